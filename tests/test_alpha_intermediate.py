"""alpha-CROWN over every layer (adcert.bounds.alpha_intermediate): the intermediate bounds'
slopes are optimised with the final ones.

Properties: never looser than CROWN (iteration 0 is CROWN and keep-best keeps it); tighter than
optimising the final layer alone on a net whose intermediate neurons are unstable; every bound
(margins and intermediate boxes, plain and sound) contains the network at sampled points; the
window (patches) and dense forms of the slopes give the same optimisation; past the memory budget
the slopes are shared and stay valid; bad options are refused by name.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from adcert.bounds import compute_bounds
from adcert.bounds.alpha_intermediate import SlopeBank
from adcert.models import cnn7

from box_sampling import one_thread_per_module, outputs_at, sample_points  # noqa: F401

EPS = 0.1


def net(seed: int = 0) -> nn.Module:
    """CNN7 at width 4 on 3x8x8 inputs, as initialised for training: at ``EPS`` most of its
    intermediate neurons are unstable, so the intermediate slopes matter."""
    torch.manual_seed(seed)
    return cnn7(in_channels=3, width=4, linear_size=32, input_size=8).double().eval()


@pytest.fixture(scope="module")
def case():
    g = torch.Generator().manual_seed(7)
    x = torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.tensor([1, 6])
    return net(), x, y


def margins_at(model, x, y):
    """The margins ``z_y - z_i`` at sampled points of the box: ``[B, N, 10]``."""
    z = outputs_at(model, sample_points(x, EPS, n=300))
    return z.gather(2, y.view(-1, 1, 1).expand(-1, z.shape[1], 1)) - z


def relu_inputs_at(model, x):
    """Every ReLU's input at the sampled points: ``[[B * N, *shape]]``."""
    pts = sample_points(x, EPS, n=300).flatten(0, 1)
    seen = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
             for m in model.modules() if isinstance(m, nn.ReLU)]
    with torch.no_grad():
        model(pts)
    for h in hooks:
        h.remove()
    return seen


def test_every_layer_is_tighter_than_the_last_alone_and_never_looser_than_crown(case):
    model, x, y = case
    crown_boxes, full_boxes = [], []
    crown = compute_bounds(model, x, EPS, method="crown", y=y, relu_bounds=crown_boxes)
    last = compute_bounds(model, x, EPS, method="alpha-crown", y=y, intermediate=False)
    full = compute_bounds(model, x, EPS, method="alpha-crown", y=y, relu_bounds=full_boxes)
    assert (full >= crown - 1e-12).all()
    # the intermediate slopes matter here: optimising them gains clearly over the last layer's
    off = ~torch.nn.functional.one_hot(y, 10).bool()
    assert float((full - last)[off].sum()) > float((last - crown)[off].sum()) + 1e-2
    # the reported intermediate boxes are the tightest seen: inside CROWN's, some strictly
    strictly = 0
    for (cl, cu), (fl, fu) in zip(crown_boxes, full_boxes):
        assert (fl >= cl - 1e-12).all() and (fu <= cu + 1e-12).all()
        strictly += int(((fl > cl + 1e-9) | (fu < cu - 1e-9)).sum())
    assert strictly > 0


@pytest.mark.parametrize("sound", [False, True])
@pytest.mark.parametrize("kw", [{}, {"patches": False}, {"max_alpha_elements": 0}],
                         ids=["windows", "dense", "shared"])
def test_margins_and_boxes_contain_sampled_points(case, sound, kw):
    model, x, y = case
    boxes = []
    lb = compute_bounds(model, x, EPS, method="alpha-crown", y=y, sound=sound,
                        relu_bounds=boxes, iterations=8, **kw)
    assert (margins_at(model, x, y).min(1).values >= lb - 1e-12).all()
    n = x.shape[0]
    for (lo, up), z in zip(boxes, relu_inputs_at(model, x)):
        z = z.reshape((n, -1) + tuple(z.shape[1:]))
        assert (z >= lo.unsqueeze(1) - 1e-12).all() and (z <= up.unsqueeze(1) + 1e-12).all()


def test_sound_mode_reevaluates_the_kept_slopes_rigorously(case):
    model, x, y = case
    plain = compute_bounds(model, x, EPS, method="alpha-crown", y=y, iterations=8)
    sound = compute_bounds(model, x, EPS, method="alpha-crown", y=y, iterations=8, sound=True)
    crown = compute_bounds(model, x, EPS, method="crown", y=y, sound=True)
    # the final slopes meet the per-neuron best intermediate boxes (from several iterations),
    # so the sound bound may even be a little tighter than the plain keep-best; it stays close
    assert (plain - sound).abs().max() < 1e-3
    assert float((sound - crown).sum()) > 1e-2


def test_window_and_dense_slopes_optimise_the_same_bound(case):
    model, x, y = case
    windows = compute_bounds(model, x, EPS, method="alpha-crown", y=y, iterations=6)
    dense = compute_bounds(model, x, EPS, method="alpha-crown", y=y, iterations=6,
                           patches=False)
    torch.testing.assert_close(windows, dense, rtol=1e-7, atol=1e-9)


