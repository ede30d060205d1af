"""Merge shard journals into one summary: clean, AutoAttack and certified accuracy, per-stage
counts and times, ACR when the records carry certified radii.

    summary = report(["runs/a", "runs/b"])      # every journal-*-of-*.jsonl in each directory
    print(format_table(summary))

The journals must agree on eps, stages, number of samples, number of shards and soundness, and
on their fingerprints (model, data, options, ...; :mod:`adcert.certify.fingerprint`) but for the
shard; a sample index in two journals is an error naming both files. A sample recorded twice in
one journal with the same verdict counts once (with a warning). Missing samples (shards not run
or not finished) are reported as ``missing`` and the accuracies are over the ``done`` samples.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any, Dict, List, Sequence, Union

from adcert.certify.fingerprint import differences
from adcert.certify.journal import JournalError, VERDICTS, read_journal

PathLike = Union[str, os.PathLike]


def find_journals(dirs: Sequence[PathLike]) -> List[pathlib.Path]:
    """Every ``journal-*-of-*.jsonl`` in ``dirs`` (a file path is taken as is)."""
    found: List[pathlib.Path] = []
    for d in dirs:
        p = pathlib.Path(d)
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(p.glob("journal-*-of-*.jsonl")))
        else:
            raise FileNotFoundError(f"report: {p} is neither a directory nor a journal file")
    if not found:
        raise FileNotFoundError(f"report: no journal-*-of-*.jsonl in {', '.join(map(str, dirs))}")
    return found


def report(dirs: Sequence[PathLike]) -> Dict[str, Any]:
    """The merged summary (a JSON-able dict; see :func:`format_table` for the fields). Times are
    the journals' per-sample stage times (each sample's own share of a stage, see
    :mod:`adcert.certify.pipeline`): ``per_stage[s]["time_s"]`` sums stage ``s`` over the
    samples it ran on, and ``time_s`` sums every sample's ``time`` (= its stage times), so
    ``time_s`` is the sum of the per-stage totals."""
    files = find_journals(dirs)
    meta_ref, ref_file = None, None
    owner: Dict[int, pathlib.Path] = {}
    records: List[Dict[str, Any]] = []
    unavailable: Dict[str, str] = {}
    shards = set()
    for f in files:
        contents = read_journal(f, truncated="ignore")
        if contents.meta is None:
            if contents.samples:
                raise JournalError(f"{f}: no meta record")
            continue  # an empty journal: a shard that never started
        m = contents.meta
        keys = ("eps", "stages", "n_total", "sound")
        if meta_ref is None:
            meta_ref, ref_file = m, f
        else:
            diff = [k for k in keys if m.get(k) != meta_ref.get(k)]
            fp, fp_ref = m.get("fingerprint"), meta_ref.get("fingerprint")
            if isinstance(fp, dict) and isinstance(fp_ref, dict):  # shards of one run?
                diff += [k for k in differences(fp_ref, fp) if k != "shard" and k not in diff]
            if diff or m["shard"][1] != meta_ref["shard"][1]:
                raise JournalError(f"{f} and {ref_file}: journals of different runs (differ in "
                                   f"{', '.join(diff) or 'number of shards'})")
        shards.add(tuple(m["shard"]))
        for run in contents.runs:
            unavailable.update(run.get("unavailable") or {})
        for idx, rec in contents.samples.items():
            if idx in owner:
                raise JournalError(f"sample {idx} appears in both {owner[idx]} and {f}")
            if idx % m["shard"][1] != m["shard"][0]:
                raise JournalError(f"{f}: sample {idx} does not belong to shard "
                                   f"{m['shard'][0]}/{m['shard'][1]}")
            owner[idx] = f
            records.append(rec)
    if meta_ref is None:
        raise JournalError(f"report: every journal is empty ({', '.join(map(str, files))})")
    return summarize(records, meta_ref, sorted(shards), unavailable, [str(f) for f in files])


def summarize(records: List[Dict[str, Any]], meta: Dict[str, Any], shards, unavailable,
              files) -> Dict[str, Any]:
    n_total, done = meta["n_total"], len(records)
    counts = {v: sum(r["verdict"] == v for r in records) for v in VERDICTS}
    stages: Dict[str, Dict[str, Any]] = {}
    for name in meta["stages"] + (["radius"] if meta.get("radius") else []):
        ran = [r for r in records if name in r.get("stage_times", {})]
        total = sum(r["stage_times"][name] for r in ran)
        decided = [r for r in records if r.get("stage") == name]
        stages[name] = {"ran": len(ran), "decided": len(decided),
                        "verdicts": {v: sum(r["verdict"] == v for r in decided)
                                     for v in VERDICTS if any(r["verdict"] == v for r in decided)},
                        "time_s": total, "mean_time_s": total / len(ran) if ran else None}

    def frac(k: int):
        return k / done if done else None

    has_aa = "autoattack" in meta["stages"] and "autoattack" not in unavailable
    radii = [r.get("radius") for r in records]
    eps_max = (meta.get("radius") or {}).get("eps_max")
    acr = (sum(radii) / done / eps_max
           if eps_max and done and all(isinstance(v, (int, float)) for v in radii) else None)
    return {
        "eps": meta["eps"], "sound": meta["sound"], "stages": meta["stages"],
        "n_total": n_total, "done": done, "missing": n_total - done,
        "shards": [list(s) for s in shards], "num_shards": meta["shard"][1],
        "counts": counts,
        "timed_out": sum(bool(r.get("timed_out")) for r in records),
        "sample_timeout": meta.get("sample_timeout"),
        "clean_accuracy": frac(done - counts["misclassified"]),
        "autoattack_accuracy": frac(done - counts["misclassified"] - counts["attacked"])
        if has_aa else None,
        "certified_accuracy": frac(counts["certified"]),
        "acr": acr, "per_stage": stages, "unavailable": unavailable,
        "time_s": sum(r["time"] for r in records), "journals": files,
    }


def format_table(s: Dict[str, Any]) -> str:
    """A plain-text table of a :func:`report` summary."""
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.2f}%"

    lines = [f"eps {s['eps']:g}   samples {s['done']}/{s['n_total']}"
             + (f" ({s['missing']} MISSING)" if s["missing"] else "")
             + f"   shards {len(s['shards'])}/{s['num_shards']}"
             + ("" if s["sound"] else "   UNSOUND (sound=False: not certificates)"),
             f"clean accuracy      {pct(s['clean_accuracy'])}",
             f"AutoAttack accuracy {pct(s['autoattack_accuracy'])}",
             f"certified accuracy  {pct(s['certified_accuracy'])}"]
    if s["acr"] is not None:
        lines.append(f"ACR                 {s['acr']:.5f}  (mean radius / eps_max)")
    lines.append("verdicts: " + ", ".join(f"{k} {v}" for k, v in s["counts"].items())
                 + (f" ({s['timed_out']} unknown at the sample timeout of "
                    f"{s['sample_timeout']} s)" if s.get("timed_out") else ""))
    lines.append(f"{'stage':<12}{'ran':>8}{'decided':>9}{'total s':>11}{'s/sample':>11}  verdicts")
    for name, st in s["per_stage"].items():
        mean = "-" if st["mean_time_s"] is None else f"{st['mean_time_s']:.4g}"
        note = " UNAVAILABLE: " + s["unavailable"][name] if name in s["unavailable"] else ""
        lines.append(f"{name:<12}{st['ran']:>8}{st['decided']:>9}{st['time_s']:>11.3f}"
                     f"{mean:>11}  {st['verdicts'] or ''}{note}")
    lines.append(f"{'all':<12}{s['done']:>8}{'':>9}{s['time_s']:>11.3f}"
                 f"{(s['time_s'] / s['done'] if s['done'] else 0):>11.4g}  (sum of the stages)")
    return "\n".join(lines)


__all__ = ["report", "summarize", "format_table", "find_journals"]
