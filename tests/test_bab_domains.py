"""The branch-and-bound domain queue (:mod:`adcert.certify.domains`): compact storage that
round-trips exactly, refuses what it would lose, the memory-derived batch, and the search's
retry with smaller batches when bounding runs out of memory."""
from __future__ import annotations

import pytest
import torch

from adcert.bounds import compute_bounds
from adcert.certify.bab_relu import ReluSplitBaB
from adcert.certify.domains import (CPU_MAX_BATCH, GPU_MAX_BATCH, MEMORY_SHARE, Domains,
                                    DomainQueue, auto_batch, domain_bytes, split_children)

from test_certify_bab import EPS, attackable, mlp, points

SHAPES = [(3, 4, 4), (5,)]
S = 3


def root_and_keep(seed=0):
    g = torch.Generator().manual_seed(seed)
    boxes = []
    for shape in SHAPES:
        c = torch.randn((1,) + shape, generator=g, dtype=torch.float64)
        r = torch.rand((1,) + shape, generator=g, dtype=torch.float64)
        boxes.append((c - r, c + r))
    keep = [((lo < 0) & (up > 0))[0] for lo, up in boxes]
    return boxes, keep


def domains_inside(boxes, keep, n, seed=1, warm=True):
    """``n`` full-form domains that split, shrink and warm-start only kept neurons (what a
    ``reuse`` search produces): outside ``keep`` the root's boxes, no split, any slope."""
    g = torch.Generator().manual_seed(seed)
    splits, dboxes, alphas, betas = [], [], [], []
    for (lo, up), k in zip(boxes, keep):
        shape = (n,) + tuple(lo.shape[1:])
        s = torch.randint(-1, 2, shape, generator=g, dtype=torch.int8) * k
        shrink = torch.rand(shape, generator=g, dtype=torch.float64) * 0.1 * k
        splits.append(s)
        dboxes.append((lo + shrink, up - shrink))
        alphas.append(torch.rand((n, S) + shape[1:], generator=g, dtype=torch.float64))
        betas.append(torch.rand((n, S) + shape[1:], generator=g, dtype=torch.float64))
    return Domains(splits, dboxes, (alphas, betas) if warm else None)


def test_split_children_fix_one_more_neuron_each_way():
    s = [torch.zeros(2, 2, 3, dtype=torch.int8), torch.zeros(2, 4, dtype=torch.int8)]
    s[0][1, 0, 0] = -1
    best = torch.tensor([7, 2])  # domain 0: layer 1 neuron 1; domain 1: layer 0 neuron (0, 2)
    kids = split_children(s, best)
    assert [tuple(k.shape) for k in kids] == [(4, 2, 3), (4, 4)]
    flat = torch.cat([k.flatten(1) for k in kids], 1)
    parents = torch.cat([p.flatten(1) for p in s], 1).repeat(2, 1)
    diff = (flat != parents).nonzero().tolist()
    assert diff == [[0, 7], [1, 2], [2, 7], [3, 2]]  # one neuron per child, the chosen one
    assert flat[0, 7] == 1 and flat[1, 2] == 1 and flat[2, 7] == -1 and flat[3, 2] == -1
    assert flat[1, 0] == -1 and flat[3, 0] == -1  # earlier splits are inherited


def test_compact_queue_round_trips_what_a_search_reads():
    boxes, keep = root_and_keep()
    assert 0 < sum(int(k.sum()) for k in keep) < sum(k.numel() for k in keep)
    q = DomainQueue(boxes, keep, "compact")
    d = domains_inside(boxes, keep, 5)
    q.push(d)
    q.push(d.take(slice(0, 2)))
    assert len(q) == 7 and q.peak == 7
    got = q.pop(5)
    assert len(got) == 5 and len(q) == 2
    for k, kk in enumerate(keep):
        assert torch.equal(got.splits[k], d.splits[k])
        assert torch.equal(got.boxes[k][0], d.boxes[k][0])  # the root's where not kept
        assert torch.equal(got.boxes[k][1], d.boxes[k][1])
        # slopes: kept exactly, NaN elsewhere; multipliers: on the split neurons only
        for part, where in ((0, kk), (1, d.splits[k] != 0)):
            a, ref = got.warm[part][k], d.warm[part][k]
            m = where.unsqueeze(-len(SHAPES[k]) - 1).expand_as(a) if part else \
                where.expand_as(a[0]).expand_as(a)
            assert m.any() and torch.equal(a[m], ref[m]) and a[~m].isnan().all()
    rest = q.pop(10)  # first in, first out; fewer when the queue is shorter
    assert len(rest) == 2 and len(q) == 0
    assert all(torch.equal(a, b[:2]) for a, b in zip(rest.splits, d.splits))


