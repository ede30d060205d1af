#!/usr/bin/env python
"""Standalone benchmark runner: adcert's interval ops versus the plain-torch reference, and the
whole-model IBP / clean cost ratio of CNN7, timed side by side in one process.

    python benchmarks/run.py [--device cpu|cuda] [--batch N] [--repeats N] [--out FILE] [--quick]

See benchmarks/README.md for what every number means. In short:

* every case runs its variants interleaved (A B, then B A, ...), after a warm-up, with
  ``torch.cuda.synchronize()`` around each timed sample on CUDA; the table gives the median and the
  20th/80th percentiles of the per-call time and the speedup ``reference / adcert`` of the medians;
* peak memory is the growth above what was live before the call (inputs and weights excluded):
  CUDA -- ``torch.cuda.max_memory_allocated``; CPU -- the growth of the process's peak resident set
  (VmHWM, reset through /proc/self/clear_refs) in a separate worker process whose glibc malloc
  returns every block of 64 KiB or more to the OS on free, so resident memory follows live memory;
* the whole-model ratio is the time of an IBP forward+backward of CNN7 divided by a clean
  forward+backward of the same model (train mode, same batch), measured in the same run. The FLOP
  floor is 2.0; the target is <= 2.2.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from typing import Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402

import bench_common as bc  # noqa: E402

SCHEMA_VERSION = 1
FLOOR_RATIO = 2.0
TARGET_RATIO = 2.2
MALLOC_MMAP_THRESHOLD = 65536
CPU_RSS_METHOD = (
    "cpu: peak resident-set growth of the process during one call (VmHWM after the call minus "
    "VmRSS before it, VmHWM reset via /proc/self/clear_refs), max over 2 calls after a warm-up "
    "call (--quick: 1 call, no warm-up), in a worker process whose glibc malloc mmaps every block >= "
    f"{MALLOC_MMAP_THRESHOLD} bytes (MALLOC_MMAP_THRESHOLD_) and so unmaps it on free; counts "
    "every allocation (ATen, oneDNN, OpenMP, the compiled kernels); inputs and weights are "
    "allocated before the call and excluded")
CPU_ALLOCATOR_METHOD = (
    "cpu (fallback, /proc/self/clear_refs not writable): peak bytes live in torch's CPU allocator "
    "during one call above the bytes live before it, from torch.profiler(profile_memory=True) "
    "allocation events; max over 2 calls after a warm-up call (--quick: 1, none); memory that "
    "libraries allocate outside the torch allocator is not counted")


# ----------------------------------------------------------------------------------------------
# Statistics and timing
# ----------------------------------------------------------------------------------------------

def percentile(values: List[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), ``q`` in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(samples_s: List[float]) -> Dict[str, float]:
    ms = [s * 1e3 for s in samples_s]
    return {"median_ms": percentile(ms, 50), "p20_ms": percentile(ms, 20),
            "p80_ms": percentile(ms, 80), "min_ms": min(ms), "n_samples": len(ms)}


def time_interleaved(fns: Dict[str, Callable[[], object]], sync: Callable[[], None],
                     repeats: int, warmup: int, target_sample_s: float,
                     max_inner: int = 1000) -> Dict[str, dict]:
    """Time several callables doing the same job, interleaved: round i runs them in order, round
    i+1 in reverse order (A B B A A B ...), so drift of a noisy machine (turbo, other tenants,
    thermal) hits every variant alike. Each sample is ``inner`` back-to-back calls bracketed by
    ``sync()``; ``inner`` is set per variant from the warm-up so that a sample lasts about
    ``target_sample_s`` (1 when the call is already longer). Returns per-call times."""
    names = list(fns)
    last = {}
    for _ in range(max(1, warmup)):
        for k in names:
            sync()
            t0 = time.perf_counter()
            fns[k]()
            sync()
            last[k] = time.perf_counter() - t0
    inner = {k: max(1, min(max_inner, math.ceil(target_sample_s / max(last[k], 1e-9))))
             for k in names}
    samples: Dict[str, List[float]] = {k: [] for k in names}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(repeats):
            order = names if i % 2 == 0 else names[::-1]
            for k in order:
                f, n = fns[k], inner[k]
                sync()
                t0 = time.perf_counter()
                for _ in range(n):
                    f()
                sync()
                samples[k].append((time.perf_counter() - t0) / n)
    finally:
        if gc_was_enabled:
            gc.enable()
    out = {}
    for k in names:
        out[k] = summarize(samples[k])
        out[k]["inner"] = inner[k]
    out["_samples"] = samples
    return out


# ----------------------------------------------------------------------------------------------
# Peak memory
# ----------------------------------------------------------------------------------------------

def cuda_peak_growth(fn: Callable[[], object]) -> int:
    """Bytes allocated at peak during one call, above what was allocated before it."""
    torch.cuda.synchronize()
    gc.collect()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _build_item(item: dict, spec: dict) -> Callable[[], object]:
    if item["kind"] == "op":
        return bc.build_op_case(item["case"], item["variant"], item["mode"], spec["device"],
                                spec["batch"], channels_last=spec["channels_last"])
    return bc.build_model_case(item["variant"], spec["device"], spec["batch"],
                               channels_last=spec["channels_last"])


def allocator_peak_growth(fn: Callable[[], object]) -> int:
    """Fallback when /proc/self/clear_refs is not writable: the peak of the bytes live in torch's
    CPU allocator during one call (every ATen tensor; not memory that libraries allocate
    around it), from the allocation events of ``torch.profiler`` with ``profile_memory=True``."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    allocs = []
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation and e.typed[1].device.type == "cpu":
            allocs.append(e)
    if not allocs:
        return 0
    allocs.sort(key=lambda e: e.start_time_ns)
    first = allocs[0].typed[1]
    base = first.total_allocated - first.alloc_size
    return int(max(0, max(e.typed[1].total_allocated for e in allocs) - base))


