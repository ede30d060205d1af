"""The ``abcrown`` stage: run the official alpha,beta-CROWN verifier on the undecided samples.

alpha,beta-CROWN (``complete_verifier/abcrown.py`` of its repository) is NOT a dependency: the
user points at an installed copy with ``--abcrown PATH`` or ``$ADCERT_ABCROWN`` (the script, or its
``complete_verifier`` folder). :func:`find_abcrown` resolves that and raises
:class:`AbcrownNotFound`, naming both, when there is none.

For a batch of samples (``x: [B, *in]`` in [0, 1], labels ``y: [B]``), :class:`AbcrownStage`:

1. writes one VNNLIB file per sample (:func:`write_vnnlib`): the input box
   ``clip(x +- eps, 0, 1)``, rounded OUTWARD to float32 so abcrown's float32 box contains ours,
   and the unsafe set ``OR_{i != y} (Y_i >= Y_y)``, which abcrown proves empty ("safe") or hits;
2. saves the model (``torch.save`` of the module; TorchScript is refused) and writes an abcrown
   YAML config (:func:`abcrown_config`) whose ``model.name`` is abcrown's ``Customized(...)``
   loader pointing at :func:`load_for_abcrown` of this module (no ONNX; ``Normalize`` is an ordinary
   module to abcrown), the specs as a one-column instance CSV, ``bab.timeout`` per sample, the
   device, and a counterexample saver (:func:`save_counterexample`) that appends every
   counterexample to a JSON-lines file;
3. runs ``python -m adcert.certify.abcrown ABCROWN_PY --config CFG`` as a subprocess with a
   wall-clock limit (this module's ``__main__`` first puts stubs in place of the modules abcrown
   imports at start-up but these runs never use (:data:`OPTIONAL_IMPORTS`): ``torchvision``
   always -- abcrown needs it only for its built-in data sets; set
   ``ADCERT_ABCROWN_TORCHVISION=real`` to keep the real one -- and, when not installed,
   ``onnx2pytorch``, ``onnx``, ``onnxruntime``, ``onnxoptimizer``, ``skl2onnx`` (its ONNX model
   loader) and ``gurobipy`` (its MIP/LP solvers); calling into a stub raises an error naming the
   module to install; then runs the script);
4. reads abcrown's per-instance results (:func:`read_results`: the pickle it writes after every
   instance) and maps each status (:func:`map_status`): ``safe*`` -> ``certified`` (stage
   ``abcrown``), ``unsafe*`` -> ``attacked`` ONLY when one of the saved counterexamples, projected
   into the sample's exact box, is misclassified by our own forward pass (else ``unknown``),
   anything else (``unknown``, ``timeout``, no result) -> ``unknown``. A sample whose box holds a
   verified counterexample is ``attacked`` whatever its status (a "safe" one is warned about).
   A subprocess killed at its wall-clock limit leaves the samples without a result ``unknown``;
   for crashes and unreadable results see :class:`AbcrownStage` ("Failures").

abcrown's "safe" is that tool's floating-point certificate (the number the papers report), not
adcert's rounding-sound one; the journal records the deciding stage as ``abcrown``.
"""
from __future__ import annotations

import collections
import functools
import io
import json
import math
import os
import pathlib
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from adcert.certify.stages import Outcome

Tensor = torch.Tensor
PathLike = Union[str, os.PathLike]

ENV_VAR = "ADCERT_ABCROWN"
STAGE_NAME = "abcrown"
RESULTS_FILE = "results.pkl"  # abcrown's general.results_file, in each run's folder
HOOKS_FILE = "adcert_abcrown_hooks.py"  # the loader/saver module abcrown loads, ditto


class AbcrownNotFound(FileNotFoundError):
    """alpha,beta-CROWN was requested but cannot be found (the message says where to point)."""


class AbcrownError(RuntimeError):
    """The abcrown subprocess failed without results (the message has its log's tail)."""


# ---------------------------------------------------------------------------------------------
# Finding the verifier

