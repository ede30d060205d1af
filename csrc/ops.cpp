// Schemas of the adcert interval ops. Kernels register per device elsewhere:
// csrc/cpu/*_cpu.cpp (C++ CPU) and adcert/ops/_triton_impl.py (Triton, CUDA).
// Fake (meta) kernels and autograd are registered from Python (adcert/ops/*.py).
#include <Python.h>
#include <torch/library.h>

// Importing adcert._C loads this library, which runs the TORCH_LIBRARY registrations below.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(adcert, m) {
  // 0 valid, 1 NaN in mu, 2 NaN in r, 3 negative r (argument checks, CPU).
  m.def("box_status(Tensor mu, Tensor r) -> int");
  m.def("interval_linear(Tensor mu, Tensor r, Tensor weight, Tensor? bias) -> (Tensor, Tensor)");
  m.def(
      "interval_linear_backward(Tensor grad_mu, Tensor grad_r, Tensor mu, Tensor r, Tensor weight, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "interval_conv2d(Tensor mu, Tensor r, Tensor weight, Tensor? bias, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups) -> (Tensor, Tensor)");
  m.def(
      "interval_conv2d_backward(Tensor grad_mu, Tensor grad_r, Tensor mu, Tensor r, Tensor weight, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "interval_batch_norm(Tensor mu, Tensor r, Tensor mean, Tensor var, Tensor? weight, "
      "Tensor? bias, float eps) -> (Tensor, Tensor)");
  m.def(
      "interval_batch_norm_backward(Tensor grad_mu, Tensor grad_r, Tensor mu, Tensor r, "
      "Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("interval_relu(Tensor mu, Tensor r) -> (Tensor, Tensor)");
  m.def(
      "interval_relu_backward(Tensor grad_mu, Tensor grad_r, Tensor mu, Tensor r) "
      "-> (Tensor, Tensor)");
  m.def(
      "interval_linear_bn_relu(Tensor mu, Tensor r, Tensor weight, Tensor? bias, Tensor? bn_mean, "
      "Tensor? bn_var, Tensor? bn_weight, Tensor? bn_bias, float bn_eps, bool relu) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "interval_linear_bn_relu_backward(Tensor grad_mu, Tensor grad_r, Tensor mu, Tensor r, "
      "Tensor weight, Tensor? bias, Tensor? bn_mean, Tensor? bn_var, Tensor? bn_weight, "
      "Tensor? bn_bias, float bn_eps, bool relu, Tensor mu_pre, Tensor r_pre, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "interval_conv2d_bn_relu(Tensor mu, Tensor r, Tensor weight, Tensor? bias, Tensor? bn_mean, "
      "Tensor? bn_var, Tensor? bn_weight, Tensor? bn_bias, float bn_eps, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, bool relu) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "interval_conv2d_bn_relu_backward(Tensor grad_mu, Tensor grad_r, Tensor mu, Tensor r, "
      "Tensor weight, Tensor? bias, Tensor? bn_mean, Tensor? bn_var, Tensor? bn_weight, "
      "Tensor? bn_bias, float bn_eps, int[2] stride, int[2] padding, int[2] dilation, int groups, "
      "bool relu, Tensor mu_pre, Tensor r_pre, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // AD-CERT / RSLAD-CERT loss per sample and, from the same pass, its gradients w.r.t. student,
  // margin and clean logits ([B, C] each; grad_clean is empty when clean is None).
  m.def(
      "adcert_loss(Tensor student, Tensor teacher, Tensor margin, Tensor? clean, float alpha, "
      "float tau, float adv_weight) "
      "-> (Tensor loss, Tensor grad_student, Tensor grad_margin, Tensor grad_clean)");
  // One batched Brent root-search step (certified radius): state [12, B], f [B] -> new state.
  m.def("brent_step(Tensor state, Tensor f, float xtol, float rtol, int max_iter) -> Tensor");
}
