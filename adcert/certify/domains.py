"""The open domains of one sample's ReLU branch-and-bound (:mod:`adcert.certify.bab_relu`): how
a domain is split, where the queued ones are kept, and how many are bounded at once.

A domain is, per activation layer ``k`` (``shape_k`` its input shape), a split tensor ``[*shape_k]``
of ``-1/0/+1``; with ``boxes="reuse"``/``"refine"`` also its parent's activation input box; with
warm starts its parent's optimised slopes and multipliers ``[S, *shape_k]`` (``S`` margin rows).

**Compact storage.** Only a neuron whose relaxation is loose (``Piece.loose``, for ReLU
``lower < 0 < upper``) can be split or read its slope or multiplier. When every domain's boxes
lie inside the root's (``boxes="reuse"``: the parent's, clamped; ``"refine"``: those, tightened),
a neuron that is not loose at the root is loose in no domain, so :class:`DomainQueue` keeps, per
layer, only the entries of the root's loose neurons (``[N, u_k]`` instead of ``[N, *shape_k]``),
and rebuilds full tensors for the domains it hands out:

* splits: 0 elsewhere (a split outside the kept neurons is refused, never dropped);
* slopes: ``NaN`` elsewhere, which :mod:`adcert.bounds.alpha_crown` reads as "no warm start"
  (the default start; for a neuron stable in the domain it is never read);
* multipliers: only a split neuron's is read, so only those are kept (``[N, S, D]`` values and
  their positions, ``D`` the most splits of a queued domain), ``NaN`` (read as 0) elsewhere;
* reused boxes: the root's elsewhere. A neuron that is stable at the root is never split, so its
  box in every ``reuse`` domain is the root's (intersected with IBP's, which ``compute_bounds``
  does again). ``refine`` tightens every box, so its boxes are kept whole.

With ``boxes="recompute"`` a domain's CROWN boxes need not lie inside the root's: every neuron is
kept. A queued domain holds about ``u (1 + 2 b + S b)`` bytes (``u`` kept neurons, ``b`` bytes
per number: split, box, slopes) and ``D (S b + 8)`` for its multipliers. Measured on
``benchmarks/bench_bab_cnn7.py``'s CNN7 (width 8, MNIST, 22016 ReLU neurons, fp32), sample 35 at
eps 0.13: 0.28 MB per ``reuse`` domain, 1.70 MB with every neuron's slopes and multipliers; a
model trained at the radius it is certified at has fewer loose neurons, and a smaller share to
keep.

**Batch size** (:func:`auto_batch`): the domains bounded per ``compute_bounds`` call, from an
estimate of one domain's working memory (the backward walk's rows and their autograd graph, the
slopes and multipliers with their Adam state) and the memory free on the device; on a CPU at most
:data:`CPU_MAX_BATCH`, on a GPU at most :data:`GPU_MAX_BATCH`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from adcert.bounds.memory import memory_free

Tensor = torch.Tensor
Box = Tuple[Tensor, Tensor]
# (slopes, multipliers) of a batch of domains: one [n, S, *shape_k] tensor per activation each
Warm = Tuple[List[Optional[Tensor]], List[Optional[Tensor]]]  # None: a layer without them

#: Copies of ``S x (every piece's input size)`` one domain's bound holds at its peak (the walk's
#: rows, their autograd graph and the sound mode's magnitudes; slopes and multipliers with
#: gradients, two Adam moments and the best ones). Measured on CNN7 width 8, MNIST, sound
#: alpha-CROWN with multipliers, fp32: peak memory grows by about 25 MB per domain of a batch
#: (1.1 GB at batch 16, 2.3 GB at 64), ~13 x ``10 x 48736 x 4`` bytes; rounded up.
GRAPH_COPIES = 16
#: On a CPU, bounding more domains at once does not bound them faster (CNN7 width 8: 13.2, 13.2
#: and 12.8 domains/s at batch 16, 64 and 256) and delays the periodic attack and the timeout.
CPU_MAX_BATCH = 64
GPU_MAX_BATCH = 2048
#: The share of the free memory the batch may fill (the queue and the model live beside it).
MEMORY_SHARE = 0.5


def split_children(splits: List[Tensor], best: Tensor) -> List[Tensor]:
    """Both children of ``n`` domains (``splits[k]: [n, *shape_k]``) split on neuron ``best[n]``
    (a flat index over all layers concatenated): ``[2n, *shape_k]`` per layer, the ``+1``
    (active) children first, then the ``-1`` ones."""
    children, offset = [], 0
    for s in splits:
        m = s[0].numel()
        flat = s.flatten(1)
        local = best - offset
        hit = (local >= 0) & (local < m)
        idx = local.clamp(0, m - 1)[:, None]
        here = flat.gather(1, idx)
        pos = flat.scatter(1, idx, torch.where(hit[:, None], 1, here).to(flat.dtype))
        neg = flat.scatter(1, idx, torch.where(hit[:, None], -1, here).to(flat.dtype))
        children.append(torch.cat([pos, neg]).reshape((-1,) + tuple(s.shape[1:])))
        offset += m
    return children


@dataclass
class Domains:
    """``n`` domains in full form: ``splits[k]: [n, *shape_k]`` (int8); ``boxes`` (or ``None``):
    ``[(lo, up)]`` each ``[n, *shape_k]``; ``warm`` (or ``None``): :data:`Warm`."""
    splits: List[Tensor]
    boxes: Optional[List[Box]] = None
    warm: Optional[Warm] = None

    def __len__(self) -> int:
        return self.splits[0].shape[0]

    def take(self, index) -> "Domains":
        """The domains ``index`` (a slice or a bool mask)."""
        return Domains([s[index] for s in self.splits],
                       None if self.boxes is None else [(lo[index], up[index])
                                                        for lo, up in self.boxes],
                       None if self.warm is None else _take_warm(self.warm, index))

    def children(self, best: Tensor) -> "Domains":
        """Both children of every domain, split on ``best: [n]`` (:func:`split_children`); each
        inherits its parent's boxes and warm start."""
        two = (lambda t: torch.cat([t, t]))
        return Domains(split_children(self.splits, best),
                       None if self.boxes is None else [(two(lo), two(up))
                                                        for lo, up in self.boxes],
                       None if self.warm is None else
                       tuple([None if t is None else two(t) for t in part]
                             for part in self.warm))


