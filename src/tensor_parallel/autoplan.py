"""Automatic Megatron plans from one traced forward, checked layer by layer.

:func:`flow_plan` runs the module once on a small probe input while a ``TorchFunctionMode``
records every torch operation and which tensors it reads and writes (linear-like layers and
embeddings are recorded whole, as one step). It then asks, for each layer whose input is
replicated, "if this layer's output were split by features, would every operation downstream
keep working on its own slice, until a layer that can take a split input?" The answer follows
the split through elementwise work, reshapes (a reshape that cuts the features into heads makes
an attention region), transposes, matmuls and attention over heads. Regions that close on row
layers become column -> row pairs (one all-reduce); an attention region becomes one
:class:`~tensor_parallel.styles.AttentionParallel` (whole heads, GQA-aware, its head-count
attributes set per shard). Anything else stays split-and-gathered, which is always correct.

Every region is then checked: the smallest module that holds it is copied (random weights
when the model is on the meta device), split by the region's entries and run on the inputs it
saw during the trace. A region whose split copy differs from the unsplit one falls back to
split-and-gather, with a log line naming it. Modules of one class with the same entries and
input shapes are checked once.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
from fractions import Fraction
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .styles import AttentionParallel, ColwiseParallel, RowwiseParallel, Style, linear_view

__all__ = ["flow_plan", "trace_flow"]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Recording one forward
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Step:
    """One recorded operation: ``name`` is the torch function's name, or ``module:PATH`` for a
    layer recorded whole. ``inputs``/``outputs`` are tensor ids; ``shapes`` maps each id to
    its shape; ``args`` keeps the call's non-tensor arguments (tensors replaced by ids)."""

    name: str
    inputs: list[int]
    outputs: list[int]
    args: tuple
    kwargs: dict
    path: str | None = None


@dataclasses.dataclass
class Flow:
    """What one traced forward did: its steps in order, the shapes of every tensor, the ids
    of the root's outputs, and the first inputs each module was called with."""

    steps: list[Step]
    shapes: dict[int, tuple[int, ...]]
    outputs: set[int]
    calls: dict[str, int]
    inputs: dict[str, tuple[tuple, dict]]
    returned: dict[str, list[int | None]]
    parameters_read: set[int]

    def read_directly(self, module: nn.Module) -> set[str]:
        """Layers recorded whole whose parameters some other operation also read."""
        return {path for path, sub in module.named_modules()
                if any(id(p) in self.parameters_read for p in sub.parameters(recurse=False))}


class _Ref(int):
    """A recorded tensor, as it appears among a step's arguments."""


