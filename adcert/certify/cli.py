"""``adcert certify``: certify a checkpoint on a test set, one shard per job; merge the shards.

    adcert certify --checkpoint CKPT --eps EPS --dataset NAME [--data-dir D] [--n N]
                   [--stages autoattack,ibp,crown,alpha-crown,bab-relu] [--timeout 400]
                   [--sample-timeout 1000] [--shard i/n]
                   [--out DIR] [--batch-size B] [--dtype float32|float64] [--device DEV]
                   [--skip-unavailable] [--trust-pickle] [--quiet]
                   [--abcrown PATH] [--abcrown-config YAML] [--verifier ours|abcrown]
    adcert certify report DIR [DIR ...] [--json PATH]

The default stages are the papers' pipeline (AD-CERT F.4): AutoAttack (standard version), IBP,
CROWN, alpha-CROWN, then branch-and-bound over ReLU splits, each stage only on the samples the
previous ones left undecided; ``--timeout`` seconds per sample of the branch-and-bound stage,
``--sample-timeout`` seconds per sample for all stages together (0: no limit). Append
``abcrown`` (``--stages ...,alpha-crown,abcrown``) to hand what our stages left undecided to the
official alpha,beta-CROWN (``--abcrown``/``$ADCERT_ABCROWN``, ``--timeout`` per sample);
``--verifier abcrown`` is the older spelling of ``--stages abcrown`` (abcrown alone after the
clean check; ``--stages`` is then ignored).

Each shard appends to ``DIR/journal-<i>-of-<n>.jsonl``; rerunning the same command resumes (done
samples are skipped). One process per shard and DIR: a second one is refused at the start,
naming the PID of the one that runs. A rerun with another checkpoint (by content), eps, dataset,
sample count, stages, dtype or verifier than the journal's is refused, naming what differs.
Under ``torchrun`` without ``--shard``, each rank certifies shard ``RANK/WORLD_SIZE`` (no process
group is needed). Progress: a bar with the running verdict counts on a terminal, one line per
batch otherwise, nothing with ``--quiet``. Ctrl-C keeps every finished sample in the journal and
prints the command that resumes. ``report`` prints the merged table and writes the JSON summary
(default ``DIR/report.json`` of the first DIR). Exit status 2 on bad input (a locked or
mismatched journal included), 3 when a requested stage is unavailable (see
``--skip-unavailable``) or alpha,beta-CROWN fails on its first batch (the ``abcrown`` stage), 130
when interrupted.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import sys
from typing import Optional

from adcert.certify.stages import DEFAULT_SAMPLE_TIMEOUT, DEFAULT_STAGES, DEFAULT_TIMEOUT


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``certify`` (with its ``report`` sub-command) on an ``argparse`` sub-parser
    collection; ``args.fn(args)`` runs it."""
    p = subparsers.add_parser("certify", help="certify a checkpoint (staged, resumable, sharded)",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(fn=run)
    sub = p.add_subparsers(dest="certify_command")
    r = sub.add_parser("report", help="merge shard journals into one table and JSON")
    r.add_argument("dirs", nargs="+", help="journal directories (or journal files)")
    r.add_argument("--json", default=None, help="where to write the JSON summary")
    r.set_defaults(fn=run_report)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="adcert checkpoint, TorchScript file or saved module")
    p.add_argument("--eps", type=_number, help="L-inf radius in pixel space, e.g. 0.00784 or "
                   "2/255 (the config syntax)")
    p.add_argument("--dataset", help="dataset name (adcert.data), its test split is certified")
    p.add_argument("--data-dir", default=None, help="data directory (default $ADCERT_DATA)")
    p.add_argument("--n", type=int, default=None, help="certify the first N test samples")
    p.add_argument("--stages", default=",".join(DEFAULT_STAGES),
                   help="comma-separated stages after 'clean' (autoattack, ibp, crown, "
                        "alpha-crown, bab-relu, bab, abcrown; default: %(default)s)")
    p.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT,
                   help="seconds per sample for a branch-and-bound stage (bab-relu, bab, "
                        "abcrown; 0: no limit, but abcrown always gets one: the default; "
                        "default: %(default)s)")
    p.add_argument("--sample-timeout", type=_seconds, default=DEFAULT_SAMPLE_TIMEOUT,
                   help="seconds per sample for all its stages together (0: no limit; "
                        "default: %(default)s)")
    p.add_argument("--shard", default=None, help="i/n: certify shard i of n (default 0/1, or "
                   "RANK/WORLD_SIZE under torchrun)")
    p.add_argument("--out", default="certify-out", help="journal directory")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-unavailable", action="store_true",
                   help="leave out stages that cannot run (recorded) instead of failing")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading a pickled nn.Module (runs code from the file)")
    p.add_argument("--verifier", choices=("ours", "abcrown"), default="ours",
                   help="'abcrown': the older spelling of '--stages abcrown' (after the clean "
                        "check, the official alpha,beta-CROWN on every sample; --stages is "
                        "ignored)")
    p.add_argument("--abcrown", default=None, help="alpha,beta-CROWN's complete_verifier/"
                   "abcrown.py (default $ADCERT_ABCROWN)")
    p.add_argument("--abcrown-config", default=None, help="a YAML file of abcrown settings "
                   "merged into the generated config (e.g. 'attack: {pgd_order: after}')")
    p.add_argument("--quiet", action="store_true",
                   help="no progress output (default: a progress bar with the verdict counts "
                        "when stderr is a terminal, else one line per batch)")


