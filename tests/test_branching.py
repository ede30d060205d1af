"""Branching heuristics of ``bab-relu`` (:mod:`adcert.certify.branching`): FSB's look-ahead
picks, among the k best BaBSR candidates, the one whose worse child bounds best -- never worse
than BaBSR's own pick by that measure -- and branch-and-bound with it reaches the same verdicts."""
from __future__ import annotations

import torch

from adcert.bounds import compute_bounds
from adcert.certify import branching
from adcert.certify.bab_relu import ReluSplitBaB
from test_certify_bab import EPS, attackable, mlp, points


def _child_bound(low, x, y, boxes, flat: int, sign: int) -> float:
    """The one-pass worst margin of the child that clamps neuron ``flat`` (all layers
    concatenated) to ``>= 0`` (``sign`` +1) or ``<= 0`` (-1)."""
    out, offset = [], 0
    for lo, up in boxes:
        lo, up = lo.clone(), up.clone()
        n = lo[0].numel()
        if offset <= flat < offset + n:
            j = flat - offset
            if sign > 0:
                lo.view(-1)[j] = lo.view(-1)[j].clamp(min=0)
            else:
                up.view(-1)[j] = up.view(-1)[j].clamp(max=0)
        offset += n
        out.append((lo, up))
    if any(bool((lo > up).any()) for lo, up in out):
        return float("inf")
    lb, _ = branching.worst_margins(low, x, y, EPS, out)
    return float(lb.min())


def test_fsb_pick_is_a_candidate_and_its_worse_child_beats_babsr_top1():
    net = mlp(0)
    x, y = points(net, 3)
    for i in range(3):
        xi, yi = x[i:i + 1], y[i:i + 1]
        boxes = []
        compute_bounds(net, xi, EPS, method="crown", y=yi, relu_bounds=boxes)
        low = ReluSplitBaB._lowered(net, xi)
        scores = branching.babsr_scores(low, xi, yi, EPS, boxes)
        flat = torch.cat([torch.where((lo < 0) & (up > 0), s, torch.full_like(s, -1.0))
                          .flatten(1) for s, (lo, up) in zip(scores, boxes)], 1)
        if not bool((flat >= 0).any()):
            continue
        top1 = int(flat.argmax(1))
        pick = int(branching.fsb_choice(low, xi, yi, EPS, boxes, flat, 3)[0])
        assert pick in flat.topk(3, dim=1).indices[0].tolist() and float(flat[0, pick]) >= 0

        def worse(j):
            return min(_child_bound(low, xi, yi, boxes, j, +1),
                       _child_bound(low, xi, yi, boxes, j, -1))
        assert worse(pick) >= worse(top1) - 1e-9


def test_fsb_branch_and_bound_agrees_with_babsr():
    net = mlp(0)
    x, y = points(net, 6)
    verdicts = {}
    for rule in ("babsr", "fsb"):
        bab = ReluSplitBaB(method="crown", branching=rule, timeout=20, attack_every=0)
        verdicts[rule] = bab.run(net, x, y, EPS).verdicts
    truth = attackable(net, x, y, EPS)
    for a, b, broken in zip(verdicts["babsr"], verdicts["fsb"], truth.tolist()):
        assert not (a == "certified" and b == "attacked") and \
            not (a == "attacked" and b == "certified")
        assert not (broken and "certified" in (a, b))
    assert sum(v == "certified" for v in verdicts["fsb"]) >= 1