def find_abcrown(path: Optional[PathLike] = None) -> pathlib.Path:
    """The ``abcrown.py`` script: ``path`` (the script or its ``complete_verifier`` folder), else
    ``$ADCERT_ABCROWN``; raises :class:`AbcrownNotFound` naming ``--abcrown`` and the variable."""
    given = path if path is not None else os.environ.get(ENV_VAR) or None
    hint = (f"point at alpha,beta-CROWN's complete_verifier/abcrown.py with --abcrown PATH or "
            f"the environment variable {ENV_VAR}")
    if given is None:
        raise AbcrownNotFound(f"alpha,beta-CROWN not found: {hint}")
    p = pathlib.Path(given).expanduser()
    if p.is_dir():
        p = p / "abcrown.py"
    if not p.is_file():
        src = "--abcrown" if path is not None else f"${ENV_VAR}"
        raise AbcrownNotFound(f"alpha,beta-CROWN not found: {src} = {given!r} is not abcrown.py "
                              f"or a folder holding it; {hint}")
    return p.resolve()


# ---------------------------------------------------------------------------------------------
# VNNLIB specifications

def _outward_f32(lo: np.ndarray, hi: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """float64 bounds rounded outward to float32-representable values (as float64)."""
    lo32, hi32 = lo.astype(np.float32), hi.astype(np.float32)
    lo32 = np.where(lo32.astype(np.float64) > lo, np.nextafter(lo32, np.float32(-np.inf)), lo32)
    hi32 = np.where(hi32.astype(np.float64) < hi, np.nextafter(hi32, np.float32(np.inf)), hi32)
    return lo32.astype(np.float64), hi32.astype(np.float64)


def vnnlib_box(x: Tensor, eps: float) -> Tuple[np.ndarray, np.ndarray]:
    """The box ``[clip(x - eps, 0, 1), clip(x + eps, 0, 1)]`` of one sample ``x: [*in]``,
    flattened (C order) to float64 arrays ``[numel]``, rounded outward to float32 values."""
    xf = x.detach().to("cpu", torch.float64).reshape(-1).numpy()
    lo, hi = np.clip(xf - eps, 0.0, 1.0), np.clip(xf + eps, 0.0, 1.0)
    return _outward_f32(lo, hi)


def write_vnnlib(path: PathLike, lower: np.ndarray, upper: np.ndarray, label: int,
                 num_classes: int) -> None:
    """Write a VNNLIB robustness property: inputs ``X_k`` in ``[lower[k], upper[k]]`` (``[n]``
    each), outputs ``Y_0..Y_{C-1}``, unsafe set ``OR_{i != label} (Y_i >= Y_label)``."""
    lower, upper = np.asarray(lower, np.float64).reshape(-1), np.asarray(upper, np.float64)
    upper = upper.reshape(-1)
    if lower.shape != upper.shape or not np.all(lower <= upper):
        raise ValueError(f"lower, upper: expected equal shapes with lower <= upper, got "
                         f"{lower.shape}, {upper.shape}")
    if not (isinstance(num_classes, int) and num_classes >= 2 and 0 <= label < num_classes):
        raise ValueError(f"label: expected 0 <= label < num_classes (>= 2), got label={label}, "
                         f"num_classes={num_classes}")
    lines = [f"; adcert robustness property: label {label}, {lower.size} inputs"]
    lines += [f"(declare-const X_{k} Real)" for k in range(lower.size)]
    lines += [f"(declare-const Y_{j} Real)" for j in range(num_classes)]
    for k, (lo, hi) in enumerate(zip(lower.tolist(), upper.tolist())):
        lines.append(f"(assert (>= X_{k} {lo!r}))")
        lines.append(f"(assert (<= X_{k} {hi!r}))")
    lines.append("(assert (or")
    lines += [f"    (and (>= Y_{i} Y_{label}))" for i in range(num_classes) if i != label]
    lines.append("))")
    pathlib.Path(path).write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# abcrown's side: the model loader and the counterexample saver it calls (via ``Customized``)

def load_for_abcrown(path: str, dtype: str = "float32") -> nn.Module:
    """abcrown's model loader: the module saved at ``path`` (our own file, written by
    :class:`AbcrownStage`), on CPU, in eval mode, in ``dtype``."""
    from adcert.certify.model_io import load_model

    model = load_model(path, "cpu", trust_pickle=True)
    return model.to(getattr(torch, dtype)).eval()


def save_counterexample(adv_input, adv_output, res_path, out: str) -> None:
    """abcrown's counterexample saver: append ``{"x": [n floats], "y": [C floats]}`` to the
    JSON-lines file ``out`` (``res_path``, abcrown's single file, is not used)."""
    rec = {"x": adv_input.detach().double().cpu().reshape(-1).tolist(),
           "y": adv_output.detach().double().cpu().reshape(-1).tolist()}
    with open(out, "a") as f:
        f.write(json.dumps(rec) + "\n")


def read_counterexamples(path: PathLike) -> List[Tensor]:
    """The points saved by :func:`save_counterexample`: a list of float64 ``[n]`` tensors (a
    missing file: empty; a line cut by a kill is ignored)."""
    p = pathlib.Path(path)
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(torch.tensor(json.loads(line)["x"], dtype=torch.float64))
        except (ValueError, KeyError, TypeError):
            continue
    return out


# ---------------------------------------------------------------------------------------------
# The config and abcrown's results

def abcrown_config(workdir: PathLike, model_file: PathLike, csv_file: PathLike,
                   input_shape: Sequence[int], timeout: float, device: str = "cpu",
                   dtype: str = "float32", overrides: Optional[Dict[str, Any]] = None
                   ) -> Dict[str, Any]:
    """abcrown's YAML config as a dict: our model loader and counterexample saver (through the
    hooks file :func:`write_hooks` puts in ``workdir``), the instance CSV, ``input_shape``
    ``[*in]`` (batch dim excluded), per-instance ``timeout`` (s), ``device``; ``overrides`` (a
    nested dict, e.g. ``{"solver": {"batch_size": 256}}``) is merged in last."""
    me = pathlib.Path(workdir) / HOOKS_FILE  # see write_hooks
    cex = pathlib.Path(workdir) / "counterexamples.jsonl"
    cfg: Dict[str, Any] = {
        "general": {"device": device, "csv_name": str(csv_file), "root_path": str(workdir),
                    "results_file": str(pathlib.Path(workdir) / RESULTS_FILE),
                    "save_adv_example": True, "double_fp": dtype == "float64",
                    "complete_verifier": "bab"},
        # abcrown eval()s these strings as Python: the paths are quoted with repr
        "model": {"name": f"Customized({str(me)!r}, 'load_for_abcrown', "
                          f"path={str(model_file)!r}, dtype={dtype!r})",
                  "input_shape": [-1] + [int(s) for s in input_shape]},
        "attack": {"adv_saver": f"Customized({str(me)!r}, 'save_counterexample', "
                                f"out={str(cex)!r})",
                   "cex_path": str(pathlib.Path(workdir) / "abcrown_cex.txt")},
        "bab": {"timeout": float(timeout)},
    }
    _merge(cfg, overrides or {})
    return cfg


def write_hooks(workdir: PathLike) -> pathlib.Path:
    """Write the small module abcrown's ``Customized(file, name)`` loads (it runs the file
    outside the package): it re-exports :func:`load_for_abcrown` and
    :func:`save_counterexample` from this module."""
    path = pathlib.Path(workdir) / HOOKS_FILE
    path.write_text("# written by adcert.certify.abcrown for alpha,beta-CROWN's Customized()\n"
                    "from adcert.certify.abcrown import load_for_abcrown, save_counterexample\n")
    return path


def _merge(d: Dict[str, Any], u: Dict[str, Any]) -> None:
    for k, v in u.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            _merge(d[k], v)
        else:
            d[k] = v


def _storage_from_bytes(data: Any):
    """What ``torch.storage._load_from_bytes`` does for a pickled tensor's storage -- read the
    nested ``torch.save`` record -- but with ``torch.load(weights_only=True)`` (torch's restricted
    unpickler; the original uses ``weights_only=False``, which runs any code the record names)
    and onto the CPU (abcrown may have run on a GPU). Only a plain storage is accepted."""
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError(f"abcrown results: a tensor storage must be bytes, got "
                                     f"{type(data).__name__}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TypedStorage is deprecated
            storage = torch.load(io.BytesIO(bytes(data)), weights_only=True, map_location="cpu")
    except Exception as err:  # weights_only refuses any global it does not know
        lines = [l.strip() for l in str(err).splitlines() if l.strip()]
        why = next((l for l in lines if "GLOBAL" in l), lines[0] if lines else "")
        raise pickle.UnpicklingError(f"abcrown results: refusing a tensor storage: "
                                     f"{type(err).__name__}: {why}") from None
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise pickle.UnpicklingError(f"abcrown results: expected a tensor storage, got "
                                     f"{type(storage).__name__}")
    return storage


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False,
                    backward_hooks=None, metadata=None) -> Tensor:
    """``torch._utils._rebuild_tensor_v2`` for a plain tensor only: a storage from
    :func:`_storage_from_bytes`, integer offset, size and stride, no backward hooks (they would
    be code) and no metadata; ``requires_grad`` is dropped."""
    ints = lambda v: isinstance(v, (tuple, list)) and all(  # noqa: E731
        isinstance(k, int) and not isinstance(k, bool) for k in v)
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)) or \
            not isinstance(storage_offset, int) or not ints(size) or not ints(stride) or \
            backward_hooks or metadata:
        raise pickle.UnpicklingError("abcrown results: refusing a tensor that is not a plain "
                                     "CPU tensor")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage is deprecated
        return torch._utils._rebuild_tensor_v2(storage, storage_offset, tuple(size),
                                               tuple(stride), False, collections.OrderedDict())