def _take_warm(warm: Warm, index) -> Warm:
    return ([None if t is None else t[index] for t in warm[0]],
            [None if t is None else t[index] for t in warm[1]])


class DomainQueue:
    """First in, first out queue of domains, stored compactly (see the module docstring).

    Args:
        root_boxes: the root's activation input boxes ``[(lo, up)]``, each ``[1, *shape_k]``.
        keep: per layer, the neurons stored ``[*shape_k]`` (bool): the root's loose ones, or all
            of them (``boxes="recompute"``).
        boxes: ``"compact"`` (the root's box where not kept), ``"full"`` or ``None`` (domains
            carry no boxes).
    """

    def __init__(self, root_boxes: List[Box], keep: List[Tensor], boxes: Optional[str]):
        if boxes not in ("compact", "full", None):
            raise ValueError(f"boxes: expected 'compact', 'full' or None, got {boxes!r}")
        self.shapes = [tuple(lo.shape[1:]) for lo, _ in root_boxes]
        self.index = [k.reshape(-1).nonzero().squeeze(1) for k in keep]
        self.base = [(lo.reshape(-1), up.reshape(-1)) for lo, up in root_boxes]
        self.box_mode = boxes
        self.splits: List[Tensor] = []
        self.boxes: Optional[List[Box]] = None
        # with warm starts: (compact slopes [N, S, u_k] per layer, [multiplier values [N, S, D],
        # their positions [N, D]], see _pack_betas); beta_layers: the layers with multipliers
        self.warm = None
        self.beta_layers: Optional[List[bool]] = None
        self.peak = self.peak_bytes = 0  # the most domains queued at once, and their bytes

    def __len__(self) -> int:
        return self.splits[0].shape[0] if self.splits else 0

    # -- compact <-> full ------------------------------------------------------------------

    def _pack(self, t: Tensor, k: int) -> Tensor:
        """``[n, ..., *shape_k]`` -> ``[n, ..., u_k]`` (the kept neurons)."""
        lead = t.dim() - len(self.shapes[k])
        return t.flatten(lead).index_select(lead, self.index[k])

    def _unpack(self, t: Tensor, k: int, fill) -> Tensor:
        """``[n, ..., u_k]`` -> ``[n, ..., *shape_k]``; ``fill``: a value, or ``[numel]`` (the
        root's box) broadcast to the rest."""
        numel = math.prod(self.shapes[k])
        out_shape = tuple(t.shape[:-1]) + (numel,)
        if isinstance(fill, Tensor):
            out = fill.expand(out_shape).clone()
        else:
            out = torch.full(out_shape, fill, dtype=t.dtype, device=t.device)
        out.index_copy_(t.dim() - 1, self.index[k], t)
        return out.reshape(tuple(t.shape[:-1]) + self.shapes[k])

    def _pack_domains(self, d: Domains) -> Domains:
        splits = []
        for k, s in enumerate(d.splits):
            packed = self._pack(s, k)
            if int(s.count_nonzero()) != int(packed.count_nonzero()):
                raise RuntimeError(f"DomainQueue: a domain splits a neuron of layer {k} that is "
                                   f"not kept (not loose at the root)")
            splits.append(packed)
        boxes = None
        if self.box_mode == "compact":
            boxes = [(self._pack(lo, k), self._pack(up, k)) for k, (lo, up) in enumerate(d.boxes)]
        elif self.box_mode == "full":
            boxes = [(lo, up) for lo, up in d.boxes]
        warm = None
        if d.warm is not None:
            alphas = [None if t is None else self._pack(t, k) for k, t in enumerate(d.warm[0])]
            if self.beta_layers is None:
                self.beta_layers = [b is not None for b in d.warm[1]]
            warm = (alphas, self._pack_betas(splits, d.warm[1]))
        return Domains(splits, boxes, warm)

    def _pack_betas(self, splits: List[Tensor], betas: List[Optional[Tensor]]) -> List[Tensor]:
        """The multipliers of the split neurons only (no other is read): ``[values [n, S, D],
        positions [n, D]]``, positions into the kept neurons of all layers concatenated (``-1``:
        padding), ``D`` the most splits of a domain. ``splits``: compact, ``[n, u_k]``."""
        split = torch.cat(splits, 1) != 0  # [n, U]
        n, U = split.shape
        ref = next(b for b in betas if b is not None)
        S = ref.shape[1]
        full = torch.cat([self._pack(b, k) if b is not None else
                          ref.new_full((n, S, self.index[k].numel()), float("nan"))
                          for k, b in enumerate(betas)], 2)  # [n, S, U]
        D = int(split.sum(1).max()) if n else 0
        order = torch.sort(split.to(torch.int8), dim=1, descending=True, stable=True).indices
        order = order[:, :D]
        values = full.gather(2, order.unsqueeze(1).expand(n, S, D))
        return [values, torch.where(split.gather(1, order), order, -1)]

    def _unpack_betas(self, packed: List[Tensor]) -> List[Optional[Tensor]]:
        """:meth:`_pack_betas` reversed: ``[n, S, *shape_k]`` per layer, ``NaN`` where not
        split (read as 0, the start of a multiplier)."""
        values, pos = packed
        n, S, _ = values.shape
        sizes = [i.numel() for i in self.index]
        U = sum(sizes)
        full = values.new_full((n, S, U + 1), float("nan"))  # column U: the padding's
        idx = torch.where(pos < 0, U, pos)
        full.scatter_(2, idx.unsqueeze(1).expand(n, S, idx.shape[1]), values)
        parts = full[:, :, :U].split(sizes, 2)
        return [self._unpack(t.contiguous(), k, float("nan")) if keep else None
                for k, (t, keep) in enumerate(zip(parts, self.beta_layers))]

    def _unpack_domains(self, d: Domains) -> Domains:
        splits = [self._unpack(s, k, 0) for k, s in enumerate(d.splits)]
        boxes = None
        if self.box_mode == "compact":
            boxes = [(self._unpack(lo, k, self.base[k][0]), self._unpack(up, k, self.base[k][1]))
                     for k, (lo, up) in enumerate(d.boxes)]
        elif self.box_mode == "full":
            boxes = d.boxes
        warm = None
        if d.warm is not None:
            warm = ([None if t is None else self._unpack(t, k, float("nan"))
                     for k, t in enumerate(d.warm[0])], self._unpack_betas(d.warm[1]))
        return Domains(splits, boxes, warm)

    # -- the queue -------------------------------------------------------------------------

    def push(self, d: Domains) -> None:
        """Append domains given in full form."""
        if (d.boxes is None) != (self.box_mode is None):
            raise ValueError("DomainQueue.push: boxes expected exactly when the queue keeps them")
        p = self._pack_domains(d)
        if not self.splits:
            self.splits, self.boxes, self.warm = p.splits, p.boxes, p.warm
        else:
            cat = (lambda a, b: None if a is None else torch.cat([a, b]))
            self.splits = [torch.cat([a, b]) for a, b in zip(self.splits, p.splits)]
            if self.boxes is not None:
                self.boxes = [(cat(a, c), cat(b, e)) for (a, b), (c, e) in zip(self.boxes, p.boxes)]
            if self.warm is not None:
                alphas = [cat(a, b) for a, b in zip(self.warm[0], p.warm[0])]
                (qv, qp), (pv, pp) = _same_width(self.warm[1], p.warm[1])
                self.warm = (alphas, [torch.cat([qv, pv]), torch.cat([qp, pp])])
        if len(self) > self.peak:
            self.peak = len(self)
            self.peak_bytes = self.peak * self.bytes_per_domain()

    def pop(self, n: int) -> Domains:
        """The first ``n`` domains (fewer if the queue is shorter), in full form."""
        stored = Domains(self.splits, self.boxes, self.warm)
        head, rest = stored.take(slice(0, n)), stored.take(slice(n, None))
        self.splits, self.boxes, self.warm = rest.splits, rest.boxes, rest.warm
        return self._unpack_domains(head)

    def bytes_per_domain(self) -> int:
        """Bytes one queued domain holds (its splits, boxes and warm start)."""
        stored = Domains(self.splits, self.boxes, self.warm)
        tensors = list(stored.splits)
        tensors += [t for box in (stored.boxes or []) for t in box]
        tensors += [t for part in (stored.warm or ()) for t in part if t is not None]
        return sum(t[:1].numel() * t.element_size() for t in tensors)


