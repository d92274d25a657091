// The CPU attention kernels (attention_kernel_body.h) compiled for any CPU the build
// targets, with at::vec's portable vectors.
#include "attention_kernel_body.h"
