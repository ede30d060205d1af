"""CROWN-IBP and CROWN (linear relaxation bounds) for :func:`adcert.bounds.compute_bounds`.

* ``method="crown-ibp"``: the ReLU input bounds come from IBP (the fused ops); the output (or
  the specification) is bounded by one backward linear relaxation
  (:mod:`adcert.bounds.linear_relax`) with CROWN's adaptive lower slopes. Differentiable w.r.t.
  the model's parameters (the CROWN-IBP training objective uses it). Not intersected with IBP:
  a training method mixes the two itself.
* ``method="crown"``: IBP first; then, ReLU layer by ReLU layer, a backward relaxation of the
  sub-network up to that layer bounds the neurons IBP leaves UNSTABLE (gathered per sample and
  batched as specification rows, in chunks), and the layer's bounds are the intersection of the
  IBP and CROWN bounds (stable neurons keep IBP's). Layers that IBP already bounds exactly (no
  ReLU before them and at most one conv/linear) are skipped. The final bound is intersected with
  IBP's, so it is never looser than IBP. A certification tool: it runs under ``no_grad`` and the
  result is detached from the parameters.
* ``method="alpha-crown"``: as ``crown``, then the relaxations' parameters (ReLU lower slopes,
  Sigmoid/Tanh tangent points) are optimised (:mod:`adcert.bounds.alpha_crown`): those of the
  final bound and, by default, those of every intermediate bound too, which is recomputed at
  every step (:mod:`adcert.bounds.alpha_intermediate`; ``intermediate=False``: CROWN's
  intermediate bounds stay fixed, the final layer's slopes alone are optimised, much cheaper).

Specifications (``S`` rows per sample, one backward pass for all of them): with ``y`` the margins
``z_y - z_i`` (rows ``e_y - e_i`` for ``i != y``, the zero ``y`` row left out; the result's
``y`` entry 0); with ``C: [B, S, C_out]`` the
rows of ``C`` (both bounds: the rows ``[C; -C]``); otherwise the identity (both bounds of every
output). The specification multiplies the last layer first, i.e. it is folded into the last
linear layer.

Options (unknown ones raise ``TypeError``):

* ``max_spec_elements`` (crown, alpha-crown; default ``2**21`` on CPU, ``2**25`` on GPUs): the
  most elements of one batch of intermediate specification rows ``[B, rows, *largest layer]``;
  unstable neurons are processed in chunks of that size (memory ~ a few times this many
  elements). On CPU smaller chunks are faster (they stay in cache and avoid page faults on fresh
  100+ MB tensors): CNN7 at width 16, batch 2, 25.5 s at ``2**25`` and 10.3 s at ``2**21``.
* ``interm_boxes`` (crown, alpha-crown): ``[(lower, upper)]``, one ``[B, *input shape]`` pair per
  activation (as ``relu_bounds`` returns them): bounds of every activation's input KNOWN to hold
  over the box (and ``splits``), e.g. a branch-and-bound parent's. They replace CROWN's
  intermediate pass (intersected with IBP's boxes and the split clamps): one backward walk
  instead of one per layer. The result is only as sound as they are. ``refine_interm`` (False):
  run CROWN's intermediate pass anyway, starting from them (tighter, at CROWN's cost).
* ``splits`` (all three): ``{relu_index: tensor [B, *relu shape]}`` with ``+1`` (neuron forced
  active: input lower bound clamped to >= 0), ``-1`` (forced inactive: upper bound clamped to
  <= 0) or ``0``; the bound then holds on that sub-domain of the box (branch-and-bound).
* alpha-crown: ``intermediate`` (True), ``max_alpha_elements`` (per-row intermediate slopes
  kept in all; memory ~6x; default ``"auto"``: a quarter of the free memory,
  :func:`adcert.bounds.memory.alpha_budget`; past it the slopes are shared per layer, see
  :mod:`adcert.bounds.alpha_intermediate`), ``iterations`` (20), ``lr``
  (0.3), ``lr_decay`` (0.98), ``patience`` (10), ``tol`` (0), ``beta`` (False: with ``splits``, also optimise beta-CROWN split multipliers)
  and ``lr_beta`` (0.05), see :func:`adcert.bounds.alpha_crown.optimize_alpha_beta`; warm
  start: ``init_alphas`` / ``init_betas`` (``{relu_index: [B, S, *relu shape]}``) and
  ``alpha_out`` (a dict receiving the best ``{"alphas", "betas"}``), see
  :mod:`adcert.bounds.alpha_crown`.

``sound=True`` runs the same driver sequence (:func:`run_sound`) with the floating-point-rigorous
pieces of :mod:`adcert.bounds.crown_sound`.
"""
from __future__ import annotations

