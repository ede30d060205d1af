"""Sound CROWN's rounding-error terms.

* Folded (:func:`adcert.bounds.backward.folded_source_error`): a ReLU charges its batch norm's
  and convolution's backward rounding errors in its own weighted sum. The folded walk must
  charge what the piece-by-piece walk charges (no term lost, at most a few roundings more) and
  still contain fp64 bounds and sampled outputs on adversarial layers.
* Weighed by CROWN's boxes (:class:`adcert.bounds.crown_sound.SoundBoxes`), not IBP's: on a deep
  random network the allowance shrinks several-fold, and the bound still contains the fp64 one.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from adcert.bounds import compute_bounds
from adcert.bounds.crown_sound import SoundBoxes
from adcert.bounds.layers.relu import ReluPiece
from adcert.models.cnn import cnn7


def conv_bn_net(seed=0, cancelling=True):
    """conv -> BN -> ReLU -> conv -> BN -> ReLU -> linear, with weights of mixed magnitudes
    (1e-4 .. 1e4 per input channel) whose rows sum to ~0, and batch norms of mixed scales."""
    torch.manual_seed(seed)
    c1, c2 = nn.Conv2d(4, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1, stride=2)
    b1, b2 = nn.BatchNorm2d(16), nn.BatchNorm2d(16)
    with torch.no_grad():
        for c in (c1, c2):
            w = torch.randn_like(c.weight)
            if cancelling:
                w = w * torch.logspace(-4, 4, c.weight.shape[1]).view(1, -1, 1, 1)
                w = w - w.mean(dim=(1, 2, 3), keepdim=True)
            c.weight.copy_(w)
        for b in (b1, b2):
            b.running_mean.copy_(torch.randn(16) * 10)
            b.running_var.copy_(torch.logspace(-3, 3, 16))
            b.weight.copy_(torch.randn(16) * torch.logspace(-2, 2, 16))
            b.bias.copy_(torch.randn(16))
    return nn.Sequential(c1, b1, nn.ReLU(), c2, b2, nn.ReLU(), nn.Flatten(),
                         nn.Linear(16 * 16, 5)).eval()


def unstable_splits(model, x, eps):
    """Splits of the first ReLU layer: its first two unstable neurons (per sample) forced
    active and inactive."""
    boxes = []
    compute_bounds(model, x, eps, method="crown", relu_bounds=boxes)
    lo, up = boxes[0]
    s = torch.zeros_like(lo, dtype=torch.int8).flatten(1)
    for i, row in enumerate(((lo < 0) & (up > 0)).flatten(1)):
        idx = row.nonzero()[:2, 0]
        s[i, idx[0]], s[i, idx[1]] = 1, -1
    return {0: s.reshape(lo.shape)}


@pytest.mark.parametrize("method,opts", [("crown", {}), ("alpha-crown", {"iterations": 2}),
                                         ("alpha-crown", {"iterations": 2, "beta": True})])
def test_folded_errors_charge_what_the_piece_by_piece_walk_charges(method, opts, monkeypatch):
    model = conv_bn_net(cancelling=False)
    x = torch.rand(2, 4, 8, 8)
    y = torch.tensor([0, 3])
    if opts.get("beta"):  # split multipliers: the ReLU's rows handed back differ from A'
        opts = dict(opts, splits=unstable_splits(model, x, 0.01))
    folded = compute_bounds(model, x, 0.01, method=method, y=y, sound=True, **opts)
    plain = compute_bounds(model, x, 0.01, method=method, y=y, **opts)
    monkeypatch.setattr(ReluPiece, "folds_source_error", False)
    apart = compute_bounds(model, x, 0.01, method=method, y=y, sound=True, **opts)
    other = torch.ones_like(plain, dtype=torch.bool)
    other[torch.arange(2), y] = False  # the label's own margin is 0 in every mode
    charged_folded, charged_apart = (plain - folded)[other], (plain - apart)[other]
    assert bool((charged_apart > 0).all())
    # the same terms in another order (a few more roundings up): equal to a small fraction
    assert torch.allclose(charged_folded, charged_apart, rtol=1e-3, atol=0), \
        (charged_folded, charged_apart)


@pytest.mark.parametrize("batch", [1, 8])
def test_folded_sound_crown_contains_fp64_bounds_on_adversarial_layers(batch):
    model = conv_bn_net()
    x = torch.rand(batch, 4, 8, 8)
    lb, ub = compute_bounds(model, x, 1e-4, method="crown", sound=True)
    model64 = conv_bn_net().double()
    lo64, hi64 = compute_bounds(model64, x.double(), 1e-4, method="crown")
    assert bool((lb.double() <= lo64 + 1e-9 * lo64.abs()).all())
    assert bool((ub.double() >= hi64 - 1e-9 * hi64.abs()).all())
    pts = (x.double() + 1e-4 * (2 * torch.rand(64, *x.shape, dtype=torch.float64) - 1)).clamp(0, 1)
    with torch.no_grad():
        outs = torch.stack([model64(p) for p in pts])
    assert bool((lb.double() <= outs).all()) and bool((outs <= ub.double()).all())


def test_error_terms_weigh_crown_boxes_not_ibp_boxes(monkeypatch):
    """A random CNN7 (width 8): IBP's boxes grow with depth far faster than CROWN's. With the
    error terms weighing CROWN's boxes the sound bound loses a third as much to them (measured:
    0.0019 against 0.0062 summed), and still contains the fp64 CROWN bound."""
    torch.manual_seed(0)
    model = cnn7(width=8, linear_size=32, in_channels=3, input_size=16, mean=(0.0,) * 3,
                 std=(1.0,) * 3).eval()
    x = torch.rand(2, 3, 16, 16)
    y = torch.tensor([1, 7])
    exact = compute_bounds(model.double(), x.double(), 0.02, method="crown", y=y)
    model.float()
    tight = compute_bounds(model, x, 0.02, method="crown", y=y, sound=True).double()
    monkeypatch.setattr(SoundBoxes, "tighten", lambda self, k, box: None)
    monkeypatch.setattr(SoundBoxes, "tighten_all", lambda self, boxes: None)
    loose = compute_bounds(model, x, 0.02, method="crown", y=y, sound=True).double()
    other = torch.ones_like(exact, dtype=torch.bool)
    other[torch.arange(2), y] = False
    assert bool((tight[other] <= exact[other]).all()) and bool((loose <= tight).all())
    lost_tight, lost_loose = (exact - tight)[other].sum(), (exact - loose)[other].sum()
    assert lost_tight < 0.5 * lost_loose, (lost_tight, lost_loose)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sound_crown_keeps_the_ibp_bound_of_the_specification_in_the_last_layer(dtype):
    """Where IBP with the margin folded into the last linear layer beats CROWN (here: margin
    ``h2 + 0.3``, h2 a ReLU of ``[-1, 2]``: folded IBP 0.3, CROWN's relaxation -0.7, the output
    boxes' difference -1.7), the plain mode returns it, and so must the sound mode."""
    net = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 2)).to(dtype).eval()
    with torch.no_grad():
        net[0].weight.fill_(3.0)
        net[0].bias.fill_(-1.0)
        net[2].weight.copy_(torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
        net[2].bias.copy_(torch.tensor([0.3, 0.0]))
    x, y = torch.full((1, 1), 0.5, dtype=dtype), torch.tensor([0])
    plain = compute_bounds(net, x, 0.5, method="crown", y=y)
    sound = compute_bounds(net, x, 0.5, method="crown", y=y, sound=True)
    assert abs(float(plain[0, 1]) - 0.3) < 1e-6
    assert float(sound[0, 1]) <= float(plain[0, 1]) and float(plain[0, 1] - sound[0, 1]) < 1e-5


def test_a_walk_that_stops_early_needs_the_sound_boxes():
    from adcert.bounds.backward import backward_lower
    from adcert.certify.bab_relu import ReluSplitBaB
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    low = ReluSplitBaB._lowered(net, torch.zeros(1, 3))
    with pytest.raises(ValueError, match="^stop:"):
        backward_lower(low, len(low.ops), torch.ones(1, 1, 2), torch.zeros(1, 3),
                       torch.ones(1, 3), [None], stop=1)