def test_multipliers_of_domains_of_different_depths_survive_the_queue():
    """Domains with one split, then domains with many (the stored multiplier width grows), then
    none: every split neuron's multiplier comes back, in order."""
    boxes, keep = root_and_keep()
    deep = domains_inside(boxes, keep, 3, seed=2)
    shallow = domains_inside(boxes, keep, 2, seed=3)
    for k, s in enumerate(shallow.splits):  # at most one split per domain, in layer 0
        s.zero_()
        if k == 0:
            first = keep[0].flatten().nonzero()[0, 0]
            s.view(2, -1)[:, first] = torch.tensor([1, -1], dtype=torch.int8)
    bare = domains_inside(boxes, keep, 1, seed=4)
    for s in bare.splits:
        s.zero_()
    q = DomainQueue(boxes, keep, "compact")
    for d in (shallow, deep, bare):
        q.push(d)
    got = q.pop(6)
    for i, (d, j) in enumerate([(shallow, 0), (shallow, 1), (deep, 0), (deep, 1), (deep, 2),
                                (bare, 0)]):
        for k in range(len(SHAPES)):
            split = d.splits[k][j] != 0
            b = got.warm[1][k][i]
            assert torch.equal(got.splits[k][i], d.splits[k][j])
            assert torch.equal(b[:, split], d.warm[1][k][j][:, split])
            assert b[:, ~split].isnan().all()


def test_compact_queue_holds_a_fraction_of_the_full_layout():
    boxes, keep = root_and_keep()
    d = domains_inside(boxes, keep, 4)
    sizes = {}
    for mode, kept in (("compact", keep), ("full", [torch.ones_like(k) for k in keep])):
        q = DomainQueue(boxes, kept, mode)
        q.push(d)
        sizes[mode] = q.bytes_per_domain()
        assert q.peak_bytes == 4 * sizes[mode]
    u = sum(int(k.sum()) for k in keep)
    total = sum(k.numel() for k in keep)
    D = int(torch.cat([s.flatten(1) for s in d.splits], 1).count_nonzero(1).max())
    multipliers = D * (S * 8 + 8)  # fp64 values and int64 positions of the split neurons
    assert sizes["compact"] == u * (1 + 2 * 8 + S * 8) + multipliers  # int8 split, fp64 rest
    assert sizes["full"] == total * (1 + 2 * 8 + S * 8) + multipliers


def test_queue_refuses_a_split_it_would_drop_and_bad_arguments():
    boxes, keep = root_and_keep()
    q = DomainQueue(boxes, keep, "compact")
    d = domains_inside(boxes, keep, 2)
    outside = (~keep[0]).nonzero()[0].tolist()
    d.splits[0][(1,) + tuple(outside)] = 1
    with pytest.raises(RuntimeError, match="not kept"):
        q.push(d)
    with pytest.raises(ValueError, match="^boxes:"):
        DomainQueue(boxes, keep, "dense")
    with pytest.raises(ValueError, match="boxes expected"):
        DomainQueue(boxes, keep, None).push(domains_inside(boxes, keep, 1))


def test_nan_warm_start_entries_keep_the_default_start():
    """``init_alphas`` entries that are NaN behave as if absent: all-NaN gives the cold start's
    bound exactly, and a partial warm start equals the full one with CROWN's slopes (the
    default start) written where it is NaN."""
    net = mlp()
    x, y = points(net, n=2)
    kw = dict(method="alpha-crown", y=y, iterations=4, intermediate=False)
    init = _optimised_slopes(net, x, y, 0)  # no step: CROWN's slopes
    cold = compute_bounds(net, x, EPS, **kw)
    nan = {k: torch.full_like(a, float("nan")) for k, a in init.items()}
    assert torch.equal(compute_bounds(net, x, EPS, init_alphas=nan, **kw), cold)
    partial = {}
    for k, a in _optimised_slopes(net, x, y, 10).items():
        mask = torch.zeros_like(a, dtype=torch.bool)
        mask[..., ::2] = True
        partial[k] = torch.where(mask, a, torch.full_like(a, float("nan")))
    filled = {k: torch.where(a.isnan(), init[k], a) for k, a in partial.items()}
    got = compute_bounds(net, x, EPS, init_alphas=partial, **kw)
    assert torch.equal(got, compute_bounds(net, x, EPS, init_alphas=filled, **kw))
    assert not torch.equal(got, cold)  # the warm half did start elsewhere


