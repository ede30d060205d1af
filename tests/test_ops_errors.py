"""Bad input to the ops raises a clear error naming the argument."""
from __future__ import annotations

import pytest
import torch

import adcert
from adcert import ops


def _box(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype), torch.rand(*shape, dtype=dtype)


def test_shape_mismatch_between_mu_and_r():
    with pytest.raises(ValueError, match="r: expected the shape of mu"):
        ops.interval_relu(torch.zeros(2, 3), torch.zeros(2, 4))


def test_dtype_mismatch():
    with pytest.raises(TypeError, match="r: expected the dtype of mu"):
        ops.interval_relu(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64))
    mu, r = _box(2, 3)
    with pytest.raises(TypeError, match="weight: expected dtype torch.float32"):
        ops.interval_linear(mu, r, torch.zeros(4, 3, dtype=torch.float64))


def test_integer_tensor_and_non_tensor():
    with pytest.raises(TypeError, match="mu: expected a floating-point tensor"):
        ops.interval_relu(torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="mu: expected a torch.Tensor, got list"):
        ops.interval_relu([1.0, 2.0], torch.zeros(2))
    mu, r = _box(2, 3)
    with pytest.raises(TypeError, match="weight: expected a torch.Tensor"):
        ops.interval_linear(mu, r, None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cpu_is_refused_naming_the_argument(dtype):
    """The CPU kernels implement float32 and float64: other float dtypes are refused by the
    Python checks (naming the argument and the supported dtypes), not inside the kernel."""
    msg = rf"^mu: expected a float32 or float64 tensor .*cpu.*got dtype {dtype}"
    mu, r = _box(2, 3, 6, 6, dtype=dtype)
    w = torch.zeros(4, 3, 3, 3, dtype=dtype)
    fmu, fr, fw = mu.flatten(1), r.flatten(1), torch.zeros(4, 108, dtype=dtype)
    stats = torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype)
    calls = [lambda: ops.interval_conv2d(mu, r, w),
             lambda: ops.interval_conv2d_bn_relu(mu, r, w),
             lambda: ops.interval_linear(fmu, fr, fw),
             lambda: ops.interval_linear_bn_relu(fmu, fr, fw),
             lambda: ops.interval_batch_norm(mu, r, *stats),
             lambda: ops.interval_relu(mu, r)]
    for call in calls:
        with pytest.raises(TypeError, match=msg):
            call()
    with pytest.raises(TypeError, match=r"^weight: expected a float32 or float64 tensor"):
        ops.interval_linear(fmu.float(), fr.float(), fw)  # a parameter is named the same way


def test_negative_radius_and_nan():
    mu, r = _box(2, 3)
    with pytest.raises(ValueError, match="r: the radius must be >= 0"):
        ops.interval_relu(mu, -r - 1)
    bad = mu.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="mu: contains NaN"):
        ops.interval_linear(bad, r, torch.zeros(4, 3))
    bad_r = r.clone()
    bad_r[1, 1] = float("nan")
    with pytest.raises(ValueError, match="r: contains NaN"):
        ops.interval_relu(mu, bad_r)


def test_wrong_weight_shapes():
    mu, r = _box(2, 3)
    with pytest.raises(ValueError, match=r"weight: expected shape \[out, 3\]"):
        ops.interval_linear(mu, r, torch.zeros(4, 5))
    with pytest.raises(ValueError, match=r"bias: expected shape \(4,\)"):
        ops.interval_linear(mu, r, torch.zeros(4, 3), torch.zeros(5))
    cmu, cr = _box(1, 3, 8, 8)
    with pytest.raises(ValueError, match="weight: expected 3 input channels per group"):
        ops.interval_conv2d(cmu, cr, torch.zeros(4, 2, 3, 3))
    with pytest.raises(ValueError, match="mu: expected a 4-D tensor"):
        ops.interval_conv2d(*_box(3, 8, 8), torch.zeros(4, 3, 3, 3))
    with pytest.raises(ValueError, match="too small for kernel"):
        ops.interval_conv2d(*_box(1, 3, 2, 2), torch.zeros(4, 3, 3, 3))
    with pytest.raises(TypeError, match="stride: expected an int or a pair"):
        ops.interval_conv2d(cmu, cr, torch.zeros(4, 3, 3, 3), stride="2")


def test_batch_norm_arguments():
    mu, r = _box(2, 3, 4, 4)
    w = torch.zeros(5, 3, 1, 1)
    with pytest.raises(ValueError, match="bn_mean, bn_var: give both"):
        ops.interval_conv2d_bn_relu(mu, r, w, bn_mean=torch.zeros(5))
    with pytest.raises(ValueError, match=r"bn_var: expected shape \(5,\)"):
        ops.interval_conv2d_bn_relu(mu, r, w, bn_mean=torch.zeros(5), bn_var=torch.ones(3))
    with pytest.raises(ValueError, match="bn_var: bn_var \\+ bn_eps must be > 0"):
        ops.interval_batch_norm(mu, r, torch.zeros(3), -torch.ones(3), None, None, 1e-5)
    with pytest.raises(ValueError, match="bn_weight, bn_bias: batch-norm parameters need"):
        ops.interval_conv2d_bn_relu(mu, r, w, bn_weight=torch.ones(5))


def test_device_mismatch_is_reported():
    mu, r = _box(2, 3)
    meta_w = torch.zeros(4, 3, device="meta")
    with pytest.raises(ValueError, match="weight: expected device cpu"):
        ops.interval_linear(mu, r, meta_w)


def test_extension_load_error_says_how_to_fix(monkeypatch):
    import builtins

    from adcert.ops import _extension

    real_import = builtins.__import__

    def fake_import(name, globals=None, locals=None, fromlist=(), level=0):
        if fromlist and "_C" in fromlist and name == "adcert":
            raise ImportError("/x/_C.so: undefined symbol: _ZN3c104impl")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="(?s)built against a different torch.*pip install "
                                          "--no-build-isolation -e ."):
        _extension.load_extension()
    assert adcert.__version__


def test_value_checks_can_be_switched_off_and_restore():
    mu, r = _box(2, 3)
    with ops.value_checks(False):
        ops.interval_relu(mu, -r - 1)  # not checked: the caller vouches for the box
        with pytest.raises(ValueError, match="r: expected the shape of mu"):
            ops.interval_relu(mu, r[:, :2])  # shape checks always run
    with pytest.raises(ValueError, match="r: the radius must be >= 0"):
        ops.interval_relu(mu, -r - 1)
