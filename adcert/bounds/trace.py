"""Any ``nn.Module`` -> a :class:`~adcert.bounds.plan.LayerPlan`, by ``torch.fx`` tracing.

The model is traced once (supported ``torch.nn`` layers and :class:`~adcert.models.Normalize` are
leaves; user modules are traced through). The graph must be series-parallel with one input and
one output: every tensor used more than once (a *fork*, e.g. a ResNet block's input) must have its
uses joined again by residual adds. It is converted into the nested step structure of the plan:

* a chain of nodes becomes a step sequence, fused exactly like a Sequential model
  (conv/linear + BN + ReLU -> one :class:`AffineStep`);
* ``a + b`` where both operands descend from the same fork becomes a
  :class:`ResidualStep` whose branches are the two operands' step sequences (an operand that IS
  the fork gives the empty branch, the identity shortcut); a ReLU right after the add is fused
  into it (``relu=True``). Adds nest, so three or more uses of one fork also work.

Supported: modules ``Conv2d``, ``Linear``, ``BatchNorm1d/2d``, ``ReLU``, ``Flatten``,
``AvgPool2d``, ``AdaptiveAvgPool2d``, ``Normalize``, ``Identity``, dropout (the identity for
bounds); functions/methods ``F.relu``/``torch.relu``/``.relu()``, ``+``/``torch.add`` (residual
add of two tensors), ``torch.flatten``/``.flatten``/``.view``/``.reshape`` keeping the batch
dimension (``x.view(x.size(0), -1)``, ``x.view(-1, K)``), ``F.avg_pool2d``,
``F.adaptive_avg_pool2d``, ``.contiguous()``, ``x.size(0)``/``x.shape[0]``. Anything else raises
``NotImplementedError`` naming it and listing what is supported.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Dict, List, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from adcert.bounds import plan as P
from adcert.models.normalize import Normalize

_POOLS = (nn.AvgPool2d, nn.AdaptiveAvgPool2d)
_LEAVES = P.SUPPORTED_MODULES + _POOLS + P.SKIPPED_MODULES

SUPPORTED_FUNCTIONS = ("F.relu", "torch.relu", ".relu()", "+ / torch.add (residual add)",
                       "torch.flatten", ".flatten()", ".view()", ".reshape()", "F.avg_pool2d",
                       "F.adaptive_avg_pool2d", ".contiguous()", "x.size(0)", "x.shape[0]")


def supported_text() -> str:
    mods = ", ".join(c.__name__ for c in P.SUPPORTED_MODULES + _POOLS)
    return f"supported modules: {mods}; supported functions: {', '.join(SUPPORTED_FUNCTIONS)}"


def _unsupported(what: str, why: str = "") -> NotImplementedError:
    extra = f" ({why})" if why else ""
    return NotImplementedError(f"model: {what} is not supported by compute_bounds{extra}; "
                               f"{supported_text()}")


class _Tracer(fx.Tracer):
    """Supported layers (and any other ``torch.nn`` layer, to be refused by name) are leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward:
            return False
        return isinstance(m, _LEAVES) or super().is_leaf_module(m, qualname)


def traced_key(model: nn.Module) -> Tuple[nn.Module, ...]:
    """The cache key of a traced plan: every submodule of ``model`` (not ``model`` itself, which
    keys the cache), in registration order."""
    return tuple(model.modules())[1:]


# ----------------------------------------------------------------------------- graph -> items


_BATCH = object()  # the value of x.size(0) / x.shape[0]


@dataclass
class _Shape:
    """The value of ``x.shape`` / ``x.size()``: only its batch entry may be read."""


@dataclass
class _Add:
    """A residual join of raw item lists (fused into a ResidualStep at the end)."""
    branches: Tuple[List[Any], ...]


@dataclass
class _Thread:
    """A tensor value: ``items`` applied to the value of the fork node ``origin``."""
    origin: fx.Node
    items: List[Any] = field(default_factory=list)


def _is_add(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add)


def _tensor_uses(node: fx.Node) -> int:
    """How many times ``node`` is consumed as a tensor (``size``/``shape`` reads excluded)."""
    n = 0
    for user in node.users:
        if user.op == "call_method" and user.target == "size":
            continue
        if user.op == "call_function" and user.target is getattr:
            continue
        flat = fx.node.map_arg((user.args, user.kwargs), lambda a: a)
        n += sum(1 for a in _flatten(flat) if a is node)
    return n


