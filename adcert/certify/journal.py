"""The per-sample journal: JSON lines appended atomically, read back strictly.

A journal file holds one JSON object per line:

* line 1, ``{"type": "meta", ...}``: what the run certifies (eps, stages, shard, number of samples,
  model) and its ``fingerprint`` (:mod:`adcert.certify.fingerprint`); a rerun must have the same
  fingerprint, or it is refused (a different eps or model in the same file would mix two
  experiments).
* ``{"type": "run", ...}``: one per (re)start: time, which stages were unavailable and why, sound.
* ``{"type": "sample", "index": i, "verdict": v, "stage": s, ...}``: one per finished sample,
  with ``stage_times`` (the sample's own seconds in each stage it reached, see "Time" in
  :mod:`adcert.certify.pipeline`), ``time`` (their sum) and ``timed_out: true`` when the
  whole-sample time limit ended it ``unknown``.

Each line is written with ONE ``os.write`` of the whole line including its ``"\\n"`` on an
``O_APPEND`` descriptor, then fsynced. So a kill can only leave the LAST line without its newline:
:func:`read_journal` repairs that (truncates the file back to the last newline, with a warning; the
sample is simply recomputed). A sample recorded twice with the same verdict (e.g. by two
processes that wrote one journal before journals were locked) is kept once, with a warning. Any
other bad line -- garbage, a non-object, a bad field, a sample recorded twice with different
verdicts -- raises :class:`JournalError` naming the file and line number.

One writer per journal: :class:`JournalLock` holds an exclusive ``flock`` on
``<journal>.lock`` for the whole run (the file holds the holder's PID and host, for the message
a second writer gets: :class:`JournalLocked`). The kernel releases an ``flock`` when its process
exits in any way (SIGKILL and crashes included), so a lock can never be left stale by a dead
process; the PID in the file is information only and is never used to decide anything (a PID
file checked with ``os.kill(pid, 0)`` would misjudge a reused PID, a holder on another host of a
shared filesystem or in another PID namespace, and races between two starters that both find
it stale).
"""
from __future__ import annotations

import json
import os
import pathlib
import socket
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

PathLike = Union[str, os.PathLike]

VERDICTS = ("misclassified", "attacked", "certified", "unknown")
_SAMPLE_FIELDS = {"index": int, "verdict": str, "time": (int, float)}


class JournalError(ValueError):
    """A journal line is corrupt or inconsistent (the message names the file and line)."""


class JournalLocked(RuntimeError):
    """Another process holds the journal's lock (is writing it now). ``path``: the journal;
    ``holder``: ``{"pid": ..., "host": ..., "since": ...}`` as far as known (may be empty)."""

    def __init__(self, path: PathLike, holder: Optional[Dict[str, Any]]):
        self.path, self.holder = pathlib.Path(path), dict(holder or {})
        pid = self.holder.get("pid")
        who = f"PID {pid}" if pid is not None else "a process whose PID is unknown"
        host = self.holder.get("host")
        if host and host != socket.gethostname():
            who += f" on host {host}"
        super().__init__(
            f"{self.path} is being written by another certify process ({who}): one writer per "
            f"journal; wait for it to finish (or stop it), or use another --out or --shard")


@dataclass
class JournalContents:
    """What a journal file holds: ``meta`` (first line), ``runs`` and ``samples`` by index."""
    meta: Optional[Dict[str, Any]] = None
    runs: List[Dict[str, Any]] = field(default_factory=list)
    samples: Dict[int, Dict[str, Any]] = field(default_factory=dict)


def _check_record(rec: Any, where: str, first: bool) -> None:
    if not isinstance(rec, dict):
        raise JournalError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    kind = rec.get("type")
    if first != (kind == "meta"):
        raise JournalError(f"{where}: " + ("the first line must be the meta record" if first
                                           else "a meta record after the first line"))
    if kind in ("meta", "run"):
        return
    if kind != "sample":
        raise JournalError(f"{where}: unknown record type {kind!r}")
    for key, typ in _SAMPLE_FIELDS.items():
        if not isinstance(rec.get(key), typ) or isinstance(rec.get(key), bool):
            raise JournalError(f"{where}: field {key!r} missing or not {typ}")
    if rec["verdict"] not in VERDICTS:
        raise JournalError(f"{where}: verdict {rec['verdict']!r} is not one of {VERDICTS}")