class _ResultsUnpickler(pickle.Unpickler):
    """abcrown's results file: plain containers, strings and numbers, and plain tensors (its
    branch-and-bound stores bounds as torch tensors, pickled as ``torch._utils.
    _rebuild_tensor_v2(torch.storage._load_from_bytes(bytes), ...)``). Those two globals are
    replaced by :func:`_rebuild_tensor` and :func:`_storage_from_bytes`, which rebuild a plain
    CPU tensor and nothing else; every other global (numpy, classes, functions) is refused, so
    nothing in the file can run code."""
    _ok = {("collections", "defaultdict"), ("collections", "OrderedDict"), ("builtins", "list"),
           ("builtins", "dict")}
    _tensor = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
               ("torch.storage", "_load_from_bytes"): _storage_from_bytes}

    def find_class(self, module, name):
        if (module, name) in self._ok:
            return super().find_class(module, name)
        if (module, name) in self._tensor:
            return self._tensor[(module, name)]
        raise pickle.UnpicklingError(f"abcrown results: refusing to load {module}.{name} "
                                     f"(only plain containers and tensors are expected)")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("abcrown results: refusing a persistent id")


def load_results(path: PathLike) -> Any:
    """The whole object pickled in abcrown's results file, read by :class:`_ResultsUnpickler`
    (tensors come back as plain CPU tensors)."""
    with open(path, "rb") as f:
        return _ResultsUnpickler(f).load()


