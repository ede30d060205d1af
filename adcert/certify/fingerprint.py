"""The fingerprint of a certification run: everything that determines a verdict.

A journal's meta record carries ``"fingerprint": {key: value}``; a rerun that resumes the journal
must have the same fingerprint, else it is refused with a message naming what differs
(:func:`mismatch_message`). The certifier (:func:`adcert.certify.certify`) fills in what it
knows -- ``eps``, ``stages``, ``stage_options``, ``timeout`` (when a stage uses it), ``sound``,
``radius``, ``shard``, ``n_total``, ``dtype``, ``model`` (sha256 of the weights and buffers) and
``data`` (sha256 of the inputs, labels and indices) -- and a caller adds its own (``adcert
certify``: ``checkpoint``, the sha256 of the checkpoint file, ``dataset`` and ``verifier``).
The batch size and the device are not part of it: resuming with others is fine.

Only keys present in both fingerprints are compared, so a newer adcert that records more can
still resume an older run's journal.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Union

import torch

PathLike = Union[str, os.PathLike]

# a difference in the key on the left is implied by one in a key on the right: not shown twice
_IMPLIED = {"model": ("checkpoint", "dtype"), "data": ("dataset", "n_total")}
_LABELS = {"n_total": "samples", "stage_options": "stage options"}


def file_sha256(path: PathLike, chunk: int = 1 << 20) -> str:
    """The sha256 hex digest of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _update(h, t: torch.Tensor) -> None:
    t = t.detach()
    h.update(f"{t.dtype}{tuple(t.shape)};".encode())
    if t.numel():
        flat = t.to("cpu").contiguous().reshape(-1)
        h.update(memoryview(flat.view(torch.uint8).numpy()))


def tensors_sha256(tensors: Iterable[Any]) -> str:
    """The sha256 of a sequence of tensors (dtype, shape and bytes each) and other JSON-able
    items (e.g. parameter names)."""
    h = hashlib.sha256()
    for t in tensors:
        if isinstance(t, torch.Tensor):
            _update(h, t)
        else:
            h.update(json.dumps(t, sort_keys=True).encode() + b";")
    return h.hexdigest()


def model_sha256(model: torch.nn.Module) -> str:
    """The sha256 of a model's state (every parameter and buffer, by name)."""
    items: List[Any] = []
    for name, t in model.state_dict().items():
        items += [name, t] if isinstance(t, torch.Tensor) else [name, repr(t)]
    return tensors_sha256(items)


def jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists; other objects their str), so
    a fingerprint compares equal to the one stored in a journal."""
    return json.loads(json.dumps(value, default=str))


def differences(stored: Mapping[str, Any], now: Mapping[str, Any]) -> List[str]:
    """The keys present in both with different values (in ``now``'s order), leaving out those
    whose difference another listed key implies (e.g. ``model`` when ``checkpoint`` differs)."""
    diff = [k for k in now if k in stored and stored[k] != now[k]]
    return [k for k in diff if not any(o in diff for o in _IMPLIED.get(k, ()))]


def describe(key: str, value: Any, header: Optional[Mapping[str, Any]] = None) -> str:
    """One fingerprint item in words, e.g. ``eps 0.1``, ``checkpoint a.pt (sha256 1f2e...)``."""
    header = header or {}
    if key == "checkpoint" and isinstance(value, str):
        where = header.get("checkpoint")
        return f"checkpoint {where} (sha256 {value[:12]})" if where else \
            f"checkpoint sha256 {value[:12]}"
    if key in ("model", "data") and isinstance(value, str):
        return f"{'model weights' if key == 'model' else 'input data'} sha256 {value[:12]}"
    if key == "stages" and isinstance(value, list):
        return "stages " + ",".join(map(str, value))
    if key == "shard" and isinstance(value, list) and len(value) == 2:
        return f"shard {value[0]}/{value[1]}"
    if key == "n_total":
        return f"{value} samples"
    if isinstance(value, (dict, list)):
        value = json.dumps(value, sort_keys=True)
    elif isinstance(value, str):
        pass
    else:
        value = repr(value)
    return f"{_LABELS.get(key, key)} {value}"


def mismatch_message(out: Any, keys: List[str], stored: Mapping[str, Any],
                     now: Mapping[str, Any], stored_header: Optional[Mapping[str, Any]] = None,
                     header: Optional[Mapping[str, Any]] = None) -> str:
    """``--out DIR holds a run with eps 0.1; this run has eps 0.05: use another --out``."""
    old = ", ".join(describe(k, stored.get(k), stored_header) for k in keys)
    new = ", ".join(describe(k, now.get(k), header) for k in keys)
    return f"--out {out} holds a run with {old}; this run has {new}: use another --out"


__all__ = ["file_sha256", "tensors_sha256", "model_sha256", "jsonable", "differences",
           "describe", "mismatch_message"]
