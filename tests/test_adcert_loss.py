"""``adcert.ops.adcert_loss`` (fused C++ op) against the fp64 plain-torch composite
(``F.kl_div`` / ``log_softmax`` / ``logsumexp``), its gradients, opcheck and argument errors."""
import pytest
import torch
import torch.nn.functional as F

from adcert import ops
from adcert.ops import reference as ref


def _composite(s, t, m, alpha, tau, reduction="mean", clean=None, adv_weight=5 / 6):
    """Independent fp64 composite (written out here, not the module's reference)."""
    s, t, m = s.double(), t.detach().double(), m.double()
    log_t = F.log_softmax(t / tau, 1)

    def kd(x):
        return tau ** 2 * F.kl_div(F.log_softmax(x / tau, 1), log_t, reduction="none",
                                   log_target=True).sum(1)

    distill = kd(s) if clean is None else (1 - adv_weight) * kd(clean.double()) + adv_weight * kd(s)
    loss = (1 - alpha) * distill + alpha * torch.logsumexp(-m, 1)
    return {"mean": loss.mean, "sum": loss.sum, "none": lambda: loss}[reduction]()


def _inputs(B, C, dtype, kind="randn", scale=3.0, clean=False):
    s = torch.randn(B, C, dtype=torch.float64) * scale
    if kind == "extreme":
        t = torch.randn(B, C, dtype=torch.float64) * 1e4
        s = torch.randn(B, C, dtype=torch.float64) * 1e4
        s[:, 0] = 1e4
        t[:, 1] = -1e4
    elif kind == "onehot":
        t = torch.full((B, C), -30.0, dtype=torch.float64)
        t[torch.arange(B), torch.randint(C, (B,))] = 30.0
    elif kind == "uniform":
        t = torch.zeros(B, C, dtype=torch.float64)
    else:
        t = torch.randn(B, C, dtype=torch.float64) * scale
    m = torch.randn(B, C, dtype=torch.float64) * scale
    if kind == "extreme":
        m = m * 3e3
    y = torch.randint(C, (B,))
    m[torch.arange(B), y] = 0.0
    c = torch.randn(B, C, dtype=torch.float64) * scale if clean else None
    out = [x.to(dtype).requires_grad_() if x is not None else None for x in (s, t, m, c)]
    return out


def _tol(dtype, kind):
    if dtype == torch.float64:
        return dict(rtol=1e-9, atol=1e-9 if kind != "extreme" else 1e-7)
    # fp32 logits near 1e4 carry ~1e-3 absolute rounding of their own
    return dict(rtol=1e-4, atol=1e-4 if kind != "extreme" else 2e-2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("C", [10, 200, 1000])
@pytest.mark.parametrize("kind", ["randn", "extreme", "onehot", "uniform"])
@pytest.mark.parametrize("tau", [1.0, 4.0])
@pytest.mark.parametrize("clean", [False, True])
def test_matches_composite(dtype, C, kind, tau, clean):
    B = 17
    s, t, m, c = _inputs(B, C, dtype, kind, clean=clean)
    weights = torch.rand(B, dtype=torch.float64) * 2 - 0.5  # grad_output != 1, per sample
    for alpha in (0.0, 1.0, 0.37):
        kw = dict(clean_logits=c, adv_weight=0.7) if clean else {}
        ckw = dict(clean=c, adv_weight=0.7) if clean else {}
        got = ops.adcert_loss(s, t, m, alpha, tau, "none", **kw)
        want = _composite(s, t, m, alpha, tau, "none", **ckw)
        assert got.shape == (B,) and got.dtype == dtype
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, **_tol(dtype, kind))
        leaves = [s, m] + ([c] if clean else [])
        g_got = torch.autograd.grad(got, leaves, weights.to(dtype))
        g_want = torch.autograd.grad(want, leaves, weights)
        for a, b in zip(g_got, g_want):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a.double(), b.double(), **_tol(dtype, kind))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("clean", [False, True])