import contextlib
import math
from functools import partial
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

from adcert.bounds.alpha_crown import optimize_alpha_beta, signed_betas
from adcert.bounds.alpha_intermediate import IntermediateRows, SlopeBank
from adcert.bounds.memory import alpha_budget
from adcert.bounds.crown_sound import (
    SoundBoxes, final_layer_ibp, sound_backward, sound_concretize, sound_op_boxes,
    widened_input,
)
from adcert.bounds.ibp import effective_linear, ibp_steps
from adcert.bounds.inputs import check_y_range
from adcert.bounds.linear_relax import Lowered, backward_lower, lower_plan
from adcert.bounds.sound import strict_float_mode
from adcert.bounds.layers.affine_piece import ChannelPiece, ConvPiece
from adcert.bounds.layers.relu import ReluPiece
from adcert.bounds.patches import unit_patches
from adcert.bounds.spec import margin_spec, margin_spec_others, scatter_others, zero_label_entry

Tensor = torch.Tensor
Box = Tuple[Tensor, Tensor]

COMMON_OPTIONS = ("splits",)
CROWN_OPTIONS = COMMON_OPTIONS + ("max_spec_elements", "patches", "interm_boxes",
                                  "refine_interm")
ALPHA_OPTIONS = CROWN_OPTIONS + ("iterations", "lr", "lr_decay", "patience", "tol", "beta",
                                 "lr_beta", "init_alphas", "init_betas", "alpha_out",
                                 "intermediate", "max_alpha_elements")
DEFAULT_MAX_SPEC_ELEMENTS = {"cpu": 2 ** 21, "other": 2 ** 25}  # by device type
# sound alpha-CROWN stops optimising once every margin's plain bound exceeds this: the rigorous
# re-evaluation of trained nets' bounds was within 0.013 of the plain one (100 digits, margins
# ~1.6, session 5), so a sample stopped here almost always stays verified
SOUND_STOP_MARGIN = 0.05


# --------------------------------------------------------------------------- specification


def build_spec(request, out_shape: Tuple[int, ...], x: Tensor) -> Tuple[Tensor, str]:
    """The specification rows ``[B, S2, *out_shape]`` to lower-bound, and the result kind:
    ``"margin"`` (rows ``e_y - e_i`` for the classes ``i != y``: the ``y`` row is identically
    zero and not walked; all ``n`` rows when ``n == 1``), ``"C"`` (rows ``[C; -C]``) or
    ``"box"`` (rows ``[I; -I]`` of the flattened output)."""
    B = x.shape[0]
    if request.y is not None:
        if len(out_shape) != 1:
            raise ValueError(f"y: margins need logits of shape [B, C], but the model outputs "
                             f"shape {(B,) + tuple(out_shape)}")
        n = out_shape[0]
        check_y_range(request.y, n)
        if n == 1:
            return margin_spec(request.y, n, x.dtype, x.device), "margin"
        return margin_spec_others(request.y, n, x.dtype, x.device), "margin"
    if request.C is not None:
        C = request.C
        if not isinstance(C, torch.Tensor):
            raise TypeError(f"C: expected a torch.Tensor [B, S, C_out], got {type(C).__name__}")
        if C.dtype != x.dtype or C.device != x.device:
            raise TypeError(f"C: expected dtype {x.dtype} on {x.device} (those of x), got "
                            f"{C.dtype} on {C.device}")
        if len(out_shape) != 1 or C.dim() != 3 or C.shape[0] != B or C.shape[2] != out_shape[0]:
            raise ValueError(f"C: expected shape [B, S, C_out] = [{B}, S, "
                             f"{out_shape[0] if len(out_shape) == 1 else out_shape}] for a model "
                             f"with outputs [B, C_out], got {tuple(C.shape)}")
        return torch.cat([C, -C], dim=1), "C"
    n = math.prod(out_shape)
    eye = torch.eye(n, dtype=x.dtype, device=x.device).reshape((n,) + tuple(out_shape))
    return torch.cat([eye, -eye], 0).unsqueeze(0).expand((B, 2 * n) + tuple(out_shape)), "box"


