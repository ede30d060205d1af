"""The layer plan: a model turned, once, into a short list of bound-propagation steps (the graph).

Every step is a :class:`~adcert.bounds.layers.base.Node` of one operation type of
:mod:`adcert.bounds.layers`, which carries all of that operation's rules. ``nn.Sequential``
models (nested ``Sequential``s are flattened) of registered modules (:mod:`adcert.bounds.registry`)
are compiled here; any other ``nn.Module`` is traced with ``torch.fx`` by
:mod:`adcert.bounds.trace` into the same structure.

The fast path: ``Conv2d``/``Linear`` followed by an optional ``BatchNorm`` and an optional ``ReLU``
become ONE :class:`AffineStep`, which the IBP pass runs as one fused op
(``interval_conv2d_bn_relu`` / ``interval_linear_bn_relu``). ``Identity`` and dropout are dropped
(dropout is the identity for bounds). The plan holds only structure -- module references -- and
reads parameters, batch-norm mode and layer hyper-parameters when it is run, so it stays valid
across optimiser steps and ``train()``/``eval()`` switches.

Plans are cached per model (weakly, so a cached plan never keeps a model alive) and rebuilt when
the flattened module list changes (a layer appended, replaced or removed). Joins
(:class:`ResidualStep`, :class:`CatStep`) hold branches of steps; :func:`iter_steps` visits
nested steps.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import partial
from typing import Callable, List, Optional, Tuple, Union

from torch import nn

from adcert.bounds import layers  # noqa: F401  (registers every operation)
from adcert.bounds import registry
from adcert.bounds.layers.avg_pool import AvgPoolStep
from adcert.bounds.layers.base import OPAQUE, Node, branches_of
from adcert.bounds.layers.dense import AffineStep, BatchNormStep
from adcert.bounds.layers.join import CatStep, ResidualStep
from adcert.bounds.layers.normalize import NormalizeStep
from adcert.bounds.layers.relu import ReluStep
from adcert.bounds.layers.shape import FlattenStep, ReshapeStep

__all__ = ["LayerPlan", "Step", "AffineStep", "BatchNormStep", "NormalizeStep", "ReluStep",
           "FlattenStep", "AvgPoolStep", "ReshapeStep", "ResidualStep", "CatStep", "iter_steps",
           "check_leaf", "flatten_modules", "build_plan", "fuse_modules", "get_plan",
           "SUPPORTED_MODULES"]

BatchNorm = Union[nn.BatchNorm1d, nn.BatchNorm2d]
Step = Node
SUPPORTED_MODULES = registry.supported_modules()

_AFFINE = (nn.Conv2d, nn.Linear)
_BATCH_NORM = (nn.BatchNorm1d, nn.BatchNorm2d)


def iter_steps(steps):
    """Every step of ``steps``, depth first, including the steps inside joins' branches (a join
    is yielded before its branches' steps)."""
    for step in steps:
        yield step
        for branch in branches_of(step):
            yield from iter_steps(branch)


@dataclass(frozen=True, eq=False)
class LayerPlan:
    """A model compiled to bound-propagation steps.

    ``modules``: the flattened leaf modules the plan was built from (the cache key);
    ``steps``: the steps, in order.
    """
    modules: Tuple[nn.Module, ...]
    steps: Tuple[Node, ...]

    def batch_norms(self) -> List[BatchNorm]:
        """Every batch-norm module in the plan, in order."""
        return [bn for step in iter_steps(self.steps) for bn in step.batch_norms()]

    def final_linear(self) -> Optional[AffineStep]:
        """The last step if it is a ``Linear`` (+ optional batch norm) WITHOUT ReLU, i.e. an affine
        map into which a linear specification can be folded; else ``None``."""
        if self.steps:
            last = self.steps[-1]
            if isinstance(last, AffineStep) and last.is_linear and not last.relu:
                return last
        return None

    def first_layer(self) -> Optional[nn.Module]:
        """The first module that fixes the input rank (conv/linear/batch-norm/flatten; searched
        inside the first join's branches too); ``None`` if a reshape or pool comes first."""
        for step in self.steps:
            first = step.first_module()
            if first is None:
                continue
            return None if first is OPAQUE else first
        return None


def _unsupported(module: nn.Module, index: int, why: str = "") -> NotImplementedError:
    extra = f" ({why})" if why else ""
    return NotImplementedError(
        f"model: module {index} of type {type(module).__name__} is not supported by "
        f"compute_bounds{extra}; {registry.supported_text()}")


def check_leaf(module: nn.Module, refuse: Callable[[str], Exception]) -> None:
    """Refuse a leaf module the engine could silently get wrong: not of a registered class (or a
    subclass with its own forward, see :func:`adcert.bounds.registry.module_builder`), with
    forward hooks, or a ``Conv2d`` with a padding the engine does not implement. Raises
    ``refuse(why)`` (``why`` is ``""`` for an unsupported class), so each caller words its own
    error; used by :func:`build_plan` and by :mod:`adcert.bounds.trace`."""
    if registry.module_builder(module) is None:
        raise refuse("")
    if module._forward_pre_hooks or module._forward_hooks:  # noqa: SLF001
        raise refuse("it has forward hooks, which compute_bounds would ignore (e.g. "
                     "weight_norm/pruning); remove them")
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            raise refuse(f"padding_mode={module.padding_mode!r}; only 'zeros' is supported")
        if isinstance(module.padding, str) and module.padding not in ("valid", "same"):
            raise refuse(f"padding={module.padding!r}")