def read_results(path: PathLike) -> List[Tuple[str, float]]:
    """abcrown's per-instance results file (a pickle ``{"summary": {status: [indices]},
    "results": [[status, seconds], ...], "bab_ret": [...]}``, instances in CSV order; older
    abcrown versions: ``"results": [status, ...]`` and ``"time": [seconds, ...]``) ->
    ``[(status, seconds)]``. Only plain containers and plain tensors are unpickled (see
    :class:`_ResultsUnpickler`); anything else raises ``pickle.UnpicklingError``."""
    data = load_results(path)
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise ValueError(f"{path}: expected abcrown's results dict with a 'results' list")
    items = data["results"]
    times = data.get("time")
    if items and all(isinstance(i, str) for i in items) and isinstance(times, list) and \
            len(times) == len(items):  # the older format
        items = [[i, t] for i, t in zip(items, times)]
    out = []
    for k, item in enumerate(items):
        if not (isinstance(item, (list, tuple)) and len(item) >= 2 and isinstance(item[0], str)):
            raise ValueError(f"{path}: results[{k}]: expected [status, seconds], got {item!r}")
        out.append((item[0], float(item[1])))
    return out


def map_status(status: str) -> str:
    """abcrown's status string -> ``"safe"``, ``"unsafe"`` or ``"unknown"``: ``safe``,
    ``safe-incomplete``, ``safe (timed out)``, ... are safe; ``unsafe-pgd``, ``unsafe-bab``,
    ``unsafe-mip`` ... unsafe; ``unknown``, ``timeout`` and anything unrecognised unknown."""
    s = status.strip().lower()
    head = s.split(" ")[0]
    if head.startswith("unsafe") or head == "sat":
        return "unsafe"
    if head.startswith("safe") or head == "unsat":
        return "safe"
    if head not in ("unknown", "timeout", "timed"):
        warnings.warn(f"abcrown: unrecognised status {status!r} counted as unknown",
                      RuntimeWarning, stacklevel=2)
    return "unknown"