def format_result(lb: Tensor, kind: str, request, out_shape):
    """Turn the lower bounds ``[B, S2]`` of the specification rows into compute_bounds' result."""
    if kind == "margin":
        if lb.shape[1] == out_shape[0]:
            return zero_label_entry(lb, request.y)
        return scatter_others(lb, request.y)
    half = lb.shape[1] // 2
    lower, upper = lb[:, :half], -lb[:, half:]
    if kind == "box":
        shape = (lb.shape[0],) + tuple(out_shape)
        return lower.reshape(shape), upper.reshape(shape)
    return lower, upper


def ibp_spec_lower(plan, mu: Tensor, r: Tensor, stats, spec: Tensor,
                   relu_boxes: List[Box]) -> Tensor:
    """IBP lower bounds ``[B, S]`` of the specification rows (folded into the last linear layer
    when the model ends in one); appends every ReLU input box to ``relu_boxes``."""
    final = plan.final_linear()
    if final is not None and spec.dim() == 3:
        h_mu, h_r = ibp_steps(plan.steps[:-1], mu, r, stats, relu_boxes)
        weight, bias = effective_linear(final, stats)
        A = spec.matmul(weight)
        const = spec.matmul(bias)
    else:
        h_mu, h_r = ibp_steps(plan.steps, mu, r, stats, relu_boxes)
        A, const = spec, 0.0
    Af = A.flatten(2)
    return (torch.einsum("bsk,bk->bs", Af, h_mu.flatten(1))
            - torch.einsum("bsk,bk->bs", Af.abs(), h_r.flatten(1)) + const)


# --------------------------------------------------------------------------- splits


def check_splits(splits, low: Lowered, B: int) -> Optional[Dict[int, Tensor]]:
    """Validate ``options["splits"]``: ``{relu_index: [B, *shape] tensor of -1/0/+1}``."""
    if splits is None:
        return None
    if not isinstance(splits, dict):
        raise TypeError(f"splits: expected a dict {{relu_index: tensor}}, got "
                        f"{type(splits).__name__}")
    n = len(low.relu_at)
    for k, s in splits.items():
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < n:
            raise ValueError(f"splits: keys must be ReLU indices in [0, {n}), got {k!r}")
        act = low.activation(k)
        if not act.splittable:
            raise ValueError(f"splits: entry {k} is a {type(act).__name__}; only ReLU neurons "
                             f"can be split")
        shape = (B,) + act.in_shape
        if not isinstance(s, torch.Tensor) or tuple(s.shape) != shape:
            raise ValueError(f"splits: entry {k} must be a tensor of shape {shape}, got "
                             f"{tuple(s.shape) if isinstance(s, torch.Tensor) else type(s)}")
    return splits


def given_boxes(given, ibp_boxes: List[Box], splits) -> List[Box]:
    """``options["interm_boxes"]`` validated against the IBP boxes (one pair per activation, the
    same shapes, dtype and device), intersected with them and clamped by the splits."""
    if not isinstance(given, (list, tuple)) or len(given) != len(ibp_boxes):
        raise ValueError(f"interm_boxes: expected a list of {len(ibp_boxes)} (lower, upper) "
                         f"pairs, one per activation, got "
                         f"{len(given) if isinstance(given, (list, tuple)) else type(given)}")
    out = []
    for k, (pair, (lo, up)) in enumerate(zip(given, ibp_boxes)):
        ok = isinstance(pair, (list, tuple)) and len(pair) == 2 and all(
            isinstance(t, torch.Tensor) and t.shape == lo.shape and t.dtype == lo.dtype
            and t.device == lo.device for t in pair)
        if not ok:
            raise ValueError(f"interm_boxes: entry {k} must be a (lower, upper) pair of tensors "
                             f"of shape {tuple(lo.shape)}, dtype {lo.dtype} on {lo.device}")
        box = (torch.maximum(pair[0], lo), torch.minimum(pair[1], up))
        out.append(apply_split(box, None if splits is None else splits.get(k)))
    return out