def mem_worker(spec_path: str, out_path: str) -> None:
    """Runs in a subprocess (see ``cpu_peak_growth_all``): measure every item of the spec."""
    with open(spec_path) as f:
        spec = json.load(f)
    torch.set_num_threads(spec["threads"])
    method = "rss" if _reset_hwm() else "allocator"
    results = []
    for item in spec["items"]:
        res = {"bytes": None, "error": None}
        try:
            fn = _build_item(item, spec)
            for _ in range(spec.get("warmup", 1)):
                fn()  # warm-up: lazy one-time allocations (thread pools, kernel caches)
            growth = 0
            for _ in range(spec.get("calls", 2)):
                if method == "rss":
                    base = _proc_status_kb("VmRSS")
                    _reset_hwm()
                    fn()
                    growth = max(growth, 1024 * (_proc_status_kb("VmHWM") - base))
                else:
                    growth = max(growth, allocator_peak_growth(fn))
            res["bytes"] = growth
            del fn
        except Exception as e:  # noqa: BLE001  (reported, not fatal)
            res["error"] = f"{type(e).__name__}: {e}"
        gc.collect()  # ~0.1 s with torch loaded: once per item
        results.append(res)
    with open(out_path, "w") as f:
        json.dump({"method": method, "results": results}, f)


def _run_mem_worker(spec: dict, timeout: float) -> dict:
    env = dict(os.environ)
    # Every allocation of >= 64 KiB gets its own mmap and is unmapped on free (setting the
    # threshold also turns off glibc's dynamic threshold), so RSS follows live tensor memory.
    env["MALLOC_MMAP_THRESHOLD_"] = str(MALLOC_MMAP_THRESHOLD)
    tun = f"glibc.malloc.mmap_threshold={MALLOC_MMAP_THRESHOLD}"
    env["GLIBC_TUNABLES"] = (env["GLIBC_TUNABLES"] + ":" + tun) if env.get("GLIBC_TUNABLES") \
        else tun
    with tempfile.TemporaryDirectory() as d:
        spec_path, out_path = os.path.join(d, "spec.json"), os.path.join(d, "out.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_mem-worker",
                               spec_path, out_path], env=env, capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0 or not os.path.exists(out_path):
            raise RuntimeError(f"memory worker failed (rc {proc.returncode}): "
                               f"{proc.stderr.strip()[-2000:]}")
        with open(out_path) as f:
            return json.load(f)


def cpu_peak_growth_all(items: List[dict], spec_base: dict, timeout: float = 900.0) -> dict:
    """Peak memory growth of one call of each item, measured in a worker process:
    ``{"method": "rss" | "allocator", "results": [{"bytes", "error"}, ...]}``."""
    if not os.path.exists("/proc/self/status"):
        return {"method": None,
                "results": [{"bytes": None, "error": "no /proc (not Linux)"} for _ in items]}
    return _run_mem_worker(dict(spec_base, items=items), timeout)


