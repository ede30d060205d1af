"""``certify``: the staged, journaled, resumable, sharded certification loop.

Per sample, in order, each stage only on what the previous ones left undecided: ``clean``
(misclassified), then the requested stages (default the papers' pipeline: ``autoattack``, ``ibp``,
``crown``, ``alpha-crown``, ``bab-relu``; ``bab`` is the complete input-split verifier for tiny
models; ``abcrown``, the external alpha,beta-CROWN, can be appended to decide what ours left).
Verdicts: ``misclassified``, ``attacked``, ``certified`` (with the deciding stage) or
``unknown``.

Time. Each sample record has ``stage_times`` (seconds per stage, the sample's own) and ``time``
(their sum). Stages run on a batch; a stage that measures each sample itself reports it
(``Outcome.times``: ``bab`` and ``bab-relu`` time each sample's search, ``abcrown`` reports each
instance's seconds), and the rest of the stage's wall time (start-up, batching) is shared
equally; a stage that cannot be split by sample (AutoAttack, IBP, CROWN, alpha-CROWN: one pass
over the batch) gives each sample its wall time divided by the samples it ran on. So the times
of a stage's samples add up to its wall time, and the report's totals add up. ``timeout``
limits a branch-and-bound stage per sample (default 400 s); ``sample_timeout`` limits a sample's
deciding stages together (default 1000 s; AD-CERT F.4, the radius is not counted). It is
enforced at two granularities: between stages (a sample whose time has reached it gets no
further stage and ends ``unknown``, with ``timed_out: true``), and inside the stages that take a
time limit (``bab``, ``bab-relu``: the sample's remaining budget caps its search, checked between
rounds of domains; ``abcrown``: the batch's largest remaining budget caps abcrown's per-instance
timeout). A stage that runs as one pass (AutoAttack, the bound stages) is not interrupted: started
within the budget it finishes, and its verdict counts; a sample still undecided after it, beyond
the budget, ends ``unknown`` (``timed_out``).

Each sample's record is appended to the shard's journal (``journal-<i>-of-<n>.jsonl`` in
``out_dir``) as soon as its verdict is final; a rerun with the same ``out_dir`` skips every
journaled sample (granularity: a sample's final verdict; undecided samples of a batch interrupted
mid-way are recomputed). Verified counterexamples are saved as ``adversarial/<index>.pt``
(atomically, before the journal line that points to them).

One process per journal: the run holds an exclusive lock on its journal (an ``flock`` the kernel
releases on any exit, see :class:`~adcert.certify.journal.JournalLock`); a second run on the same
shard and ``out_dir`` is refused at the start (:class:`JournalLocked`, naming the holder's PID).
The journal's meta record holds the run's fingerprint (eps, stages and their options, model
weights, data, dtype, ...; :mod:`adcert.certify.fingerprint`): a rerun with another one is refused
(:class:`JournalMismatch`, naming what differs). Ctrl-C drops the current batch's undecided
samples, closes the journal and raises :class:`CertifyInterrupted`; rerunning resumes.

Sharding: shard ``i`` of ``n`` takes the samples whose global index ``k`` has ``k % n == i``, so
independent jobs (or ``torchrun`` ranks) cover the set exactly once; merge them with
:func:`adcert.certify.report.report`.

A stage that cannot run (e.g. a bounding method or ``sound=True`` not implemented yet) is found
by a probe before any sample is processed: by default that is an error naming the stage and the
reason; with ``skip_unavailable=True`` the stage is left out, the journal's run record lists it
with the reason, and every sample record names the stages it skipped.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import os
import pathlib
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from adcert.certify.fingerprint import (
    differences, jsonable, mismatch_message, model_sha256, tensors_sha256,
)
from adcert.certify.journal import (
    Journal, JournalLock, JournalLocked, journal_name, read_journal,
)
from adcert.certify.stages import (
    DEFAULT_SAMPLE_TIMEOUT, DEFAULT_STAGES, DEFAULT_TIMEOUT, STAGE_NAMES, TIMEOUT_STAGES,
    RadiusStage, make_stage,
)

Tensor = torch.Tensor
PathLike = Union[str, os.PathLike]


class StageUnavailable(RuntimeError):
    """A requested stage cannot run (the message names it and why)."""


class JournalMismatch(ValueError):
    """The journal in ``out_dir`` was written by a run with a different fingerprint (the
    message names what differs)."""


class CertifyInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped :func:`certify`. The journal is closed and holds every sample
    finished before it (``done`` of the shard's ``total``; ``computed`` of them by this call);
    the undecided samples of the interrupted batch were dropped. Rerunning the same call
    resumes. A ``KeyboardInterrupt``, so code that catches that still does."""

    def __init__(self, journal: Optional[pathlib.Path], shard: Tuple[int, int], done: int,
                 total: int, computed: int):
        self.journal, self.shard = journal, tuple(shard)
        self.done, self.total, self.computed = int(done), int(total), int(computed)
        where = f"the journal {journal} holds" if journal is not None else "no journal; done:"
        super().__init__(f"interrupted: {where} {done} of the {total} samples of shard "
                         f"{shard[0]}/{shard[1]}")