def _flatten(obj):
    if isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _flatten(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _flatten(o)
    else:
        yield obj


class _Converter:
    """Walks the fx graph in order, keeping every tensor value as a :class:`_Thread`."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.values: Dict[fx.Node, Any] = {}
        self.pending: Dict[fx.Node, int] = {}  # open threads of each fork node
        self.own: Dict[fx.Node, _Thread] = {}  # a fork's own thread (relative to its origin)

    # -- values ---------------------------------------------------------------------------
    def thread(self, arg, where: str) -> _Thread:
        if not isinstance(arg, fx.Node) or not isinstance(self.values.get(arg), _Thread):
            raise _unsupported(where, f"its input {arg!r} is not the traced tensor")
        if arg in self.pending:  # a fork: each use starts a new thread from it
            return _Thread(arg, [])
        t = self.values[arg]
        return _Thread(t.origin, list(t.items))

    def set(self, node: fx.Node, t: _Thread) -> None:
        uses = _tensor_uses(node)
        if uses > 1:
            self.pending[node] = uses
            self.own[node] = t
        self.values[node] = t

    def join(self, a: _Thread, b: _Thread, where: str) -> _Thread:
        if a.origin is not b.origin:
            raise _unsupported(where, "its operands do not start from the same tensor: the graph "
                                      "is not series-parallel (only residual blocks are)")
        fork = a.origin
        t = _Thread(fork, [_Add((a.items, b.items))])
        self.pending[fork] -= 1
        if self.pending[fork] == 1 and fork in self.own:  # every use joined: collapse the fork
            del self.pending[fork]
            base = self.own[fork]
            t = _Thread(base.origin, base.items + t.items)
        return t

    # -- nodes ----------------------------------------------------------------------------
    def run(self) -> List[Any]:
        out = None
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                if self.values:
                    raise _unsupported(f"a second input {node.name!r}",
                                       "the model must take one tensor")
                self.values[node] = _Thread(node, [])
                self.pending[node] = max(_tensor_uses(node), 1)
            elif node.op == "get_attr":
                self.values[node] = node  # a parameter/buffer: refused where it is used
            elif node.op == "call_module":
                self.call_module(node)
            elif node.op == "call_function":
                self.call_function(node)
            elif node.op == "call_method":
                self.call_method(node)
            elif node.op == "output":
                out = node.args[0]
        result = self.thread(out, "the model's output") if isinstance(out, fx.Node) else None
        if result is None:
            raise _unsupported(f"an output of type {type(out).__name__}",
                               "the model must return one tensor")
        if not result.origin.op == "placeholder" or self.pending[result.origin] != 1 or \
                len(self.pending) != 1:
            raise _unsupported("the model's graph", "a tensor is used more than once without "
                                                    "being joined again by a residual add")
        return result.items

    def call_module(self, node: fx.Node) -> None:
        module = self.gm.get_submodule(node.target)
        what = f"module {node.target!r} of type {type(module).__name__}"
        P.check_leaf(module, partial(_unsupported, what), extra=_POOLS)
        if len(node.args) != 1 or node.kwargs:
            raise _unsupported(what, "called with more than one argument")
        t = self.thread(node.args[0], what)
        if not isinstance(module, P.SKIPPED_MODULES):
            t.items.append(P.AvgPoolStep(module) if isinstance(module, _POOLS) else module)
        self.set(node, t)

    def call_function(self, node: fx.Node) -> None:
        fn, args, kw = node.target, node.args, node.kwargs
        name = getattr(fn, "__name__", repr(fn))
        what = f"function {name}"
        if fn in (F.relu, torch.relu):
            t = self.thread(args[0], what)
            t.items.append(nn.ReLU())
        elif _is_add(node):
            if len(args) != 2 or kw:
                raise _unsupported(what, "only the sum of two tensors, no alpha/out")
            t = self.join(self.thread(args[0], what), self.thread(args[1], what), what)
        elif fn is torch.flatten:
            t = self.thread(args[0], what)
            t.items.append(self._flatten_step(args[1:], kw, what))
        elif fn in (F.avg_pool2d, F.adaptive_avg_pool2d):
            t = self.thread(args[0], what)
            t.items.append(P.AvgPoolStep(self._pool_module(fn, args[1:], kw)))
        elif fn is getattr and len(args) == 2 and args[1] == "shape":
            self.thread(args[0], what)
            self.values[node] = _Shape()
            return
        elif fn is operator.getitem and isinstance(self.values.get(args[0]), _Shape):
            if args[1] != 0:
                raise _unsupported(f"reading x.shape[{args[1]!r}]", "only the batch size "
                                                                      "x.shape[0] may be read")
            self.values[node] = _BATCH
            return
        else:
            raise _unsupported(what)
        self.set(node, t)

    def call_method(self, node: fx.Node) -> None:
        name, args, kw = node.target, node.args, node.kwargs
        what = f"tensor method .{name}()"
        if name == "size":
            self.thread(args[0], what)
            dim = args[1] if len(args) > 1 else kw.get("dim")
            if dim is None:
                self.values[node] = _Shape()
            elif dim == 0:
                self.values[node] = _BATCH
            else:
                raise _unsupported(f"x.size({dim!r})", "only the batch size x.size(0) may be read")
            return
        t = self.thread(args[0], what)
        if name in ("relu", "relu_"):
            t.items.append(nn.ReLU())
        elif name == "contiguous":
            pass
        elif name == "flatten":
            t.items.append(self._flatten_step(args[1:], kw, what))
        elif name in ("view", "reshape"):
            if kw:
                raise _unsupported(what, "keyword arguments")
            dims = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
            t.items.append(self._reshape_step([self.values.get(d, d) if isinstance(d, fx.Node)
                                               else d for d in dims], what))
        else:
            raise _unsupported(what)
        self.set(node, t)

    # -- helpers ----------------------------------------------------------------------------
    @staticmethod
    def _flatten_step(args, kw, what) -> P.ReshapeStep:
        start = args[0] if args else kw.get("start_dim", 0)
        end = args[1] if len(args) > 1 else kw.get("end_dim", -1)
        if not (isinstance(start, int) and isinstance(end, int)):
            raise _unsupported(what, "start_dim/end_dim must be constants")
        if start == 0:
            raise _unsupported(what, "start_dim=0 merges the batch dimension")
        return P.ReshapeStep(None, start, end)

    @staticmethod
    def _reshape_step(dims, what) -> P.ReshapeStep:
        if not dims:
            raise _unsupported(what, "no target shape")
        first, rest = dims[0], list(dims[1:])
        if not all(isinstance(d, int) and not isinstance(d, bool) for d in rest) or \
                not (first is _BATCH or first == -1):
            raise _unsupported(what, "the target shape must be (x.size(0), ints...) or "
                                     "(-1, ints...) so that the batch dimension is kept")
        if first == -1 and not rest:
            raise _unsupported(what, "view(-1) merges the batch dimension")
        if first == -1 and -1 in rest:
            raise _unsupported(what, "two inferred (-1) dimensions")
        return P.ReshapeStep(tuple(rest))

    @staticmethod
    def _pool_module(fn, args, kw) -> nn.Module:
        try:
            if fn is F.adaptive_avg_pool2d:
                return nn.AdaptiveAvgPool2d(*args, **kw)
            return nn.AvgPool2d(*args, **kw)
        except TypeError as exc:
            raise _unsupported(f"function {fn.__name__}", f"arguments: {exc}") from exc


# ----------------------------------------------------------------------------- items -> steps


def fuse_items(items: List[Any]) -> Tuple[P.Step, ...]:
    """Raw items (leaf modules, ready steps, :class:`_Add`) -> fused plan steps. Module runs are
    fused exactly like a Sequential model (:func:`adcert.bounds.plan.build_plan`); a ReLU right
    after a residual add is fused into the :class:`ResidualStep`."""
    steps: List[P.Step] = []
    run: List[nn.Module] = []

    def flush() -> None:
        if run:
            steps.extend(P.fuse_modules(run))
            run.clear()

    i = 0
    while i < len(items):
        it = items[i]
        if isinstance(it, nn.Module):
            run.append(it)
        elif isinstance(it, _Add):
            flush()
            relu = i + 1 < len(items) and isinstance(items[i + 1], nn.ReLU)
            branches = tuple(fuse_items(b) for b in it.branches)
            steps.append(P.ResidualStep(branches, relu, (items[i + 1],) if relu else ()))
            i += 1 + relu
            continue
        else:
            flush()
            steps.append(it)
        i += 1
    flush()
    return tuple(steps)


def trace_plan(model: nn.Module) -> P.LayerPlan:
    """Trace ``model`` with ``torch.fx`` and build its :class:`LayerPlan` (not cached; see
    :func:`adcert.bounds.plan.get_plan`). ``plan.modules`` is :func:`traced_key`.

    Raises ``NotImplementedError`` naming the first unsupported module/function (and listing the
    supported ones), or when the graph is not series-parallel."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    for name, m in model.named_modules():
        if m._forward_pre_hooks or m._forward_hooks:  # noqa: SLF001
            label = f"module {name!r}" if name else "the model"
            raise _unsupported(f"{label} of type {type(m).__name__}",
                               "it has forward hooks, which compute_bounds would ignore; remove "
                               "them")
    try:
        graph = _Tracer().trace(model)
    except NotImplementedError:
        raise
    except Exception as exc:  # fx cannot trace data-dependent control flow etc.
        raise NotImplementedError(
            f"model: {type(model).__name__} could not be traced by torch.fx ({type(exc).__name__}:"
            f" {exc}); compute_bounds needs a traceable model; {supported_text()}") from exc
    gm = fx.GraphModule(model, graph)
    gm.graph.eliminate_dead_code()
    items = _Converter(gm).run()
    return P.LayerPlan(modules=traced_key(model), steps=fuse_items(items))
