"""Checkpoints: written atomically, read with clear errors, models rebuilt from their spec.

A checkpoint is a ``torch.save``d dict with ``format == "adcert-checkpoint"`` and ``version``,
``kind`` (``"last"``: resumable training state; ``"final"``: the finished model), ``epoch``
(completed epochs), ``step`` (completed optimiser steps), ``config`` (the run's config as a dict),
``model_spec`` (keyword arguments of :func:`adcert.models.build_model`), ``model`` (state dict),
and for ``"last"`` also ``optimizer``, ``scheduler``, ``swa`` (averaged model state or None) and
``rng`` (one entry per process: torch, numpy and python generator states). Only tensors,
numbers, strings, lists and dicts are stored, so it loads with ``torch.load(weights_only=True)``.

Writes go to a temporary file in the same directory, are fsynced, then renamed over the old file
(``os.replace``), so a crash mid-write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
import pathlib
import random
import tempfile
from typing import Any, Dict, Union

import numpy as np
import torch
from torch import nn

FORMAT = "adcert-checkpoint"
VERSION = 1
PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt or not an adcert checkpoint (the message names it)."""


def _save(obj: Any, f) -> None:  # indirection so tests can simulate a crash mid-write
    torch.save(obj, f)


def atomic_save(obj: Any, path: PathLike) -> None:
    """``torch.save(obj, path)`` through a temporary file in the same directory + fsync +
    ``os.replace`` (+ fsync of the directory). On any error the temporary file is removed and
    ``path`` is untouched."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            _save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # some filesystems cannot fsync a directory
        pass


def rng_state() -> Dict[str, Any]:
    """This process's torch, numpy and python RNG states, in weights_only-loadable form."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": [str(name), torch.from_numpy(keys.astype(np.int64)), int(pos),
                      int(has_gauss), float(cached)],
            "python": [int(version), list(internal), gauss]}


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu"
                    ) -> Dict[str, Any]:
    """The checkpoint dict at ``path``. Raises :class:`CheckpointError` naming ``path`` if it is
    missing, truncated/corrupt, or not an adcert checkpoint."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: file not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types on corrupt zip/pickle data
        raise CheckpointError(f"checkpoint {path}: corrupt or not a torch file "
                              f"({type(err).__name__}: {err})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: not an adcert checkpoint "
                              f"(no format={FORMAT!r} entry)")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path}: version {ckpt.get('version')!r}, this adcert "
                              f"reads version {VERSION}")
    needed = ["kind", "epoch", "model_spec", "model", "config"]
    if ckpt["kind"] == "last":
        needed += ["step", "optimizer", "scheduler", "swa", "rng"]
    missing = [k for k in needed if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path}: incomplete, lacks {', '.join(missing)}")
    return ckpt


def model_from_spec(ckpt: Dict[str, Any], path: PathLike,
                    map_location: Union[str, torch.device] = "cpu") -> nn.Module:
    """``ckpt["model_spec"]`` rebuilt with :func:`adcert.models.build_model`, loaded with
    ``ckpt["model"]``, in eval mode; :class:`CheckpointError` naming ``path`` if they disagree."""
    from adcert.models import build_model

    try:
        model = build_model(**ckpt["model_spec"])
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, KeyError) as err:
        raise CheckpointError(f"checkpoint {path}: the weights do not fit the model spec "
                              f"{ckpt['model_spec']} ({err})") from None
    return model.to(map_location).eval()


def model_from_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu"
                          ) -> nn.Module:
    """The model of an adcert checkpoint (``"final"``: the finished model, ``"last"``: the
    training weights), rebuilt from its spec, in eval mode."""
    return model_from_spec(load_checkpoint(path, map_location), path, map_location)


__all__ = ["CheckpointError", "FORMAT", "VERSION", "atomic_save", "rng_state", "set_rng_state",
           "load_checkpoint", "model_from_checkpoint", "model_from_spec"]
