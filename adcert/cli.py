"""The ``adcert`` command line.

    adcert quickstart [--dataset digits|mnist]       PGD teacher, then an AD-CERT student (README)
    adcert demo [--epochs N] [--eps E] [--seed S]   IBP certified training on the bundled digits
    adcert train --config FILE [--set k=v ...]      train from a YAML config (configs/)
    adcert certify --checkpoint CKPT --eps E --dataset D   staged sound certification (journaled)
    adcert certify report DIR...                    merge certification shards into one table
    adcert plot --radii LABEL=FILE.pt --eps-max E  certified accuracy over eps (PNG)
    adcert bench [runner args]                      the op benchmarks (needs a source checkout)
    adcert info                                     versions, extension and kernel status
"""
from __future__ import annotations

import argparse
import pathlib
import platform
import runpy
import sys


def _info(_args) -> int:
    import torch

    import adcert
    from adcert import ops
    from adcert.ops._extension import describe, status, triton_available

    print(f"adcert {adcert.__version__} (python {platform.python_version()}, torch "
          f"{torch.__version__})")
    print(f"ops: {describe()}")  # compiled / reference / unavailable (a stale adcert._C)
    print(f"triton importable: {triton_available()}; CUDA available: "
          f"{torch.cuda.is_available()}; Triton CUDA kernels registered: {ops.GPU_KERNELS}")
    return 1 if status() == "broken" else 0


def _bench(args) -> int:
    runner = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"
    if not runner.exists():
        print("adcert bench: benchmarks/run.py not found; run it from a source checkout of "
              "adcert (the benchmarks are not part of the installed package)", file=sys.stderr)
        return 2
    sys.argv = [str(runner)] + args.rest
    runpy.run_path(str(runner), run_name="__main__")
    return 0


def _demo(args) -> int:
    from adcert import demo

    return demo.main(args.rest)


def _quickstart(args) -> int:
    from adcert import quickstart

    return quickstart.main(args.rest)


# Sub-commands whose arguments are parsed by their own module (options included).
_PASSTHROUGH = {"demo": _demo, "bench": _bench, "quickstart": _quickstart}


def main(argv=None) -> int:
    from adcert._deps import MissingDependency

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except MissingDependency as err:  # an optional package: one line, not a traceback
        print(f"adcert {argv[0]}: {err}" if argv else f"adcert: {err}", file=sys.stderr)
        return 2


def _main(argv) -> int:
    if argv and argv[0] in _PASSTHROUGH:
        return int(_PASSTHROUGH[argv[0]](argparse.Namespace(rest=argv[1:])) or 0)
    parser = argparse.ArgumentParser(prog="adcert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, text in (("quickstart", _quickstart,
                            "PGD teacher + AD-CERT student on the bundled digits"),
                           ("demo", _demo, "IBP certified training on the bundled digits"),
                           ("bench", _bench, "run the op benchmarks"),
                           ("info", _info, "versions and kernel status")):
        p = sub.add_parser(name, help=text, add_help=(name == "info"))
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(fn=fn)
    from adcert.train import cli as train_cli  # light: argparse only until it runs

    train_cli.add_parser(sub)
    from adcert import plots
    from adcert.certify import cli as certify_cli

    plots.add_parser(sub)
    certify_cli.add_parser(sub)
    args = parser.parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
