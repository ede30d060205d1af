"""An install without the compiled extension: ``import adcert`` works, the ops run their plain-torch
reference with one warning that says how to build ``adcert._C``, and ``adcert info`` says so. An
``adcert._C`` built against another torch stays a clear error (when an op runs). Each case runs in
a subprocess, since ``adcert._C`` is loaded in this one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from conftest import REPO

_MISSING = "import sys\nsys.modules['adcert._C'] = None  # as if it had never been built\n"

_STALE = textwrap.dedent("""\
    import importlib.abc, importlib.machinery, sys

    class _Stale(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        # an adcert._C that is there but does not load, as one built against another torch
        def find_spec(self, name, path, target=None):
            if name == "adcert._C":
                return importlib.machinery.ModuleSpec(name, self, origin="/x/_C.so")

        def create_module(self, spec):
            raise ImportError("/x/_C.so: undefined symbol: _ZN3c104impl8GPUTrace")

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, _Stale())
    """)

_OPS = textwrap.dedent("""\
    import json, warnings
    import torch

    import adcert, adcert.data, adcert.models  # noqa: F401
    from adcert import ops
    from adcert.ops import _extension, reference
    from adcert.ops.brent_step import brent_init

    g = torch.Generator().manual_seed(0)
    def t(*shape, pos=False):
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        return x.abs() if pos else x
    mu, r, w, b = t(4, 5), t(4, 5, pos=True), t(3, 5), t(3)
    mu4, r4, w4 = t(2, 2, 5, 5), t(2, 2, 5, 5, pos=True), t(3, 2, 3, 3)
    bn = (t(3), t(3, pos=True) + 0.5, t(3), t(3))
    state = brent_init(torch.zeros(6, dtype=torch.float64), -torch.ones(6, dtype=torch.float64),
                       torch.ones(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64))
    calls = {
        "interval_linear": ((mu, r, w, b), {}),
        "interval_conv2d": ((mu4, r4, w4, b), {"stride": 2, "padding": 1}),
        "interval_batch_norm": ((t(4, 3), t(4, 3, pos=True), *bn), {"eps": 1e-3}),
        "interval_relu": ((mu, r), {}),
        "interval_linear_bn_relu": ((mu, r, w, b, *bn), {"bn_eps": 1e-3}),
        "interval_conv2d_bn_relu": ((mu4, r4, w4, b, *bn), {"padding": 1, "relu": False}),
        "adcert_loss": ((t(4, 10), t(4, 10), t(4, 10), 0.3), {"tau": 2.0,
                                                              "clean_logits": t(4, 10)}),
        "brent_step": ((state, t(6), 1e-6, 1e-6, 10), {}),
    }
    public = sorted(n for n in ops.__all__ if n not in ("reference", "value_checks"))
    assert sorted(calls) == public, (sorted(calls), public)

    def flat(out):
        return list(out) if isinstance(out, tuple) else [out]

    out = {"status": _extension.status(), "equal": {}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, (args, kwargs) in calls.items():
            got, want = flat(getattr(ops, name)(*args, **kwargs)), flat(
                getattr(reference, name)(*args, **kwargs))
            out["equal"][name] = len(got) == len(want) and all(
                torch.equal(a, b) for a, b in zip(got, want))
        x = mu.clone().requires_grad_()
        ops.interval_linear(x, r, w, b)[0].sum().backward()   # ordinary autograd
        out["grad"] = torch.allclose(x.grad, w.sum(0).expand(4, 5))
        try:
            ops.interval_relu(mu, -r)
        except ValueError as err:                               # the same argument checks
            out["check"] = str(err)
    out["warnings"] = [(type(x.message).__name__, str(x.message)) for x in caught]
    print(json.dumps(out))
    """)

_INFO = "from adcert.cli import main\nsys.exit(main(['info']))\n"


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_without_the_extension_every_op_runs_the_reference_with_one_warning():
    proc = _run(_MISSING + _OPS)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["status"] == "reference"
    assert out["equal"] and all(out["equal"].values()), out["equal"]
    assert out["grad"] and out["check"].startswith("r: the radius must be >= 0")
    assert len(out["warnings"]) == 1, out["warnings"]
    kind, message = out["warnings"][0]
    assert kind == "ExtensionMissingWarning"
    assert "adcert._C" in message and "pip install --no-build-isolation -e ." in message


def test_info_reports_the_reference_path_without_the_extension():
    proc = _run(_MISSING + _INFO)
    assert proc.returncode == 0, proc.stderr
    assert "ops: reference (plain torch" in proc.stdout
    assert "pip install --no-build-isolation -e ." in proc.stdout
    here = _run("import sys\n" + _INFO)
    assert here.returncode == 0 and "ops: compiled (adcert._C: " in here.stdout


def test_an_extension_built_against_another_torch_is_a_clear_error_when_an_op_runs():
    code = _STALE + textwrap.dedent("""\
        import torch
        import adcert, adcert.data, adcert.models  # noqa: F401  (importing still works)
        from adcert import ops
        try:
            ops.interval_relu(torch.zeros(2), torch.zeros(2))
        except ImportError as err:
            print("ERROR:", str(err).replace("\\n", " "))
        """)
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    assert "ERROR: adcert._C was built against a different torch" in proc.stdout
    assert "pip install --no-build-isolation -e ." in proc.stdout
    info = _run(_STALE + _INFO)
    assert info.returncode == 1
    assert "ops: unavailable (adcert._C was built against a different torch" in info.stdout