@dataclass
class CertifyResult:
    """``records``: the sample records of this shard (journaled earlier and now), by index;
    ``computed``: indices processed by this call; ``unavailable``: ``{stage: reason}``."""
    records: Dict[int, Dict[str, Any]]
    computed: List[int]
    unavailable: Dict[str, str]
    journal: Optional[pathlib.Path]


def parse_shard(text: str) -> Tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``; raises ``ValueError`` naming ``shard``."""
    try:
        i, n = (int(p) for p in str(text).split("/"))
    except ValueError:
        raise ValueError(f"shard: expected 'i/n' (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"shard: expected 0 <= i < n, got {text!r}")
    return i, n


def shard_from_env() -> Optional[Tuple[int, int]]:
    """``(RANK, WORLD_SIZE)`` when launched by ``torchrun`` (a shard per rank), else ``None``."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return parse_shard(f"{os.environ['RANK']}/{os.environ['WORLD_SIZE']}")
    return None


def _check_inputs(model, x, y, eps, stages
                  ) -> Tuple[Tensor, Tensor, List[str], Dict[str, Any]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError(f"x: expected a tensor [N, *in], got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0] or \
            y.dtype.is_floating_point:
        raise ValueError(f"y: expected integer labels [{x.shape[0]}], got "
                         f"{getattr(y, 'shape', type(y).__name__)} {getattr(y, 'dtype', '')}")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps: expected a finite float >= 0, got {eps!r}")
    if x.dtype == torch.uint8:
        x = x.float() / 255
    if not x.dtype.is_floating_point:
        raise ValueError(f"x: expected float pixels in [0, 1] or uint8, got {x.dtype}")
    if x.numel() and (float(x.min()) < 0 or float(x.max()) > 1):
        raise ValueError("x: expected pixels in [0, 1]")
    objs = {}  # stage objects given instead of names (e.g. adcert.certify.abcrown's stage)
    for s in stages:
        if not isinstance(s, str):
            if not all(hasattr(s, a) for a in ("name", "unavailable", "run")):
                raise ValueError(f"stages: expected stage names or stage objects (name, "
                                 f"unavailable, run), got {type(s).__name__}")
            objs[s.name] = s
    names = [s.strip().lower() if isinstance(s, str) else s.name for s in stages
             if not isinstance(s, str) or s.strip()]
    bad = [s for s in names if (s not in STAGE_NAMES and s not in objs) or s == "clean"]
    if bad:
        raise ValueError(f"stages: unknown stage(s) {bad}; choose from "
                         f"{', '.join(STAGE_NAMES[1:])} ('clean' always runs first)")
    if len(set(names)) != len(names):
        raise ValueError(f"stages: each stage at most once, got {names}")
    return x, y.long(), names, objs


def _num_classes(model: nn.Module, x: Tensor) -> int:
    with torch.no_grad():
        out = model(x[:1])
    if out.dim() != 2:
        raise ValueError(f"model: expected logits [B, C], got shape {tuple(out.shape)}")
    return int(out.shape[1])


def _save_adv(out_dir: pathlib.Path, index: int, adv: Tensor) -> str:
    from adcert.train.checkpoint import atomic_save

    rel = f"adversarial/{index}.pt"
    atomic_save(adv.clone(), out_dir / rel)
    return rel


def certify(model: nn.Module, x: Tensor, y: Tensor, eps: float,
            stages: Sequence[str] = DEFAULT_STAGES, out_dir: Optional[PathLike] = None,
            shard: Tuple[int, int] = (0, 1), indices: Optional[Sequence[int]] = None,
            batch_size: int = 64, timeout: Optional[float] = DEFAULT_TIMEOUT, sound: bool = True,
            skip_unavailable: bool = False, stage_options: Optional[Dict[str, Dict]] = None,
            radius: Optional[Dict[str, Any]] = None, meta: Optional[Dict[str, Any]] = None,
            log=None, fingerprint: Optional[Dict[str, Any]] = None,
            progress=None, sample_timeout: Optional[float] = DEFAULT_SAMPLE_TIMEOUT
            ) -> CertifyResult:
    """Certify the samples of shard ``shard`` of ``(x, y)`` at L-inf radius ``eps``.

    Args:
        model: a classifier ``[B, *in] -> [B, C]``; put in eval mode. Its dtype is used
            (fp32/fp64 for sound bounds).
        x: ``[N, *in]`` pixels in [0, 1] (float) or uint8; ``y``: ``[N]`` labels.
        eps: the radius (pixel space).
        stages: the stages after ``clean``, in order (names in :data:`STAGE_NAMES`, or stage
            objects with ``name``, ``unavailable`` and ``run``, e.g.
            :class:`adcert.certify.abcrown.AbcrownStage`; ``abcrown`` by name builds one from
            ``stage_options["abcrown"]`` and ``$ADCERT_ABCROWN``). Default: the papers'
            pipeline ``autoattack, ibp, crown, alpha-crown, bab-relu``.
        out_dir: the journal directory (``None``: no journal, nothing resumable).
        shard: ``(i, n)``: this call handles global indices ``k`` with ``k % n == i``.
        indices: the global index of each row of ``x`` (default ``0..N-1``).
        batch_size: samples per batch through the stages.
        timeout: seconds per sample of a branch-and-bound stage (``bab``, ``bab-relu``,
            ``abcrown`` given by name; default 400, AD-CERT F.4; ``None``: no limit).
        sample_timeout: seconds per sample for all its stages together (default 1000, AD-CERT
            F.4; ``None``: no limit); see "Time" in the module docstring.
        sound: certify with rigorous floating-point bounds (the default; ``False`` is for tests
            and debugging, and is recorded in the journal as NOT a certificate).
        skip_unavailable: leave out stages that cannot run (recorded) instead of raising
            :class:`StageUnavailable`.
        stage_options: ``{stage: {option: value}}`` (e.g. ``{"autoattack": {"square_queries":
            500}}``, ``{"alpha-crown": {"iterations": 20}}``).
        radius: ``{"eps_max": E, "method": "ibp", ...}`` to also record every sample's certified
            radius (:class:`~adcert.certify.stages.RadiusStage`; the report then gives ACR).
        meta: extra JSON-able fields for the journal's meta record (e.g. the checkpoint path).
        log: ``callable(str)`` for progress lines, one per batch (default: silent).
        fingerprint: extra JSON-able items of the run's fingerprint (what the caller knows and
            the certifier cannot see, e.g. ``{"checkpoint": sha256 of the file}``); see
            :mod:`adcert.certify.fingerprint` for what is always in it.
        progress: ``True`` (stderr) or a file: a tqdm bar over the shard's samples with the
            running verdict counts.

    Returns a :class:`CertifyResult`. While it runs, it holds the journal's lock: another
    process (or call) on the same shard and ``out_dir`` gets :class:`JournalLocked`, naming
    this one's PID. Raises :class:`JournalMismatch` when ``out_dir`` holds a journal of this
    shard whose fingerprint (eps, stages and their options, model weights, data, dtype, ...;
    see :mod:`adcert.certify.fingerprint`) differs, naming what differs; a journal of an older
    adcert without a fingerprint is resumed with a warning. Ctrl-C raises
    :class:`CertifyInterrupted` after closing the journal (every finished sample is in it).
    """
    x, y, names, given = _check_inputs(model, x, y, eps, stages)
    i_shard, n_shards = parse_shard(f"{shard[0]}/{shard[1]}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    for arg, v in (("timeout", timeout), ("sample_timeout", sample_timeout)):
        if v is not None and not (isinstance(v, (int, float)) and v > 0):
            raise ValueError(f"{arg}: expected seconds > 0 or None, got {v!r}")
    n_total = x.shape[0]
    index = list(range(n_total)) if indices is None else [int(k) for k in indices]
    if len(index) != n_total or len(set(index)) != n_total:
        raise ValueError(f"indices: expected {n_total} distinct integers")
    out = pathlib.Path(out_dir) if out_dir is not None else None
    # the inputs as given (uint8 already scaled), before the cast to the model's dtype
    data_sha = tensors_sha256([x, y, index]) if out is not None else None
    model.eval()
    param = next(iter(model.parameters()), None)
    if param is not None:
        x = x.to(device=param.device, dtype=param.dtype)
        y = y.to(param.device)
    eps = float(eps)
    if torch.cuda.is_available():  # sound bounds forbid TF32 (DESIGN.md section 4)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    num_classes = _num_classes(model, x)
    # built before any file is touched: a stage that cannot be built (e.g. abcrown not found)
    # fails here
    stage_objs = [make_stage("clean", num_classes)] + [
        given[n] if n in given else
        make_stage(n, num_classes, sound=sound, timeout=timeout, options=stage_options)
        for n in names]

    header = {"type": "meta", "version": 2, "eps": eps, "stages": ["clean"] + names,
              "shard": [i_shard, n_shards], "n_total": n_total, "sound": bool(sound),
              "radius": dict(radius) if radius else None, "sample_timeout": sample_timeout,
              **(meta or {})}
    if out is not None:
        header["fingerprint"] = _fingerprint(header, model, x, names, given, stage_objs,
                                             stage_options, timeout, data_sha, fingerprint)
    mine = [p for p, k in enumerate(index) if k % n_shards == i_shard]
    path, done = None, {}
    with contextlib.ExitStack() as stack:
        contents = None
        if out is not None:
            path = out / journal_name(i_shard, n_shards)
            stack.enter_context(JournalLock(path))  # JournalLocked: another process writes it
            contents = read_journal(path)
            if contents.meta is not None:
                _check_resume(out_dir, path, contents.meta, header)
            done = dict(contents.samples)
        todo = [p for p in mine if index[p] not in done]

        radius_stage = RadiusStage(sound=sound, **radius) if radius else None
        unavailable: Dict[str, str] = {}
        if todo:
            probe_x, probe_y = x[todo[:1]], y[todo[:1]]
            for st in stage_objs + ([radius_stage] if radius_stage else []):
                reason = st.unavailable(model, probe_x, probe_y, eps)
                if reason is not None:
                    unavailable[st.name] = reason
        if unavailable and not skip_unavailable:
            raise StageUnavailable(
                "stage(s) unavailable: " + "; ".join(f"{k}: {v}" for k, v in unavailable.items())
                + ". Remove them from the stages, or skip them explicitly (skip_unavailable / "
                  "--skip-unavailable; they are then recorded as skipped)")
        if unavailable:
            warnings.warn("certify: skipping unavailable stage(s) " + ", ".join(unavailable)
                          + " (recorded in the journal)", RuntimeWarning, stacklevel=2)
        if not sound:
            warnings.warn("certify: sound=False -- 'certified' verdicts are NOT rounding-sound "
                          "certificates (recorded in the journal)", RuntimeWarning, stacklevel=2)
        active = [st for st in stage_objs if st.name not in unavailable]
        skipped = [st.name for st in stage_objs if st.name in unavailable]

        journal = None
        if path is not None:
            journal = stack.enter_context(Journal(path))
            if contents.meta is None:
                journal.append(header)
            journal.append({"type": "run", "started": time.time(), "unavailable": unavailable,
                            "sound": bool(sound), "todo": len(todo)})
        bar = _progress_bar(progress, (i_shard, n_shards), len(mine), len(mine) - len(todo),
                            [done[index[p]]["verdict"] for p in mine if index[p] in done])
        if bar is not None:
            stack.callback(bar.close)
        computed: List[int] = []

        def finish(local: int, pos: List[int], yb: Tensor, s: Dict[str, Any]) -> None:
            _finish(journal, index[pos[local]], int(yb[local]), s, skipped, computed, done)
            if bar is not None:
                bar.counts[s["verdict"]] += 1
                bar.set_postfix(bar.counts, refresh=False)
                bar.update(1)

        try:
            for b in range(0, len(todo), batch_size):
                pos = todo[b:b + batch_size]
                xb, yb = x[pos], y[pos]
                state = [{"values": {}, "stage_times": {}} for _ in pos]
                open_ = list(range(len(pos)))
                if radius_stage is not None and "radius" not in unavailable:
                    t0 = time.perf_counter()
                    for s, r in zip(state, radius_stage.radii(model, xb, yb)):
                        s["radius"] = r
                        s["stage_times"]["radius"] = (time.perf_counter() - t0) / len(pos)
                for st in active:
                    if sample_timeout is not None:  # out of time: unknown, no more stages
                        late = [l for l in open_ if _spent(state[l]) >= sample_timeout]
                        for local in late:
                            s = state[local]
                            s["verdict"], s["stage"], s["timed_out"] = "unknown", None, True
                            finish(local, pos, yb, s)
                        open_ = [l for l in open_ if l not in late]
                    if not open_:
                        break
                    kw = {}
                    if sample_timeout is not None and _takes(st.run, "time_limits"):
                        kw["time_limits"] = [sample_timeout - _spent(state[l]) for l in open_]
                    t0 = time.perf_counter()
                    res = st.run(model, xb[open_], yb[open_], eps, **kw)
                    times = attribute_times(time.perf_counter() - t0,
                                            getattr(res, "times", None), len(open_))
                    still = []
                    for j, local in enumerate(open_):
                        s = state[local]
                        s["stage_times"][st.name] = times[j]
                        s["values"][st.name] = res.values[j]
                        extra = getattr(res, "extra", None)  # optional per-sample JSON-able info
                        if extra and extra[j] is not None:
                            s.setdefault("extra", {})[st.name] = extra[j]
                        if res.verdicts[j] is None:
                            still.append(local)
                            continue
                        s["verdict"], s["stage"] = res.verdicts[j], st.name
                        if res.adv and res.adv[j] is not None and out is not None:
                            s["adv"] = _save_adv(out, index[pos[local]], res.adv[j])
                        finish(local, pos, yb, s)
                    open_ = still
                for local in open_:
                    s = state[local]
                    s["verdict"], s["stage"] = "unknown", None
                    if sample_timeout is not None and _spent(s) >= sample_timeout:
                        s["timed_out"] = True
                    finish(local, pos, yb, s)
                if log is not None:
                    log(f"certify shard {i_shard}/{n_shards}: {min(b + batch_size, len(todo))}"
                        f"/{len(todo)} samples")
        except KeyboardInterrupt:
            # the journal holds every finished sample (each line written whole and fsynced);
            # the undecided samples of the current batch are dropped and recomputed on resume
            n_done = sum(index[p] in done for p in mine)
            if path is not None:  # the journal is the truth (Ctrl-C may land after a write)
                with contextlib.suppress(Exception), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    n_done = len(read_journal(path, truncated="ignore").samples)
            raise CertifyInterrupted(path, (i_shard, n_shards), n_done, len(mine),
                                     n_done - (len(mine) - len(todo))) from None
    return CertifyResult({k: done[k] for k in sorted(done)}, computed, unavailable, path)


def attribute_times(wall: float, own: Optional[Sequence[Optional[float]]], n: int
                    ) -> List[float]:
    """Each sample's share of a stage's ``wall`` seconds on ``n`` samples: its own measured
    seconds ``own[j]`` (a stage's ``Outcome.times``) plus an equal share of the rest (start-up,
    batching overhead), or -- without usable ``own`` times -- ``wall / n`` each (a batched
    bound pass cannot be split by sample). The shares sum to ``wall``."""
    if not own or len(own) != n or not all(
            isinstance(t, (int, float)) and math.isfinite(t) and t >= 0 for t in own):
        return [wall / n] * n
    total = float(sum(own))
    if total > wall:  # two clocks: scale down to the wall time
        return [t * wall / total for t in own]
    return [t + (wall - total) / n for t in own]


def _takes(fn, keyword: str) -> bool:
    """Does the callable ``fn`` accept the keyword argument ``keyword``?"""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == keyword and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) or
               p.kind == p.VAR_KEYWORD for p in params)


def _spent(s: Dict[str, Any]) -> float:
    """A sample's seconds so far in its deciding stages (the radius is not one)."""
    return sum(v for k, v in s["stage_times"].items() if k != "radius")


def _fingerprint(header: Dict[str, Any], model: nn.Module, x: Tensor, names: List[str],
                 given: Dict[str, Any], stage_objs: List[Any],
                 stage_options: Optional[Dict[str, Dict]], timeout: Optional[float],
                 data_sha: Optional[str], extra: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Everything that determines a verdict (see :mod:`adcert.certify.fingerprint`)."""
    options = {n: (stage_options or {})[n] for n in names if n in (stage_options or {})}
    for obj in stage_objs:  # stages that describe their own settings (AutoAttack, abcrown)
        fp = getattr(obj, "fingerprint", None)
        if callable(fp):
            options[obj.name] = fp()
    uses_timeout = any(n in TIMEOUT_STAGES and n not in given for n in names)
    fp = {"eps": header["eps"], **(extra or {})}  # in the order a message lists differences
    fp.update({"n_total": header["n_total"], "stages": header["stages"],
               "stage_options": options, "timeout": timeout if uses_timeout else None,
               "sample_timeout": header["sample_timeout"],
               "dtype": str(x.dtype).replace("torch.", ""), "sound": header["sound"],
               "radius": header["radius"], "shard": header["shard"],
               "model": model_sha256(model), "data": data_sha})
    return jsonable(fp)


_LEGACY_KEYS = ("eps", "stages", "shard", "n_total", "sound", "radius", "dataset")


def _check_resume(out_dir, path: pathlib.Path, stored: Dict[str, Any],
                  header: Dict[str, Any]) -> None:
    """Refuse (:class:`JournalMismatch`) to resume a journal written by a run with another
    fingerprint; a journal of an older adcert without one is checked on what its header has,
    then accepted with a warning."""
    now = header["fingerprint"]
    old = stored.get("fingerprint")
    if isinstance(old, dict):
        diff = differences(old, now)
        if diff:
            raise JournalMismatch(mismatch_message(out_dir, diff, old, now, stored, header))
        return
    legacy = {k: header[k] for k in _LEGACY_KEYS if k in header}
    diff = differences(stored, legacy)
    if diff:
        raise JournalMismatch(mismatch_message(out_dir, diff, stored, legacy, stored, header))
    was = stored.get("checkpoint")
    warnings.warn(
        f"{path}: written by an older adcert, without a fingerprint: only its eps, stages, "
        f"shard, sample count, soundness and radius could be checked, not the model"
        + (f" (it names checkpoint {was})" if was else "")
        + ", the data, dtype or stage options; resuming it (use another --out to start afresh "
          "if this is another model or setting)", RuntimeWarning, stacklevel=3)


def _progress_bar(progress, shard: Tuple[int, int], total: int, initial: int,
                  verdicts: List[str]):
    """A tqdm bar over the shard's samples with the running verdict counts (``None`` when
    ``progress`` is off)."""
    if not progress:
        return None
    from tqdm import tqdm

    counts = {v: verdicts.count(v) for v in ("certified", "attacked", "unknown")}
    counts["misclassified"] = verdicts.count("misclassified")
    bar = tqdm(total=total, initial=initial, desc=f"certify {shard[0]}/{shard[1]}",
               unit="sample", file=sys.stderr if progress is True else progress,
               dynamic_ncols=True, smoothing=0.1, postfix=counts)
    bar.counts = counts
    return bar


def _finish(journal, index: int, label: int, s: Dict[str, Any], skipped: List[str],
            computed: List[int], done: Dict[int, Dict[str, Any]]) -> None:
    stage = s.get("stage")
    rec = {"type": "sample", "index": index, "label": label, "verdict": s["verdict"],
           "stage": stage, "margin": s["values"].get(stage) if stage else None,
           "values": s["values"], "stage_times": s["stage_times"],
           "time": sum(s["stage_times"].values()), "skipped": skipped}
    for key in ("adv", "radius", "extra", "timed_out"):
        if key in s:
            rec[key] = s[key]
    if journal is not None:
        journal.append(rec)
    done[index] = rec
    computed.append(index)


__all__ = ["certify", "CertifyResult", "StageUnavailable", "JournalMismatch", "JournalLocked",
           "CertifyInterrupted", "parse_shard", "shard_from_env"]