def _optimised_slopes(net, x, y, iterations):
    """alpha-CROWN's best slopes ``{k: [B, S, *shape]}`` after ``iterations`` steps."""
    out = {}
    compute_bounds(net, x, EPS, method="alpha-crown", y=y, iterations=iterations,
                   intermediate=False, alpha_out=out)
    return out["alphas"]


def test_auto_batch_fills_the_memory_share_within_the_caps():
    from adcert.certify.bab_relu import ReluSplitBaB as Bab
    net = mlp()
    x, _ = points(net, n=1)
    low = Bab._lowered(net, x)
    per = domain_bytes(low, 3, 8)
    assert per == 16 * 3 * (4 + 20 + 20 + 20 + 20) * 8  # every piece's input, 16 copies
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert auto_batch(low, 3, 8, cpu, free=int(10.5 * per / MEMORY_SHARE)) == 10
    assert auto_batch(low, 3, 8, cpu, free=1) == 1  # at least one domain
    assert auto_batch(low, 3, 8, cpu, free=10 ** 15) == CPU_MAX_BATCH
    assert auto_batch(low, 3, 8, gpu, free=10 ** 15) == GPU_MAX_BATCH
    assert 1 <= auto_batch(low, 3, 8, cpu) <= CPU_MAX_BATCH  # this machine's free memory


class _SmallMemory(ReluSplitBaB):
    """Bounding more than ``room`` domains at once raises ``error(message)``."""

    room = 3
    error = torch.OutOfMemoryError
    message = "CUDA out of memory. Tried to allocate 2.00 GiB"

    def _bound(self, model, x, y, eps, splits, *args, **kw):
        if splits is not None and x.shape[0] > self.room:
            raise self.error(self.message)
        return super()._bound(model, x, y, eps, splits, *args, **kw)


def test_out_of_memory_halves_the_batch_and_the_search_goes_on():
    eps = 0.2  # some points attackable, some need searches of 12 and 24 domains
    net = mlp()
    x, y = points(net)
    kw = dict(sound=True, method="alpha-crown", timeout=30)
    ref = ReluSplitBaB(batch=2, **kw)
    out_ref = ref.run(net, x, y, eps)
    small = _SmallMemory(batch=8, **kw)
    out = small.run(net, x, y, eps)
    searched = [i for i, st in enumerate(small.last_stats) if st["domains"] > 4]
    assert searched, "the instances must need a search larger than the memory"
    assert out.verdicts == out_ref.verdicts
    assert [s["domains"] for s in small.last_stats] == [s["domains"] for s in ref.last_stats]
    assert all(small.last_stats[i]["batch"] == 2 for i in searched)  # 8 -> 4 -> 2
    cert = torch.tensor([v == "certified" for v in out.verdicts])
    assert not attackable(net, x[cert], y[cert], eps).any()


@pytest.mark.parametrize("room,error,message,fails", [
    (0, torch.OutOfMemoryError, "CUDA out of memory", True),  # not even one domain fits
    (1, RuntimeError, "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 GB",
     False),  # the CPU allocator's failure is recognised too
    (1, RuntimeError, "shape mismatch in layer 3", True),  # not an allocation failure
])
def test_errors_while_bounding_domains(room, error, message, fails):
    net = mlp()
    x, y = points(net)
    cls = type("Tight", (_SmallMemory,), {"room": room, "error": error, "message": message})
    eps = 0.15  # searches of up to 10 domains, all certified
    st = cls(sound=False, method="alpha-crown", batch=8, timeout=30)
    if fails:
        with pytest.raises(error, match=message.split(":")[0]):
            st.run(net, x, y, eps)
    else:
        ref = ReluSplitBaB(sound=False, method="alpha-crown", batch=1, timeout=30)
        assert st.run(net, x, y, eps).verdicts == ref.run(net, x, y, eps).verdicts
        assert {s.get("batch", 1) for s in st.last_stats} == {1}