# ----------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: str) -> dict:
    info = {"type": device, "torch_num_threads": torch.get_num_threads(),
            "cpu_model": cpu_model(), "cpu_count": os.cpu_count()}
    if device == "cuda":
        idx = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        info.update(name=torch.cuda.get_device_name(idx),
                    capability=".".join(map(str, torch.cuda.get_device_capability(idx))),
                    total_memory_gb=round(props.total_memory / 2**30, 1),
                    cuda_runtime=torch.version.cuda)
    else:
        info["name"] = f"{info['cpu_model']} ({info['torch_num_threads']} threads)"
    return info


def versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__, "triton": None}
    try:
        import triton
        v["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        pass
    try:
        import adcert
        v["adcert"] = getattr(adcert, "__version__", None)
    except Exception:  # noqa: BLE001
        v["adcert"] = None
    repo = os.path.dirname(HERE)
    try:
        commit = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        v["adcert_git"] = (commit + ("-dirty" if dirty else "")) if commit else None
    except Exception:  # noqa: BLE001
        v["adcert_git"] = None
    return v


def precision_settings(device: str) -> dict:
    s = {"dtype": "float32", "float32_matmul_precision": torch.get_float32_matmul_precision()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key, getter in (
                ("cuda_matmul_allow_tf32", lambda: torch.backends.cuda.matmul.allow_tf32),
                ("cudnn_allow_tf32", lambda: torch.backends.cudnn.allow_tf32),
                ("cudnn_benchmark", lambda: torch.backends.cudnn.benchmark),
                ("cudnn_deterministic", lambda: torch.backends.cudnn.deterministic)):
            try:
                s[key] = bool(getter())
            except Exception:  # noqa: BLE001
                s[key] = None
    s["tf32_applies"] = device == "cuda"
    return s


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--batch", type=int, default=None,
                   help="batch size (default: $ADCERT_BENCH_BATCH, else 128 on cuda, 16 on cpu)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed samples per variant (default 20; 3 with --quick)")
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up rounds per variant, at least 1 (it calibrates the samples; "
                        "default 3, 1 with --quick)")
    p.add_argument("--out", default=None,
                   help="JSON output (default benchmarks/results/<device>-<timestamp>.json)")
    p.add_argument("--quick", action="store_true",
                   help="tiny batch (2) and few repeats: a smoke test, not a measurement")
    p.add_argument("--only", default=None,
                   help="comma-separated substrings: run only the op cases whose name contains "
                        "one ('model' selects the whole-model ratio)")
    p.add_argument("--no-model", action="store_true", help="skip the whole-model ratio")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--channels-last", action="store_true",
                   help="4-D activations, conv weights and the model in channels-last layout")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--_mem-worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("batch", "repeats", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name}: expected a positive integer, got {v}")
    if args.warmup is not None and args.warmup < 0:
        p.error(f"--warmup: expected a non-negative integer, got {args.warmup}")
    return p, args


def _selected(name: str, only: Optional[List[str]]) -> bool:
    return only is None or any(s in name for s in only)


def _fmt_ms(s: Optional[dict]) -> str:
    if not s:
        return "error"
    m = s["median_ms"]
    digits = 3 if m < 1 else (2 if m < 100 else 1)
    return f"{m:.{digits}f} ({s['p20_ms']:.{digits}f}-{s['p80_ms']:.{digits}f})"


def _fmt_mb(b) -> str:
    if b is None:
        return "-"
    return f"{b / 2**20:.1f}"