# ---------------------------------------------------------------------------------------------
# The stage

@dataclass
class AbcrownOutcome(Outcome):
    """An :class:`~adcert.certify.stages.Outcome` with ``extra``: per sample, abcrown's raw
    ``{"status": str or None, "seconds": float}`` (``None`` status: no result, e.g. killed;
    with ``"error"``: the batch failed, see :class:`AbcrownStage`)."""
    extra: List[Optional[Dict[str, Any]]] = field(default_factory=list)


class AbcrownStage:
    """A certification stage (see :mod:`adcert.certify.stages`) that hands every undecided
    sample of a batch to alpha,beta-CROWN in one subprocess.

    Args:
        abcrown: the script or its folder (default ``$ADCERT_ABCROWN``); resolved now, so a
            missing verifier raises :class:`AbcrownNotFound` before any work.
        timeout: abcrown's per-sample branch-and-bound limit (s).
        device: abcrown's device (``"cpu"``, ``"cuda"``).
        workdir: where each run's files (specs, config, model, ``abcrown.log``) go, one
            sub-folder per batch, kept; ``None``: a temporary folder, removed after the run.
        startup: seconds allowed for abcrown's start-up, on top of ``timeout`` per sample (with
            ``slack`` more), in the subprocess's wall-clock limit.
        slack: seconds per sample beyond ``timeout`` in that limit (default 30): abcrown's own
            timeout does not cover its PGD attack before the bounds (``attack: pgd_order:
            before``, its default; measured: a CNN7 sample took 32 s under a 30 s timeout), and
            a batch killed at the limit leaves all its samples unknown.
        config: nested overrides of the generated YAML config.
        python: the interpreter that runs abcrown (default: this one).

    Time: ``run(..., time_limits=...)`` (the pipeline's remaining whole-sample budgets) lowers
    abcrown's per-instance timeout for a batch to the largest of them (one abcrown run serves
    the whole batch); ``Outcome.times`` are abcrown's own seconds per instance (0 for an
    instance without a result), the pipeline sharing the rest of the subprocess's wall time
    (start-up, an instance killed at the limit) equally.

    Failures: a batch whose results file cannot be read (corrupt, or holding an object that is
    not a plain container or tensor), holds more results than instances, or -- once a batch
    of this stage has run -- a batch whose abcrown crashes or writes nothing, is recorded per
    sample: undecided (``unknown``), ``extra`` ``{"status": None, "error": message}``, with a
    warning, and the run goes on. A crash (or no result at all) on the stage's FIRST batch
    raises :class:`AbcrownError` instead (nothing journaled; a rerun resumes): that is almost
    always a set-up problem (a missing import, a bad ``--abcrown-config``) that would turn every
    sample into ``unknown``.
    """
    name = STAGE_NAME

    def __init__(self, abcrown: Optional[PathLike] = None, timeout: float = 30.0,
                 device: str = "cpu", workdir: Optional[PathLike] = None,
                 startup: float = 120.0, slack: float = 30.0,
                 config: Optional[Dict[str, Any]] = None, python: Optional[str] = None):
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout: expected seconds > 0, got {timeout!r}")
        self.script = find_abcrown(abcrown)
        self.timeout, self.device = float(timeout), str(device)
        self.workdir = pathlib.Path(workdir) if workdir is not None else None
        self.startup, self.slack = float(startup), float(slack)
        self.config, self.python = dict(config or {}), python or sys.executable
        self.last_statuses: List[Optional[str]] = []
        self._batch_timeout = self.timeout  # this batch's per-instance timeout (time_limits)
        self._ran = False  # has a batch run (not crashed)? see the class docstring

    def unavailable(self, model, x, y, eps) -> Optional[str]:
        if not isinstance(model, nn.Module) or isinstance(model, torch.jit.ScriptModule):
            return "abcrown needs a plain nn.Module (not TorchScript) to build its bounds"
        if not eps > 0:
            return f"eps = {eps}: nothing to verify"
        return None

    def fingerprint(self) -> Dict[str, Any]:
        """The settings that can change a verdict (part of the journal's fingerprint; the
        script's location, the device and the work folder are not)."""
        return {"timeout": self.timeout, "config": self.config}

    def _limit(self, n: int) -> float:
        return self.startup + n * (self._batch_timeout + self.slack)

    def run(self, model: nn.Module, x: Tensor, y: Tensor, eps: float,
            time_limits: Optional[Sequence[Optional[float]]] = None) -> "AbcrownOutcome":
        """Verify ``x: [B, *in]`` (labels ``y: [B]``) at radius ``eps``: verdicts
        ``"certified"``, ``"attacked"`` or ``None`` (undecided: abcrown's unknown/timeout, an
        unconfirmed "unsafe", or a failed batch); values ``None``; adv the verified points;
        ``extra`` abcrown's ``{"status", "seconds"}`` per sample (journaled by the pipeline;
        ``"error"`` added for a failed batch); ``times`` abcrown's seconds per sample.
        ``time_limits``: per-sample limits (s), see the class docstring."""
        from adcert.attacks.autoattack import verify_counterexamples

        n = x.shape[0]
        if n == 0:
            return AbcrownOutcome([], [], [], extra=[])
        given = [t for t in (time_limits or []) if t is not None]
        self._batch_timeout = min(self.timeout, max(given)) if given else self.timeout
        if not self._batch_timeout > 0:
            self._batch_timeout = self.timeout
        with torch.no_grad():
            num_classes = int(model(x[:1]).shape[1])
        if self.workdir is not None:
            self.workdir.mkdir(parents=True, exist_ok=True)
            work = pathlib.Path(tempfile.mkdtemp(prefix=time.strftime("run-%Y%m%d-%H%M%S-"),
                                                 dir=self.workdir))
        else:
            work = pathlib.Path(tempfile.mkdtemp(prefix="adcert-abcrown-"))
        try:
            results, failure, fatal = self._run_abcrown(model, x, y, eps, num_classes, work)
            cex = read_counterexamples(work / "counterexamples.jsonl")
        finally:
            if self.workdir is None:
                shutil.rmtree(work, ignore_errors=True)
        if failure is not None and fatal and not self._ran:
            raise AbcrownError(failure)  # the first batch: a set-up problem, see the docstring
        self._ran = self._ran or not fatal
        if failure is not None:
            warnings.warn(f"abcrown: a batch of {n} samples failed; its samples without a "
                          f"result are recorded unknown with the error, and the run goes on: "
                          f"{failure.splitlines()[0]}", RuntimeWarning, stacklevel=2)
        statuses = [r[0] if r is not None else None for r in results]
        self.last_statuses = statuses
        verdicts: List[Optional[str]] = []
        adv: List[Optional[Tensor]] = []
        for j, st in enumerate(statuses):
            kind = map_status(st) if st is not None else "unknown"
            # any saved point that really breaks this sample's box decides it, whatever abcrown
            # said about it (a "safe" one then is a contradiction, reported)
            point = self._confirm(model, x[j], y[j], eps, cex, verify_counterexamples)
            if point is not None and kind == "safe":
                warnings.warn(f"abcrown: status {st!r} for a sample with a verified "
                              f"counterexample; journaled as attacked", RuntimeWarning,
                              stacklevel=2)
            verdicts.append("attacked" if point is not None else
                            "certified" if kind == "safe" else None)  # None: undecided
            adv.append(point)
        extra: List[Optional[Dict[str, Any]]] = [
            {"status": r[0], "seconds": r[1]} if r is not None else
            {"status": None} if failure is None else {"status": None, "error": failure[:2000]}
            for r in results]
        times = [max(float(r[1]), 0.0) if r is not None and math.isfinite(r[1]) else 0.0
                 for r in results]
        return AbcrownOutcome(verdicts, [None] * n, adv, times, extra=extra)

    @staticmethod
    def _confirm(model, x, y, eps, cex, verify) -> Optional[Tensor]:
        """A saved counterexample that, projected into ``x``'s box, our forward pass
        misclassifies (``z_i >= z_y``), as ``[*in]`` in ``x``'s dtype; else ``None``."""
        lo, hi = vnnlib_box(x, eps)
        for c in cex:
            if c.numel() != x.numel():
                continue
            v = c.numpy()  # belongs to this sample's (float32-rounded) box?
            if not (np.all(v >= lo) and np.all(v <= hi)):
                continue
            broken, x_proj, _ = verify(model, x[None], c.reshape(x.shape)[None], y[None], eps)
            if bool(broken[0]):
                return x_proj[0].detach().cpu()
        return None

    def _run_abcrown(self, model, x, y, eps, num_classes, work: pathlib.Path
                     ) -> Tuple[List[Optional[Tuple[str, float]]], Optional[str], bool]:
        """One abcrown run on the batch -> (``[(status, seconds)]`` or ``None`` per sample,
        the failure's message or ``None``, whether it is a crash or no output at all)."""
        import yaml

        n = x.shape[0]
        specs = []
        for j in range(n):
            lo, hi = vnnlib_box(x[j], eps)
            spec = work / f"spec_{j}.vnnlib"
            write_vnnlib(spec, lo, hi, int(y[j]), num_classes)
            specs.append(str(spec))
        (work / "instances.csv").write_text("\n".join(specs) + "\n")
        model_file = work / "model.pt"
        torch.save(model, model_file)
        dtype = "float64" if x.dtype == torch.float64 else "float32"
        write_hooks(work)
        cfg = abcrown_config(work, model_file, work / "instances.csv", tuple(x.shape[1:]),
                             self._batch_timeout, self.device, dtype, self.config)
        (work / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=True))
        env = dict(os.environ)
        root = str(pathlib.Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
        log = work / "abcrown.log"
        cmd = [self.python, "-m", "adcert.certify.abcrown", str(self.script), "--config",
               str(work / "config.yaml")]
        timed_out = False
        with open(log, "wb") as f:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # its own group: killed as one
            try:
                rc = proc.wait(timeout=self._limit(n))
            except subprocess.TimeoutExpired:
                timed_out, rc = True, None
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        def tail() -> str:
            return log.read_text(errors="replace")[-3000:]

        failure, fatal = None, False
        if rc:  # a crash decides nothing
            failure, fatal = f"abcrown exited with status {rc} (log {log}):\n{tail()}", True
        found = work / RESULTS_FILE
        results: List[Tuple[str, float]] = []
        if found.exists():
            try:
                results = read_results(found)
            except Exception as err:  # unreadable: refused globals, a cut file, a bad format
                if failure is None and not timed_out:  # (killed mid-write: nothing to say)
                    failure = (f"cannot read abcrown's results {found}: {type(err).__name__}: "
                               f"{err}")
                results = []
        elif failure is None and not timed_out:
            failure, fatal = f"abcrown wrote no results (log {log}):\n{tail()}", True
        if len(results) > n:
            failure = (f"abcrown reported {len(results)} results for {n} instances "
                       f"(log {log})")
            results = []
        return list(results) + [None] * (n - len(results)), failure, fatal


# ---------------------------------------------------------------------------------------------
# The launcher: ``python -m adcert.certify.abcrown ABCROWN_PY ARGS...``

#: Modules abcrown imports at start-up that this adapter's runs never use: ``torchvision`` (its
#: built-in data sets), the ONNX tool chain (``load_model.py``'s ONNX loader; our model comes
#: through a ``Customized`` loader) and ``gurobipy`` (its MIP/LP solvers, used only by configs
#: that ask for them, e.g. ``complete_verifier: mip`` or ``bab-refine``).
OPTIONAL_IMPORTS = ("torchvision", "onnx2pytorch", "onnx", "onnxruntime", "onnxoptimizer",
                    "skl2onnx", "gurobipy")


def _stub_class(qualname: str, top: str) -> type:
    """A stand-in for anything reached through a stubbed module: its attributes are stand-ins
    too (``grb.GRB.OPTIMAL``), it can be subclassed, tested with ``isinstance`` or named in an
    ``except`` (an ``Exception`` subclass that is never raised), and calling it (or a
    subclass) raises a ``RuntimeError`` saying what to install."""
    class _Meta(type):
        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _stub_class(f"{qualname}.{name}", top)

        def __call__(cls, *args, **kwargs):
            raise RuntimeError(f"{qualname} was called, but {top} is not installed: adcert's "
                               f"abcrown launcher put a stub in its place (abcrown imports it "
                               f"at start-up; adcert's runs do not use it). Install {top} for "
                               f"the abcrown feature that needs it.")

    return _Meta(qualname.rsplit(".", 1)[-1], (Exception,), {"__module__": top})


def _stub_modules(names: Sequence[str]) -> None:
    """Make ``import N`` and ``import N.sub...`` resolve to stub modules for every ``N`` in
    ``names`` (whose attributes are :func:`_stub_class` stand-ins), dropping any already
    imported."""
    import importlib.abc
    import importlib.machinery
    import types

    tops = tuple(names)

    class _Stub(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _stub_class(f"{self.__name__}.{name}", self.__name__.split(".")[0])

    class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path=None, target=None):
            if fullname.split(".")[0] in tops:
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec):
            return _Stub(spec.name)

        def exec_module(self, module):
            module.__path__ = []

    for name in [m for m in sys.modules if m.split(".")[0] in tops]:
        del sys.modules[name]
    sys.meta_path.insert(0, _Finder())


