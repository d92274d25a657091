// The CPU attention kernels (attention_kernel_body.h) compiled for AVX2 and FMA, torch's
// "AVX2" capability, where this compiler can (attention_kernel.cpp says nullptr elsewhere).
#include "attention_kernel.h"
#if defined(LMKERN_ATTENTION_X86_KERNELS)
#define LMKERN_ATTENTION_AVX2
#include "attention_kernel_body.h"
#endif
