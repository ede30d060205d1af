"""Optional dependencies: imported where they are needed, with a one-line error when missing.

    sklearn = require("sklearn.datasets", "scikit-learn", "dataset 'digits'")

A missing package raises :class:`MissingDependency` (an ``ImportError``) whose message names the
package and the command that installs it; the command lines print it as one line (exit status 2)
instead of a traceback.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional


class MissingDependency(ImportError):
    """An optional package is not installed; the message names it and how to install it."""


def require(module: str, package: str, purpose: str, install: Optional[str] = None
            ) -> ModuleType:
    """``import module``, or :class:`MissingDependency` saying that ``purpose`` needs
    ``package`` and how to install it (``install``: the pip arguments, default ``package``)."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependency(missing_message(package, purpose, install)) from err


def missing_message(package: str, purpose: str, install: Optional[str] = None) -> str:
    """``"<purpose> needs <package>, which is not installed: pip install <install>"``."""
    return f"{purpose} needs {package}, which is not installed: pip install {install or package}"


__all__ = ["MissingDependency", "require", "missing_message"]
