"""The layer plan: a model's module list turned, once, into a short list of bound-propagation steps.

``nn.Sequential`` models (nested ``Sequential``s are flattened) of the supported modules become a
:class:`LayerPlan`. ``Conv2d``/``Linear`` followed by an optional ``BatchNorm`` and an optional
``ReLU`` become ONE :class:`AffineStep`, which the IBP pass runs as one fused op
(``interval_conv2d_bn_relu`` / ``interval_linear_bn_relu``). ``Identity`` and dropout are dropped
(dropout is the identity for bounds). The plan holds only structure -- module references -- and
reads parameters, batch-norm mode and layer hyper-parameters when it is run, so it stays valid
across optimiser steps and ``train()``/``eval()`` switches.

Plans are cached per model (weakly, so a cached plan never keeps a model alive) and rebuilt when
the flattened module list changes (a layer appended, replaced or removed).

Any other ``nn.Module`` (or a Sequential with other modules, e.g. ``AvgPool2d`` or a residual
block) is traced with ``torch.fx`` by :mod:`adcert.bounds.trace` into the same structure plus
:class:`AvgPoolStep`, :class:`ReshapeStep` and :class:`ResidualStep` (branches applied to the same
input and summed, then optional ReLU; branches are step tuples, fused the same way). Use
:func:`iter_steps` to visit nested steps.

The plan is method-agnostic: IBP (:mod:`adcert.bounds.ibp`) and the clean forward
(:mod:`adcert.bounds.forward`) dispatch on the step types; CROWN-family methods are meant to walk
the same steps backwards.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import partial
from typing import Callable, List, Optional, Tuple, Type, Union

from torch import nn
from torch.nn.modules.dropout import _DropoutNd

from adcert.models.normalize import Normalize

BatchNorm = Union[nn.BatchNorm1d, nn.BatchNorm2d]


@dataclass(frozen=True, eq=False)
class NormalizeStep:
    """``(x - mean) / std`` (exact affine map)."""
    module: Normalize


@dataclass(frozen=True, eq=False)
class AffineStep:
    """``Conv2d`` or ``Linear`` (+ bias), then optionally a batch norm, then optionally ReLU.

    ``modules`` are the original modules fused into this step, in order (for error messages and
    for methods that need per-layer state, e.g. alpha-CROWN's per-ReLU slopes)."""
    layer: Union[nn.Conv2d, nn.Linear]
    bn: Optional[BatchNorm]
    relu: bool
    modules: Tuple[nn.Module, ...]

    @property
    def is_linear(self) -> bool:
        return isinstance(self.layer, nn.Linear)


@dataclass(frozen=True, eq=False)
class BatchNormStep:
    """A batch norm not preceded by a conv/linear (e.g. first layer, or after a ReLU), then
    optionally ReLU."""
    bn: BatchNorm
    relu: bool
    modules: Tuple[nn.Module, ...]


@dataclass(frozen=True, eq=False)
class ReluStep:
    """A ReLU not fused into a preceding affine step."""
    module: nn.ReLU


@dataclass(frozen=True, eq=False)
class FlattenStep:
    """``torch.flatten(x, start_dim, end_dim)``; the batch dimension is never merged."""
    module: nn.Flatten


@dataclass(frozen=True, eq=False)
class AvgPoolStep:
    """``nn.AvgPool2d`` or ``nn.AdaptiveAvgPool2d``: linear with non-negative weights, so the box
    maps to ``(pool(mu), pool(r))`` exactly."""
    module: Union[nn.AvgPool2d, nn.AdaptiveAvgPool2d]


@dataclass(frozen=True, eq=False)
class ReshapeStep:
    """A reshape that keeps the batch dimension (``view``/``reshape``/``torch.flatten`` in a traced
    model). ``shape`` given: ``t.reshape(t.shape[0], *shape)`` (``shape`` is the per-sample target,
    at most one ``-1``); ``shape`` None: ``torch.flatten(t, start_dim, end_dim)`` with
    ``start_dim`` not the batch dimension."""
    shape: Optional[Tuple[int, ...]] = None
    start_dim: int = 1
    end_dim: int = -1

    def apply(self, t):
        """The reshape of ``t: [B, *]`` (raises if it would merge or split the batch)."""
        if self.shape is not None:
            try:
                return t.reshape((t.shape[0],) + tuple(self.shape))
            except RuntimeError as exc:
                raise ValueError(f"x: the model reshapes a [B, *] = {tuple(t.shape)} tensor to "
                                 f"per-sample shape {tuple(self.shape)}, which does not keep the "
                                 f"batch dimension ({exc})") from exc
        if self.start_dim % t.dim() == 0:
            raise NotImplementedError("model: a flatten that merges the batch dimension "
                                      "(start_dim=0) is not supported")
        return t.flatten(self.start_dim, self.end_dim)


@dataclass(frozen=True, eq=False)
class ResidualStep:
    """A residual join: every branch (a step sequence; ``()`` is the identity shortcut) is applied
    to the SAME input, the results are summed, then optionally ReLU.

    IBP: ``mu = sum mu_i``, ``r = sum r_i`` (DESIGN.md section 3). ``modules``: the ReLU module
    fused after the add, if any (for error messages)."""
    branches: Tuple[Tuple["Step", ...], ...]
    relu: bool
    modules: Tuple[nn.Module, ...] = ()


Step = Union[NormalizeStep, AffineStep, BatchNormStep, ReluStep, FlattenStep, AvgPoolStep,
             ReshapeStep, ResidualStep]


def iter_steps(steps):
    """Every step of ``steps``, depth first, including the steps inside residual branches (a
    :class:`ResidualStep` is yielded before its branches' steps)."""
    for step in steps:
        yield step
        if isinstance(step, ResidualStep):
            for branch in step.branches:
                yield from iter_steps(branch)


@dataclass(frozen=True, eq=False)
class LayerPlan:
    """A model compiled to bound-propagation steps.

    ``modules``: the flattened leaf modules the plan was built from (the cache key);
    ``steps``: the steps, in order.
    """
    modules: Tuple[nn.Module, ...]
    steps: Tuple[Step, ...]

    def batch_norms(self) -> List[BatchNorm]:
        """Every batch-norm module in the plan, in order."""
        out: List[BatchNorm] = []
        for step in iter_steps(self.steps):
            bn = getattr(step, "bn", None)
            if bn is not None:
                out.append(bn)
        return out

    def final_linear(self) -> Optional[AffineStep]:
        """The last step if it is a ``Linear`` (+ optional batch norm) WITHOUT ReLU, i.e. an affine
        map into which a linear specification can be folded; else ``None``."""
        if self.steps:
            last = self.steps[-1]
            if isinstance(last, AffineStep) and last.is_linear and not last.relu:
                return last
        return None

    def first_layer(self) -> Optional[nn.Module]:
        """The first conv/linear/batch-norm/flatten module (the one that fixes the input rank;
        searched inside the first residual step's branches too); ``None`` if a reshape or pool
        comes first."""
        return _first_layer(self.steps)


def _first_layer(steps) -> Optional[nn.Module]:
    for step in steps:
        if isinstance(step, AffineStep):
            return step.layer
        if isinstance(step, BatchNormStep):
            return step.bn
        if isinstance(step, FlattenStep):
            return step.module
        if isinstance(step, (ReshapeStep, AvgPoolStep)):
            return None
        if isinstance(step, ResidualStep):
            for branch in step.branches:
                first = _first_layer(branch)
                if first is not None:
                    return first
            return None
    return None


# Supported leaf modules. A subclass is accepted only if it does not override ``forward``: the
# engine never calls the modules, so a different forward would be silently mis-bounded.
_AFFINE: Tuple[Type[nn.Module], ...] = (nn.Conv2d, nn.Linear)
_BATCH_NORM: Tuple[Type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d)
SKIPPED_MODULES: Tuple[Type[nn.Module], ...] = (nn.Identity, _DropoutNd)  # identity for bounds
SUPPORTED_MODULES: Tuple[Type[nn.Module], ...] = (
    nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.Flatten, Normalize,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)


def _supported_names() -> str:
    return ", ".join(c.__name__ for c in SUPPORTED_MODULES) + " (inside nn.Sequential)"


def _unsupported(module: nn.Module, index: int, why: str = "") -> NotImplementedError:
    extra = f" ({why})" if why else ""
    return NotImplementedError(
        f"model: module {index} of type {type(module).__name__} is not supported by "
        f"compute_bounds{extra}; supported modules: {_supported_names()}")


def supported_class(module: nn.Module, extra: Tuple[Type[nn.Module], ...] = ()
                    ) -> Optional[Type[nn.Module]]:
    """The supported class ``module`` is an instance of, provided it keeps that class's forward;
    ``extra``: more accepted classes (the traced path's pooling layers)."""
    for cls in SUPPORTED_MODULES + (_DropoutNd,) + tuple(extra):
        if isinstance(module, cls) and type(module).forward is cls.forward:
            return cls
    return None


def check_leaf(module: nn.Module, refuse: Callable[[str], Exception],
               extra: Tuple[Type[nn.Module], ...] = ()) -> None:
    """Refuse a leaf module the engine could silently get wrong: not of a supported class (or a
    subclass with its own forward, see :func:`supported_class`; ``extra`` as there), with
    forward hooks, or a ``Conv2d`` with a padding the engine does not implement. Raises
    ``refuse(why)`` (``why`` is ``""`` for an unsupported class), so each caller words its own
    error; used by :func:`build_plan` and by :mod:`adcert.bounds.trace`."""
    if supported_class(module, extra) is None:
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


def _check_module(module: nn.Module, index: int) -> None:
    """:func:`check_leaf` for module ``index`` of a Sequential model."""
    check_leaf(module, partial(_unsupported, module, index))


def _is(module: nn.Module, classes: Tuple[Type[nn.Module], ...]) -> bool:
    return isinstance(module, classes)


def build_plan(model: nn.Module) -> LayerPlan:
    """Build (without caching) the :class:`LayerPlan` of ``model``.

    Raises ``NotImplementedError`` naming the first unsupported module and listing the supported
    ones."""
    modules = flatten_modules(model)
    for i, m in enumerate(modules):
        _check_module(m, i)
    kept = [m for m in modules if not _is(m, SKIPPED_MODULES)]
    return LayerPlan(modules=modules, steps=tuple(fuse_modules(kept)))


def fuse_modules(kept: List[nn.Module]) -> List[Step]:
    """Checked leaf modules (Identity/dropout already dropped), in order -> steps:
    conv/linear + matching BN + ReLU fuse into one :class:`AffineStep`, a BN (+ ReLU) not after a
    conv/linear into a :class:`BatchNormStep`. Also used for the chains of traced models."""
    steps: List[Step] = []
    i = 0
    while i < len(kept):
        m = kept[i]
        if isinstance(m, Normalize):
            steps.append(NormalizeStep(m))
            i += 1
        elif _is(m, _AFFINE) or _is(m, _BATCH_NORM):
            group: List[nn.Module] = [m]
            j = i + 1
            bn = m if _is(m, _BATCH_NORM) else None
            if bn is None and j < len(kept) and _is(kept[j], _BATCH_NORM) and \
                    _bn_matches(m, kept[j]):
                bn = kept[j]
                group.append(bn)
                j += 1
            relu = j < len(kept) and isinstance(kept[j], nn.ReLU)
            if relu:
                group.append(kept[j])
                j += 1
            if _is(m, _AFFINE):
                steps.append(AffineStep(m, bn, relu, tuple(group)))  # type: ignore[arg-type]
            else:
                steps.append(BatchNormStep(m, relu, tuple(group)))  # type: ignore[arg-type]
            i = j
        elif isinstance(m, nn.ReLU):
            steps.append(ReluStep(m))
            i += 1
        elif isinstance(m, nn.Flatten):
            steps.append(FlattenStep(m))
            i += 1
        else:  # pragma: no cover - _check_module guards this
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
    """Whether ``model`` takes the Sequential fast path: a plain ``nn.Sequential`` (or a lone
    supported leaf) whose flattened modules are all supported leaf modules."""
    plain = isinstance(model, nn.Sequential) and type(model).forward is nn.Sequential.forward
    leaf = modules == (model,) and supported_class(model) is not None
    return (plain or leaf) and all(supported_class(m) is not None for m in modules)


def _check_hooks(modules) -> None:
    for i, m in enumerate(modules):  # hooks may have been added since the plan was built
        if m._forward_pre_hooks or m._forward_hooks:  # noqa: SLF001
            _check_module(m, i)


def get_plan(model: nn.Module) -> LayerPlan:
    """The cached :class:`LayerPlan` of ``model``, rebuilt if its module list changed.

    A plain ``nn.Sequential`` of supported modules (or a lone supported module) is compiled by
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