def read_journal(path: PathLike, truncated: str = "repair") -> JournalContents:
    """Parse ``path`` (missing file: empty contents). A truncated last line (no newline) is,
    by ``truncated``: ``"repair"``: removed from the file, ``"ignore"``: left out (the file is
    not touched; for readers such as the report), both with a warning, or ``"raise"``. Every
    other defect raises :class:`JournalError` naming ``path`` and the 1-based line number."""
    if truncated not in ("repair", "ignore", "raise"):
        raise ValueError(f"truncated: expected 'repair', 'ignore' or 'raise', got {truncated!r}")
    path = pathlib.Path(path)
    out = JournalContents()
    if not path.exists():
        return out
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    if tail:
        where = f"{path}:{len(lines) + 1}"
        if truncated == "raise":
            raise JournalError(f"{where}: truncated last line (no newline; killed mid-write?)")
        action = "removed" if truncated == "repair" else "ignored"
        warnings.warn(f"journal {where}: truncated last line {action} (the run was killed "
                      f"mid-write; that sample is not done)", RuntimeWarning, stacklevel=2)
        if truncated == "repair":
            with open(path, "r+b") as f:
                f.truncate(len(data) - len(tail))
                f.flush()
                os.fsync(f.fileno())
    line_of: Dict[int, int] = {}
    duplicates: List[Tuple[int, int]] = []  # (index, line) of identical repeats
    for number, raw in enumerate(lines, start=1):
        where = f"{path}:{number}"
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise JournalError(f"{where}: corrupt line ({err}): {raw[:80]!r}") from None
        _check_record(rec, where, first=(number == 1))
        if rec["type"] == "meta":
            out.meta = rec
        elif rec["type"] == "run":
            out.runs.append(rec)
        else:
            idx = rec["index"]
            first_rec = out.samples.get(idx)
            if first_rec is None:
                out.samples[idx] = rec
                line_of[idx] = number
            elif (first_rec["verdict"], first_rec.get("label")) == (rec["verdict"],
                                                                    rec.get("label")):
                duplicates.append((idx, number))
            else:
                raise JournalError(
                    f"{where}: sample index {idx} appears twice with conflicting verdicts: "
                    f"{first_rec['verdict']!r} (label {first_rec.get('label')}) on line "
                    f"{line_of[idx]}, {rec['verdict']!r} (label {rec.get('label')}) here")
    if duplicates:
        shown = ", ".join(f"{i} (line {n})" for i, n in duplicates[:5])
        more = f" and {len(duplicates) - 5} more" if len(duplicates) > 5 else ""
        warnings.warn(f"journal {path}: {len(duplicates)} duplicate sample record(s) with the "
                      f"same verdict as an earlier line, kept once: sample {shown}{more} (two "
                      f"processes wrote this journal)", RuntimeWarning, stacklevel=2)
    return out


class Journal:
    """An append-only journal file (see the module docstring). Use as a context manager or call
    :meth:`close`."""

    def __init__(self, path: PathLike):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, record: Dict[str, Any]) -> None:
        """Write ``record`` as one line: a single write, then fsync."""
        line = (json.dumps(record, sort_keys=True, allow_nan=True) + "\n").encode("utf-8")
        view = memoryview(line)
        while view:  # os.write on a regular file writes everything; loop for safety
            n = os.write(self._fd, view)
            view = view[n:]
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def lock_path(journal: PathLike) -> pathlib.Path:
    """The lock file of a journal: ``<journal>.lock`` (left in place after a run, empty)."""
    journal = pathlib.Path(journal)
    return journal.with_name(journal.name + ".lock")


class JournalLock:
    """An exclusive, non-blocking lock on one journal for the duration of a run (see the module
    docstring): ``acquire()`` raises :class:`JournalLocked` naming the holder's PID when another
    process (or another lock object in this process) holds it; ``release()`` (or leaving the
    ``with`` block, or any exit of the process) frees it.

    The lock is an ``fcntl.flock`` on ``<journal>.lock``. Where ``flock`` is unavailable (no
    ``fcntl`` module, or a filesystem that refuses locks) the run goes on unlocked, with a
    warning. A process forked (not exec'd) while holding the lock shares it, as with any
    ``flock``.
    """

    def __init__(self, journal: PathLike, wait: float = 1.0):
        self.journal = pathlib.Path(journal)
        self.path = lock_path(self.journal)
        self.wait = float(wait)  # how long to look for the holder's PID (written after locking)
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "JournalLock":
        if self._fd is not None:
            raise RuntimeError(f"{self.path}: already held by this lock object")
        try:
            import fcntl
        except ImportError:  # not POSIX: no flock
            warnings.warn(f"{self.journal}: no file locking on this platform; make sure no "
                          f"other process writes this journal", RuntimeWarning, stacklevel=2)
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.wait
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    holder = _read_holder(fd)
                    # the holder writes its PID right after locking: retry briefly if not yet
                    if holder.get("pid") is not None or time.monotonic() > deadline:
                        raise JournalLocked(self.journal, holder) from None
                    time.sleep(0.02)
                except OSError as err:  # e.g. ENOLCK / EOPNOTSUPP: a filesystem without locks
                    warnings.warn(f"{self.journal}: cannot lock {self.path} ({err}); going on "
                                  f"without a lock: make sure no other process writes this "
                                  f"journal", RuntimeWarning, stacklevel=2)
                    os.close(fd)
                    return self
            info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Free the lock (emptying the file first); a no-op when not held."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        finally:
            os.close(fd)  # closing the last descriptor releases the flock

    def __enter__(self) -> "JournalLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> Dict[str, Any]:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return info if isinstance(info, dict) else {}


def journal_name(shard: int, num_shards: int) -> str:
    """The journal file name of one shard: ``journal-<i>-of-<n>.jsonl``."""
    return f"journal-{shard}-of-{num_shards}.jsonl"


__all__ = ["VERDICTS", "JournalError", "JournalLocked", "JournalContents", "read_journal",
           "Journal", "JournalLock", "lock_path", "journal_name"]