def test_budget_shares_the_slopes_and_counts_what_it_keeps():
    bank = SlopeBank(budget=100)
    relu = type("Act", (), {"act_index": 0,
                            "init_alpha": staticmethod(lambda lo, up: (up >= -lo).double())})()
    lo, up = -torch.rand(2, 3, 4, dtype=torch.float64), torch.rand(2, 3, 4, dtype=torch.float64)
    A = torch.randn(2, 4, 3, 4, dtype=torch.float64)  # 96 elements: fits
    a = bank.select(1, 0).rows_alpha(relu, A, (lo, up))
    assert a.shape == A.shape and bank.used == 96 and a.requires_grad
    assert bank.select(1, 0).rows_alpha(relu, A, (lo, up)) is a  # the same parameters next time
    b = bank.select(1, 1).rows_alpha(relu, A, (lo, up))  # over the budget: shared maps
    assert bank.used == 96 and list(bank.shared) == [(1, 0)]
    assert b.shape == A.shape
    torch.testing.assert_close(b[:, 0], b[:, 1])  # the two lower rows share a map
    torch.testing.assert_close(b[:, 2], b[:, 3])  # and the two upper rows the other
    torch.testing.assert_close(b[:, 0], (up >= -lo).double())


def test_default_budget_is_a_share_of_the_free_memory(case, monkeypatch):
    """``max_alpha_elements="auto"`` (the default): :data:`ALPHA_MEMORY_SHARE` of the free
    memory at :data:`SLOPE_COPIES` copies of the bound's itemsize per slope. Little memory
    shares the slopes (the same bound as that budget given explicitly, looser than per-row
    slopes); plenty keeps every row's."""
    from adcert.bounds import memory

    assert memory.alpha_budget("cpu", torch.float64, free=48 * 10 ** 6) == \
        int(memory.ALPHA_MEMORY_SHARE * 48 * 10 ** 6) // (memory.SLOPE_COPIES * 8)
    assert memory.alpha_budget("cpu", torch.float32, free=48 * 10 ** 6) == \
        2 * memory.alpha_budget("cpu", torch.float64, free=48 * 10 ** 6)
    assert memory.memory_free("cpu") > 0
    model, x, y = case
    banks = []
    init = SlopeBank.__init__

    def spy(self, budget):
        init(self, budget)
        banks.append(self)

    monkeypatch.setattr(SlopeBank, "__init__", spy)
    run = dict(method="alpha-crown", y=y, iterations=4)
    monkeypatch.setattr(memory, "memory_free", lambda device: 10 ** 4)
    small = compute_bounds(model, x, EPS, **run)
    assert banks[-1].budget == memory.alpha_budget("cpu", torch.float64, free=10 ** 4)
    assert banks[-1].shared  # 52 elements: most walks share their slopes
    given = compute_bounds(model, x, EPS, max_alpha_elements=banks[-1].budget, **run)
    torch.testing.assert_close(small, given, rtol=0, atol=0)
    monkeypatch.setattr(memory, "memory_free", lambda device: 10 ** 12)
    large = compute_bounds(model, x, EPS, **run)
    assert not banks[-1].shared and banks[-1].used > 0
    off = ~torch.nn.functional.one_hot(y, 10).bool()
    assert float(large[off].sum()) > float(small[off].sum())


@pytest.mark.parametrize("bad, match", [({"intermediate": "yes"}, "intermediate"),
                                        ({"max_alpha_elements": -1}, "max_alpha_elements"),
                                        ({"max_alpha_elements": 2.5}, "max_alpha_elements")])
def test_bad_options_are_refused_by_name(case, bad, match):
    model, x, y = case
    with pytest.raises(ValueError, match=match):
        compute_bounds(model, x, EPS, method="alpha-crown", y=y, **bad)


def test_optimisation_stops_once_every_margin_is_verified(case):
    """A sample verified by CROWN's own slopes takes no Adam step (the slopes come back as
    CROWN's); a box specification (no verdict to reach) and a margin that is not yet positive
    keep optimising."""
    model, x, labels = case
    with torch.no_grad():
        y = model(x).argmax(1)  # the net's own labels: a tiny box is then verified
    lb = compute_bounds(model, x, 1e-4, method="crown", y=y)
    assert (lb[~torch.nn.functional.one_hot(y, 10).bool()] > 0).all()  # verified already
    out = {}
    compute_bounds(model, x, 1e-4, method="alpha-crown", y=y, iterations=30, alpha_out=out)
    start = {}
    compute_bounds(model, x, 1e-4, method="alpha-crown", y=y, iterations=0, alpha_out=start)
    for k, a in out["alphas"].items():
        torch.testing.assert_close(a, start["alphas"][k], rtol=0, atol=0)
    moved = {}
    compute_bounds(model, x, EPS, method="alpha-crown", y=labels, iterations=3, alpha_out=moved)
    start = {}
    compute_bounds(model, x, EPS, method="alpha-crown", y=labels, iterations=0, alpha_out=start)
    assert any(not torch.equal(a, start["alphas"][k]) for k, a in moved["alphas"].items())


def test_checkpointed_walks_give_the_same_optimisation(case, monkeypatch):
    """Checkpointing the intermediate walks (large nets) re-runs them in the backward pass: the
    same gradients, so the same bounds as keeping their graphs."""
    import adcert.bounds.alpha_intermediate as ai

    model, x, y = case
    kept = compute_bounds(model, x, EPS, method="alpha-crown", y=y, iterations=5)
    monkeypatch.setattr(ai, "CHECKPOINT_ELEMENTS", 0)
    redone = compute_bounds(model, x, EPS, method="alpha-crown", y=y, iterations=5)
    torch.testing.assert_close(redone, kept, rtol=1e-10, atol=1e-12)
