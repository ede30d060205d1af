"""Any ``nn.Module`` -> a :class:`~adcert.bounds.plan.LayerPlan`, by ``torch.fx`` tracing.

The model is traced once (registered ``torch.nn`` layers and :class:`~adcert.models.Normalize` are
leaves; user modules are traced through). Every fx node is mapped to a plan step by the registry
(:mod:`adcert.bounds.registry`), except the few the tracer handles itself:

* arithmetic with constants -- ``+ - * /`` and ``neg`` where one operand is a number, a buffer or
  parameter, or anything computed from those alone (e.g. ``self.mean.view(1, 3, 1, 1)``) --
  becomes an :class:`~adcert.bounds.layers.arith.ArithStep`; constants are read from the model at
  every bound pass, so learnable scales train;
* joins: the graph must be series-parallel with one input and one output: every tensor used more
  than once (a *fork*, e.g. a ResNet block's input) must have its uses joined again, by a residual
  add (``a + b``, ``a - b``; a :class:`ResidualStep`, whose branches are the operands' step
  sequences, an operand that IS the fork giving the empty branch) or a ``torch.cat`` along a
  feature dimension (a :class:`CatStep`). A ReLU right after an add is fused into it. Joins nest.
* ``x.size(0)`` / ``x.shape[0]`` (the batch size, for ``view``) and ``.contiguous()``.

Chains of nodes are fused exactly like a Sequential model (conv/linear + BN + ReLU -> one
:class:`AffineStep`). Anything else raises ``NotImplementedError`` naming it and listing what is
supported.
"""
from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Dict, List, Tuple

import torch
import torch.fx as fx
from torch import nn

from adcert.bounds import plan as P
from adcert.bounds import registry
from adcert.bounds.layers.arith import ARITH_FUNCTIONS, ARITH_METHODS, ArithStep, Const
from adcert.bounds.layers.join import CatStep, ResidualStep
from adcert.bounds.registry import BATCH, supported_text, unsupported_call as _unsupported


