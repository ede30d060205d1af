"""Builds adcert and its compiled extension ``adcert._C``.

    pip install torch==2.13.0                      # CPU torch first (see constraints.txt)
    pip install --no-build-isolation -e .          # builds adcert._C against that torch

Environment switches:
    ADCERT_CUDA=auto|0|1   build csrc/cuda/*.cu: auto (default) when torch is a CUDA build and a
                           CUDA toolkit is found; 0 never; 1 always (fails if impossible).
    ADCERT_DEBUG=1         -O0 -g instead of -O3.
The Triton kernels in kernels/ are pure Python and install as the package ``adcert.kernels``.
"""
import glob
import os

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - exercised only on a broken setup
    raise SystemExit(
        "adcert needs torch to build its extension. Install torch first, e.g.\n"
        "    pip install torch==2.13.0\n"
        "then build without build isolation so the extension links that torch:\n"
        "    pip install --no-build-isolation -e .") from exc

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    mode = os.environ.get("ADCERT_CUDA", "auto").lower()
    cuda_sources = glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu"))
    possible = torch.version.cuda is not None and CUDA_HOME is not None and bool(cuda_sources)
    if mode in ("0", "false", "no", "off"):
        return False
    if mode in ("1", "true", "yes", "on"):
        if not possible:
            raise SystemExit("ADCERT_CUDA=1 but a CUDA build of torch, a CUDA toolkit "
                             f"(CUDA_HOME={CUDA_HOME}) or csrc/cuda/*.cu sources are missing")
        return True
    if mode != "auto":
        raise SystemExit(f"ADCERT_CUDA: expected auto, 0 or 1, got {mode!r}")
    return possible


def _extension():
    debug = os.environ.get("ADCERT_DEBUG", "0") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    # -fopenmp: at::parallel_for is an inline OpenMP region; without it the loops run serially.
    # -fno-trapping-math: lets the compiler turn the ReLU selects into vector blends
    # (FP traps are never enabled by torch); without it they stay mispredicted branches.
    cxx += ["-fopenmp", "-fno-trapping-math", "-Wall", "-Wno-unknown-pragmas"]
    rel = lambda p: os.path.relpath(p, HERE)  # noqa: E731
    sources = [rel(p) for p in sorted(glob.glob(os.path.join(HERE, "csrc", "*.cpp"))
                                      + glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")))]
    if _want_cuda():
        sources += [rel(p) for p in sorted(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))]
        return CUDAExtension("adcert._C", sources, define_macros=[("ADCERT_WITH_CUDA", "1")],
                             extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
                             extra_link_args=["-fopenmp"])
    return CppExtension("adcert._C", sources, extra_compile_args={"cxx": cxx},
                        extra_link_args=["-fopenmp"])


setup(
    name="adcert",
    version="0.1.0",
    description="Certified training and certification with a compiled interval-bound core",
    packages=find_packages(include=["adcert", "adcert.*"]) + ["adcert.kernels"],
    package_dir={"adcert.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
    install_requires=["torch", "numpy", "tqdm", "pyyaml"],
    extras_require={
        "triton": ["triton"],
        "test": ["pytest", "pytest-benchmark", "scipy", "scikit-learn"],
    },
    entry_points={"console_scripts": ["adcert=adcert.cli:main"]},
)