def apply_split(box: Box, split: Optional[Tensor]) -> Box:
    """Clamp a ReLU input box by a split: ``+1`` -> lower >= 0, ``-1`` -> upper <= 0."""
    if split is None:
        return box
    lo, up = box
    lo = torch.where(split > 0, lo.clamp(min=0), lo)
    up = torch.where(split < 0, up.clamp(max=0), up)
    return lo, up


# --------------------------------------------------------------------------- CROWN intermediates


def ibp_is_exact(low: Lowered, end: int) -> bool:
    """Whether IBP bounds the output of ``low.ops[end - 1]`` exactly: no ReLU before it and at
    most one conv/linear/pool/residual join (diagonal maps and reshapes keep a box a box).
    Conservative on a DAG: it counts every op listed before ``end``."""
    ops = low.ops[:end]
    return not any(o.act_index is not None for o in ops) and sum(1 for o in ops if o.dense) <= 1


def unstable_order(lo: Tensor, up: Tensor, loose: Optional[Tensor] = None
                   ) -> Tuple[Tensor, int]:
    """Flat neuron indices ``[B, n_max]`` with each sample's unstable neurons first, and
    ``n_max`` = the largest per-sample unstable count (one host synchronisation). ``loose``:
    the mask of neurons to tighten (default: ReLU-unstable, ``lo < 0 < up``)."""
    unstable = ((lo < 0) & (up > 0) if loose is None else loose).flatten(1)
    n_max = int(unstable.sum(1).max()) if unstable.numel() else 0
    order = torch.sort(unstable.to(torch.int8), dim=1, descending=True, stable=True).indices
    return order[:, :n_max], n_max


def neuron_bounds(low: Lowered, end: int, idx: Tensor, shape, mu: Tensor, r: Tensor,
                  boxes: List[Box], backward=backward_lower, patches: bool = False,
                  alphas=None) -> Box:
    """CROWN lower and upper bounds ``[B, n]`` of the neurons ``idx: [B, n]`` (flat indices into
    one sample's ``shape``) of the output of ``low.ops[end - 1]``. ``patches``: start from
    receptive-field rows (:mod:`adcert.bounds.patches`; ``shape`` must be ``(C, H, W)``);
    ``alphas``: the walk's relaxation parameters (the ``2n`` rows are ``[lower; upper]``)."""
    B, n = idx.shape
    if patches:
        lb = backward(low, end, unit_patches(idx, tuple(shape), mu.dtype), mu, r, boxes, alphas)
        return lb[:, :n], -lb[:, n:]
    A = torch.zeros((B, n, math.prod(shape)), dtype=mu.dtype, device=mu.device)
    A.scatter_(2, idx.unsqueeze(2), 1.0)
    A = A.reshape((B, n) + tuple(shape))
    lb = backward(low, end, torch.cat([A, -A], 1), mu, r, boxes, alphas)
    return lb[:, :n], -lb[:, n:]