def print_table(res: dict) -> None:
    d, cfg = res["device"], res["config"]
    ver = res["versions"]
    print()
    print(f"adcert benchmarks -- device: {d['type']} | {d['name']}")
    print(f"python {ver['python']} | torch {ver['torch']} | triton {ver['triton']} | "
          f"adcert {ver.get('adcert')} ({ver.get('adcert_git')})")
    print(f"batch {cfg['batch']} | repeats {cfg['repeats']} | warm-up {cfg['warmup']} | "
          f"fp32 | channels_last {cfg['channels_last']} | tf32 (cudnn/matmul) "
          f"{res['precision']['cudnn_allow_tf32']}/{res['precision']['cuda_matmul_allow_tf32']}"
          f"{' | QUICK (smoke test, not a measurement)' if cfg['quick'] else ''}")
    ob = res["ops_backend"]
    if ob["all_reference"]:
        print("NOTE: adcert.ops is still reference-backed -- 'adcert' and 'reference' run the "
              "same code; speedups ~1.0 are expected.")
    else:
        n_ref = sum(impl == "reference" for impl in ob["ops"].values())
        ext = "loaded" if ob["compiled_extension"] else "NOT loaded"
        print(f"ops backend: compiled extension {ext} | GPU kernels {ob['gpu_kernels']}"
              + (f" | {n_ref} op(s) still reference-backed" if n_ref else ""))
    print("times: median (p20-p80) ms per call; speedup = reference median / adcert median; "
          "mem = peak growth MiB")
    if res["cases"]:
        hdr = (f"{'case':<26} {'mode':<7} {'adcert ms':>24} {'reference ms':>24} "
               f"{'speedup':>8} {'mem adcert':>11} {'mem ref':>9}")
        print()
        print(hdr)
        print("-" * len(hdr))
        for c in res["cases"]:
            a, r = c["variants"].get("adcert"), c["variants"].get("reference")
            sp = f"{c['speedup']:.2f}x" if c.get("speedup") else "-"
            print(f"{c['name']:<26} {c['mode']:<7} {_fmt_ms(a):>24} {_fmt_ms(r):>24} {sp:>8} "
                  f"{_fmt_mb((a or {}).get('peak_mem_bytes')):>11} "
                  f"{_fmt_mb((r or {}).get('peak_mem_bytes')):>9}")
    m = res.get("model")
    if m:
        print()
        hdr = (f"{'CNN7 fwd+bwd, batch ' + str(cfg['batch']):<26} {'ms':>24} "
               f"{'ratio to clean':>15} {'paired':>7} {'mem':>9}")
        print(hdr)
        print("-" * len(hdr))
        for name, s in m["variants"].items():
            ratio = m["ratio"].get(name)
            paired = m["ratio_paired"].get(name)
            print(f"{name:<26} {_fmt_ms(s):>24} "
                  f"{(f'{ratio:.3f}' if ratio else '-'):>15} "
                  f"{(f'{paired:.3f}' if paired else '-'):>7} "
                  f"{_fmt_mb((s or {}).get('peak_mem_bytes')):>9}")
        print(f"(ratio = IBP fwd+bwd / clean fwd+bwd; floor {FLOOR_RATIO}, target <= "
              f"{TARGET_RATIO}; paired = median of per-round ratios)")
    if res["errors"]:
        print()
        print(f"{len(res['errors'])} error(s):")
        for e in res["errors"]:
            print(f"  {e['where']}: {e['error']}")
    print()


