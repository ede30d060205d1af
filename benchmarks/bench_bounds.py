#!/usr/bin/env python
"""Time and peak memory of every ``compute_bounds`` method on CNN7 with CIFAR-shaped inputs.

    python benchmarks/bench_bounds.py [--device cpu|cuda] [--batches 1,16,128]
                                      [--crown-batches 1] [--crown-width 8] [--width 64]
                                      [--methods ibp,crown-ibp,crown,alpha-crown]
                                      [--variants adcert,reference,auto_LiRPA]
                                      [--repeats N] [--crown-repeats N] [--iterations 20]
                                      [--max-spec-elements N] [--no-memory] [--out FILE]
                                      [--quick]

Per (method, batch): median and p20/p80 of the per-call time (``run.time_interleaved``: the
variants of a case interleaved, after a warm-up), the peak memory growth during one call, the
speedup ``reference / adcert`` (and ``auto_LiRPA / adcert``), and how far each variant's bounds
are from adcert's (``max_rel_diff``, ``max|a - b| / (1 + |b|)`` over the margins). Variants:

* ``adcert``: ``compute_bounds(model, x, eps, method, y=y)`` (fused ops, explicit transposes);
* ``reference`` (plain torch, the same algorithm): IBP through ``adcert.ops.reference`` one op
  at a time; CROWN-family back-substitution with every layer transposed by autograd (a
  vector-Jacobian product of the layer's forward, ``torch.autograd.grad``) instead of
  ``conv_transpose2d``/``matmul``, and a ReLU relaxation written out here. ``crown`` refines
  the neurons IBP leaves unstable layer by layer (in chunks of the same size as adcert's),
  intersecting with IBP; ``alpha-crown`` then runs the same Adam loop over the final lower slopes
  (lr 0.1, decay 0.98, keep-best, the same early stop). Its bounds must equal adcert's up to
  rounding: ``--quick`` fails (exit 1) when ``max_rel_diff`` exceeds 1e-3;
* ``auto_LiRPA`` (only when ``auto_LiRPA`` is importable; ``IBP``, ``CROWN-IBP``, ``CROWN``,
  ``alpha-CROWN`` with ``C`` = the margin matrix, default ``patches`` conv mode): a different
  implementation of related algorithms, not the same numbers -- its CROWN does not intersect
  with IBP and its alpha-CROWN optimiser differs (lr 0.5) -- so ``max_rel_diff`` is reported,
  not checked. It bounds ``model[1:]``: the benchmark's ``Normalize`` is the identity, and
  auto_LiRPA 0.7.1's patches mode mishandles the constant of a ``Normalize`` in front of a conv
  (see ``tests/test_auto_lirpa_cnn.py``).

All bounds are margin lower bounds (``y`` given) in eval mode under ``torch.no_grad`` (the
certification cost; alpha-CROWN enables grad for its slopes inside); ``crown-ibp/fwdbwd`` also
times forward + backward of the CROWN-IBP loss in train mode with frozen statistics (the
training cost, adcert only). Memory: CUDA ``max_memory_allocated`` growth; CPU: the peak of
torch's CPU allocator during one call (``run.allocator_peak_growth``).

What the default run covers, and what it leaves out:

* CPU: ``ibp`` and ``crown-ibp`` at batches 1, 16, 128 (full CNN7: width 64, linear 512);
  ``crown`` and ``alpha-crown`` (20 iterations) only at batch 1 and ``--crown-width 8``
  (CNN7 at an eighth of the width, linear 64). Why: at random initialisation and
  ``eps = 2/255`` IBP leaves almost every neuron of the deeper layers unstable (width 16, batch 1:
  783, 3782, 7044, 8192, 8192 of 16384, 16384, 8192, 8192, 8192), and CROWN runs one
  backward pass per unstable neuron (batched in chunks): one call took ~26 s at width 8 and
  ~110 s at width 16 on the shared 2-core machine, and grows about 4x per width doubling
  (hours at width 64 over all variants and repeats); batches 16/128 multiply it again. Ask with
  ``--crown-batches 1,16 --crown-width 64``.
* CUDA (``--device cuda``): ``ibp`` and ``crown-ibp`` at batches 128 and 1024, ``crown`` and
  ``alpha-crown`` at batches 1 and 16 at full width (not yet timed on a GPU). Batches 128/1024
  are left out of the default: the work grows with batch x unstable neurons (tens of thousands
  per sample here), and with ``--max-spec-elements 2**25`` (adcert's GPU default) a chunk at
  batch 128 holds 2 neurons per sample, i.e. ~10^4 sequential backward passes per layer. Ask with
  ``--crown-batches 128,1024 --max-spec-elements 1073741824`` (about 4 GiB per fp32 chunk
  tensor, a few alive at once).
* Samples: the first call of each variant is the memory measurement (and the warm-up), then
  ``run.time_interleaved`` takes the samples (with one more warm-up round for calls under 1 s):
  by default 10, fewer (at least 3) when a call takes over 2 s, 3 for ``crown``/
  ``alpha-crown``. Estimated default CPU run (from single calls timed on the shared machine,
  not a full run): ~15 min on 2 cores under load, less on idle ones; crown-ibp at batch 128
  is about half of it.

``--quick`` (a smoke run, measures nothing): width 4, linear 32 (crown methods: width 2,
linear 16), batch 1, 2 repeats, 2 alpha iterations, every method and variant, reference
agreement checked.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
import traceback
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bench_common as bc  # noqa: E402
import run as runner  # noqa: E402
from adcert.bounds import clean_bn_stats, compute_bounds  # noqa: E402
from adcert.bounds.crown import default_max_spec_elements  # noqa: E402
from adcert.models import cnn7  # noqa: E402
from adcert.ops import reference as refops  # noqa: E402

Tensor = torch.Tensor
METHODS = ("ibp", "crown-ibp", "crown", "alpha-crown")
CROWN_METHODS = ("crown", "alpha-crown")
VARIANTS = ("adcert", "reference", "auto_LiRPA")
LIRPA_METHOD = {"ibp": "IBP", "crown-ibp": "CROWN-IBP", "crown": "CROWN",
                "alpha-crown": "alpha-CROWN"}
EPS = 2.0 / 255.0
MAX_SPEC_ELEMENTS = 2 ** 21  # adcert.bounds.crown's CPU default (2**25 on GPUs)
ALPHA = dict(lr=0.1, lr_decay=0.98, patience=5, tol=1e-4)  # adcert.bounds.alpha_crown's
QUICK_REF_TOL = 1e-3
SAMPLE_BUDGET_S = 20.0  # default repeats: about this long per variant, at least 3 samples
SLOW_CALL_S = 1.0  # calls slower than this get no second warm-up


# ----------------------------------------------------------------------------------------------
# The plain-torch reference: IBP with the reference ops, CROWN with autograd transposes
# ----------------------------------------------------------------------------------------------

def _blocks(model):
    """``[(layer, bn_or_None, relu)]`` of a flat cnn7 (Normalize first)."""
    mods = list(model) + [None]
    out = []
    for i, m in enumerate(mods[:-1]):
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            bn = mods[i + 1] if isinstance(mods[i + 1], torch.nn.modules.batchnorm._BatchNorm) \
                else None
            out.append((m, bn, bn is not None))
    return out


def _layer_fn(layer, bn, stats):
    """The block's affine part (conv/linear + BN with fixed statistics) as a function."""
    def f(h):
        if isinstance(layer, torch.nn.Linear):
            h = F.linear(h.flatten(1), layer.weight, layer.bias)
        else:
            h = F.conv2d(h, layer.weight, layer.bias, layer.stride, layer.padding)
        if bn is not None:
            mean, var = stats[bn]
            h = F.batch_norm(h, mean, var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return h
    return f


class RefNet:
    """A flat cnn7 (identity ``Normalize``) as the reference sees it, with its IBP pass.

    ``fns[i]``: block ``i``'s affine part (conv/linear + BN), input one-sample shape
    ``inputs[i]``; ``boxes[i]``: the IBP ``(lower, upper) [B, *shape]`` of block ``i``'s output,
    the input of the ReLU after it (every block but the last); ``last_in``: the IBP box
    ``(mu, r)`` of the last block's input (the last block itself is not run: margins fold
    the specification into it); ``(mu, r)``: the input box ``[B, 3, H, W]``."""

    def __init__(self, model, stats, x: Tensor, eps: float):
        norm = model[0]
        if not (bool((norm.mean == 0).all()) and bool((norm.std == 1).all())):
            raise ValueError("model: the reference handles an identity Normalize only, got "
                             f"{norm}")
        self.mu, self.r = bc.input_box(x, eps)
        mu, r = self.mu, self.r
        self.fns, self.inputs, self.boxes = [], [], []
        blocks = _blocks(model)
        for i, (layer, bn, relu) in enumerate(blocks):
            self.fns.append(_layer_fn(layer, bn, stats))
            self.inputs.append(tuple(mu.shape[1:]))
            if i == len(blocks) - 1:  # margins fold the specification into it: not run here
                self.last_in, self.last_layer = (mu, r), layer
                break
            if isinstance(layer, torch.nn.Linear):
                mu, r = refops.interval_linear(mu.flatten(1), r.flatten(1), layer.weight,
                                               layer.bias)
            else:
                mu, r = refops.interval_conv2d(mu, r, layer.weight, layer.bias, layer.stride,
                                               layer.padding)
            if bn is not None:
                mean, var = stats[bn]
                mu, r = refops.interval_batch_norm(mu, r, mean, var, bn.weight, bn.bias, bn.eps)
            if relu:
                self.boxes.append((mu - r, mu + r))
                mu, r = refops.interval_relu(mu, r)


def _affine_back(fn, in_shape, A: Tensor) -> Tuple[Tensor, Tensor]:
    """``A . fn(h) = A_in . h + c`` for the affine ``fn``: ``A: [B, S, *out]`` ->
    ``(A_in [B, S, *in_shape], c [B, S])``, the transpose by autograd (a VJP)."""
    B, S = A.shape[:2]
    with torch.enable_grad():
        h = torch.zeros((B * S,) + tuple(in_shape), dtype=A.dtype, device=A.device,
                        requires_grad=True)
        out = fn(h)
        (A_in,) = torch.autograd.grad(out, h, A.reshape(out.shape),
                                      create_graph=A.requires_grad)
    bias = fn(torch.zeros((1,) + tuple(in_shape), dtype=A.dtype, device=A.device))
    c = (A.reshape(out.shape) * bias).reshape(B, S, -1).sum(-1)
    return A_in.reshape((B, S) + tuple(in_shape)), c


def _relu_back(A: Tensor, box: Tuple[Tensor, Tensor], alpha: Optional[Tensor] = None
               ) -> Tuple[Tensor, Tensor]:
    """``A . relu(z) >= A_new . z + c`` on ``box = (l, u) [B, *shape]``: lower line ``alpha z``
    (default: 1 where ``u >= -l`` else 0) for positive coefficients, the chord for negative."""
    l, u = box
    uns = (l < 0) & (u > 0)
    act = (l >= 0).to(A.dtype)
    up_slope = torch.where(uns, u / torch.where(uns, u - l, torch.ones_like(u)), act)
    up_icpt = torch.where(uns, -l * up_slope, torch.zeros_like(u))
    lo = (u >= -l).to(A.dtype).unsqueeze(1) if alpha is None else alpha
    lo_slope = torch.where(uns.unsqueeze(1), lo, act.unsqueeze(1))
    pos, neg = A.clamp(min=0), A.clamp(max=0)
    c = (neg * up_icpt.unsqueeze(1)).flatten(2).sum(-1)
    return pos * lo_slope + neg * up_slope.unsqueeze(1), c


def ref_backward(net: RefNet, j: int, A: Tensor, boxes, alphas: Optional[dict] = None) -> Tensor:
    """Lower bounds ``[B, S]`` of ``A . z_j`` over the input box, ``z_j`` = block ``j``'s
    output, ``A: [B, S, *shape of z_j]``; ``boxes[k]``: ReLU ``k``'s input bounds."""
    const = A.new_zeros(A.shape[:2])
    for i in range(j, -1, -1):
        A, c = _affine_back(net.fns[i], net.inputs[i], A)
        const = const + c
        if i > 0:
            A, c = _relu_back(A, boxes[i - 1], None if alphas is None else alphas[i - 1])
            const = const + c
    Af = A.flatten(2)
    return (torch.einsum("bsk,bk->bs", Af, net.mu.flatten(1))
            - torch.einsum("bsk,bk->bs", Af.abs(), net.r.flatten(1)) + const)


def _margin_spec(y: Tensor, n: int, dtype) -> Tensor:
    eye = torch.eye(n, dtype=dtype, device=y.device)
    return eye[y].unsqueeze(1) - eye.unsqueeze(0)  # [B, C, C]


def ref_ibp_margins(net: RefNet, y: Tensor) -> Tensor:
    """IBP margin lower bounds ``[B, C]`` with the specification folded into the last linear
    layer (as ``compute_bounds`` does)."""
    layer = net.last_layer
    spec = _margin_spec(y, layer.weight.shape[0], layer.weight.dtype)
    A, c = spec.matmul(layer.weight), spec.matmul(layer.bias)
    mu, r = net.last_in
    return (torch.einsum("bsk,bk->bs", A, mu.flatten(1))
            - torch.einsum("bsk,bk->bs", A.abs(), r.flatten(1)) + c)


def ref_crown_intermediate(net: RefNet, max_elems: int = MAX_SPEC_ELEMENTS):
    """Every ReLU's input bounds: IBP's, with the neurons IBP leaves unstable tightened by
    CROWN (block 0's are exact and kept). Rows are gathered per sample, unstable first, and
    processed ``max_elems // (2 B widest)`` at a time (adcert's chunking)."""
    boxes = []
    B = net.mu.shape[0]
    widest = max(torch.Size(s).numel() for s in net.inputs)
    for k, (lo, up) in enumerate(net.boxes):
        if k > 0:
            shape = tuple(lo.shape[1:])
            unstable = ((lo < 0) & (up > 0)).flatten(1)
            n_max = int(unstable.sum(1).max())
            order = torch.sort(unstable.to(torch.int8), dim=1, descending=True,
                               stable=True).indices[:, :n_max]
            chunk = max(1, max_elems // max(1, 2 * B * widest))
            lo_f, up_f = lo.flatten(1).clone(), up.flatten(1).clone()
            for s in range(0, n_max, chunk):
                idx = order[:, s:s + chunk]
                A = torch.zeros((B, idx.shape[1], lo_f.shape[1]), dtype=lo.dtype,
                                device=lo.device)
                A.scatter_(2, idx.unsqueeze(2), 1.0)
                A = A.reshape((B, idx.shape[1]) + shape)
                lb = ref_backward(net, k, torch.cat([A, -A], 1), boxes)
                n = idx.shape[1]
                lo_f.scatter_(1, idx, torch.maximum(lo_f.gather(1, idx), lb[:, :n]))
                up_f.scatter_(1, idx, torch.minimum(up_f.gather(1, idx), -lb[:, n:]))
            lo, up = lo_f.reshape(lo.shape), up_f.reshape(up.shape)
        boxes.append((lo, up))
    return boxes


def ref_alpha(net: RefNet, spec: Tensor, boxes, iterations: int) -> Tensor:
    """Adam over the final relaxation's lower ReLU slopes (one per neuron and row), from
    CROWN's, clipped to [0, 1], keep-best, early stop as adcert's: ``[B, S]``."""
    S = spec.shape[1]
    alphas = [(u >= -lo).to(spec.dtype).unsqueeze(1).expand(
        (lo.shape[0], S) + tuple(lo.shape[1:])).clone() for lo, u in boxes]
    best, prev, stale = None, None, 0
    j = len(net.fns) - 1
    with torch.enable_grad():
        for a in alphas:
            a.requires_grad_()
        opt = torch.optim.Adam(alphas, lr=ALPHA["lr"])
        for it in range(iterations + 1):
            lb = ref_backward(net, j, spec, boxes, alphas)
            best = lb.detach().clone() if best is None else torch.maximum(best, lb.detach())
            if it == iterations or not lb.requires_grad:  # no unstable neuron: nothing to fit
                break
            total = float(best.sum())
            if prev is not None and total - prev <= ALPHA["tol"] * (1.0 + abs(total)):
                stale += 1
                if stale >= ALPHA["patience"]:
                    break
            else:
                stale = 0
            prev = total
            opt.zero_grad(set_to_none=True)
            (-lb.sum()).backward()
            opt.step()
            for group in opt.param_groups:
                group["lr"] *= ALPHA["lr_decay"]
            with torch.no_grad():
                for a in alphas:
                    a.clamp_(0.0, 1.0)
    return best


def _fix_y_entry(lb: Tensor, y: Tensor) -> Tensor:
    return lb.scatter(1, y.unsqueeze(1), 0.0)


def crown_reference(model, stats, x: Tensor, y: Tensor, eps: float, method: str,
                    iterations: int = 20, max_elems: int = MAX_SPEC_ELEMENTS) -> Tensor:
    """Margin lower bounds ``[B, C]`` of ``method`` (``crown-ibp``, ``crown`` or
    ``alpha-crown``) through plain torch; ``crown``/``alpha-crown`` are intersected with IBP."""
    net = RefNet(model, stats, x, eps)
    spec = _margin_spec(y, net.last_layer.weight.shape[0], x.dtype)
    end = len(net.fns) - 1
    if method == "crown-ibp":
        return _fix_y_entry(ref_backward(net, end, spec, net.boxes), y)
    boxes = ref_crown_intermediate(net, max_elems)
    if method == "crown":
        lb = ref_backward(net, end, spec, boxes)
    else:
        lb = ref_alpha(net, spec, boxes, iterations)
    return _fix_y_entry(torch.maximum(lb, ref_ibp_margins(net, y)), y)


def crown_ibp_reference(model, stats, x, y, eps):
    """CROWN-IBP margins through plain torch: reference-op IBP, autograd-transposed layers."""
    return crown_reference(model, stats, x, y, eps, "crown-ibp")


# ----------------------------------------------------------------------------------------------
# auto_LiRPA (optional)
# ----------------------------------------------------------------------------------------------

def lirpa_available() -> bool:
    try:
        import auto_LiRPA  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False
    return True


def lirpa_case(model, x: Tensor, y: Tensor, eps: float, method: str, iterations: int):
    """A zero-argument callable: auto_LiRPA's margin lower bounds ``[B, C]`` of ``model[1:]``
    (the benchmark's ``Normalize`` is the identity) with ``C`` = the margin matrix."""
    import warnings

    import auto_LiRPA
    net = model[1:].eval()  # a slice is a new Sequential, in train mode
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bm = auto_LiRPA.BoundedModule(net, torch.zeros_like(x[:1]), device=x.device.type)
    bm.set_bound_opts({"optimize_bound_args": {"iteration": iterations}})
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    bx = auto_LiRPA.BoundedTensor(x, auto_LiRPA.PerturbationLpNorm(norm=float("inf"), x_L=lo,
                                                                   x_U=hi))
    C = _margin_spec(y, model[-1].weight.shape[0], x.dtype)
    name = LIRPA_METHOD[method]

    def call():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if method == "alpha-crown":
                lb, _ = bm.compute_bounds(x=(bx,), method=name, C=C, bound_upper=False)
            else:
                with torch.no_grad():
                    lb, _ = bm.compute_bounds(x=(bx,), method=name, C=C, bound_upper=False)
        return lb.detach()
    return call


# ----------------------------------------------------------------------------------------------
# Cases and the driver
# ----------------------------------------------------------------------------------------------

def build_cases(method, device, batch, width, linear, iterations, seed=0,
                variants=("adcert", "reference"), max_elems=MAX_SPEC_ELEMENTS):
    """``({variant: fn}, (model, x, y, stats))`` for one (method, batch); ``fn()`` runs one
    bound call and returns the margin lower bounds ``[B, C]``."""
    torch.manual_seed(seed)
    model = cnn7(width=width, linear_size=linear).to(device).eval()  # identity Normalize
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    stats = {bn: (bn.running_mean, bn.running_var) for bn in model.modules()
             if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm)}
    opts = dict(iterations=iterations) if method == "alpha-crown" else {}
    if method in CROWN_METHODS:
        opts["max_spec_elements"] = max_elems

    def ours():
        with torch.no_grad():
            return compute_bounds(model, x, EPS, method=method, y=y, **opts)
    cases = {"adcert": ours}
    if "reference" in variants:
        if method == "ibp":
            def ref_ibp():
                with torch.no_grad():
                    net = RefNet(model, stats, x, EPS)
                    return _fix_y_entry(ref_ibp_margins(net, y), y)
            cases["reference"] = ref_ibp
        else:
            def ref_crown():
                with torch.no_grad():
                    return crown_reference(model, stats, x, y, EPS, method, iterations,
                                           max_elems)
            cases["reference"] = ref_crown
    if "auto_LiRPA" in variants:
        cases["auto_LiRPA"] = lirpa_case(model, x, y, EPS, method, iterations)
    return cases, (model, x, y, stats)


def crown_ibp_train_case(device, batch, width, linear):
    torch.manual_seed(0)
    model = cnn7(width=width, linear_size=linear).to(device).train()
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    with torch.no_grad():  # constants for the repeated timed call (outside it)
        stats = clean_bn_stats(model, x)
    params = [p for p in model.parameters()]

    def step():
        m = compute_bounds(model, x, EPS, method="crown-ibp", y=y, bn_stats=stats)
        return torch.autograd.grad(F.cross_entropy(-m, y), params)
    return step


def peak_memory(fn, device) -> int:
    if device.startswith("cuda"):
        return runner.cuda_peak_growth(fn)
    return runner.allocator_peak_growth(fn)


def max_rel_diff(a: Tensor, b: Tensor) -> float:
    """``max |a - b| / (1 + |b|)`` (one host read, outside the timed calls)."""
    return float(((a.double() - b.double()).abs() / (1.0 + b.double().abs())).max())


def _ints(text: str, name: str) -> List[int]:
    try:
        out = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"{name}: expected comma-separated positive ints, got {text!r}")
    if any(v < 1 for v in out):
        raise SystemExit(f"{name}: expected positive ints, got {text!r}")
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=bc.default_device())
    p.add_argument("--batches", default=None,
                   help="ibp/crown-ibp batches (default 1,16,128 on cpu, 128,1024 on cuda)")
    p.add_argument("--crown-batches", default=None,
                   help="crown/alpha-crown batches (default 1 on cpu, 1,16 on cuda; '' = none)")
    p.add_argument("--width", type=int, default=None, help="CNN7 width (default 64)")
    p.add_argument("--linear", type=int, default=None, help="CNN7 linear size (default 512)")
    p.add_argument("--crown-width", type=int, default=None,
                   help="CNN7 width for crown/alpha-crown (default 8 on cpu, --width on cuda); "
                        "the linear size scales with it")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--variants", default=None,
                   help="of adcert,reference,auto_LiRPA (default: all available)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed samples (default: 10, fewer (>= 3) for calls over 2 s)")
    p.add_argument("--crown-repeats", type=int, default=None,
                   help="timed samples for crown/alpha-crown (default 3)")
    p.add_argument("--iterations", type=int, default=None, help="alpha-CROWN steps (20)")
    p.add_argument("--max-spec-elements", type=int, default=None,
                   help="chunk size of intermediate specification rows (default: adcert's "
                        "default on the device, 2**21 on CPU, 2**25 on GPUs)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    for m in a.methods.split(","):
        if m and m not in METHODS:
            p.error(f"--methods: unknown method {m!r}; choose from {', '.join(METHODS)}")
    if a.variants is not None:
        for v in a.variants.split(","):
            if v and v not in VARIANTS:
                p.error(f"--variants: unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
        if "adcert" not in a.variants.split(","):
            p.error("--variants: adcert is required (the others are compared with it)")
    return a


def plan(a) -> dict:
    """The resolved configuration of a run."""
    q, cuda = a.quick, a.device.startswith("cuda")
    width = a.width or (4 if q else 64)
    linear = a.linear or (32 if q else 512)
    crown_width = a.crown_width or (2 if q else width if cuda else 8)
    batches = _ints(a.batches if a.batches is not None
                    else ("1" if q else "128,1024" if cuda else "1,16,128"), "--batches")
    crown_batches = _ints(a.crown_batches if a.crown_batches is not None
                          else ("1" if q else "1,16" if cuda else "1"), "--crown-batches")
    variants = (a.variants.split(",") if a.variants is not None
                else [v for v in VARIANTS if v != "auto_LiRPA" or lirpa_available()])
    if "auto_LiRPA" in variants and not lirpa_available():
        raise SystemExit("--variants: auto_LiRPA was asked for but cannot be imported")
    return dict(quick=q, width=width, linear=linear, crown_width=crown_width,
                crown_linear=max(1, linear * crown_width // width),
                batches=batches, crown_batches=crown_batches,
                methods=[m for m in a.methods.split(",") if m], variants=variants,
                repeats=a.repeats or (2 if q else None),
                crown_repeats=a.crown_repeats or (2 if q else None),
                iterations=a.iterations if a.iterations is not None else (2 if q else 20),
                max_spec_elements=a.max_spec_elements or default_max_spec_elements(a.device),
                memory=not a.no_memory, eps=EPS)


def first_calls(fns: Dict[str, object], device: str, memory: bool, sync):
    """Call every variant once (the first warm-up): ``({variant: result}, {variant: peak
    memory bytes or None}, slowest call in s)``. The call is the memory measurement when
    ``memory`` (CPU: under the profiler, so its duration is only a rough guide)."""
    results, mem, slowest = {}, {}, 0.0
    for k, fn in fns.items():
        box = {}

        def call(fn=fn, box=box):
            box["out"] = fn()
        sync()
        t0 = time.perf_counter()
        mem[k] = peak_memory(call, device) if memory else (call() or None)
        sync()
        slowest = max(slowest, time.perf_counter() - t0)
        results[k] = box["out"]
    return results, mem, slowest


def n_repeats(cfg: dict, crown: bool, call_s: float) -> int:
    """Timed samples: the configured number, or (default) up to 10 (3 for crown methods),
    fewer for slow calls so one variant's samples take about ``SAMPLE_BUDGET_S``, at least 3."""
    fixed = cfg["crown_repeats"] if crown else cfg["repeats"]
    if fixed is not None:
        return fixed
    cap = 3 if crown else 10
    return max(3, min(cap, int(SAMPLE_BUDGET_S / max(call_s, 1e-9))))


def timed(fns: Dict[str, object], cfg: dict, crown: bool, call_s: float, sync) -> dict:
    """``run.time_interleaved`` of ``fns`` (each already called once by :func:`first_calls`).
    Its own warm-up round is skipped for calls over ``SLOW_CALL_S`` (the first call warmed
    up; one more call per variant would only cost minutes): the first invocation is then a
    no-op and every sample is one call (``target_sample_s = 0``)."""
    repeats = n_repeats(cfg, crown, call_s)
    target = 0.0 if cfg["quick"] else 0.2
    if call_s > SLOW_CALL_S:
        target = 0.0

        def skip_first(fn):
            state = {"warm": False}

            def call():
                if state["warm"]:
                    return fn()
                state["warm"] = True
            return call
        fns = {k: skip_first(fn) for k, fn in fns.items()}
    t = runner.time_interleaved(fns, sync, repeats, 1, target)
    t.pop("_samples", None)
    return t


def run_case(cfg: dict, method: str, batch: int, device: str, sync) -> List[dict]:
    """The rows of one (method, batch): the ``fwd`` comparison, and for ``crown-ibp`` the
    adcert ``fwdbwd`` training step."""
    crown = method in CROWN_METHODS
    width, linear = ((cfg["crown_width"], cfg["crown_linear"]) if crown
                     else (cfg["width"], cfg["linear"]))
    cases, _ = build_cases(method, device, batch, width, linear, cfg["iterations"],
                           variants=cfg["variants"], max_elems=cfg["max_spec_elements"])
    results, mem, call_s = first_calls(cases, device, cfg["memory"], sync)
    t = timed(cases, cfg, crown, call_s, sync)
    row = {"method": method, "mode": "fwd", "batch": batch, "width": width, "linear": linear,
           "variants": t}
    for k in cases:
        t[k]["peak_mem_bytes"] = mem[k]
        if k != "adcert":
            t[k]["max_rel_diff"] = max_rel_diff(results[k], results["adcert"])
            t[k]["speedup"] = t[k]["median_ms"] / t["adcert"]["median_ms"]
    if "reference" in t:
        row["speedup"] = t["reference"]["speedup"]
    rows = [row]
    if method == "crown-ibp":
        fns = {"adcert": crown_ibp_train_case(device, batch, width, linear)}
        _, mem, call_s = first_calls(fns, device, cfg["memory"], sync)
        t = timed(fns, cfg, crown, call_s, sync)
        t["adcert"]["peak_mem_bytes"] = mem["adcert"]
        rows.append({"method": method, "mode": "fwdbwd", "batch": batch, "width": width,
                     "linear": linear, "variants": t})
    return rows


def print_table(results: List[dict]) -> None:
    print(f"{'method':<12} {'mode':<7} {'B':>4} {'w':>3} {'variant':<11} {'median ms':>10} "
          f"{'p20':>9} {'p80':>9} {'peak MiB':>9} {'vs adcert':>9} {'rel diff':>9}")
    for row in results:
        for k, v in row["variants"].items():
            sp = f"{v['speedup']:.2f}" if "speedup" in v else ""
            rd = f"{v['max_rel_diff']:.1e}" if "max_rel_diff" in v else ""
            mem = f"{v['peak_mem_bytes'] / 2 ** 20:.1f}" if v["peak_mem_bytes"] is not None \
                else "-"
            print(f"{row['method']:<12} {row['mode']:<7} {row['batch']:>4} {row['width']:>3} "
                  f"{k:<11} {v['median_ms']:>10.2f} {v['p20_ms']:>9.2f} {v['p80_ms']:>9.2f} "
                  f"{mem:>9} {sp:>9} {rd:>9}")


def main(argv=None) -> int:
    a = parse_args(argv)
    cfg = plan(a)
    sync = bc.synchronizer(a.device)
    results, errors = [], []
    for method in cfg["methods"]:
        batches = cfg["crown_batches"] if method in CROWN_METHODS else cfg["batches"]
        for batch in batches:
            try:
                rows = run_case(cfg, method, batch, a.device, sync)
                results.extend(rows)
                ref = rows[0]["variants"].get("reference")
                if cfg["quick"] and ref is not None and ref["max_rel_diff"] > QUICK_REF_TOL:
                    raise AssertionError(f"reference {method} bounds differ from adcert's by "
                                         f"{ref['max_rel_diff']:.3g} (relative) > "
                                         f"{QUICK_REF_TOL}")
            except Exception as exc:  # keep going; report
                errors.append({"method": method, "batch": batch, "error": repr(exc),
                               "traceback": traceback.format_exc()})
    print_table(results)
    for e in errors:
        print(f"ERROR {e['method']} batch {e['batch']}: {e['error']}", file=sys.stderr)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = a.out or os.path.join(HERE, "results", f"bounds-{a.device}-{stamp}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    versions = runner.versions()
    if "auto_LiRPA" in cfg["variants"]:
        import auto_LiRPA
        versions["auto_LiRPA"] = getattr(auto_LiRPA, "__version__", None)
    with open(out, "w") as f:
        json.dump({"timestamp_utc": stamp, "device": runner.device_info(a.device),
                   "versions": versions, "config": {**cfg, "alpha_options": ALPHA},
                   "memory_method": "cuda max_memory_allocated growth"
                   if a.device.startswith("cuda")
                   else "torch CPU allocator peak growth (torch.profiler)",
                   "results": results, "errors": errors}, f, indent=2)
    print(f"wrote {out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