def row_size(low: Lowered, at: int, windows: bool) -> int:
    """The most entries one row holds on its way back from piece ``at`` to the input: the
    largest input of a piece (dense rows), or, with receptive-field ``windows``, the largest
    window until the walk turns dense (at a piece that cannot take windows, or a window as
    large as its map), then the largest dense input below."""
    def dense_below(i: int) -> int:  # pieces 0..i and the network input
        return max([math.prod(low.in_shape)] + [math.prod(s) for o in low.ops[:i + 1]
                                                for s in getattr(o, "in_shapes", (o.in_shape,))])

    if not windows:
        return dense_below(at - 1)
    biggest, ph, pw = 1, 1, 1
    for i in range(at - 1, -1, -1):
        op = low.ops[i]
        conv = isinstance(op, ConvPiece) and op.groups == 1
        if not (conv or (len(op.in_shape) == 3 and isinstance(op, (ChannelPiece, ReluPiece)))):
            return max(biggest, dense_below(i))
        if conv:
            kh, kw = op.weight.shape[2:]
            ph = (ph - 1) * op.stride[0] + op.dilation[0] * (kh - 1) + 1
            pw = (pw - 1) * op.stride[1] + op.dilation[1] * (kw - 1) + 1
            if ph >= op.in_shape[1] and pw >= op.in_shape[2]:
                return max(biggest, dense_below(i))
        biggest = max(biggest, op.in_shape[0] * ph * pw)
    return biggest


class RowChunks(NamedTuple):
    """How activation ``k``'s loose neurons are re-bounded by backward walks (see
    :func:`row_chunks`): ``end`` (the walk's start, the activation's input), the input ``shape``,
    ``windows`` (receptive-field rows), ``parts`` (the neuron indices ``[B, n]`` of each walk),
    ``n_max`` (the largest per-sample count) and ``widest`` (:func:`row_size`)."""
    end: int
    shape: tuple
    windows: bool
    parts: List[Tensor]
    n_max: int
    widest: int


def row_chunks(low: Lowered, k: int, box: Box, max_elems: int, patches: bool
               ) -> Optional[RowChunks]:
    """The walks that re-bound activation ``k``'s loose neurons (of its input box ``box``,
    each ``[B, *shape]``), unstable ones first, as few per walk as keep its largest coefficient
    tensor (``2 x B x rows x widest`` entries) within ``max_elems``; ``None`` where IBP is exact
    or nothing is loose."""
    end = low.relu_input_end(k)
    if ibp_is_exact(low, end):
        return None
    at = low.relu_at[k]
    lo, up = box
    idx, n_max = unstable_order(lo, up, low.ops[at].loose(lo, up))
    if n_max == 0:
        return None
    shape = low.ops[at].in_shape
    windows = patches and len(shape) == 3
    widest = row_size(low, at, windows)
    chunk = max(1, max_elems // max(1, 2 * lo.shape[0] * widest))
    return RowChunks(end, shape, windows, [idx[:, s:s + chunk] for s in range(0, n_max, chunk)],
                     n_max, widest)


def crown_intermediate(low: Lowered, mu: Tensor, r: Tensor, ibp_boxes: List[Box],
                       splits: Optional[Dict[int, Tensor]], max_elems: int,
                       backward=backward_lower, patches: bool = True,
                       sound_boxes=None) -> List[Box]:
    """Every activation's input bounds: IBP's, tightened by CROWN on the loose neurons (and split
    clamps). ``backward``: the back-substitution to use (the sound mode passes its own);
    ``patches``: rows of convolutional layers start as receptive-field windows (the walk turns
    them dense wherever a piece needs it). ``sound_boxes``: the sound walks'
    :class:`~adcert.bounds.crown_sound.SoundBoxes`, tightened with every layer's box as soon as
    it is known (the later walks' rounding terms then weigh it; the boxes themselves still
    start from ``ibp_boxes``, so that a sound bound never beats the exact CROWN bound)."""
    boxes: List[Box] = []
    for k in range(len(low.relu_at)):
        box = apply_split(ibp_boxes[k], None if splits is None else splits.get(k))
        plan = row_chunks(low, k, box, max_elems, patches)
        if plan is not None:
            lo, up = box
            lo_f, up_f = lo.flatten(1).clone(), up.flatten(1).clone()
            for part in plan.parts:
                c_lo, c_up = neuron_bounds(low, plan.end, part, plan.shape, mu, r, boxes,
                                           backward, plan.windows)
                lo_f.scatter_(1, part, torch.maximum(lo_f.gather(1, part), c_lo))
                up_f.scatter_(1, part, torch.minimum(up_f.gather(1, part), c_up))
            box = apply_split((lo_f.reshape(lo.shape), up_f.reshape(up.shape)),
                              None if splits is None else splits.get(k))
        boxes.append(box)
        if sound_boxes is not None:
            sound_boxes.tighten(k, box)
    return boxes


# --------------------------------------------------------------------------- the methods


def default_max_spec_elements(device: torch.device) -> int:
    """The default chunk size of intermediate specification rows on ``device``."""
    key = "cpu" if torch.device(device).type == "cpu" else "other"
    return DEFAULT_MAX_SPEC_ELEMENTS[key]


def parse_options(method: str, options, known, device="cpu") -> dict:
    from adcert.bounds.api import reject_options  # local: api imports this module
    reject_options(method, options, known)
    out = dict(options)
    m = out.get("max_spec_elements", default_max_spec_elements(device))
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"max_spec_elements: expected a positive int, got {m!r}")
    out["max_spec_elements"] = m
    for name, default in (("patches", True), ("intermediate", True), ("refine_interm", False)):
        if not isinstance(out.get(name, default), bool):
            raise ValueError(f"{name}: expected a bool, got {out[name]!r}")
        out[name] = out.get(name, default)
    m = out.get("max_alpha_elements", "auto")
    if m != "auto" and (isinstance(m, bool) or not isinstance(m, int) or m < 0):
        raise ValueError(f"max_alpha_elements: expected an int >= 0 or 'auto', got {m!r}")
    out["max_alpha_elements"] = m
    return out


