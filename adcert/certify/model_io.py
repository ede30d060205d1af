"""``load_model(path)``: the model to certify, from any of the files adcert users have.

Accepted, tried in this order:

(a) an adcert trainer checkpoint (:mod:`adcert.train.checkpoint`: a dict with ``format ==
    "adcert-checkpoint"``, ``model_spec`` and ``model``), rebuilt by
    :func:`adcert.train.checkpoint.model_from_checkpoint` -- the key names live there only;
    a bare dict with just ``model_spec`` and ``model`` is accepted too;
(b) a TorchScript file (``torch.jit.save``; recognised by the ``code/`` folder in its archive);
    the clean and attack stages can run it, the bound stages need a plain ``nn.Sequential`` and
    report themselves unavailable otherwise;
(c) a ``torch.save``d ``nn.Module``. Unpickling such a file can run arbitrary code: it is only
    done with ``trust_pickle=True`` (the CLI's ``--trust-pickle``), for files you made yourself.

Anything else -- missing, truncated, a state dict without a spec -- raises :class:`ModelFileError`
naming the file and what was expected.
"""
from __future__ import annotations

import os
import pathlib
import zipfile
from typing import Union

import torch
from torch import nn

PathLike = Union[str, os.PathLike]


class ModelFileError(ValueError):
    """A model file cannot be loaded (the message names the file)."""


def _is_torchscript(path: pathlib.Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n for n in z.namelist())


def load_model(path: PathLike, map_location: Union[str, torch.device] = "cpu",
               trust_pickle: bool = False) -> nn.Module:
    """The model stored at ``path``, on ``map_location``, in eval mode (see the module
    docstring for the accepted formats)."""
    from adcert.train.checkpoint import (
        FORMAT, CheckpointError, model_from_checkpoint, model_from_spec,
    )

    path = pathlib.Path(path)
    if not path.is_file():
        raise ModelFileError(f"checkpoint {path}: file not found")
    if _is_torchscript(path):
        try:
            return torch.jit.load(str(path), map_location=map_location).eval()
        except Exception as err:
            raise ModelFileError(f"checkpoint {path}: corrupt TorchScript file "
                                 f"({type(err).__name__}: {err})") from None
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # not weights-only loadable: a pickled module, or corrupt
        if not trust_pickle:
            raise ModelFileError(
                f"checkpoint {path}: not an adcert checkpoint or TorchScript file, and loading it "
                f"as a pickled nn.Module needs trust_pickle=True (--trust-pickle; it can run "
                f"code from the file) ({type(err).__name__}: {str(err).splitlines()[0]})"
            ) from None
        try:
            obj = torch.load(path, map_location=map_location, weights_only=False)
        except Exception as err2:
            raise ModelFileError(f"checkpoint {path}: corrupt or not a torch file "
                                 f"({type(err2).__name__}: {err2})") from None
    if isinstance(obj, nn.Module):
        return obj.to(map_location).eval()
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        try:
            return model_from_checkpoint(path, map_location)
        except CheckpointError as err:
            raise ModelFileError(str(err)) from None
    if isinstance(obj, dict) and "model_spec" in obj and "model" in obj:
        try:
            return model_from_spec(obj, path, map_location)
        except CheckpointError as err:
            raise ModelFileError(str(err)) from None
    raise ModelFileError(f"checkpoint {path}: expected an adcert checkpoint (a dict with "
                         f"'model_spec' and 'model'), a TorchScript file or a saved nn.Module; "
                         f"got a {type(obj).__name__}"
                         + (f" with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict)
                            else ""))


__all__ = ["load_model", "ModelFileError"]
