"""Build models by name from a JSON-able spec, so checkpoints can rebuild their architecture.

    spec = {"name": "cnn7", "dataset": "cifar10", "width": 64}
    model = build_model(**spec)

With ``dataset``, ``in_channels``, ``num_classes``, ``input_size`` and the Normalize ``mean``/``std``
come from :data:`adcert.data.DATASETS` (explicit keyword arguments win).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict

from torch import nn

from adcert.models.cnn import cnn3, cnn5, cnn7, cnn7_tinyimagenet
from adcert.models.resnet import resnet

MODELS: Dict[str, Callable[..., nn.Module]] = {
    "cnn3": cnn3, "cnn5": cnn5, "cnn7": cnn7, "cnn7-tinyimagenet": cnn7_tinyimagenet,
    "resnet": resnet,
}


def build_model(name: str, dataset: str = None, **kwargs: Any) -> nn.Module:
    """A model from :data:`MODELS`; unknown names or keyword arguments raise naming them."""
    key = str(name).lower().replace("_", "-")
    if key not in MODELS:
        raise KeyError(f"model: unknown model {name!r}; known: {', '.join(MODELS)}")
    fn = MODELS[key]
    accepted = inspect.signature(fn).parameters
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        raise TypeError(f"model {key!r}: unknown argument(s) {', '.join(unknown)}; accepted: "
                        f"{', '.join(accepted)}")
    if dataset is not None:
        from adcert.data import dataset_info

        info = dataset_info(dataset)
        defaults = dict(in_channels=info.shape[0], num_classes=info.num_classes,
                        input_size=info.shape[1], mean=info.mean, std=info.std)
        kwargs = {**{k: v for k, v in defaults.items() if k in accepted}, **kwargs}
    return fn(**kwargs)
