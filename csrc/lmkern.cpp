// lmkern._C: every op schema, defined once. Each device registers its kernels in
// csrc/cpu/<op>.cpp and csrc/cuda/<op>.cpp; Python adds fake (meta) implementations in
// lmkern/ops/<op>/native.py so that torch.compile can trace the ops.
#include <Python.h>
#include <torch/library.h>

#ifndef LMKERN_WITH_CUDA
#define LMKERN_WITH_CUDA 0  // setup.py defines it as 1 when it builds the CUDA kernels
#endif

// Importing lmkern._C loads this library, which registers the ops below with torch. The
// module's one attribute, with_cuda, says whether the library holds CUDA kernels.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && PyModule_AddIntConstant(module, "with_cuda", LMKERN_WITH_CUDA) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}

TORCH_LIBRARY(lmkern, m) {
  // Fused softmax cross-entropy forward over rows of logits (N, V), last dim contiguous.
  // Returns the per-row loss (N,) in fp32 and the gradient of each row's loss with
  // respect to its logits, (N, V) in the logits' dtype. Ignored rows get loss 0 and a
  // zero gradient. A target outside [0, V) that is not ignore_index raises ValueError on
  // CPU; on CUDA, where checking would stall the stream, its row gets NaN loss and gradient.
  m.def(
      "cross_entropy_fwd(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, float z_loss) -> (Tensor, Tensor)");
  // The same, writing the gradient over the logits in place; returns the per-row loss.
  m.def(
      "cross_entropy_fwd_(Tensor(a!) logits, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, float z_loss) -> Tensor");

  // LayerNorm of s = residual + dropout(x) over rows (N, D), last dims contiguous, x and
  // residual float32/float16/bfloat16, weight and bias (D,) float32 or absent. The element
  // row * D + col is dropped when philox_uniform(seed, row * D + col) < dropout_p
  // (csrc/dropout.h). Returns out (N, D) in x's dtype, mean and rstd (N,) float32, and s
  // (N, D) if keep_sum (else an empty tensor); s is normalised as stored. With rms (RMSNorm:
  // lmkern.rms_norm, add_rms_norm) the row is not centred: rstd = 1 / sqrt(mean(s^2) + eps),
  // out = s rstd w; bias must be absent and mean is returned empty.
  m.def(
      "layer_norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, "
      "float dropout_p, SymInt seed, bool keep_sum, bool rms=False) -> (Tensor, Tensor, Tensor, Tensor)");
  // Its backward from the normalised rows s: returns ds (N, D) (plus grad_sum, the gradient
  // that reached s directly), dx = dropout(ds) (N, D) if dropout_p > 0 (else empty), and the
  // float32 weight and bias gradients (D,) (empty without weight, or unless has_bias),
  // summed deterministically. With rms, the backward of the RMSNorm forward (mean is not
  // read and may be empty; has_bias must be false).
  m.def(
      "layer_norm_bwd(Tensor grad_out, Tensor? grad_sum, Tensor summed, Tensor? weight, Tensor mean, "
      "Tensor rstd, float dropout_p, SymInt seed, bool has_bias, bool rms=False) -> (Tensor, Tensor, Tensor, Tensor)");
  // A linear layer with a fused epilogue: pre = x @ weight.T + bias, out = residual +
  // dropout(act(pre)), act "gelu", "gelu_tanh" or "none". x (N, K) and weight (F, K) in one
  // float dtype, bias (F,) float32. Returns out (N, F) and pre (N, F) if keep_preactivation
  // and act is not "none" (else empty).
  m.def(
      "linear_gelu_fwd(Tensor x, Tensor weight, Tensor? bias, str activation, bool keep_preactivation, "
      "float dropout_p, SymInt seed, Tensor? residual) -> (Tensor, Tensor)");
  // The epilogue's backward: returns grad_pre = act'(pre) * dropout(grad_out) (N, F), its
  // float32 column sums (F,) (the bias gradient, deterministic), and act(pre) (N, F) if
  // want_activation (else empty). preactivation is given exactly when act is not "none".
  m.def(
      "linear_gelu_bwd(Tensor grad_out, Tensor? preactivation, str activation, float dropout_p, SymInt seed, "
      "bool want_activation) -> (Tensor, Tensor, Tensor)");
  // The same, writing grad_pre over grad_out (contiguous); returns the bias gradient and act(pre).
  m.def(
      "linear_gelu_bwd_(Tensor(a!) grad_out, Tensor? preactivation, str activation, float dropout_p, "
      "SymInt seed, bool want_activation) -> (Tensor, Tensor)");
  // The gated feed-forward's first half: gate = x @ w_gate.T and up = x @ w_up.T, ATen's
  // matmuls writing one (2, N, F) buffer, and h = act(gate) * up, act "silu", "gelu" or
  // "gelu_tanh", in fp32. x (N, D) and w_gate, w_up (F, D) in one float dtype. Returns h
  // (N, F) and the buffer gate_up (2, N, F) (gate_up[0] = gate, gate_up[1] = up).
  m.def("swiglu_fwd(Tensor x, Tensor w_gate, Tensor w_up, str activation) -> (Tensor, Tensor)");
  // Its epilogue's backward, in place, on (R, F) rows with contiguous last dims: grad_gate
  // holds d(h) and receives d(gate) = d(h) up act'(gate); grad_up receives d(up) =
  // d(h) act(gate). Returns h = act(gate) * up (R, F) if want_activation (else empty).
  m.def(
      "swiglu_bwd_(Tensor(a!) grad_gate, Tensor(b!) grad_up, Tensor gate, Tensor up, str activation, "
      "bool want_activation) -> Tensor");
  // Flash attention forward. q (B, H, Lq, D), k (B, H_kv, Lk, D), v (B, H_kv, Lk, Dv), H a
  // multiple of H_kv (query head h reads key/value head h // (H / H_kv)), each contiguous
  // in its last dimension; mask None or (B, H, Lq, Lk) bool (True takes part) or float
  // added to the scores, any strides. Query i sees key j when j <= i + causal_shift if is_causal
  // (shift 0: torch's top-left alignment; Lk - Lq: bottom-right), and when window_left >= 0
  // (a sliding window; -1: none) only if j >= i + causal_shift - window_left. Returns
  // out (B, H, Lq, Dv) in q's dtype and lse (B, H, Lq) fp32, the logsumexp of each row's
  // scores: +inf for a row that sees no key, whose out is 0. Dropout keeps probability
  // (b, h, i, j) when philox_uniform(seed, ((b H + h) Lq + i) Lk + j) >= dropout_p
  // (csrc/philox.h), and scales it by 1 / (1 - dropout_p). relative_bias None or (H | 1,
  // Lq + Lk - 1) float, any strides, adds relative_bias[h, j - i + Lq - 1] to the score of
  // query i and key j (T5's position bias per distance); mask must then be None or depend
  // on the key only (B, H, Lq, Lk broadcast from B, 1, 1, Lk). CPU only.
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, bool is_causal, SymInt causal_shift, "
      "float scale, float dropout_p, SymInt seed, int window_left=-1, Tensor? relative_bias=None) "
      "-> (Tensor, Tensor)");
  // Its backward from the forward's out and lse: (dq, dk, dv) shaped like q, k, v.
  m.def(
      "attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? mask, "
      "bool is_causal, SymInt causal_shift, float scale, float dropout_p, SymInt seed, int window_left=-1, "
      "Tensor? relative_bias=None) -> (Tensor, Tensor, Tensor)");
  // The gradient of an additive (float) mask, from the same arguments as attention_bwd's
  // but the mask: here the mask as the caller holds it, 4-D (B | 1, H | 1, Lq | 1, Lk | 1),
  // broadcast over the dimensions where it has size 1, any strides. Returns dmask = P (dP -
  // delta), the scores' gradient, summed over those dimensions, in the mask's shape (contiguous)
  // and dtype: deterministic, no (B, H, Lq, Lk) buffer. CPU only (the CUDA kernels take
  // boolean key-padding masks only).
  m.def(
      "attention_mask_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor mask, "
      "bool is_causal, SymInt causal_shift, float scale, float dropout_p, SymInt seed, int window_left=-1, "
      "Tensor? relative_bias=None) -> Tensor");
  // The gradient of relative_bias, from attention_bwd's arguments: d relative_bias[h, t] =
  // dS summed over the batch (and the heads where it has one) and over the (i, j) with
  // j - i + Lq - 1 = t, in relative_bias's shape (contiguous) and dtype; deterministic, no
  // (H, Lq, Lk) buffer. CPU only.
  m.def(
      "attention_relative_bias_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? mask, Tensor relative_bias, bool is_causal, SymInt causal_shift, float scale, float dropout_p, "
      "SymInt seed, int window_left=-1) -> Tensor");
  // Rotary position embeddings of x (B, H, L, D), any strides, float32/float16/bfloat16.
  // cos and sin (P, R / 2), contiguous, one float dtype, R <= D: row p holds cos(p theta_i)
  // and sin(p theta_i). positions (B, L) int64, any strides: token l of sequence b sits at
  // positions[b, l]. Pair i of each head, (x_i, x_{i + R/2}) or, if interleaved,
  // (x_{2i}, x_{2i+1}), turns by p theta_i (by -p theta_i if conjugate: the backward):
  // out_1 = x_1 cos - x_2 sin, out_2 = x_2 cos + x_1 sin, in fp32; the last D - R elements
  // pass through. A position outside [0, P) raises ValueError on CPU; on CUDA, where
  // checking would stall the stream, that token's rotated part is NaN. Returns a new
  // contiguous (B, H, L, D) tensor in x's dtype.
  m.def(
      "apply_rotary(Tensor x, Tensor cos, Tensor sin, Tensor positions, bool interleaved, bool conjugate) "
      "-> Tensor");
  // The same, rotating x in place.
  m.def(
      "apply_rotary_(Tensor(a!) x, Tensor cos, Tensor sin, Tensor positions, bool interleaved, bool conjugate) "
      "-> ()");
  // Decoding: writes k_new, v_new (B, H_kv, L_new, D | Dv) into k_cache, v_cache
  // (B, H_kv, L_max, D | Dv) at positions cache_seqlens[b] (int32 or int64) onwards, then
  // attends q (B, H, Lq, D) over each sequence's keys with bottom-right causal alignment:
  // query i sees the positions up to p_i = cache_seqlens[b] + L_new - Lq + i, and when
  // window_left >= 0 (a sliding window; -1: none) only those from p_i - window_left on.
  // Returns (B, H, Lq, Dv). A sequence whose new keys do not fit raises ValueError on CPU.
  // With rotary_cos and rotary_sin ((P, R / 2), contiguous, one float dtype, as
  // apply_rotary's), k_new is rotated at positions cache_seqlens[b] + j before it is
  // written, and q (not modified) at its positions cache_seqlens[b] + L_new - Lq + i (0
  // where negative) as it is read; pairs as apply_rotary's, interleaved if
  // rotary_interleaved. A position past P raises ValueError on CPU; on CUDA the rotated
  // values there are NaN.
  m.def(
      "attention_with_kv_cache_fwd(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens, "
      "Tensor? k_new, Tensor? v_new, float scale, Tensor? rotary_cos=None, Tensor? rotary_sin=None, "
      "bool rotary_interleaved=False, int window_left=-1) -> Tensor");
}
