"""Microbenchmarks: every interval op, adcert versus the plain-torch reference, on the layers of
CNN7 for CIFAR-10, forward and forward+backward; plus one CNN7 training step (clean and IBP).

    pytest benchmarks/                                  # all of them
    pytest benchmarks/ -k "conv2d_bn_relu and fwdbwd"   # a subset
    ADCERT_BENCH_BATCH=32 pytest benchmarks/ --benchmark-columns=median,iqr,rounds

Each case's variants share a ``benchmark.group``, so the report lists them side by side. For the
fair, interleaved comparison with speedups, memory and the whole-model ratio use
``python benchmarks/run.py`` (see README.md).
"""
from __future__ import annotations

import pytest

import bench_common as bc

pytest.importorskip("pytest_benchmark")


@pytest.mark.parametrize("variant", bc.VARIANTS)
@pytest.mark.parametrize("mode", bc.MODES)
@pytest.mark.parametrize("case", list(bc.OP_CASES))
def test_op(run_bench, bench_device, bench_batch, case, mode, variant):
    fn = bc.build_op_case(case, variant, mode, bench_device, bench_batch)
    run_bench(fn, group=f"{case} [{mode}]", op=bc.OP_CASES[case]["op"], variant=variant,
              mode=mode, shape=bc.case_shape(case, bench_batch))


@pytest.mark.parametrize("variant", bc.model_variants())
def test_cnn7_train_step(run_bench, bench_device, bench_batch, variant):
    """Forward+backward of CNN7 (train mode); compare the IBP variants with ``clean``: the FLOP
    floor of IBP / clean is 2.0."""
    fn = bc.build_model_case(variant, bench_device, bench_batch)
    run_bench(fn, group="cnn7 train step [fwdbwd]", variant=variant)
