// lmkern._C: every op schema, defined once. Each device registers its kernels in
// csrc/cpu/<op>.cpp and csrc/cuda/<op>.cpp; Python adds fake (meta) implementations in
// lmkern/ops/<op>/native.py so that torch.compile can trace the ops.
#include <Python.h>
#include <torch/library.h>

// Importing lmkern._C loads this library, which registers the ops below with torch.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
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
}
