// What every CPU attention op does before its kernel runs: the problem a call describes,
// and the choice of the kernels' instruction set.
#include "attention_kernel.h"

#include <ATen/Dispatch.h>
#include <ATen/Version.h>

#include <limits>
#include <string>

namespace lmkern {

namespace {

// Whether the mask's values depend on the key only: a (B, 1, 1, Lk) mask broadcast.
bool depends_on_key_only(const at::Tensor& mask) {
  return (mask.size(1) == 1 || mask.stride(1) == 0) && (mask.size(2) == 1 || mask.stride(2) == 0);
}

// mask[b, 0, 0, :] for every b, as the bias added to the scores.
std::vector<float> read_key_bias(const at::Tensor& mask) {
  const int64_t batch = mask.size(0), keys = mask.size(3);
  std::vector<float> bias(batch * keys);
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, mask.scalar_type(), "attention_key_bias", [&] {
    const scalar_t* m = mask.const_data_ptr<scalar_t>();
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t j = 0; j < keys; ++j) {
        const scalar_t value = m[b * mask.stride(0) + j * mask.stride(3)];
        if constexpr (std::is_same_v<scalar_t, bool>) {
          bias[b * keys + j] = value ? 0.0f : -std::numeric_limits<float>::infinity();
        } else {
          bias[b * keys + j] = static_cast<float>(value);
        }
      }
    }
  });
  return bias;
}

}  // namespace

AttentionProblem make_attention_problem(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
    bool is_causal, int64_t causal_shift, double scale, double dropout_p, int64_t seed, int64_t window_left,
    const std::optional<at::Tensor>& relative_bias) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, "attention: dropout_p must be in [0, 1], got ", dropout_p);
  TORCH_CHECK(window_left >= -1, "attention: window_left must be >= -1 (-1: no window), got ", window_left);
  AttentionProblem p{};
  p.batch = q.size(0);
  p.heads = q.size(1);
  p.kv_heads = k.size(1);
  p.seqlen_q = q.size(2);
  p.seqlen_k = k.size(2);
  p.head_dim = q.size(3);
  p.head_dim_v = v.size(3);
  p.scale = static_cast<float>(scale);
  p.causal = is_causal;
  p.window_left = window_left;
  p.kv_len.assign(p.batch, p.seqlen_k);
  p.shift.assign(p.batch, causal_shift);
  p.mask = nullptr;
  if (mask.has_value() && depends_on_key_only(*mask)) {
    p.key_bias = read_key_bias(*mask);
  } else if (mask.has_value()) {
    p.mask = mask->const_data_ptr();
    p.mask_dtype = mask->scalar_type();
    for (int d = 0; d < 4; ++d) {
      p.mask_stride[d] = mask->stride(d);
    }
  }
  if (relative_bias.has_value()) {
    TORCH_CHECK(
        p.mask == nullptr, "attention: relative_bias takes a mask that depends on the key only (B, 1, 1, Lk), or ",
        "none; fold an element-wise mask into relative_bias's materialised form instead");
    // Query i's bias is the slice relative_bias[h, Lq - 1 - i : Lq - 1 - i + Lk]: an
    // element-wise mask starting at column Lq - 1 with query stride -1, so that the kernels
    // read it as any other mask, without an (H, Lq, Lk) copy.
    const at::Tensor& bias = *relative_bias;
    p.mask = static_cast<const char*>(bias.const_data_ptr()) + std::max<int64_t>(p.seqlen_q - 1, 0) * bias.stride(1) * bias.element_size();
    p.mask_dtype = bias.scalar_type();
    p.mask_stride[0] = 0;
    p.mask_stride[1] = bias.size(0) == 1 ? 0 : bias.stride(0);
    p.mask_stride[2] = -bias.stride(1);
    p.mask_stride[3] = bias.stride(1);
  }
  p.dropout_p = static_cast<float>(dropout_p);
  p.keep_scale = dropout_p >= 1.0 ? 0.0f : static_cast<float>(1.0 / (1.0 - dropout_p));
  p.seed = static_cast<uint64_t>(seed);
  return p;
}

#if !defined(LMKERN_ATTENTION_X86_KERNELS)
const AttentionKernels* attention_kernels_avx512() {
  return nullptr;
}
const AttentionKernels* attention_kernels_avx2() {
  return nullptr;
}
#endif

const AttentionKernels& attention_kernels() {
  static const AttentionKernels* kernels = [] {
    const std::string capability = at::get_cpu_capability();
    const AttentionKernels* chosen = capability == "AVX512" ? attention_kernels_avx512() : nullptr;
    if (chosen == nullptr && (capability == "AVX512" || capability == "AVX2")) {
      chosen = attention_kernels_avx2();
    }
    return chosen != nullptr ? chosen : attention_kernels_default();
  }();
  return *kernels;
}

}  // namespace lmkern