def activation_boxes(low: Lowered, mu: Tensor, r: Tensor, ibp_boxes: List[Box], splits,
                     opts: dict, backward=backward_lower, sound_boxes=None) -> List[Box]:
    """Every activation's input box for crown / alpha-crown: CROWN's from IBP's, or the given
    ``interm_boxes`` (with ``refine_interm``: CROWN's from those). ``backward``: the walk (the
    sound mode passes its own, and its ``sound_boxes``, tightened with the boxes)."""
    start = ibp_boxes
    if opts.get("interm_boxes") is not None:
        start = given_boxes(opts["interm_boxes"], ibp_boxes, splits)
        if sound_boxes is not None:
            sound_boxes.tighten_all(start)
        if not opts["refine_interm"]:
            return start
    return crown_intermediate(low, mu, r, start, splits, opts["max_spec_elements"], backward,
                              opts["patches"], sound_boxes)


def intermediate_rows(low: Lowered, boxes: List[Box], splits, opts: dict):
    """alpha-CROWN's intermediate rows and slope bank (``(None, None)`` with
    ``intermediate=False`` or when no intermediate bound can tighten)."""
    if not opts["intermediate"]:
        return None, None
    interm = IntermediateRows(low, boxes, splits, opts["max_spec_elements"], opts["patches"])
    if not interm:
        return None, None
    budget = opts["max_alpha_elements"]
    if budget == "auto":
        budget = alpha_budget(boxes[0][0].device, boxes[0][0].dtype)
    return interm, SlopeBank(budget)


def run_crown_family(plan, mu: Tensor, r: Tensor, stats, request, method: str):
    """The shared driver of ``crown-ibp``, ``crown`` and ``alpha-crown`` (see the module doc)."""
    known = {"crown-ibp": COMMON_OPTIONS, "crown": CROWN_OPTIONS,
             "alpha-crown": ALPHA_OPTIONS}[method]
    opts = parse_options(method, request.options, known, mu.device)
    if request.sound:
        return run_sound(plan, mu, r, stats, request, method, opts)
    certify = method != "crown-ibp"
    ctx = torch.no_grad() if certify else contextlib.nullcontext()
    with ctx:
        if certify:
            mu, r = mu.detach(), r.detach()
        low = lower_plan(plan, stats, tuple(mu.shape[1:]), mu.dtype, mu.device, method,
                         detach=certify)
        spec, kind = build_spec(request, low.out_shape, mu)
        splits = check_splits(opts.get("splits"), low, mu.shape[0])
        ibp_boxes: List[Box] = []
        ibp_lb = ibp_spec_lower(plan, mu, r, stats, spec, ibp_boxes) if certify else None
        if not certify:
            steps = plan.steps[:-1] if plan.final_linear() is not None else plan.steps
            ibp_steps(steps, mu, r, stats, ibp_boxes)
            boxes = [apply_split(b, None if splits is None else splits.get(k))
                     for k, b in enumerate(ibp_boxes)]
        else:
            boxes = activation_boxes(low, mu, r, ibp_boxes, splits, opts)
        end = len(low.ops)
        if method == "alpha-crown":
            interm, bank = intermediate_rows(low, boxes, splits, opts)
            lb, _, _ = optimize_alpha_beta(low, end, spec, mu, r, boxes, opts, interm, bank,
                                           stop_above=0.0 if kind == "margin" else None)
            if interm is not None:
                boxes = interm.best_boxes
        else:
            lb = backward_lower(low, end, spec, mu, r, boxes)
        if certify:
            lb = torch.maximum(lb, ibp_lb)
    if request.relu_bounds is not None:
        request.relu_bounds.extend(boxes)
    return format_result(lb, kind, request, low.out_shape)


