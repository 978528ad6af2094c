"""Planning: which style each module gets.

A plan is plain data: a dict from module-path patterns (``fnmatch`` syntax per dotted segment,
matched against ``named_modules()`` paths, ``""`` is the root) to :class:`~tensor_parallel.styles.Style`
objects. Modules no pattern matches are replicated. Patterns are applied in order, so a later
pattern overrides an earlier one for the modules both match.

:func:`plan_for` derives a default plan for a plain ``nn.Module``: every linear-like layer,
embedding and convolution is split; column -> row pairs are found by tracing the module with
``torch.fx`` and following its data flow through elementwise work; every split it cannot prove
safe to leave split is gathered right after the layer (always correct).
"""

from __future__ import annotations

import fnmatch
import logging
import operator
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import fx, nn

from .styles import (ColwiseParallel, EmbeddingParallel, RowwiseParallel, Style,
                     linear_kind, linear_view)

__all__ = ["Plan", "resolve_plan", "plan_for", "format_plan", "path_matches", "expected_collectives"]

logger = logging.getLogger(__name__)

Plan = dict[str, Style]


# --------------------------------------------------------------------------------------------
# Resolving a plan against a module
# --------------------------------------------------------------------------------------------


def resolve_plan(module: nn.Module, plan: Mapping[str, Style], world_size: int) -> dict[str, Style]:
    """Match ``plan``'s patterns to ``module``'s paths and check each style against its layer.

    Returns a dict from exact module path to style. Raises ``ValueError`` for a pattern that
    matches nothing, ``TypeError`` for a style that cannot split the layer it matched.

    Example::

        >>> import torch, tensor_parallel as tp
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        >>> resolve_plan(mlp, {"0": tp.ColwiseParallel(), "2": tp.RowwiseParallel()}, 2)
        {'0': ColwiseParallel(), '2': RowwiseParallel()}
    """
    if not isinstance(plan, Mapping):
        raise TypeError(f"plan must be a dict from module-path patterns to styles, got {type(plan).__name__}")
    paths = _paths_by_module(module)
    resolved: dict[str, Style] = {}
    for pattern, style in plan.items():
        if not isinstance(pattern, str) or not isinstance(style, Style):
            raise TypeError(f"plan entry {pattern!r}: {style!r} must map a str pattern to a Style "
                            f"such as ColwiseParallel(), RowwiseParallel() or Replicate()")
        matched = [first for first, aliases in paths.items()
                   if any(path_matches(path, pattern) for path in aliases)]
        if not matched:
            raise ValueError(f"plan pattern {pattern!r} matches no module of {type(module).__name__}; "
                             f"its module paths look like {_examples(paths)}")
        for path in matched:
            resolved[path] = style
    for path, style in resolved.items():
        style.check(module.get_submodule(path), path or "<root>", world_size)
    return resolved


def path_matches(path: str, pattern: str) -> bool:
    """``fnmatch`` per dotted segment: ``*`` never crosses a dot, so ``layers.*.mlp`` matches
    ``layers.0.mlp`` but not ``layers.0.block.mlp``.

    Example::

        >>> path_matches("layers.3.mlp.up", "layers.*.mlp.*"), path_matches("a.b.c", "a.*")
        (True, False)
    """
    parts, wanted = path.split("."), pattern.split(".")
    return len(parts) == len(wanted) and all(fnmatch.fnmatchcase(p, w) for p, w in zip(parts, wanted))


def _paths_by_module(module: nn.Module) -> dict[str, list[str]]:
    """First path of each distinct submodule -> every path it is reachable by."""
    first: dict[int, str] = {}
    aliases: dict[str, list[str]] = {}
    for path, sub in module.named_modules(remove_duplicate=False):
        key = first.setdefault(id(sub), path)
        aliases.setdefault(key, []).append(path)
    return aliases


def _examples(paths: Mapping[str, list[str]]) -> str:
    names = [p for p in paths if p][:6]
    return ", ".join(repr(n) for n in names) + (", ..." if len(paths) > 7 else "") or "'' (no submodules)"