def main(argv=None) -> int:
    parser, args = parse_args(argv)
    if args._mem_worker:
        mem_worker(*args._mem_worker)
        return 0

    device = args.device or bc.default_device()
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.quick:
        # A smoke test must finish in time on a busy machine too, where OpenMP threads fighting
        # other processes for the cores can be several times slower than one thread.
        torch.set_num_threads(1)
    if args.quick:
        batch = args.batch or 2
        repeats = args.repeats or 3
        warmup = 1 if args.warmup is None else max(1, args.warmup)
        target_sample_s = 0.0
    else:
        batch = args.batch or bc.default_batch(device)
        repeats = args.repeats or 20
        warmup = 3 if args.warmup is None else max(1, args.warmup)
        target_sample_s = 0.02 if device == "cuda" else 0.01
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    run_model = not args.no_model and _selected("model", only)
    sync = bc.synchronizer(device)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out_path = args.out or os.path.join(HERE, "results", f"{device}-{stamp}.json")

    res = {
        "schema_version": SCHEMA_VERSION,
        "timestamp_utc": stamp,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "device": device_info(device),
        "versions": versions(),
        "precision": precision_settings(device),
        "ops_backend": bc.ops_backend(),
        "config": {"batch": batch, "repeats": repeats, "warmup": warmup, "quick": args.quick,
                   "channels_last": args.channels_last, "target_sample_s": target_sample_s,
                   "interleave": "alternating order per round (ABBA...)",
                   "fwdbwd_gradient": "grad of (mu'*g1).sum() + (r'*g2).sum() w.r.t. mu, r and "
                                      "the parameters (BN statistics frozen)"},
        "memory_method": None if args.no_memory else (
            "cuda: torch.cuda.max_memory_allocated() during one call minus memory_allocated() "
            "before it" if device == "cuda" else
            CPU_RSS_METHOD),
        "cases": [],
        "model": None,
        "errors": [],
    }
    t_start = time.perf_counter()
    mem_items: List[tuple] = []  # (item, where to store the result)

    for name in bc.OP_CASES:
        if not _selected(name, only):
            continue
        for mode in bc.MODES:
            entry = {"name": name, "op": bc.OP_CASES[name]["op"], "mode": mode,
                     "shape": bc.case_shape(name, batch), "variants": {}, "speedup": None}
            res["cases"].append(entry)
            try:
                fns = {v: bc.build_op_case(name, v, mode, device, batch,
                                           channels_last=args.channels_last) for v in bc.VARIANTS}
                t = time_interleaved(fns, sync, repeats, warmup, target_sample_s)
                for v in bc.VARIANTS:
                    entry["variants"][v] = t[v]
                entry["speedup"] = t["reference"]["median_ms"] / t["adcert"]["median_ms"]
                if not args.no_memory:
                    for v in bc.VARIANTS:
                        if device == "cuda":
                            entry["variants"][v]["peak_mem_bytes"] = cuda_peak_growth(fns[v])
                        else:
                            mem_items.append(({"kind": "op", "case": name, "variant": v,
                                               "mode": mode}, entry["variants"][v]))
                del fns
            except Exception as e:  # noqa: BLE001
                res["errors"].append({"where": f"{name}/{mode}",
                                      "error": f"{type(e).__name__}: {e}",
                                      "traceback": traceback.format_exc()})
            if device == "cuda":
                torch.cuda.empty_cache()
            print(f"  done {name}/{mode} ({time.perf_counter() - t_start:.0f} s)", flush=True)

    if run_model:
        variants = bc.model_variants()
        m = {"name": "cnn7", "input": f"[{batch},3,32,32]", "eps": bc.EPS, "variants": {},
             "ratio": {}, "ratio_paired": {}, "floor": FLOOR_RATIO, "target": TARGET_RATIO}
        res["model"] = m
        try:
            fns = {}
            for v in variants:
                try:
                    fns[v] = bc.build_model_case(v, device, batch,
                                                 channels_last=args.channels_last)
                    fns[v]()  # fail here, not inside the timing loop (counts as a warm-up)
                except Exception as e:  # noqa: BLE001
                    if v == "clean":
                        raise
                    fns.pop(v, None)
                    res["errors"].append({"where": f"model/{v}",
                                          "error": f"{type(e).__name__}: {e}",
                                          "traceback": traceback.format_exc()})
            t = time_interleaved(fns, sync, repeats, max(1, warmup - 1), target_sample_s)
            samples = t.pop("_samples")
            for v in fns:
                m["variants"][v] = t[v]
                if v != "clean":
                    m["ratio"][v] = t[v]["median_ms"] / t["clean"]["median_ms"]
                    m["ratio_paired"][v] = percentile(
                        [a / b for a, b in zip(samples[v], samples["clean"])], 50)
            if not args.no_memory:
                for v in fns:
                    if device == "cuda":
                        m["variants"][v]["peak_mem_bytes"] = cuda_peak_growth(fns[v])
                    else:
                        mem_items.append(({"kind": "model", "variant": v}, m["variants"][v]))
            del fns
        except Exception as e:  # noqa: BLE001
            res["errors"].append({"where": "model", "error": f"{type(e).__name__}: {e}",
                                  "traceback": traceback.format_exc()})
        print(f"  done model ({time.perf_counter() - t_start:.0f} s)", flush=True)

    if mem_items:
        spec = {"device": device, "batch": batch, "channels_last": args.channels_last,
                "threads": torch.get_num_threads(), "calls": 1 if args.quick else 2,
                "warmup": 0 if args.quick else 1}
        try:
            mres = cpu_peak_growth_all([it for it, _ in mem_items], spec)
            if mres["method"] == "allocator":
                res["memory_method"] = CPU_ALLOCATOR_METHOD
            for (item, slot), r in zip(mem_items, mres["results"]):
                slot["peak_mem_bytes"] = r["bytes"]
                if r["error"]:
                    res["errors"].append({"where": f"memory/{item}", "error": r["error"]})
        except Exception as e:  # noqa: BLE001
            res["errors"].append({"where": "memory", "error": f"{type(e).__name__}: {e}"})
        print(f"  done memory ({time.perf_counter() - t_start:.0f} s)", flush=True)

    res["wall_s"] = time.perf_counter() - t_start
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, out_path)
    print_table(res)
    print(f"wrote {out_path} ({res['wall_s']:.0f} s)")
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
