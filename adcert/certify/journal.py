"""The per-sample journal: JSON lines appended atomically, read back strictly.

A journal file holds one JSON object per line:

* line 1, ``{"type": "meta", ...}``: what the run certifies (eps, stages, shard, number of samples,
  model); a rerun must agree with it, or it is refused (a different eps in the same file would
  mix two experiments).
* ``{"type": "run", ...}``: one per (re)start: time, which stages were unavailable and why, sound.
* ``{"type": "sample", "index": i, "verdict": v, "stage": s, ...}``: one per finished sample.

Each line is written with ONE ``os.write`` of the whole line including its ``"\\n"`` on an
``O_APPEND`` descriptor, then fsynced. So a kill can only leave the LAST line without its newline:
:func:`read_journal` repairs that (truncates the file back to the last newline, with a warning; the
sample is simply recomputed). Any other bad line -- garbage, a non-object, a bad field, a
duplicate index -- raises :class:`JournalError` naming the file and line number.
"""
from __future__ import annotations

import json
import os
import pathlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

PathLike = Union[str, os.PathLike]

VERDICTS = ("misclassified", "attacked", "certified", "unknown")
_SAMPLE_FIELDS = {"index": int, "verdict": str, "time": (int, float)}


class JournalError(ValueError):
    """A journal line is corrupt or inconsistent (the message names the file and line)."""


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
            if rec["index"] in out.samples:
                raise JournalError(f"{where}: sample index {rec['index']} appears twice")
            out.samples[rec["index"]] = rec
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
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def journal_name(shard: int, num_shards: int) -> str:
    """The journal file name of one shard: ``journal-<i>-of-<n>.jsonl``."""
    return f"journal-{shard}-of-{num_shards}.jsonl"


__all__ = ["VERDICTS", "JournalError", "JournalContents", "read_journal", "Journal",
           "journal_name"]
