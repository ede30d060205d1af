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
naming the file and what was expected. A file that does not load weights-only is first read
opcode by opcode (:func:`pickled_classes`, nothing executed): truncated, damaged or non-torch files
are reported as corrupt, and ``trust_pickle`` is suggested only for a valid file whose pickle holds
an ``nn.Module`` (or classes that cannot be checked without running code from it).
"""
from __future__ import annotations

import io
import os
import pathlib
import pickletools
import sys
import zipfile
from typing import Any, Dict, List, Optional, Tuple, Union

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
    except Exception:  # not weights-only loadable: a pickled module, or corrupt
        # Read the pickle's opcodes (nothing is executed) to tell a damaged file from a valid
        # one holding Python objects before suggesting (or doing) an unrestricted load.
        try:
            classes = pickled_classes(path)
        except _NotATorchFile as bad:
            raise ModelFileError(f"checkpoint {path}: corrupt or not a checkpoint ({bad}); "
                                 f"expected an adcert checkpoint, a TorchScript file or a "
                                 f"torch.save'd nn.Module") from None
        modules = [c for c in classes if _module_class(c) is True]
        unknown = [c for c in classes if _module_class(c) is None]
        if not modules and not unknown:
            classes = sorted(classes, key=lambda c: c.startswith("torch."))  # the foreign first
            raise ModelFileError(
                f"checkpoint {path}: not a model: a torch file holding pickled Python objects "
                f"({', '.join(classes[:4]) or 'none'}) that a weights-only load refuses, and "
                f"no nn.Module; expected an adcert checkpoint, a TorchScript file or a saved "
                f"nn.Module") from None
        if not trust_pickle:
            what = (f"a pickled nn.Module ({modules[0]})" if modules else
                    f"pickled objects of classes that cannot be checked without running code "
                    f"from the file ({', '.join(unknown[:4])}), perhaps a saved nn.Module")
            raise ModelFileError(
                f"checkpoint {path}: holds {what}, not an adcert checkpoint or TorchScript "
                f"file; loading it needs trust_pickle=True (--trust-pickle), which runs code "
                f"from the file: only for files you made yourself") from None
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


class _NotATorchFile(ValueError):
    """The file is damaged or was not written by ``torch.save`` (the message says why)."""


_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE",
               "BINUNICODE", "BINUNICODE8"}


def _scan_pickle(stream) -> Tuple[List[str], List[Any]]:
    """The classes/functions one pickle in ``stream`` references (``"module.qualname"``) and
    the values it pushed (constants, ``None`` for anything else), read from the opcodes without
    executing anything (``pickletools.genops``); :class:`_NotATorchFile` if it is not a whole
    pickle."""
    found: List[str] = []
    strings: List[Any] = []  # what was pushed (constants; None: other), for STACK_GLOBAL
    memo: Dict[Any, Any] = {}
    try:
        for op, arg, _pos in pickletools.genops(stream):
            name = op.name
            if name in _STRING_OPS:
                strings.append(arg)
            elif name in ("GLOBAL", "INST"):
                module, _, qual = str(arg).partition(" ")
                found.append(f"{module}.{qual}")
            elif name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif name == "MEMOIZE":
                memo[len(memo)] = strings[-1] if strings else None
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = strings[-1] if strings else None
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                strings.append(memo.get(arg))
            elif name.startswith("LONG") or name.startswith("BININT") or name == "INT":
                strings.append(arg)
            elif op.stack_after:  # pushed something else: not a constant a later op can use
                strings.append(None)
    except Exception as err:  # ValueError for unknown opcodes / truncation, and others
        raise _NotATorchFile(f"not a readable pickle: {err}") from None
    return found, strings


def pickled_classes(path: PathLike) -> List[str]:
    """Every class or function (``"module.qualname"``) that the object pickled in the
    ``torch.save`` file ``path`` references, found without unpickling it (so without running
    code from the file). Raises :class:`_NotATorchFile` for a file that is truncated, damaged or
    not written by ``torch.save`` (zip format, or the legacy format)."""
    path = pathlib.Path(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04" or zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                pkl = [n for n in z.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
                if not pkl:
                    raise _NotATorchFile("a zip archive without data.pkl")
                bad = z.testzip()  # reads every member: CRC errors of truncated/damaged data
                if bad is not None:
                    raise _NotATorchFile(f"zip member {bad} is damaged")
                data = z.read(pkl[0])
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
            if isinstance(err, _NotATorchFile):
                raise
            raise _NotATorchFile(f"a truncated or damaged zip archive: {err}") from None
        return list(dict.fromkeys(_scan_pickle(io.BytesIO(data))[0]))
    # the legacy format: pickles of the magic number, the protocol version, the system info and
    # the object, then the storage keys and the raw storage bytes
    import torch.serialization as ts

    with open(path, "rb") as f:
        _, magic = _scan_pickle(f)
        if magic[-1:] != [ts.MAGIC_NUMBER]:
            raise _NotATorchFile("neither a zip archive nor a legacy torch.save file")
        _scan_pickle(f)  # protocol version
        _scan_pickle(f)  # system info
        found, _ = _scan_pickle(f)
        _scan_pickle(f)  # storage keys
    return list(dict.fromkeys(found))


def _module_class(name: str) -> Optional[bool]:
    """Is ``"module.qualname"`` an ``nn.Module`` subclass? Looked up only among the modules
    already imported (importing one could run code): ``None`` when it cannot be told."""
    parts = name.split(".")
    parts[0] = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(parts[0], parts[0])
    for i in range(len(parts) - 1, 0, -1):
        module = sys.modules.get(".".join(parts[:i]))
        if module is None:
            continue
        obj: Any = module
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return isinstance(obj, type) and issubclass(obj, nn.Module)
    return None


__all__ = ["load_model", "ModelFileError", "pickled_classes"]