def run_sound(plan, mu: Tensor, r: Tensor, stats, request, method: str, opts: dict):
    """``compute_bounds(..., method, sound=True)`` for the CROWN family: the driver sequence of
    :func:`run_crown_family` with the floating-point-rigorous pieces of
    :mod:`adcert.bounds.crown_sound` (see its docstring; batch norms stay separate ops)."""
    if mu.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"sound: needs float32 or float64 inputs and model, got {mu.dtype}")
    with strict_float_mode(), torch.no_grad():
        mu, r = mu.detach(), r.detach()
        low = lower_plan(plan, stats, tuple(mu.shape[1:]), mu.dtype, mu.device, method,
                         fold_bn=False, detach=True)
        spec, kind = build_spec(request, low.out_shape, mu)
        spec = spec.detach()
        splits = check_splits(opts.get("splits"), low, mu.shape[0])
        L, U = widened_input(mu, r)
        outs = sound_op_boxes(low, L, U)
        ibp_relu = [outs[low.ops[at].src] for at in low.relu_at]
        backward = partial(sound_backward, out_boxes=outs)
        ibp_outs = dict(outs)  # IBP's (tightened, they could beat exact CROWN)
        tracked = SoundBoxes(low, outs)  # outs, tightened as the boxes become known
        if method == "crown-ibp":
            boxes = [apply_split(b, None if splits is None else splits.get(k))
                     for k, b in enumerate(ibp_relu)]
        else:
            boxes = activation_boxes(low, mu, r, ibp_relu, splits, opts, backward, tracked)
        end = len(low.ops)
        alphas = betas = None
        if method == "alpha-crown":
            interm, bank = intermediate_rows(low, boxes, splits, opts)
            # stop once every margin is verified with room for the rounding terms
            _, alphas, betas = optimize_alpha_beta(
                low, end, spec, mu, r, boxes, opts, interm, bank,
                stop_above=SOUND_STOP_MARGIN if kind == "margin" else None)
            betas = signed_betas(betas, splits)
            if interm is not None:  # the kept slopes, re-evaluated by the rigorous walks
                boxes = interm.boxes(mu, r, bank.frozen(), backward)
        tracked.tighten_all(boxes)
        lb = backward(low, end, spec, mu, r, boxes, alphas, betas)
        if method != "crown-ibp":
            lb = torch.maximum(lb, sound_concretize(spec, *ibp_outs[len(low.ops) - 1]))
            tail = final_layer_ibp(low, spec, ibp_outs)  # as the plain mode's IBP bound
            if tail is not None:
                lb = torch.maximum(lb, tail)
    if request.relu_bounds is not None:
        request.relu_bounds.extend(boxes)
    return format_result(lb, kind, request, low.out_shape)


def crown_ibp_method(plan, mu, r, stats, request):
    return run_crown_family(plan, mu, r, stats, request, "crown-ibp")


def crown_method(plan, mu, r, stats, request):
    return run_crown_family(plan, mu, r, stats, request, "crown")


def alpha_crown_method(plan, mu, r, stats, request):
    return run_crown_family(plan, mu, r, stats, request, "alpha-crown")
