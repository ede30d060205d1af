"""The README's Python examples run as written, and .ci/run uses the README's test command."""
import re

import pytest

from conftest import REPO

README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index):
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {})


def test_ci_runs_the_readme_test_command():
    command = "bash scripts/test.sh"
    assert command in README
    assert command in (REPO / ".ci" / "run").read_text()