def test_reductions_and_reference(reduction, clean):
    s, t, m, c = _inputs(32, 10, torch.float64, clean=clean)
    kw = dict(clean_logits=c) if clean else {}
    got = ops.adcert_loss(s, t, m, 0.37, 2.0, reduction, **kw)
    want = _composite(s, t, m, 0.37, 2.0, reduction, **(dict(clean=c) if clean else {}))
    mod = ref.adcert_loss(s, t, m, 0.37, 2.0, reduction, **kw)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mod, want, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(got)
    leaves = [s, m] + ([c] if clean else [])
    for a, b in zip(torch.autograd.grad(got, leaves, g), torch.autograd.grad(want, leaves, g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_default_is_ad_cert_eq10():
    """tau = 1, no clean logits: (1 - a) KL(P_T || P_S(x_adv)) + a CE([0, -m_lb], y)."""
    s, t, m, _ = _inputs(8, 10, torch.float64)
    y = (m == 0).float().argmax(1)
    kl = F.kl_div(F.log_softmax(s, 1), F.softmax(t, 1), reduction="batchmean")
    others = torch.stack([torch.cat([m[i, :y[i]], m[i, y[i] + 1:]]) for i in range(8)])
    ce = F.cross_entropy(torch.cat([torch.zeros(8, 1, dtype=m.dtype), -others], 1),
                         torch.zeros(8, dtype=torch.long))
    torch.testing.assert_close(ops.adcert_loss(s, t, m, 0.3), 0.7 * kl + 0.3 * ce)


def test_rslad_weights():
    s, t, m, c = _inputs(8, 10, torch.float64, clean=True)
    kd = lambda x: ops.adcert_loss(x, t, m, 0.0, 1.0, "none")  # noqa: E731
    got = ops.adcert_loss(s, t, m, 0.0, 1.0, "none", clean_logits=c)
    torch.testing.assert_close(got, kd(c) / 6 + kd(s) * 5 / 6)
    got = ops.adcert_loss(s, t, m, 0.0, 1.0, "none", clean_logits=c, adv_weight=1.0)
    torch.testing.assert_close(got, kd(s))


def test_teacher_gets_no_gradient():
    s, t, m, c = _inputs(4, 10, torch.float64, clean=True)
    loss = ops.adcert_loss(s, t, m, 0.5, clean_logits=c)
    loss.backward()
    assert t.grad is None
    assert s.grad is not None and m.grad is not None and c.grad is not None
    out = torch.ops.adcert.adcert_loss(s, t, m, c, 0.5, 1.0, 5 / 6)[0]
    assert torch.autograd.grad(out.sum(), t, allow_unused=True)[0] is None


@pytest.mark.parametrize("clean", [False, True])
def test_gradcheck(clean):
    s, t, m, c = _inputs(3, 5, torch.float64, clean=clean)
    t = t.detach()
    if clean:
        f = lambda s, m, c: ops.adcert_loss(s, t, m, 0.37, 2.0, "none", clean_logits=c)  # noqa
        assert torch.autograd.gradcheck(f, (s, m, c))
    else:
        f = lambda s, m: ops.adcert_loss(s, t, m, 0.37, 2.0, "none")  # noqa: E731
        assert torch.autograd.gradcheck(f, (s, m))


@pytest.mark.parametrize("clean", [False, True])
def test_opcheck(clean):
    s, t, m, c = _inputs(4, 7, torch.float64, clean=clean)
    torch.library.opcheck(torch.ops.adcert.adcert_loss, (s, t.detach(), m, c, 0.37, 2.0, 0.8))
    torch.library.opcheck(torch.ops.adcert.adcert_loss,
                          (s.detach(), t.detach(), m.detach(), None, 0.5, 1.0, 0.8))


def test_compile():
    s, t, m, _ = _inputs(6, 10, torch.float32)
    f = torch.compile(lambda s, t, m: ops.adcert_loss(s, t, m, 0.4, 2.0), backend="eager",
                      fullgraph=False)
    torch.testing.assert_close(f(s, t, m), ops.adcert_loss(s, t, m, 0.4, 2.0))


def test_noncontiguous_and_empty():
    base = torch.randn(6, 20, dtype=torch.float64)
    s, t, m = base[:, ::2], base[:, 1::2], base[:, ::2].abs()
    torch.testing.assert_close(ops.adcert_loss(s, t, m, 0.5, reduction="none"),
                               _composite(s, t, m, 0.5, 1.0, "none"))
    e = torch.zeros(0, 10)
    assert ops.adcert_loss(e, e, e, 0.5, reduction="none").shape == (0,)


def _ok():
    s, t, m, c = _inputs(4, 10, torch.float32, clean=True)
    return s, t, m, c


@pytest.mark.parametrize("which", ["student_adv_logits", "teacher_logits", "margin_lb",
                                   "clean_logits"])
@pytest.mark.parametrize("alpha,adv_weight", [(0.5, 0.8), (0.0, 1.0), (1.0, 0.0)])
def test_nan_names_argument(which, alpha, adv_weight):
    s, t, m, c = [x.detach().clone() for x in _ok()]
    {"student_adv_logits": s, "teacher_logits": t, "margin_lb": m, "clean_logits": c}[which][1, 2] \
        = float("nan")
    with pytest.raises(ValueError, match=which + ": contains NaN"):
        ops.adcert_loss(s, t, m, alpha, clean_logits=c, adv_weight=adv_weight)
    if which != "clean_logits":
        with pytest.raises(ValueError, match=which + ": contains NaN"):
            ops.adcert_loss(s, t, m, alpha)
    # the raw op propagates NaN into the row's loss (what the wrapper's check relies on)
    loss = torch.ops.adcert.adcert_loss(s, t, m, c, alpha, 1.0, adv_weight)[0]
    assert torch.isnan(loss[1]).item() and not torch.isnan(loss[0]).item()


def test_inf_names_argument():
    s, t, m, _ = [x.detach().clone() for x in _ok()]
    t[0, 0] = float("inf")
    with pytest.raises(ValueError, match="teacher_logits: contains inf"):
        ops.adcert_loss(s, t, m, 0.5)


def test_value_checks_off_skips_nan_check():
    s, t, m, _ = [x.detach().clone() for x in _ok()]
    m[0, 0] = float("nan")
    with ops.value_checks(False):
        assert torch.isnan(ops.adcert_loss(s, t, m, 0.5))


def test_bad_arguments():
    s, t, m, c = [x.detach() for x in _ok()]
    with pytest.raises(ValueError, match="teacher_logits: expected the shape"):
        ops.adcert_loss(s, t[:, :5], m, 0.5)
    with pytest.raises(ValueError, match="margin_lb: expected the shape"):
        ops.adcert_loss(s, t, m[:3], 0.5)
    with pytest.raises(ValueError, match="clean_logits: expected the shape"):
        ops.adcert_loss(s, t, m, 0.5, clean_logits=c[:, :3])
    with pytest.raises(ValueError, match=r"student_adv_logits: expected a \[B, C\]"):
        ops.adcert_loss(s[0], t[0], m[0], 0.5)
    with pytest.raises(TypeError, match="margin_lb: expected the dtype"):
        ops.adcert_loss(s, t, m.double(), 0.5)
    with pytest.raises(TypeError, match="student_adv_logits: expected a float32 or float64"):
        ops.adcert_loss(s.half(), t.half(), m.half(), 0.5)
    with pytest.raises(TypeError, match="teacher_logits: expected a torch.Tensor"):
        ops.adcert_loss(s, None, m, 0.5)
    with pytest.raises(ValueError, match="alpha"):
        ops.adcert_loss(s, t, m, 1.5)
    with pytest.raises(ValueError, match="alpha"):
        ops.adcert_loss(s, t, m, float("nan"))
    with pytest.raises(ValueError, match="tau"):
        ops.adcert_loss(s, t, m, 0.5, tau=0.0)
    with pytest.raises(ValueError, match="adv_weight"):
        ops.adcert_loss(s, t, m, 0.5, clean_logits=c, adv_weight=-0.1)
    with pytest.raises(ValueError, match="reduction"):
        ops.adcert_loss(s, t, m, 0.5, reduction="batchmean")
    # direct op calls are guarded by the C++ checks
    with pytest.raises(RuntimeError, match="teacher must have the shape"):
        torch.ops.adcert.adcert_loss(s, t[:, :5], m, None, 0.5, 1.0, 0.8)