class _Recorder(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.ids: dict[int, int] = {}
        self.keep: list[torch.Tensor] = []  # ids of live tensors are never reused
        self.steps: list[Step] = []
        self.shapes: dict[int, tuple[int, ...]] = {}
        self.inside = 0  # > 0 while a layer recorded whole runs
        self.parameters_read: set[int] = set()

    def ref(self, tensor: torch.Tensor, new: bool = False) -> int:
        key = id(tensor)
        if new or key not in self.ids:
            self.ids[key] = len(self.shapes)
            self.keep.append(tensor)
        self.shapes[self.ids[key]] = tuple(tensor.shape)
        return self.ids[key]

    def record(self, name: str, args: tuple, kwargs: dict, out: Any, path: str | None = None) -> None:
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if path is None:
            self.parameters_read.update(id(t) for t in tensors if isinstance(t, nn.Parameter))
        inputs = [self.ref(t) for t in tensors]
        outputs = [self.ref(t, new=True) for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        args, kwargs = pytree.tree_map(lambda v: _Ref(self.ids[id(v)]) if isinstance(v, torch.Tensor) else v,
                                       (args, kwargs))
        self.steps.append(Step(name, inputs, outputs, args, kwargs, path))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _reads_meta_values(func, args):
            return _stand_in(func, args[0])
        out = func(*args, **kwargs)
        if not self.inside and _produces_tensors(out):
            self.record(_name(func), args, kwargs, out)
        elif not self.inside and _mutates(func) and args and isinstance(args[0], torch.Tensor):
            self.record(_name(func), args, kwargs, args[0])
        return out


_VALUE_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__"}


def _reads_meta_values(func: Callable, args: tuple) -> bool:
    """Values of meta tensors do not exist; code that asks for one (mask checks) gets a stand-in."""
    return getattr(func, "__name__", "") in _VALUE_READS and bool(args) and \
        isinstance(args[0], torch.Tensor) and args[0].device.type == "meta"


def _stand_in(func: Callable, tensor: torch.Tensor) -> Any:
    value: Any = True if tensor.dtype == torch.bool else 0.0 if tensor.is_floating_point() else 0
    if func.__name__ == "tolist":
        return torch.zeros(tensor.shape, dtype=tensor.dtype).tolist()
    return {"__int__": int, "__float__": float, "__index__": int, "__bool__": bool}.get(func.__name__, lambda v: v)(value)


def _name(func: Callable) -> str:
    return getattr(func, "__name__", str(func)).lstrip("_").rstrip("_") or str(func)


def _produces_tensors(out: Any) -> bool:
    return any(isinstance(t, torch.Tensor) for t in pytree.tree_leaves(out))


def _mutates(func: Callable) -> bool:
    name = getattr(func, "__name__", "")
    return name == "__setitem__" or (name.endswith("_") and not name.startswith("_"))


def trace_flow(module: nn.Module, example_inputs: Mapping[str, Any] | tuple,
               leaves: Callable[[nn.Module], bool]) -> Flow:
    """Run ``module`` once on ``example_inputs`` and record its data flow, ``leaves`` deciding
    which modules are recorded whole.

    Example::

        >>> import torch
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        >>> flow = trace_flow(mlp, (torch.randn(2, 4),), lambda m: isinstance(m, torch.nn.Linear))
        >>> [step.name for step in flow.steps]
        ['module:0', 'relu', 'module:2']
    """
    recorder = _Recorder()
    names = {id(sub): path for path, sub in module.named_modules()}
    calls: dict[str, int] = {}
    inputs: dict[str, tuple[tuple, dict]] = {}
    returned: dict[str, list[int | None]] = {}
    handles = []

    def before(sub, args, kwargs):
        path = names[id(sub)]
        calls[path] = calls.get(path, 0) + 1
        inputs.setdefault(path, (args, kwargs))
        if leaves(sub) and not recorder.inside:
            for t in pytree.tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor):
                    recorder.ref(t)
            recorder.inside += 1
        elif leaves(sub):
            recorder.inside += 1

    def after(sub, args, kwargs, out):
        returned.setdefault(names[id(sub)], [recorder.ids.get(id(t)) if isinstance(t, torch.Tensor) else None
                                             for t in pytree.tree_leaves(_plain(out))])
        if leaves(sub):
            recorder.inside -= 1
            if not recorder.inside:
                recorder.record(f"module:{names[id(sub)]}", args, kwargs, out, names[id(sub)])

    for sub in module.modules():
        handles.append(sub.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(sub.register_forward_hook(after, with_kwargs=True))
    args, kwargs = (example_inputs, {}) if isinstance(example_inputs, tuple) else ((), dict(example_inputs))
    try:
        with torch.no_grad(), preserved_buffers(module), torch.random.fork_rng(devices=[]), recorder:
            out = module(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    outputs = {recorder.ids[id(t)] for t in pytree.tree_leaves(_plain(out))
               if isinstance(t, torch.Tensor) and id(t) in recorder.ids}
    return Flow(recorder.steps, recorder.shapes, outputs, calls, inputs, returned, recorder.parameters_read)


@contextlib.contextmanager
def preserved_buffers(module: nn.Module) -> Iterator[None]:
    """Buffers a probe forward updates (BatchNorm's running statistics) are put back after it."""
    saved = [(b, b.detach().clone()) for b in module.buffers() if b.device.type != "meta"]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def _plain(out: Any) -> Any:
    """Model outputs (dataclass-like ``ModelOutput`` included) as a pytree."""
    if hasattr(out, "to_tuple"):
        return out.to_tuple()
    return out


# --------------------------------------------------------------------------------------------
# Following a split through the recorded steps
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Cut:
    """A tensor split by features: along ``axis``, each index holds ``per_index`` of the
    source layer's features; ``region`` says which sources it comes from."""

    region: int
    axis: int
    per_index: Fraction


class _Failure(Exception):
    pass


_UNARY = {"relu", "gelu", "silu", "tanh", "sigmoid", "exp", "neg", "abs", "sqrt", "rsqrt", "square",
          "mish", "softplus", "dropout", "contiguous", "clone", "float", "half", "bfloat16", "double",
          "to", "type", "type_as", "erf", "log", "sin", "cos", "clamp", "clip", "detach", "relu6",
          "leaky_relu", "elu", "selu", "celu", "hardswish", "hardsigmoid", "hardtanh", "gelu_tanh",
          "nan_to_num", "reciprocal", "log1p", "expm1", "sign", "softsign", "logsigmoid", "pow",
          "tanhshrink", "fill", "zero", "requires_grad", "sinh", "cosh", "atan", "floor",
          "ceil", "round", "trunc", "frac"}
_BINARY = {"add", "sub", "mul", "div", "true_divide", "radd", "rsub", "rmul", "rtruediv", "truediv",
           "where", "maximum", "minimum", "masked_fill", "addcmul", "addcdiv", "lerp", "iadd",
           "imul", "isub", "itruediv", "pow", "rpow", "fmod", "remainder", "eq", "ne", "lt", "gt",
           "le", "ge", "logical_and", "logical_or", "and", "or", "copy"}
_ALIGNED = {"transpose", "permute", "swapaxes", "swapdims", "t", "movedim", "unsqueeze", "squeeze",
            "expand", "expand_as", "repeat", "view", "reshape", "view_as", "reshape_as", "flatten",
            "unflatten", "getitem", "contiguous"}
_REDUCE = {"softmax", "log_softmax", "mean", "sum", "amax", "amin", "max", "min", "var", "std", "norm",
           "layer_norm", "rms_norm", "cumsum", "logsumexp", "prod", "argmax", "all", "any"}
_SPLITS = {"split", "chunk", "tensor_split", "unbind", "split_with_sizes"}
_TEMPLATED = {"view_as", "reshape_as", "expand_as", "type_as"}
_ATTENTION = {"scaled_dot_product_attention"}
_MATMUL = {"matmul", "bmm", "rmatmul", "baddbmm"}


def _axis_after(in_shape: tuple, out_shape: tuple, axis: int, per_index: Fraction) -> tuple[int, Fraction]:
    """Where a reshape moves a split axis (the split must stay the major part of its group)."""
    before = math.prod(in_shape[:axis])
    size = in_shape[axis]
    for k, width in enumerate(out_shape):
        if math.prod(out_shape[:k]) == before and width > 1:
            if width == size:
                return k, per_index
            if size % width == 0 and width < size:
                return k, per_index * (size // width)
            if width % size == 0 and math.prod(in_shape[axis + 1:]) % (width // size) == 0:
                return k, per_index / (width // size)
            break
        if math.prod(out_shape[:k]) > before:
            break
    raise _Failure(f"reshape {in_shape} -> {out_shape} mixes the split axis {axis} with others")


class _Propagation:
    """One pass over the steps with a given set of layers forced to gather."""

    def __init__(self, flow: Flow, usable: Mapping[str, nn.Module], gathered: set[str]) -> None:
        self.flow, self.usable, self.gathered = flow, usable, gathered
        self.cuts: dict[int, _Cut] = {}
        self.parent: dict[int, int] = {}
        self.sources: dict[int, list[str]] = {}
        self.sinks: dict[int, list[str]] = {}
        self.failed: dict[int, str] = {}
        self.heads: dict[int, int] = {}  # region -> head size (source features per head)
        self.fused: dict[int, list[int]] = {}  # region -> sizes of a fused projection's parts

    def find(self, region: int) -> int:
        while self.parent.get(region, region) != region:
            region = self.parent[region]
        return region

    def union(self, regions: list[int]) -> int:
        roots = sorted({self.find(r) for r in regions})
        for other in roots[1:]:
            self.parent[other] = roots[0]
        return roots[0]

    def fail(self, regions, reason: str) -> None:
        for region in regions:
            self.failed.setdefault(self.find(region), reason)

    def run(self) -> "_Propagation":
        for step in self.flow.steps:
            cut_inputs = [i for i in dict.fromkeys(step.inputs) if i in self.cuts]
            try:
                if step.path is not None:
                    self._layer(step, cut_inputs)
                elif cut_inputs:
                    self._op(step, cut_inputs)
            except _Failure as failure:
                self.fail([self.cuts[i].region for i in cut_inputs], f"{step.name}: {failure}")
        for out in self.flow.outputs:
            if out in self.cuts:
                self.fail([self.cuts[out].region], "a split tensor is an output of the model")
        return self

    # layers ----------------------------------------------------------------------------------

    def _layer(self, step: Step, cut_inputs: list[int]) -> None:
        module = self.usable.get(step.path)
        if module is None:
            if cut_inputs:
                raise _Failure(f"{step.path} cannot take a split input")
            return
        kind = linear_view(module)[1]  # an adapter layer (LoRA) as the layer it wraps
        if cut_inputs:
            self._sink(step, cut_inputs, module, kind)
        elif step.path not in self.gathered and kind is not None and len(step.outputs) == 1:
            region = max(list(self.sources) + list(self.parent) + [0]) + 1
            self.parent[region] = region
            self.sources[region] = [step.path]
            out = step.outputs[0]
            axis = len(self.flow.shapes[out]) + kind.feature_dim if kind.feature_dim < 0 else kind.feature_dim
            self.cuts[out] = _Cut(region, axis, Fraction(1))

    def _sink(self, step: Step, cut_inputs: list[int], module: nn.Module, kind) -> None:
        if kind is None or len(cut_inputs) != 1 or len(step.inputs) != 1:
            raise _Failure(f"{step.path} is not a linear layer with one input")
        cut = self.cuts[cut_inputs[0]]
        shape = self.flow.shapes[cut_inputs[0]]
        feature_axis = len(shape) + kind.feature_dim if kind.feature_dim < 0 else kind.feature_dim
        by_heads = self.find(cut.region) in {self.find(r) for r in self.heads}  # AttentionParallel aligns them
        if cut.axis != feature_axis or (cut.per_index != 1 and not by_heads) or \
                shape[cut.axis] != linear_view(module)[0].weight.shape[kind.in_dim]:
            raise _Failure(f"{step.path} gets its input split along axis {cut.axis}, not by features")
        self.sinks.setdefault(self.find(cut.region), []).append(step.path)

    # operations ------------------------------------------------------------------------------

    def _op(self, step: Step, cut_inputs: list[int]) -> None:
        name = step.name
        shapes = self.flow.shapes
        if name in _TEMPLATED and step.inputs[0] in self.cuts:  # the other tensor gives only a shape
            cut_inputs = [step.inputs[0]]
        elif name in ("min", "max") and len(step.inputs) == 2:  # the elementwise form
            name = "maximum"
        cuts = [self.cuts[i] for i in cut_inputs]
        region = self.union([c.region for c in cuts])
        if name in _SPLITS:
            return self._split(step, cuts[0], region)
        if len(step.outputs) != 1:
            raise _Failure("several outputs")
        out = step.outputs[0]
        out_shape = shapes[out]
        if name in _ATTENTION or name in _MATMUL:
            self.cuts[out] = _Cut(region, self._matmul_axis(step, cut_inputs), cuts[0].per_index)
        elif name in _ALIGNED and len(cut_inputs) == 1 and step.inputs[0] == cut_inputs[0]:
            self.cuts[out] = self._aligned(step, cuts[0], region)
        elif (name in _UNARY or name in _BINARY) and name not in ("reshape", "view"):
            self.cuts[out] = self._elementwise(step, cut_inputs, region, out_shape)
        elif name in _REDUCE:
            self.cuts[out] = self._reduce(step, cuts[0], region, out_shape)
        elif name == "cat" or name == "stack" or name == "concat":
            self.cuts[out] = self._cat(step, cut_inputs, region, out_shape)
        else:
            raise _Failure("an operation not known to act per feature")

    def _elementwise(self, step: Step, cut_inputs: list[int], region: int, out_shape: tuple) -> _Cut:
        shapes = self.flow.shapes
        axis_from_end = {len(shapes[i]) - self.cuts[i].axis for i in cut_inputs}
        if len(axis_from_end) != 1:
            raise _Failure("split inputs along different axes")
        back = axis_from_end.pop()
        for other in step.inputs:
            if other in self.cuts or step.name in _TEMPLATED:
                continue
            shape = shapes[other]
            if len(shape) >= back and shape[len(shape) - back] != 1:
                raise _Failure(f"a whole tensor of shape {shape} meets the split axis")
        if len(out_shape) < back or out_shape[len(out_shape) - back] != shapes[cut_inputs[0]][-back]:
            raise _Failure("the output does not keep the split axis")
        return _Cut(region, len(out_shape) - back, self.cuts[cut_inputs[0]].per_index)

    def _reduce(self, step: Step, cut: _Cut, region: int, out_shape: tuple) -> _Cut:
        in_shape = self.flow.shapes[step.inputs[0]]
        if step.name in ("layer_norm", "rms_norm"):
            normalized = step.args[1] if len(step.args) > 1 else step.kwargs.get("normalized_shape")
            dims = range(len(in_shape) - len(tuple(normalized)), len(in_shape))
            if any(i in self.cuts for i in step.inputs[1:]):
                raise _Failure("a split norm weight")
            if cut.axis in dims:
                raise _Failure("normalises over the split axis")
            return _Cut(region, cut.axis, cut.per_index)
        dim = step.args[1] if len(step.args) > 1 else step.kwargs.get("dim")
        if dim is None or isinstance(dim, _Ref):
            raise _Failure("reduces over every axis")
        dims = [d % len(in_shape) for d in (dim if isinstance(dim, (tuple, list)) else (dim,))]
        if cut.axis in dims:
            raise _Failure("reduces over the split axis")
        if len(out_shape) == len(in_shape):
            return _Cut(region, cut.axis, cut.per_index)
        return _Cut(region, cut.axis - sum(d < cut.axis for d in dims), cut.per_index)

    def _aligned(self, step: Step, cut: _Cut, region: int) -> _Cut:
        in_shape, out_shape = self.flow.shapes[step.inputs[0]], self.flow.shapes[step.outputs[0]]
        name = step.name
        if name in ("transpose", "swapaxes", "swapdims", "t", "movedim", "permute"):
            return _Cut(region, _moved_axis(name, step.args, cut.axis, len(in_shape)), cut.per_index)
        if name in ("expand", "expand_as", "repeat"):
            if name == "repeat" and math.prod(out_shape) != math.prod(in_shape) and \
                    out_shape[len(out_shape) - len(in_shape) + cut.axis] != in_shape[cut.axis]:
                raise _Failure("repeats the split axis")
            return _Cut(region, cut.axis + len(out_shape) - len(in_shape), cut.per_index)
        if name == "getitem":
            return _Cut(region, _indexed_axis(step.args[1], cut.axis, in_shape), cut.per_index)
        if name == "contiguous":
            return cut
        axis, per_index = _axis_after(in_shape, out_shape, cut.axis, cut.per_index)
        if per_index != cut.per_index and per_index > 1:
            self.heads.setdefault(region, int(per_index))
        return _Cut(region, axis, per_index)

    def _matmul_axis(self, step: Step, cut_inputs: list[int]) -> int:
        shapes = self.flow.shapes
        tensors = [i for i in step.inputs]
        out_len = len(shapes[step.outputs[0]])
        if step.name in _ATTENTION:
            q, k, v = tensors[:3]
            if not all(t in self.cuts for t in (q, k, v)):
                raise _Failure("attention over split and whole heads")
            axes = {len(shapes[t]) - self.cuts[t].axis for t in (q, k, v)}
            for mask in tensors[3:]:
                if mask not in self.cuts and len(shapes[mask]) >= min(axes) and \
                        shapes[mask][len(shapes[mask]) - min(axes)] != 1:
                    raise _Failure("an attention mask with one row per head")
            if len(axes) != 1 or min(axes) <= 2:
                raise _Failure("attention split along other than heads")
            return out_len - axes.pop()
        a, b = tensors[0], tensors[-1] if step.name != "baddbmm" else tensors[2]
        if step.name == "baddbmm":
            a, b = tensors[1], tensors[2]
        found = set()
        for t, contracted in ((a, 1), (b, 2)):
            if t not in self.cuts:
                continue
            back = len(shapes[t]) - self.cuts[t].axis
            if back == contracted:
                raise _Failure("a matmul contracts the split axis")
            found.add(back if back > 2 else (2 if t == a else 1))
        if a in self.cuts and b in self.cuts and len(found) != 1:
            raise _Failure("matmul of tensors split along different axes")
        back = found.pop()
        for t in (a, b):
            if t not in self.cuts and back > 2 and len(shapes[t]) >= back and shapes[t][-back] != 1:
                raise _Failure("a split tensor meets a whole one in a batched matmul")
        if back <= 2 and a in self.cuts and b in self.cuts:
            raise _Failure("both matmul operands split")
        return out_len - back

    def _split(self, step: Step, cut: _Cut, region: int) -> None:
        in_shape = self.flow.shapes[step.inputs[0]]
        dim = step.args[2] if len(step.args) > 2 else step.kwargs.get("dim", 0)
        if step.name == "unbind":
            dim = step.args[1] if len(step.args) > 1 else step.kwargs.get("dim", 0)
        if dim % len(in_shape) != cut.axis:
            for out in step.outputs:
                self.cuts[out] = _Cut(region, cut.axis - (step.name == "unbind" and dim % len(in_shape) < cut.axis),
                                      cut.per_index)
            return
        if cut.per_index != 1 or len(self.sources.get(region, [])) != 1 or region in self.fused:
            raise _Failure("splits the split axis")
        sizes = [self.flow.shapes[o][cut.axis] for o in step.outputs]
        self.fused[region] = sizes
        for out in step.outputs:
            self.cuts[out] = _Cut(region, cut.axis, Fraction(1))

    def _cat(self, step: Step, cut_inputs: list[int], region: int, out_shape: tuple) -> _Cut:
        dim = step.args[1] if len(step.args) > 1 else step.kwargs.get("dim", 0)
        first = self.flow.shapes[cut_inputs[0]]
        cut = self.cuts[cut_inputs[0]]
        if step.name == "stack":
            if dim % (len(first) + 1) <= cut.axis:
                return _Cut(region, cut.axis + 1, cut.per_index)
            return _Cut(region, cut.axis, cut.per_index)
        whole = [i for i in step.inputs if i not in self.cuts and math.prod(self.flow.shapes[i])]  # empty: a new cache
        if dim % len(first) == cut.axis or whole:
            raise _Failure("concatenates along the split axis or with whole tensors")
        return _Cut(region, cut.axis, cut.per_index)


def _moved_axis(name: str, args: tuple, axis: int, ndim: int) -> int:
    if name == "t":
        return 1 - axis if ndim == 2 else axis
    if name == "permute":
        dims = args[1:] if len(args) > 2 or not isinstance(args[1], (tuple, list)) else args[1]
        return [d % ndim for d in dims].index(axis)
    a, b = (d % ndim for d in args[1:3])
    if name == "movedim":
        order = [d for d in range(ndim) if d != a]
        order.insert(b, a)
        return order.index(axis)
    return b if axis == a else a if axis == b else axis


def _indexed_axis(index: Any, axis: int, shape: tuple) -> int:
    """Where indexing moves the split axis; indexing into that axis fails."""
    index = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, (_Ref, list)) for i in index):
        raise _Failure("advanced indexing")
    explicit = sum(1 for i in index if i is not None and i is not Ellipsis)
    expanded: list = []
    for i in index:
        expanded.extend([slice(None)] * (len(shape) - explicit) if i is Ellipsis else [i])
    dim, out = 0, 0
    for i in expanded:
        if i is None:
            out += 1
            continue
        if dim == axis:
            if not (isinstance(i, slice) and i == slice(None)):
                raise _Failure("indexes into the split axis")
            return out
        out += 0 if isinstance(i, int) else 1
        dim += 1
    return out + (axis - dim)


# --------------------------------------------------------------------------------------------
# From regions to plan entries
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Region:
    """Column layers whose split outputs close on row layers, and the plan entries for them,
    relative to ``owner`` (the smallest module holding them all)."""

    sources: list[str]
    sinks: list[str]
    owner: str
    entries: dict[str, Style]
    alternatives: list[dict[str, Style]] = dataclasses.field(default_factory=list)


def _regions(prop: _Propagation) -> dict[int, tuple[list[str], list[str]]]:
    grouped: dict[int, tuple[list[str], list[str]]] = {}
    for region, paths in prop.sources.items():
        grouped.setdefault(prop.find(region), ([], []))[0].extend(paths)
    for region, paths in prop.sinks.items():
        grouped.setdefault(prop.find(region), ([], []))[1].extend(paths)
    return grouped


def _owner(paths: list[str], root: nn.Module) -> str:
    parts = [p.split(".") for p in paths]
    common: list[str] = []
    for segment in zip(*parts):
        if len(set(segment)) != 1:
            break
        common.append(segment[0])
    owner = ".".join(common)
    while owner in paths:  # a layer is not its own owner
        owner = owner.rpartition(".")[0]
    return owner


def _relative(path: str, owner: str) -> str:
    return path[len(owner) + 1:] if owner else path


def _entries(root: nn.Module, flow: Flow, prop: _Propagation, region: int, sources: list[str],
             sinks: list[str]) -> Region:
    owner = _owner(sources + sinks, root)
    while owner and owner not in flow.inputs:  # a container (ModuleDict) never called itself
        owner = owner.rpartition(".")[0]
    head_dim = next((d for r, d in prop.heads.items() if prop.find(r) == region), None)
    fused = next((sizes for r, sizes in prop.fused.items() if prop.find(r) == region), None)
    if head_dim is None and fused is not None and len(set(fused)) == 1:  # gate|up in one layer
        entries: dict[str, Style] = {_relative(sources[0], owner): ColwiseParallel(parts=len(fused))}
        entries.update({_relative(p, owner): RowwiseParallel() for p in sinks})
        return Region(sources, sinks, owner, entries)
    if head_dim is None and fused is None:
        entries = {_relative(p, owner): ColwiseParallel() for p in sources}
        entries.update({_relative(p, owner): RowwiseParallel() for p in sinks})
        return Region(sources, sinks, owner, entries)
    if head_dim is None or len(sinks) != 1:
        raise _Failure("not an attention block with one output projection")
    module = root.get_submodule(owner)
    outs = {p: _out_features(root.get_submodule(p)) for p in sources}
    style = _attention(module, owner, sources, sinks[0], outs, fused, head_dim)
    # forwards that reshape with full sizes of their own get them replaced inside the module
    fallbacks = [dataclasses.replace(style, attributes=(), local_shapes=True),
                 dataclasses.replace(style, local_shapes=True)]
    return Region(sources, sinks, owner, {"": style}, [{"": f} for f in fallbacks if f != style])


def _out_features(layer: nn.Module) -> int:
    base, kind, _ = linear_view(layer)
    return base.weight.shape[kind.out_dim]


def _attention(module: nn.Module, owner: str, sources: list[str], sink: str, outs: dict[str, int],
               fused: list[int] | None, head_dim: int) -> AttentionParallel:
    names = {p: _relative(p, owner) for p in sources}
    o = _relative(sink, owner)
    if fused is not None:
        if len(sources) != 1 or len(fused) != 3 or fused[1] != fused[2] or fused[0] % head_dim or fused[1] % head_dim:
            raise _Failure(f"a fused projection in parts {fused}, not q|k|v blocks")
        heads, kv = fused[0] // head_dim, fused[1] // head_dim
        return AttentionParallel(num_heads=heads, head_dim=head_dim, num_kv_heads=kv, q=None, k=None, v=None,
                                 o=o, qkv=names[sources[0]], layout="blocks",
                                 attributes=_head_attributes(module, heads, kv, head_dim))
    if len(sources) == 1 and outs[sources[0]] % head_dim == 0 and head_dim % 3 == 0:
        heads = outs[sources[0]] // head_dim  # q, k, v of head 0, then of head 1, ...
        return AttentionParallel(num_heads=heads, head_dim=head_dim // 3, q=None, k=None, v=None, o=o,
                                 qkv=names[sources[0]], layout="per_head",
                                 attributes=_head_attributes(module, heads, heads, head_dim // 3))
    if len(sources) != 3 or any(size % head_dim for size in outs.values()):
        raise _Failure(f"attention with {len(sources)} projections, not q, k and v")
    order = sorted(sources, key=lambda p: -outs[p])
    q, k, v = order
    if outs[k] != outs[v]:
        raise _Failure("keys and values of different widths")
    heads, kv = outs[q] // head_dim, outs[k] // head_dim
    if heads % kv:
        raise _Failure(f"{heads} query heads over {kv} key/value heads")
    return AttentionParallel(num_heads=heads, head_dim=head_dim, num_kv_heads=kv, q=names[q], k=names[k],
                             v=names[v], o=o, attributes=_head_attributes(module, heads, kv, head_dim))


_NOT_HEAD_COUNTS = ("layer", "idx", "head_dim", "head_size", "dim_head", "d_head", "window", "position",
                    "max", "rope", "rotary", "bucket", "vocab")


def _head_attributes(module: nn.Module, heads: int, kv: int, head_dim: int) -> tuple[tuple[str, str], ...]:
    """Integer attributes of ``module`` holding a head count or width the forward may read;
    each is set per shard (the check afterwards catches a wrong guess)."""
    found = []
    for name, value in vars(module).items():
        if name.startswith("_") or isinstance(value, bool) or not isinstance(value, int) or \
                any(word in name.lower() for word in _NOT_HEAD_COUNTS):
            continue
        lowered = name.lower()
        if value == heads // kv and heads != kv and "group" in lowered:
            found.append((name, "groups"))
        elif value == kv and kv != heads and ("kv" in lowered or "key_value" in lowered):
            found.append((name, "kv_heads"))
        elif value == heads and "head" in lowered:
            found.append((name, "heads"))
        elif value == heads * head_dim:
            found.append((name, "width"))
        elif value == kv * head_dim and kv != heads:
            found.append((name, "kv_width"))
    return tuple(found)


# --------------------------------------------------------------------------------------------
# Checking each region
# --------------------------------------------------------------------------------------------

# A region passes when its split copy matches the unsplit one to this: float32 sums of a few
# hundred products reordered across ranks differ by ~1e-6 relative; a wrong split is off by O(1).
CHECK_TOLERANCE = 1e-4


def _check(root: nn.Module, region: Region, flow: Flow, cuts: Mapping[int, _Cut], world_size: int,
           cache: dict) -> str | None:
    """None if the region's split copy computes what the unsplit one does, else why not
    (outputs the trace saw split, such as per-head attention weights, are not compared)."""
    inputs = flow.inputs.get(region.owner)
    if inputs is None:
        return "its module was never called"
    owner = root.get_submodule(region.owner)
    whole = [ref is None or ref not in cuts for ref in flow.returned.get(region.owner, [])]
    key = (type(owner).__qualname__, repr(sorted(region.entries.items())), _signature(inputs), tuple(whole))
    if key in cache:
        return cache[key]
    cache[key] = _compare(owner, region.entries, inputs, world_size, whole)
    return cache[key]


def _signature(inputs: Any) -> tuple:
    return tuple((tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__
                 for t in pytree.tree_leaves(inputs))


def _compare(owner: nn.Module, entries: Mapping[str, Style], inputs: tuple[tuple, dict],
             world_size: int, whole: list[bool]) -> str | None:
    from .runtime import TensorParallel  # the runtime imports the planner

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        reference = _real_copy(owner).eval()  # no dropout: both copies must see the same numbers
        args, kwargs = _real_inputs(inputs)
    try:
        with torch.no_grad():
            expected = reference(*args, **kwargs)
            split = TensorParallel(copy.deepcopy(reference), ["cpu"] * world_size, plan=dict(entries), timeout=60)
            got = split(*args, **kwargs)
    except Exception as error:  # any failure of the split copy means: do not split this way
        return f"{type(error).__name__}: {error}"
    finally:
        del reference
    return _difference(_plain(expected), _plain(got), whole)


def _difference(expected: Any, got: Any, whole: list[bool]) -> str | None:
    want, have = pytree.tree_leaves(expected), pytree.tree_leaves(got)
    if len(want) != len(have):
        return f"{len(have)} outputs instead of {len(want)}"
    for i, (a, b) in enumerate(zip(want, have)):
        if not isinstance(a, torch.Tensor) or (i < len(whole) and not whole[i]):
            continue
        if a.shape != b.shape:
            return f"an output of shape {tuple(b.shape)} instead of {tuple(a.shape)}"
        if a.is_floating_point():
            scale = max(1.0, a.abs().max().item()) if a.numel() else 1.0
            diff = (a.float() - b.float().to(a.device)).abs().max().item() if a.numel() else 0.0
            if not diff <= CHECK_TOLERANCE * scale:
                return f"outputs differ by {diff:.2e}"
        elif not torch.equal(a, b.to(a.device)):
            return "integer outputs differ"
    return None


def _real_copy(module: nn.Module) -> nn.Module:
    """A float32 CPU copy; random weights where the module's are on the meta device."""
    tensors = list(module.parameters()) + list(module.buffers())
    if any(t.device.type == "meta" for t in tensors):
        clone = copy.deepcopy(module).to_empty(device="cpu")
        for t in list(clone.parameters()) + list(clone.buffers()):
            if t.is_floating_point():
                t.data.normal_(0, 0.2)
        return clone.float()
    return copy.deepcopy(module).to("cpu").float()


def _real_inputs(inputs: tuple[tuple, dict]) -> tuple[tuple, dict]:
    def real(value):
        if not isinstance(value, torch.Tensor):
            return value
        if value.device.type != "meta":
            return value.detach().to("cpu", torch.float32) if value.is_floating_point() else value.cpu()
        if value.is_floating_point():
            return torch.randn(value.shape)
        return torch.ones(value.shape, dtype=value.dtype)
    args, kwargs = pytree.tree_map(real, inputs)
    return tuple(args), dict(kwargs)


# --------------------------------------------------------------------------------------------
# The planner
# --------------------------------------------------------------------------------------------


def flow_plan(module: nn.Module, usable: Mapping[str, nn.Module], flow: Flow, world_size: int) -> dict[str, Style]:
    """Roles for the layers in ``usable``: a style for those in checked column -> row regions
    (attention regions give one :class:`AttentionParallel` entry for their owner module).

    Example::

        >>> import torch
        >>> from tensor_parallel.styles import linear_kind
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 4))
        >>> usable = {p: m for p, m in mlp.named_modules() if isinstance(m, torch.nn.Linear)}
        >>> flow = trace_flow(mlp, (torch.randn(2, 4),), lambda m: linear_kind(m) is not None)
        >>> flow_plan(mlp, usable, flow, 2)
        {'0': ColwiseParallel(), '2': RowwiseParallel()}
    """
    usable = {p: m for p, m in usable.items() if flow.calls.get(p) == 1 and linear_view(m)[1] is not None}
    gathered: set[str] = set()
    cache: dict = {}
    while True:
        prop = _Propagation(flow, usable, gathered).run()
        regions, rejected = [], set()
        for region, (sources, sinks) in _regions(prop).items():
            reason = prop.failed.get(region) or (None if sinks else "no layer takes its split output")
            if reason is None:
                try:
                    regions.append(_entries(module, flow, prop, region, sources, sinks))
                    continue
                except _Failure as failure:
                    reason = str(failure)
            logger.debug("layers %s stay split-and-gathered: %s", sources, reason)
            rejected.update(sources)
        for region in regions:
            reason = _check(module, region, flow, prop.cuts, world_size, cache)
            for entries in region.alternatives:
                if reason is None:
                    break
                if _check(module, dataclasses.replace(region, entries=entries), flow, prop.cuts, world_size,
                          cache) is None:
                    region.entries, reason = entries, None
            if reason is not None:
                logger.info("automatic plan: %s split as %s fails its check (%s); it is gathered "
                            "after each layer instead", region.owner or "<root>",
                            _format(region.entries), reason)
                rejected.update(region.sources)
        if not rejected - gathered:
            break
        gathered |= rejected
    plan: dict[str, Style] = {}
    for region in regions:
        for path, style in region.entries.items():
            plan[f"{region.owner}.{path}" if region.owner and path else region.owner or path] = style
    return plan


def _format(entries: Mapping[str, Style]) -> str:
    return ", ".join(f"{p or '<owner>'}: {s!r}" for p, s in entries.items())
