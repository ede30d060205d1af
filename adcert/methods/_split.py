"""Splitting a sequential model into a feature extractor and a head (TAPS, STAPS, CC-DIST).

The two parts share the original modules (no copies), so the step's batch-norm statistics
``{bn: (mean, var)}`` and the optimiser's parameters apply to them unchanged.
"""
from __future__ import annotations

from typing import List, Tuple

from torch import nn


def flat_layers(model: nn.Module, name: str = "model") -> List[nn.Module]:
    """The leaf modules of an ``nn.Sequential`` (nested ones flattened), in order."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"{name}: expected an nn.Sequential model to split, got "
                        f"{type(model).__name__}")
    out: List[nn.Module] = []
    for m in model:
        out.extend(flat_layers(m, name) if isinstance(m, nn.Sequential) else [m])
    return out


def split_by_relus(model: nn.Module, head_relus: int, name: str = "classifier_relus"
                   ) -> Tuple[nn.Sequential, nn.Sequential]:
    """``(extractor, head)`` with ``head`` holding the last ``head_relus`` ReLU layers: the cut is
    right after the ``(n - head_relus)``-th ReLU of the ``n`` in ``model``. ``head_relus = 0``
    leaves only the layers after the last ReLU in the head. Requires ``0 <= head_relus < n``."""
    layers = flat_layers(model)
    relus = [i for i, m in enumerate(layers) if isinstance(m, nn.ReLU)]
    if isinstance(head_relus, bool) or not isinstance(head_relus, int):
        raise TypeError(f"{name}: expected an int, got {head_relus!r}")
    if not 0 <= head_relus < len(relus):
        raise ValueError(f"{name}: expected 0 <= {name} < {len(relus)} (the model's ReLU "
                         f"layers; the feature extractor needs at least one), got {head_relus}")
    cut = relus[len(relus) - head_relus - 1] + 1
    return nn.Sequential(*layers[:cut]), nn.Sequential(*layers[cut:])


def split_before_last_linear(model: nn.Module, name: str = "model"
                             ) -> Tuple[nn.Sequential, nn.Linear]:
    """``(h, g)``: ``h`` every layer before the final ``nn.Linear`` (the penultimate features,
    ``[B, k]``), ``g`` that linear layer. Raises if the model does not end in a Linear."""
    layers = flat_layers(model, name)
    if not layers or not isinstance(layers[-1], nn.Linear):
        raise ValueError(f"{name}: expected a model ending in nn.Linear (the classification "
                         f"head), got {type(layers[-1]).__name__ if layers else 'an empty model'}")
    return nn.Sequential(*layers[:-1]), layers[-1]