def flatten_modules(model: nn.Module) -> Tuple[nn.Module, ...]:
    """The leaf modules of ``model``, with nested ``nn.Sequential`` containers flattened."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if type(model).forward is not nn.Sequential.forward or not isinstance(model, nn.Sequential):
        return (model,)
    if model._forward_pre_hooks or model._forward_hooks:  # noqa: SLF001
        raise NotImplementedError(f"model: the {type(model).__name__} container has forward hooks, "
                                  "which compute_bounds would ignore; remove them")
    out: List[nn.Module] = []
    for child in model.children():
        out.extend(flatten_modules(child))
    return tuple(out)


def build_plan(model: nn.Module, fuse: bool = True) -> LayerPlan:
    """Build (without caching) the :class:`LayerPlan` of a Sequential ``model``. ``fuse=False``
    gives the general path: one step per module, no fused conv/linear + BN + ReLU (the fast path
    must give the same bounds; tests compare them).

    Raises ``NotImplementedError`` naming the first unsupported module and listing the supported
    ones."""
    modules = flatten_modules(model)
    items = []
    for i, m in enumerate(modules):
        check_leaf(m, partial(_unsupported, m, i))
        item = registry.module_builder(m)(m)
        if item is not None:
            items.append(item)
    return LayerPlan(modules=modules, steps=tuple(fuse_modules(items, fuse)))


def fuse_modules(kept: List[Union[nn.Module, Node]], fuse: bool = True) -> List[Node]:
    """Items in order -- ready steps, or the fusable modules (conv/linear, batch norm, ReLU) the
    registry hands back as themselves -> steps: conv/linear + matching BN + ReLU fuse into one
    :class:`AffineStep`, a BN (+ ReLU) not after a conv/linear into a :class:`BatchNormStep`, a
    lone ReLU into a :class:`ReluStep`. Also used for the chains of traced models. ``fuse=False``:
    every module its own step."""
    steps: List[Node] = []
    i = 0
    while i < len(kept):
        m = kept[i]
        if isinstance(m, Node):
            steps.append(m)
            i += 1
        elif isinstance(m, _AFFINE + _BATCH_NORM):
            group: List[nn.Module] = [m]
            j = i + 1
            bn = m if isinstance(m, _BATCH_NORM) else None
            if fuse and bn is None and j < len(kept) and isinstance(kept[j], _BATCH_NORM) and \
                    _bn_matches(m, kept[j]):
                bn = kept[j]
                group.append(bn)
                j += 1
            relu = fuse and j < len(kept) and isinstance(kept[j], nn.ReLU)
            if relu:
                group.append(kept[j])
                j += 1
            if isinstance(m, _AFFINE):
                steps.append(AffineStep(m, bn, relu, tuple(group)))  # type: ignore[arg-type]
            else:
                steps.append(BatchNormStep(m, relu, tuple(group)))  # type: ignore[arg-type]
            i = j
        elif isinstance(m, nn.ReLU):
            steps.append(ReluStep(m))
            i += 1
        else:  # pragma: no cover - the registry guards this
            raise _unsupported(m, i)
    return steps


def _bn_matches(layer: nn.Module, bn: nn.Module) -> bool:
    """Fuse only a BatchNorm2d after a Conv2d / a BatchNorm1d after a Linear."""
    if isinstance(layer, nn.Conv2d):
        return isinstance(bn, nn.BatchNorm2d)
    return isinstance(bn, nn.BatchNorm1d)


_CACHE: "weakref.WeakKeyDictionary[nn.Module, LayerPlan]" = weakref.WeakKeyDictionary()


def _same_modules(a: Tuple[nn.Module, ...], b: Tuple[nn.Module, ...]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _is_plain_sequential(model: nn.Module, modules: Tuple[nn.Module, ...]) -> bool:
    """Whether ``model`` takes the Sequential path: a plain ``nn.Sequential`` (or a lone
    registered leaf) whose flattened modules are all registered leaf modules."""
    plain = isinstance(model, nn.Sequential) and type(model).forward is nn.Sequential.forward
    leaf = modules == (model,) and registry.module_builder(model) is not None
    return (plain or leaf) and all(registry.module_builder(m) is not None for m in modules)


def _check_hooks(modules) -> None:
    for i, m in enumerate(modules):  # hooks may have been added since the plan was built
        if m._forward_pre_hooks or m._forward_hooks:  # noqa: SLF001
            check_leaf(m, partial(_unsupported, m, i))


def get_plan(model: nn.Module) -> LayerPlan:
    """The cached :class:`LayerPlan` of ``model``, rebuilt if its module list changed.

    A plain ``nn.Sequential`` of registered modules (or a lone registered module) is compiled by
    :func:`build_plan`; any other ``nn.Module`` is traced with ``torch.fx``
    (:func:`adcert.bounds.trace.trace_plan`). Traced plans are cached per model and rebuilt when
    its set of submodules changes; like any fx trace they record ONE path through Python control
    flow, taken at build time.

    Cost on a cache hit: one walk over the module list (no tensor work)."""
    modules = flatten_modules(model)
    if not _is_plain_sequential(model, modules):
        from adcert.bounds.trace import trace_plan, traced_key
        key = traced_key(model)
        plan = _CACHE.get(model)
        if plan is not None and _same_modules(plan.modules, key):
            if any(m._forward_pre_hooks or m._forward_hooks for m in (model,) + key):  # noqa
                return trace_plan(model)  # raises, naming the hooked module
            return plan
        plan = trace_plan(model)
        _CACHE[model] = plan
        return plan
    plan = _CACHE.get(model) if isinstance(model, nn.Sequential) else None
    if plan is not None and _same_modules(plan.modules, modules):
        _check_hooks(modules)
        return plan
    plan = build_plan(model)
    if isinstance(model, nn.Sequential):  # a leaf model would be its own plan's key: no cache
        _CACHE[model] = plan
    return plan