def stubbed_imports() -> List[str]:
    """Which of :data:`OPTIONAL_IMPORTS` the launcher replaces by stubs: every one that is not
    installed, and ``torchvision`` always (a broken torchvision build cannot then break
    abcrown's start-up) unless ``ADCERT_ABCROWN_TORCHVISION=real``."""
    import importlib.util

    out = []
    for name in OPTIONAL_IMPORTS:
        if name == "torchvision":
            if os.environ.get("ADCERT_ABCROWN_TORCHVISION") != "real":
                out.append(name)
            continue
        try:
            if importlib.util.find_spec(name) is None:
                out.append(name)
        except (ImportError, ValueError):
            out.append(name)
    return out


def _launch(argv: Sequence[str]) -> None:
    import runpy

    if not argv:
        raise SystemExit("usage: python -m adcert.certify.abcrown ABCROWN_PY [abcrown args]")
    script = find_abcrown(argv[0])
    _stub_modules(stubbed_imports())
    sys.path.insert(0, str(script.parent))
    sys.argv = [str(script)] + list(argv[1:])
    runpy.run_path(str(script), run_name="__main__")


__all__ = ["AbcrownStage", "AbcrownOutcome", "AbcrownNotFound", "AbcrownError", "find_abcrown",
           "vnnlib_box", "write_vnnlib", "read_results", "map_status", "abcrown_config",
           "write_hooks", "load_for_abcrown", "save_counterexample", "read_counterexamples",
           "load_results", "stubbed_imports", "OPTIONAL_IMPORTS", "ENV_VAR", "STAGE_NAME"]

if __name__ == "__main__":
    _launch(sys.argv[1:])
