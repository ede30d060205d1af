"""Differentiable interval ops on centre-radius boxes ``(mu, r)``, ``r >= 0``.

Each op is a ``torch.library`` custom op (``torch.ops.adcert.<name>``) with a schema, a fake
kernel and registered autograd, so it also works under ``torch.compile``. CPU tensors run the
C++ kernels of ``adcert._C``; CUDA tensors run the Triton kernels (``adcert.kernels``).
``adcert.ops.reference`` holds the plain-torch reference of every op. Without ``adcert._C`` (an
install without a compiler) ``import adcert`` still works and each op below runs its reference,
with one warning that says how to build the extension (``adcert info`` shows the active path;
``adcert.ops._extension``); an ``adcert._C`` built against another torch makes the ops raise an
ImportError that says how to rebuild it. On CPU each op checks its
box for NaN and negative radii (one fused pass); ``with adcert.ops.value_checks(False):`` skips
that pass for boxes you have already validated.

    interval_linear(mu, r, weight, bias=None)                            -> (mu, r)
    interval_conv2d(mu, r, weight, bias=None, stride=1, padding=0, dilation=1, groups=1)
    interval_batch_norm(mu, r, mean, var, weight=None, bias=None, eps=1e-5)
    interval_relu(mu, r)
    interval_linear_bn_relu(mu, r, weight, bias=None, bn_mean=None, bn_var=None,
                            bn_weight=None, bn_bias=None, bn_eps=1e-5, relu=True)
    interval_conv2d_bn_relu(mu, r, weight, bias=None, bn_mean=None, ..., stride=1, padding=0,
                            dilation=1, groups=1, relu=True)
    adcert_loss(student_adv_logits, teacher_logits, margin_lb, alpha, tau=1.0, reduction="mean",
                clean_logits=None, adv_weight=5/6)                        -> loss
    brent_step(state, f, xtol, rtol, max_iter)   -> state   (batched Brent step, adcert.radius)
"""
from adcert.ops import _extension  # noqa: F401
# importing the op modules loads adcert._C when it is there (it registers torch.ops.adcert.* and
# the CPU kernels); without it they run adcert.ops.reference (adcert.ops._extension)
from adcert.ops import reference  # noqa: E402,F401
from adcert.ops.adcert_loss import adcert_loss  # noqa: E402
from adcert.ops.brent_step import brent_step  # noqa: E402
from adcert.ops.interval_batch_norm import interval_batch_norm  # noqa: E402
from adcert.ops.interval_conv2d import interval_conv2d  # noqa: E402
from adcert.ops.interval_conv2d_bn_relu import interval_conv2d_bn_relu  # noqa: E402
from adcert.ops.interval_linear import interval_linear  # noqa: E402
from adcert.ops.interval_linear_bn_relu import interval_linear_bn_relu  # noqa: E402
from adcert.ops.interval_relu import interval_relu  # noqa: E402
from adcert.ops._checks import value_checks  # noqa: E402
from adcert.ops._extension import register_gpu_kernels as _register_gpu_kernels  # noqa: E402

GPU_KERNELS = _register_gpu_kernels()

__all__ = ["interval_linear", "interval_conv2d", "interval_batch_norm", "interval_relu",
           "interval_linear_bn_relu", "interval_conv2d_bn_relu", "reference", "value_checks",
           "adcert_loss", "brent_step"]