def format_plan(plan: Mapping[str, Style]) -> str:
    """The plan as one line per entry, for printing.

    Example::

        >>> import tensor_parallel as tp
        >>> print(format_plan({"fc1": tp.ColwiseParallel(), "fc2": tp.RowwiseParallel()}))
        fc1  ColwiseParallel()
        fc2  RowwiseParallel()  -> all_reduce
    """
    width = max((len(p) for p in plan), default=0)
    lines = []
    for path, style in plan.items():
        comm = f"  -> {', '.join(style.collectives)}" if style.collectives else ""
        lines.append(f"{path or '<root>':<{width}}  {style!r}{comm}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The default plan for plain modules
# --------------------------------------------------------------------------------------------


def plan_for(module: nn.Module, world_size: int | None = None, *,
             example_inputs: Mapping[str, Any] | tuple | None = None, builtin: bool = True) -> Plan:
    """A plan that splits every linear-like layer and embedding of ``module``, always correctly.

    Embeddings are split when they have at least half the rows of the largest one: smaller
    tables (positions, token types) stay whole, which saves their collective.

    Column -> row pairs (one all-reduce per pair) are used where tracing proves that the split
    output reaches the next layer through elementwise work only; every other linear-like layer
    is split by output features and gathered right after. Layers that share a weight, or
    whose weights the forward reads directly, are replicated. With ``example_inputs``
    (positional tuple or keyword dict; meta tensors on a meta model) one traced forward also
    finds attention heads and pairs through reshapes and transposes, and every region it
    splits is checked against the unsplit module (:mod:`tensor_parallel.autoplan`); without
    them, ``torch.fx`` tracing finds the elementwise pairs.
    A transformers model gets its built-in or shipped plan unless ``builtin=False``.

    Example::

        >>> import torch, tensor_parallel as tp
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
        >>> tp.plan_for(mlp)
        {'0': ColwiseParallel(), '2': RowwiseParallel()}
    """
    if builtin and _is_transformers_model(module):
        from .hf.plans import plan_for_pretrained  # built-in, translated or generic

        return plan_for_pretrained(module, world_size or 2)
    candidates = {path: sub for path, sub in module.named_modules()
                  if _splittable(sub) and not _inside_builtin(module, path)}
    inside_adapters = [f"{path}." for path, sub in candidates.items() if linear_view(sub)[2] is not None]
    candidates = {path: sub for path, sub in candidates.items() if not path.startswith(tuple(inside_adapters))}
    flow = _trace_flow(module, example_inputs)
    graph = _trace(module) if flow is None else None
    direct = flow.read_directly(module) if flow is not None else _read_directly(graph)
    for path in _tied_modules(module) | direct:
        candidates.pop(path, None)
    if graph is not None:  # a layer the traced forward never calls is used some other way
        called = {node.target for node in graph.nodes if node.op == "call_module"}
        candidates = {path: sub for path, sub in candidates.items() if path in called}
    plan: Plan = {}
    if flow is not None:
        from .autoplan import flow_plan

        plan = flow_plan(module, candidates, flow, world_size or 2)
    roles = _pair(graph, candidates, dict(module.named_modules())) if graph is not None else {}
    rows = {path: sub.num_embeddings for path, sub in candidates.items()
            if isinstance(sub, (nn.Embedding, nn.EmbeddingBag))}
    for path, sub in candidates.items():
        if any(path == done or path.startswith(done + ".") or not done for done in plan):
            continue
        if path in rows:
            if 2 * rows[path] >= max(rows.values()):  # small tables (positions, token types) stay whole
                plan[path] = EmbeddingParallel(dim=1)
        elif roles.get(path) == "col":
            plan[path] = ColwiseParallel()
        elif roles.get(path) == "row":
            plan[path] = RowwiseParallel()
        else:
            plan[path] = ColwiseParallel(gather_output=True)
    return plan


def _trace_flow(module: nn.Module, example_inputs):
    """One recorded forward on ``example_inputs``, or on a guessed input when there are none;
    None when there is nothing to run or the forward fails."""
    inputs = _guess_inputs(module) if example_inputs is None else example_inputs
    if inputs is None:
        return None
    from .autoplan import trace_flow

    try:
        return trace_flow(module, inputs, _splittable)
    except Exception as error:  # planning is best effort: the always-correct plan remains
        if example_inputs is not None:
            logger.info("running %s on its example inputs failed (%s: %s); layers are paired by fx "
                        "tracing only", type(module).__name__, type(error).__name__, error)
        return None


def _guess_inputs(module: nn.Module) -> tuple | None:
    """A small input for a forward with one required argument, from the first layer that has
    a weight: token ids for an embedding, (2, 3, features) for a linear layer, a 16 x 16 image
    for a convolution; None for other forwards."""
    import inspect

    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    required = [p for p in parameters if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    first = next((sub for sub in module.modules() if isinstance(sub._parameters.get("weight"), torch.Tensor)), None)
    if len(required) != 1 or first is None:
        return None
    device = first.weight.device
    dtype = first.weight.dtype if first.weight.is_floating_point() else torch.float32
    with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
        torch.manual_seed(0)
        guess = _guess(first, device, dtype)
    return None if guess is None else (guess,)


def _guess(first: nn.Module, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    if isinstance(first, nn.Embedding):
        return torch.randint(0, min(first.num_embeddings, 8), (1, 4), device=device)
    if isinstance(first, nn.Linear):
        return torch.randn(2, 3, first.in_features, device=device, dtype=dtype)
    if isinstance(first, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        size = (first.in_channels,) + (16,) * (first.weight.dim() - 2)
        return torch.randn(1, *size, device=device, dtype=dtype)
    return None


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _inside_builtin(root: nn.Module, path: str) -> bool:
    """A layer inside one of torch's own composite modules (MultiheadAttention reads its
    out_proj's weight directly; TransformerEncoderLayer has a fused fast path)."""
    if not path:
        return False
    parts = path.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        parent = root.get_submodule(".".join(parts[:depth]))
        if type(parent).__module__.startswith("torch.nn") and not isinstance(parent, _CONTAINERS):
            return True
    return False


def _is_transformers_model(module: nn.Module) -> bool:
    return any(cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers")
               for cls in type(module).__mro__)


def expected_collectives(module: nn.Module, plan: Mapping[str, Style], world_size: int) -> dict[str, int]:
    """Collectives one forward of ``module`` split by ``plan`` makes, by kind, counting each
    split module once (a module called twice per forward costs twice that).

    Example::

        >>> import torch, tensor_parallel as tp
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        >>> expected_collectives(mlp, tp.plan_for(mlp), 2)
        {'all_reduce': 1}
    """
    counts: dict[str, int] = {}
    for style in resolve_plan(module, plan, world_size).values():
        for kind in style.collectives:
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def _splittable(module: nn.Module) -> bool:
    base, kind, adapter = linear_view(module)
    if adapter is not None:  # an adapter layer (LoRA) splits as its base layer does, adapters alike
        return kind is not None and _splittable(base)
    weight = module._parameters.get("weight")  # not getattr: fx's tracer records those reads
    if not isinstance(weight, torch.Tensor) or not (weight.dtype.is_floating_point or weight.dtype.is_complex):
        return False  # integer (quantized) weights: partial sums across ranks are not defined
    if linear_kind(module) is not None:
        return True
    plain_embedding = type(module).forward in (nn.Embedding.forward, nn.EmbeddingBag.forward)
    return plain_embedding and getattr(module, "max_norm", 1.0) is None


def _tied_modules(module: nn.Module) -> set[str]:
    """Paths of modules that own a tensor some other module also owns."""
    owners: dict[int, list[str]] = {}
    for path, sub in module.named_modules():
        for tensor in list(sub._parameters.values()) + list(sub._buffers.values()):
            if tensor is not None:
                owners.setdefault(id(tensor), []).append(path)
    return {path for paths in owners.values() if len(paths) > 1 for path in paths}


class _LeafTracer(fx.Tracer):
    """Keeps every linear-like layer and embedding a leaf, even user subclasses."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _splittable(m) or super().is_leaf_module(m, qualname)


_UNARY_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU,
                  nn.SELU, nn.CELU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
                  nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Identity, nn.Dropout)
_UNARY_FUNCTIONS = {F.relu, F.relu6, F.gelu, F.silu, F.mish, F.elu, F.selu, F.celu, F.leaky_relu,
                    F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus, F.softsign, F.dropout,
                    torch.relu, torch.tanh, torch.sigmoid, torch.exp, torch.neg, torch.abs,
                    operator.neg, F.tanh, F.sigmoid}
_UNARY_METHODS = {"relu", "tanh", "sigmoid", "exp", "neg", "abs", "contiguous", "clone"}
_BINARY_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv,
                     torch.add, torch.sub, torch.mul, torch.div}
_BINARY_METHODS = {"add", "sub", "mul", "div"}


def _is_elementwise(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _UNARY_MODULES)
    if node.op == "call_function":
        return node.target in _UNARY_FUNCTIONS or node.target in _BINARY_FUNCTIONS
    if node.op == "call_method":
        return node.target in _UNARY_METHODS or node.target in _BINARY_METHODS
    return False


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in list(node.args) + list(node.kwargs.values()) if isinstance(a, fx.Node)]


def _trace(module: nn.Module) -> fx.Graph | None:
    try:
        return _LeafTracer().trace(module)
    except Exception as error:  # fx cannot trace data-dependent control flow and the like
        logger.info("tracing %s failed (%s: %s); every split is gathered right after its layer",
                    type(module).__name__, type(error).__name__, error)
        return None


def _read_directly(graph: fx.Graph | None) -> set[str]:
    """Paths of modules whose tensors the traced forward reads itself (``self.emb.weight``)."""
    if graph is None:
        return set()
    return {node.target.rpartition(".")[0] for node in graph.nodes if node.op == "get_attr" and node.users}


def _pair(graph: fx.Graph, candidates: Mapping[str, nn.Module],
          modules: Mapping[str, nn.Module]) -> dict[str, str]:
    """Module path -> "col" or "row" for the pairs the traced data flow proves safe."""
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    usable = {p: m for p, m in candidates.items() if calls.get(p) == 1 and linear_view(m)[1] is not None}
    roles: dict[str, str] = {}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in usable and node.target not in roles:
            region = _Region(node, usable, roles, modules).grow()
            if region is not None:
                roles.update({s.target: "col" for s in region[0]})
                roles.update({s.target: "row" for s in region[1]})
    return roles


class _Region:
    """Column layers (sources) whose split outputs reach only row layers (sinks) through
    elementwise work, all with the same feature dimension and size."""

    def __init__(self, start: fx.Node, usable, roles, modules) -> None:
        self.usable, self.roles, self.modules = usable, roles, modules
        kind = linear_view(usable[start.target])[1]
        self.feature_dim = kind.feature_dim
        self.size = self._weight(start).shape[kind.out_dim]
        self.sources, self.sinks, self.inner = {start}, set(), set()
        self.forward_queue: list[fx.Node] = [start]
        self.backward_queue: list[fx.Node] = []

    def grow(self):
        while self.forward_queue or self.backward_queue:
            ok = self._follow_users(self.forward_queue.pop()) if self.forward_queue \
                else self._claim_producer(self.backward_queue.pop())
            if not ok:
                return None
        return (self.sources, self.sinks) if self.sinks else None

    def _layer(self, node: fx.Node):
        if node.op != "call_module" or node.target not in self.usable or node.target in self.roles:
            return None
        kind = linear_view(self.usable[node.target])[1]
        return kind if kind.feature_dim == self.feature_dim else None

    def _weight(self, node: fx.Node) -> torch.Tensor:
        """The weight of the layer ``node`` calls (of its base layer, for an adapter layer)."""
        return linear_view(self.usable[node.target])[0].weight

    def _follow_users(self, node: fx.Node) -> bool:
        for user in node.users:
            if user in self.inner or user in self.sinks:
                continue
            kind = self._layer(user)
            if kind is not None and _tensor_args(user) == [node] and user not in self.sources \
                    and self._weight(user).shape[kind.in_dim] == self.size:
                self.sinks.add(user)
            elif _is_elementwise(user, self.modules):
                self.inner.add(user)
                self.forward_queue.append(user)
                self.backward_queue.extend(a for a in _tensor_args(user) if a is not node)
            else:
                return False
        return True

    def _claim_producer(self, node: fx.Node) -> bool:
        if node in self.sources or node in self.inner:
            return True
        kind = self._layer(node)
        if kind is not None and node not in self.sinks \
                and self._weight(node).shape[kind.out_dim] == self.size:
            self.sources.add(node)
            self.forward_queue.append(node)
            return True
        if _is_elementwise(node, self.modules):
            self.inner.add(node)
            self.forward_queue.append(node)
            self.backward_queue.extend(_tensor_args(node))
            return True
        return False
