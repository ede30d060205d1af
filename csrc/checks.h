// Argument checks shared by the C++ kernels. The Python wrappers validate user input with
// friendlier messages; these guard the ops when they are called directly through torch.ops.
#pragma once
#include <ATen/ATen.h>

#define ADCERT_CHECK_CPU(x) TORCH_CHECK((x).device().is_cpu(), #x " must be a CPU tensor")
#define ADCERT_CHECK_FLOAT(x)                                                        \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kDouble, \
              #x " must be float32 or float64 on CPU, got ", (x).scalar_type())
#define ADCERT_CHECK_SAME(x, y)                                                           \
  TORCH_CHECK((x).scalar_type() == (y).scalar_type(), #y " must have the dtype of " #x \
              " (", (x).scalar_type(), "), got ", (y).scalar_type())
#define ADCERT_CHECK_BOX(mu, r)                                                              \
  ADCERT_CHECK_CPU(mu);                                                                      \
  ADCERT_CHECK_CPU(r);                                                                       \
  ADCERT_CHECK_FLOAT(mu);                                                                    \
  ADCERT_CHECK_SAME(mu, r);                                                                  \
  TORCH_CHECK((mu).sizes() == (r).sizes(), "r must have the shape of mu: ", (mu).sizes(), \
              " vs ", (r).sizes())
