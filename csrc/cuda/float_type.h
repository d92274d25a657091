// The element types lmkern's CUDA kernels take, named without torch headers so that the
// pure-CUDA launchers (csrc/cuda/*_kernels.cu) compile with nvcc alone.
#pragma once

namespace lmkern::cuda {

enum class FloatType { kFloat32, kFloat16, kBFloat16 };

}  // namespace lmkern::cuda