def _seconds(text: str) -> Optional[float]:
    """``--timeout``, ``--sample-timeout``: seconds >= 0; 0 means no limit (``None``)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds (0: no limit), got {text!r}") \
            from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds >= 0 (0: no limit), got {text!r}")
    return v or None


def _number(text: str) -> float:
    """``--eps``: a number or a fraction like ``2/255``, parsed as in the training config."""
    from adcert.train.config import number_arg

    return number_arg(text)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except KeyboardInterrupt as err:  # Ctrl-C: the journal is closed; say how to resume
        return _interrupted(args, err)


def _interrupted(args: argparse.Namespace, err: KeyboardInterrupt) -> int:
    from adcert.certify.pipeline import CertifyInterrupted

    if isinstance(err, CertifyInterrupted) and err.journal is not None:
        state = (f"the journal {err.journal} holds {err.done} of the {err.total} samples of "
                 f"shard {err.shard[0]}/{err.shard[1]} ({err.computed} done by this run; the "
                 f"unfinished batch was dropped)")
    else:
        state = "nothing new was journaled"
    print(f"\nadcert certify: interrupted; {state}. To resume, run the same command again:\n"
          f"  {resume_command(args)}", file=sys.stderr)
    return 130


def resume_command(args: argparse.Namespace) -> str:
    """The ``adcert certify ...`` command line of ``args`` (every option that differs from its
    default), which resumes the run."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    words = ["adcert", "certify"]
    for action in parser._actions:
        value = getattr(args, action.dest, action.default)
        if value is None and action.type is _seconds and action.default is not None:
            words += [action.option_strings[0], "0"]  # no limit
            continue
        if value is None or value == action.default or not action.option_strings:
            continue
        if action.nargs == 0:  # a flag
            words.append(action.option_strings[0])
        else:
            words += [action.option_strings[0], repr(value) if isinstance(value, float)
                      else str(value)]
    return shlex.join(words)