class _Tracer(fx.Tracer):
    """Registered layers (and any other ``torch.nn`` layer, to be refused by name) are leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward:
            return False
        # a subclass of a registered layer is a leaf too, to be refused by name if it has its
        # own forward
        return isinstance(m, tuple(registry.MODULES)) or super().is_leaf_module(m, qualname)


def traced_key(model: nn.Module) -> Tuple[nn.Module, ...]:
    """The cache key of a traced plan: every submodule of ``model`` (not ``model`` itself, which
    keys the cache), in registration order."""
    return tuple(model.modules())[1:]


# ----------------------------------------------------------------------------- graph -> items


@dataclass
class _Shape:
    """The value of ``x.shape`` / ``x.size()``: only its batch entry may be read."""


@dataclass
class _Join:
    """A join of raw item lists (made a ResidualStep / CatStep at the end)."""
    branches: Tuple[List[Any], ...]
    cat_dim: Any = None  # None: a sum


@dataclass
class _Thread:
    """A tensor value: ``items`` applied to the value of the fork node ``origin``."""
    origin: fx.Node
    items: List[Any] = field(default_factory=list)


_ADDS = (operator.add, operator.iadd, torch.add)
_SUBS = (operator.sub, operator.isub, torch.sub)


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


def _read_attr(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class _Converter:
    """Walks the fx graph in order, keeping every tensor value as a :class:`_Thread`."""

    def __init__(self, gm: fx.GraphModule, model: nn.Module):
        self.gm = gm
        self.model = weakref.ref(model)
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

    def is_thread(self, arg) -> bool:
        return isinstance(arg, fx.Node) and isinstance(self.values.get(arg), _Thread)

    def value(self, arg):
        """A non-tensor argument: a python value, :data:`BATCH`, or a :class:`Const`."""
        if isinstance(arg, fx.Node):
            return self.values.get(arg, arg)
        if isinstance(arg, (tuple, list)):
            return type(arg)(self.value(a) for a in arg)
        return arg

    def set(self, node: fx.Node, t: _Thread) -> None:
        uses = _tensor_uses(node)
        if uses > 1:
            self.pending[node] = uses
            self.own[node] = t
        self.values[node] = t

    def join(self, threads: List[_Thread], where: str, cat_dim=None) -> _Thread:
        fork = threads[0].origin
        if any(t.origin is not fork for t in threads):
            raise _unsupported(where, "its operands do not start from the same tensor: the graph "
                                      "is not series-parallel (only residual blocks are)")
        t = _Thread(fork, [_Join(tuple(t.items for t in threads), cat_dim)])
        self.pending[fork] -= len(threads) - 1
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
                if any(isinstance(v, _Thread) for v in self.values.values()):
                    raise _unsupported(f"a second input {node.name!r}",
                                       "the model must take one tensor")
                self.values[node] = _Thread(node, [])
                self.pending[node] = max(_tensor_uses(node), 1)
            elif node.op == "get_attr":
                self.values[node] = self.attribute(node.target)
            elif node.op == "call_module":
                self.call_module(node)
            elif node.op in ("call_function", "call_method"):
                self.call(node)
            elif node.op == "output":
                out = node.args[0]
        result = self.thread(out, "the model's output") if self.is_thread(out) else None
        if result is None:
            raise _unsupported(f"an output of type {type(self.value(out)).__name__}",
                               "the model must return one tensor computed from its input")
        if not result.origin.op == "placeholder" or self.pending[result.origin] != 1 or \
                len(self.pending) != 1:
            raise _unsupported("the model's graph", "a tensor is used more than once without "
                                                    "being joined again by a residual add")
        return result.items

    def attribute(self, target: str) -> Const:
        """A parameter/buffer, read from the model at every pass (fx's own tensor constants,
        which the model does not hold, are captured)."""
        model = self.model()
        try:
            _read_attr(model, target)
        except AttributeError:
            value = _read_attr(self.gm, target)
            return Const(lambda: value, target)
        ref = self.model
        return Const(lambda: _read_attr(ref(), target), f"self.{target}")

    def call_module(self, node: fx.Node) -> None:
        module = self.gm.get_submodule(node.target)
        what = f"module {node.target!r} of type {type(module).__name__}"
        P.check_leaf(module, partial(_unsupported, what))
        if len(node.args) != 1 or node.kwargs:
            raise _unsupported(what, "called with more than one argument")
        t = self.thread(node.args[0], what)
        item = registry.module_builder(module)(module)
        if item is not None:
            t.items.append(item)
        self.set(node, t)

    def call(self, node: fx.Node) -> None:
        fn, args, kw = node.target, node.args, node.kwargs
        method = node.op == "call_method"
        name = fn if method else getattr(fn, "__name__", repr(fn))
        what = f"tensor method .{name}()" if method else f"function {name}"
        threads = [a for a in _flatten((args, kw)) if self.is_thread(a)]
        if not threads:  # computed from constants (or shape reads) alone
            self.constant(node, what)
            return
        if method and name == "size":
            dim = args[1] if len(args) > 1 else kw.get("dim")
            if dim is None:
                self.values[node] = _Shape()
            elif dim == 0:
                self.values[node] = BATCH
            else:
                raise _unsupported(f"x.size({dim!r})", "only the batch size x.size(0) may be read")
            return
        if not method and fn is getattr and len(args) == 2 and args[1] == "shape":
            self.values[node] = _Shape()
            return
        if (fn in _ADDS or fn in _SUBS or name in ("add", "sub")) and len(threads) == 2:
            self.set(node, self.residual(node, what))
        elif not method and fn is torch.cat:
            self.set(node, self.cat(node, what))
        elif (not method and fn in ARITH_FUNCTIONS) or (method and name in ARITH_METHODS):
            if len(threads) != 1:
                raise _unsupported(what, "a product or quotient of two traced tensors is not "
                                         "linear")
            t = self.thread(threads[0], what)
            op = ARITH_FUNCTIONS.get(fn) if not method else ARITH_METHODS[name]
            t.items.append(ArithStep.from_call(op, args, kw, threads[0], self.value, what))
            self.set(node, t)
        else:
            build = registry.METHODS.get(name) if method else registry.FUNCTIONS.get(fn)
            if build is None:
                raise _unsupported(what)
            if args[0] is not threads[0] or len(threads) != 1:
                raise _unsupported(what, "it must be applied to one traced tensor")
            t = self.thread(args[0], what)
            item = build(tuple(self.value(a) for a in args[1:]),
                         {k: self.value(v) for k, v in kw.items()}, what)
            if item is not None:
                t.items.append(item)
            self.set(node, t)

    def constant(self, node: fx.Node, what: str) -> None:
        """A node computed from constants alone (or reading ``x.shape[0]``)."""
        fn, args, kw = node.target, node.args, node.kwargs
        if node.op == "call_function" and fn is operator.getitem and \
                isinstance(self.values.get(args[0]), _Shape):
            if args[1] != 0:
                raise _unsupported(f"reading x.shape[{args[1]!r}]", "only the batch size "
                                                                   "x.shape[0] may be read")
            self.values[node] = BATCH
            return
        vals = (self.value(args), {k: self.value(v) for k, v in kw.items()})
        if any(v is BATCH or isinstance(v, _Shape) for v in _flatten(vals)):
            raise _unsupported(what, "arithmetic on the batch size")

        def resolve(v):
            if isinstance(v, Const):
                return v()
            if isinstance(v, (tuple, list)):
                return type(v)(resolve(a) for a in v)
            return v

        if node.op == "call_method":
            def compute():
                a = resolve(vals[0])
                return getattr(a[0], fn)(*a[1:], **resolve(vals[1]))
        else:
            def compute():
                return fn(*resolve(vals[0]), **resolve(vals[1]))
        self.values[node] = Const(compute, what)

    def residual(self, node: fx.Node, what: str) -> _Thread:
        args, kw = node.args, node.kwargs
        if len(args) != 2 or kw:
            raise _unsupported(what, "only the sum or difference of two tensors, no alpha/out")
        a, b = self.thread(args[0], what), self.thread(args[1], what)
        target = node.target
        if target in _SUBS or target == "sub":
            b.items.append(ArithStep("neg"))
        return self.join([a, b], what)

    def cat(self, node: fx.Node, what: str) -> _Thread:
        args, kw = node.args, dict(node.kwargs)
        seq = args[0] if args else kw.pop("tensors", None)
        dim = args[1] if len(args) > 1 else kw.pop("dim", 0)
        if kw or not isinstance(seq, (tuple, list)) or not all(self.is_thread(a) for a in seq):
            raise _unsupported(what, "only torch.cat([traced tensors...], dim) is supported")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim == 0:
            raise _unsupported(what, f"dim={dim!r}: concatenate along a feature dimension")
        if len(seq) == 1:
            return self.thread(seq[0], what)
        return self.join([self.thread(a, what) for a in seq], what, cat_dim=dim)


# ----------------------------------------------------------------------------- items -> steps


def fuse_items(items: List[Any]) -> Tuple[P.Step, ...]:
    """Raw items (leaf modules, ready steps, :class:`_Join`) -> fused plan steps. Module runs are
    fused exactly like a Sequential model (:func:`adcert.bounds.plan.fuse_modules`); a ReLU right
    after a residual add is fused into the :class:`ResidualStep`."""
    steps: List[P.Step] = []
    run: List[Any] = []

    def flush() -> None:
        if run:
            steps.extend(P.fuse_modules(run))
            run.clear()

    i = 0
    while i < len(items):
        it = items[i]
        if isinstance(it, _Join):
            flush()
            branches = tuple(fuse_items(b) for b in it.branches)
            if it.cat_dim is not None:
                steps.append(CatStep(branches, it.cat_dim))
                i += 1
                continue
            relu = i + 1 < len(items) and isinstance(items[i + 1], nn.ReLU)
            steps.append(ResidualStep(branches, relu, (items[i + 1],) if relu else ()))
            i += 1 + relu
            continue
        run.append(it)
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
    items = _Converter(gm, model).run()
    return P.LayerPlan(modules=traced_key(model), steps=fuse_items(items))