def _same_width(a: List[Tensor], b: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
    """Two packed multiplier sets padded to the same ``D`` (values NaN, positions -1)."""
    D = max(a[1].shape[1], b[1].shape[1])

    def pad(p: List[Tensor]) -> List[Tensor]:
        v, pos = p
        extra = D - pos.shape[1]
        if extra == 0:
            return p
        return [torch.cat([v, v.new_full(v.shape[:2] + (extra,), float("nan"))], 2),
                torch.cat([pos, pos.new_full((pos.shape[0], extra), -1)], 1)]
    return pad(a), pad(b)


def domain_bytes(low, S: int, itemsize: int) -> int:
    """Estimated peak bytes of one domain's bound (see :data:`GRAPH_COPIES`): ``low`` the lowered
    model, ``S`` margin rows, ``itemsize`` bytes per number."""
    sizes = sum(math.prod(s) for op in low.ops
                for s in getattr(op, "in_shapes", (op.in_shape,)))
    return GRAPH_COPIES * S * sizes * itemsize


def auto_batch(low, S: int, itemsize: int, device: torch.device,
               free: Optional[int] = None) -> int:
    """Domains per ``compute_bounds`` call filling :data:`MEMORY_SHARE` of ``free`` bytes
    (default :func:`memory_free`), at least 1, at most :data:`CPU_MAX_BATCH` on a CPU and
    :data:`GPU_MAX_BATCH` elsewhere."""
    free = memory_free(device) if free is None else free
    cap = CPU_MAX_BATCH if device.type == "cpu" else GPU_MAX_BATCH
    return max(1, min(cap, int(MEMORY_SHARE * free) // max(1, domain_bytes(low, S, itemsize))))


__all__ = ["Domains", "DomainQueue", "Warm", "split_children", "auto_batch", "domain_bytes",
           "memory_free"]
