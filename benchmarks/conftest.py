"""pytest-benchmark fixtures for ``pytest benchmarks/`` (not part of the normal test run, whose
``testpaths`` is ``tests``).

Environment:

* ``ADCERT_BENCH_DEVICE`` -- ``cpu`` or ``cuda`` (default: cuda when available, else cpu);
* ``ADCERT_BENCH_BATCH``  -- batch size (default: 128 on cuda, 16 on cpu).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import bench_common as bc  # noqa: E402


@pytest.fixture(scope="session")
def bench_device() -> str:
    device = os.environ.get("ADCERT_BENCH_DEVICE") or bc.default_device()
    if device not in ("cpu", "cuda"):
        raise ValueError(f"ADCERT_BENCH_DEVICE: expected 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("ADCERT_BENCH_DEVICE=cuda but torch.cuda.is_available() is False")
    return device


@pytest.fixture(scope="session")
def bench_batch(bench_device) -> int:
    return bc.default_batch(bench_device)


@pytest.fixture
def run_bench(benchmark, bench_device, bench_batch):
    """``run_bench(fn, group, **extra)``: one warm-up call (Triton compiles, caches fill), then
    pytest-benchmark times ``fn`` followed by a device synchronisation."""
    sync = bc.synchronizer(bench_device)

    def go(fn, group: str, **extra):
        benchmark.group = group
        benchmark.extra_info.update(device=bench_device, batch=bench_batch,
                                    ops_backend=bc.ops_backend()["ops"], **extra)

        def call():
            fn()
            sync()

        call()
        benchmark(call)

    return go