def _run(args: argparse.Namespace) -> int:
    import torch

    from adcert._deps import MissingDependency
    from adcert.certify.fingerprint import file_sha256
    from adcert.certify.journal import JournalLocked
    from adcert.certify.model_io import ModelFileError, load_model
    from adcert.certify.pipeline import (
        JournalMismatch, StageUnavailable, certify, parse_shard, shard_from_env,
    )
    from adcert.certify.report import format_table, report

    missing = [f"--{k}" for k in ("checkpoint", "eps", "dataset") if getattr(args, k) is None]
    if missing:
        print(f"adcert certify: {', '.join(missing)} required (or use 'adcert certify report')",
              file=sys.stderr)
        return 2
    from adcert.data import dataset_info

    try:  # before any work: a typo in the name should not wait for the model to load
        dataset_info(args.dataset)
    except KeyError as err:  # "dataset: unknown dataset 'foo'; known: ..."
        print(f"adcert certify: --{err.args[0]}", file=sys.stderr)
        return 2
    try:
        shard = parse_shard(args.shard) if args.shard else (shard_from_env() or (0, 1))
        meta = {"checkpoint": str(args.checkpoint), "dataset": args.dataset}
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
        if args.verifier == "abcrown":  # the older spelling of --stages abcrown
            stages = ["abcrown"]
        if "abcrown" in (s.lower() for s in stages):  # found (or a clear error) before any work
            from adcert.certify.abcrown import AbcrownStage

            work = pathlib.Path(args.out) / f"abcrown-{shard[0]}-of-{shard[1]}"
            abcrown = AbcrownStage(args.abcrown, timeout=args.timeout or DEFAULT_TIMEOUT,
                                   device=args.device, workdir=work,
                                   config=_abcrown_overrides(args.abcrown_config))
            meta["abcrown"] = str(abcrown.script)
            stages = [abcrown if s.lower() == "abcrown" else s for s in stages]
        model = load_model(args.checkpoint, args.device, trust_pickle=args.trust_pickle)
        model = model.to(getattr(torch, args.dtype))
        # what determines a verdict besides what certify() sees (the checkpoint by content)
        fingerprint = {"checkpoint": file_sha256(args.checkpoint), "dataset": args.dataset,
                       "verifier": args.verifier}
        from adcert.data import load_dataset, subset

        x, y = load_dataset(args.dataset, "test", args.data_dir)
        x, y = subset(x, y, args.n)
        bar = not args.quiet and sys.stderr.isatty()
        res = certify(model, x, y, args.eps, stages=stages, out_dir=args.out, shard=shard,
                      batch_size=args.batch_size, timeout=args.timeout,
                      sample_timeout=args.sample_timeout,
                      skip_unavailable=args.skip_unavailable, meta=meta,
                      fingerprint=fingerprint, progress=bar,
                      log=None if args.quiet or bar else lambda s: print(s, file=sys.stderr))
    except StageUnavailable as err:
        print(f"adcert certify: {err}", file=sys.stderr)
        return 3
    except JournalLocked as err:  # another process certifies this shard into this --out
        print(f"adcert certify: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # AbcrownError: the external verifier failed
        if type(err).__name__ != "AbcrownError":
            raise
        print(f"adcert certify: {err}", file=sys.stderr)
        return 3
    except (ModelFileError, JournalMismatch, ValueError, FileNotFoundError,
            MissingDependency) as err:
        print(f"adcert certify: {err}", file=sys.stderr)
        return 2
    print(f"shard {shard[0]}/{shard[1]}: {len(res.computed)} samples processed now, "
          f"{len(res.records)} in the journal {res.journal}")
    print(format_table(report([args.out])))
    return 0


def _abcrown_overrides(path):
    """The ``--abcrown-config`` YAML as a dict (``None``: no overrides)."""
    if path is None:
        return None
    import yaml

    try:
        data = yaml.safe_load(pathlib.Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"--abcrown-config {path}: cannot read it ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--abcrown-config {path}: expected a YAML mapping of abcrown "
                         f"settings, got {type(data).__name__}")
    return data


def run_report(args: argparse.Namespace) -> int:
    from adcert.certify.journal import JournalError
    from adcert.certify.report import format_table, report

    try:
        summary = report(args.dirs)
    except (JournalError, FileNotFoundError) as err:
        print(f"adcert certify report: {err}", file=sys.stderr)
        return 2
    print(format_table(summary))
    out = pathlib.Path(args.json) if args.json else (
        pathlib.Path(args.dirs[0]) / "report.json" if pathlib.Path(args.dirs[0]).is_dir()
        else pathlib.Path(args.dirs[0]).with_suffix(".report.json"))
    out.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    print(f"JSON: {out}")
    return 0


def main(argv=None) -> int:
    """``python -m adcert.certify.cli ...`` (same arguments as ``adcert certify``)."""
    parser = argparse.ArgumentParser(prog="adcert")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["certify"] + list(sys.argv[1:] if argv is None else argv))
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
