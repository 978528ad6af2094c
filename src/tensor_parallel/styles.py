"""Split styles: each one owns one layer's whole contract.

A style says how a layer's tensors are cut (:meth:`Style.shard_specs`), checks that it can cut
that layer (:meth:`Style.check`, at wrap time), and turns the layer of a shard into its
parallel form (:meth:`Style.convert`): what layout its input may have and which collective
follows it. The pairing of a column split with a row split, and its single all-reduce, lives
here and nowhere else.

Layers keep their class (a split ``nn.Linear`` is still an ``nn.Linear``) and their parameter
names, so a shard's ``state_dict`` has the original keys.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .comm import Communicator
from .split import Shard, assign_heads, even_shard

__all__ = [
    "Style",
    "AttentionParallel",
    "ExpertsParallel",
    "ColwiseParallel",
    "RowwiseParallel",
    "EmbeddingParallel",
    "Replicate",
    "LinearKind",
    "register_linear_kind",
    "AdapterKind",
    "register_adapter_kind",
]


# --------------------------------------------------------------------------------------------
# Linear-like layers: what "output features" and "input features" mean for each type
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearKind:
    """How a linear-like layer type stores and applies its weight.

    ``out_dim``/``in_dim`` are the weight's output and input dimensions, ``feature_dim`` the
    dimension of activations that holds features, ``out_attr``/``in_attr`` the size attributes
    to update, and ``apply(module, x, weight)`` computes the layer without its bias.

    Example::

        >>> import torch
        >>> from tensor_parallel.styles import linear_kind
        >>> kind = linear_kind(torch.nn.Conv2d(3, 8, 3))
        >>> kind.out_dim, kind.feature_dim, kind.out_attr
        (0, 1, 'out_channels')
    """

    out_dim: int
    in_dim: int
    feature_dim: int
    out_attr: str | None
    in_attr: str | None
    apply: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def _conv_apply(module, x, weight):
    return module._conv_forward(x, weight, None)


def _conv_transpose_apply(module, x, weight):
    functional = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[len(module.stride)]
    return functional(x, weight, None, module.stride, module.padding, module.output_padding,
                      module.groups, module.dilation)


_LINEAR_KINDS: dict[type, LinearKind] = {
    nn.Linear: LinearKind(0, 1, -1, "out_features", "in_features", lambda m, x, w: F.linear(x, w)),
}
for _cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    _LINEAR_KINDS[_cls] = LinearKind(0, 1, 1, "out_channels", "in_channels", _conv_apply)
for _cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    _LINEAR_KINDS[_cls] = LinearKind(1, 0, 1, "out_channels", "in_channels", _conv_transpose_apply)


def register_linear_kind(cls: type[nn.Module], kind: LinearKind) -> None:
    """Teach the column and row styles a new linear-like layer type.

    Example::

        >>> import torch
        >>> from tensor_parallel.styles import LinearKind, register_linear_kind
        >>> class MyLinear(torch.nn.Linear):
        ...     pass
        >>> register_linear_kind(MyLinear, LinearKind(0, 1, -1, "out_features", "in_features",
        ...                      lambda m, x, w: torch.nn.functional.linear(x, w)))
    """
    _LINEAR_KINDS[cls] = kind


def linear_kind(module: nn.Module) -> LinearKind | None:
    """The :class:`LinearKind` of ``module``, or None if it is not a plain linear-like layer.

    A subclass that overrides ``forward`` is not plain: its forward may depend on the sizes.
    """
    own = type(module).__bases__[-1] if isinstance(module, _Parallel) else type(module)  # split: its class
    for cls in own.__mro__:
        if cls in _LINEAR_KINDS:
            if own.forward is not cls.forward:
                return None
            if getattr(module, "groups", 1) != 1:
                return None
            return _LINEAR_KINDS[cls]
    return None


# --------------------------------------------------------------------------------------------
# Adapter layers: a linear-like base layer plus low-rank branches (LoRA)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterKind:
    """How a layer that adds low-rank branches to a linear-like base layer is built:
    ``y = base(x) + sum(up(down(x)))``. ``base`` is the base layer's child path,
    ``branches(module)`` lists each branch's (down, up) child paths (linear-like layers), and
    ``check(module, path)`` raises for variants whose branches cannot be split that way.

    The column and row styles cut a registered layer consistently: column split, each ``up``
    by output features like the base (``down`` replicated); row split, each ``down`` by input
    features like the base, all-reduced, then ``up`` replicated.

    Example::

        >>> from tensor_parallel.styles import adapter_kind
        >>> from peft.tuners.lora import Linear   # registered when peft's layers are met
        >>> import torch, peft
        >>> layer = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)),
        ...                             peft.LoraConfig(target_modules=["0"], r=2)).base_model.model[0]
        >>> kind = adapter_kind(layer)
        >>> kind.base, kind.branches(layer)
        ('base_layer', [('lora_A.default', 'lora_B.default')])
    """

    base: str
    branches: Callable[[nn.Module], list[tuple[str, str]]]
    check: Callable[[nn.Module, str], None] = lambda module, path: None


_ADAPTER_KINDS: dict[type, AdapterKind] = {}


def register_adapter_kind(cls: type[nn.Module], kind: AdapterKind) -> None:
    """Teach the column and row styles a layer type that wraps a linear-like layer with
    low-rank branches (peft's LoRA ``Linear`` is registered already).

    Example::

        >>> import torch
        >>> from tensor_parallel.styles import AdapterKind, register_adapter_kind
        >>> class Adapted(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.base, self.down, self.up = torch.nn.Linear(8, 8), torch.nn.Linear(8, 2), torch.nn.Linear(2, 8)
        ...     def forward(self, x):
        ...         return self.base(x) + self.up(self.down(x))
        >>> register_adapter_kind(Adapted, AdapterKind("base", lambda m: [("down", "up")]))
    """
    _ADAPTER_KINDS[cls] = kind


def adapter_kind(module: nn.Module) -> AdapterKind | None:
    """The :class:`AdapterKind` of ``module``, or None if it is no registered adapter layer.

    Example::

        >>> import torch
        >>> adapter_kind(torch.nn.Linear(2, 2)) is None
        True
    """
    own = type(module).__bases__[-1] if isinstance(module, _Parallel) else type(module)  # split: its class
    if own.__module__.startswith("peft."):
        import importlib

        importlib.import_module("tensor_parallel.hf.peft")  # registers peft's layers (peft is loaded)
    for cls in own.__mro__:
        if cls in _ADAPTER_KINDS:
            return _ADAPTER_KINDS[cls]
    return None


def linear_view(module: nn.Module) -> tuple[nn.Module, LinearKind | None, AdapterKind | None]:
    """The linear-like layer that holds ``module``'s weight (its base layer for an adapter
    layer), that layer's kind, and the adapter kind (None for a plain layer).

    Example::

        >>> import torch
        >>> base, kind, adapter = linear_view(torch.nn.Linear(2, 3))
        >>> kind.out_dim, adapter
        (0, None)
    """
    adapter = adapter_kind(module)
    base = module.get_submodule(adapter.base) if adapter else module
    return base, linear_kind(base), adapter


def _branches(module: nn.Module, adapter: AdapterKind | None) -> list[tuple[nn.Module, str, nn.Module, str]]:
    if adapter is None:
        return []
    return [(module.get_submodule(down), down, module.get_submodule(up), up) for down, up in adapter.branches(module)]


def column_cut(module: nn.Module, size: int, ranges) -> dict[str, Shard]:
    """Every tensor of ``module`` that a column split cuts by output features, positions
    ``ranges`` of ``size``: the weight and bias, and the ``up`` layers of its adapters.

    Example::

        >>> import torch
        >>> sorted(column_cut(torch.nn.Linear(2, 4), 4, (((0, 2),), ((2, 4),))))
        ['bias', 'weight']
    """
    base, kind, adapter = linear_view(module)
    prefix = f"{adapter.base}." if adapter else ""
    specs = {f"{prefix}weight": Shard(kind.out_dim, size, ranges)}
    if base.bias is not None:
        specs[f"{prefix}bias"] = Shard(0, size, ranges)
    for _, _, up, up_path in _branches(module, adapter):
        specs[f"{up_path}.weight"] = Shard(linear_kind(up).out_dim, size, ranges)
        if up.bias is not None:
            specs[f"{up_path}.bias"] = Shard(0, size, ranges)
    return specs


def row_cut(module: nn.Module, size: int, ranges) -> dict[str, Shard]:
    """Every tensor of ``module`` that a row split cuts by input features, positions
    ``ranges`` of ``size``: the weight, and the ``down`` layers of its adapters.

    Example::

        >>> import torch
        >>> row_cut(torch.nn.Linear(4, 2), 4, (((0, 2),), ((2, 4),)))["weight"].dim
        1
    """
    _, kind, adapter = linear_view(module)
    prefix = f"{adapter.base}." if adapter else ""
    specs = {f"{prefix}weight": Shard(kind.in_dim, size, ranges)}
    for down, down_path, _, _ in _branches(module, adapter):
        specs[f"{down_path}.weight"] = Shard(linear_kind(down).in_dim, size, ranges)
    return specs


def _under(specs: Mapping[str, Shard], path: str) -> dict[str, Shard]:
    """The specs of the tensors under child ``path``, keyed relative to it."""
    return {key[len(path) + 1:]: shard for key, shard in specs.items() if key.startswith(path + ".")}


# --------------------------------------------------------------------------------------------
# The style interface
# --------------------------------------------------------------------------------------------


class Style(abc.ABC):
    """How one layer is split. Subclasses are frozen dataclasses: plain, printable data.

    Example::

        >>> import tensor_parallel as tp
        >>> style = tp.RowwiseParallel()
        >>> isinstance(style, tp.Style), style.collectives, style == tp.RowwiseParallel()
        (True, ('all_reduce',), True)
    """

    #: collectives one call of the converted layer runs, by kind (for plan printing)
    collectives: tuple[str, ...] = ()

    def __repr__(self) -> str:
        """Only the options that differ from their defaults: ``ColwiseParallel(unit=64)``."""
        changed = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                   if getattr(self, f.name) != f.default]
        return f"{type(self).__name__}({', '.join(changed)})"

    def check(self, module: nn.Module, path: str, world_size: int) -> None:
        """Raise ``TypeError``/``ValueError`` if this style cannot split ``module``."""

    @abc.abstractmethod
    def shard_specs(self, module: nn.Module, world_size: int) -> dict[str, Shard]:
        """How each of ``module``'s own tensors is cut; tensors left out are replicated."""

    @abc.abstractmethod
    def convert(self, module: nn.Module, *, rank: int, comm: Communicator,
                specs: Mapping[str, Shard]) -> None:
        """Turn ``module`` (holding rank ``rank``'s slices already) into its parallel form."""


@functools.lru_cache(maxsize=None)
def _parallel_class(mixin: type, base: type) -> type:
    return type(f"{mixin.__name__.lstrip('_')}{base.__name__}", (mixin, base), {})


def _convert_class(module: nn.Module, mixin: type) -> None:
    module.__class__ = _parallel_class(mixin, type(module))


def _require_linear(style: Style, module: nn.Module, path: str) -> LinearKind:
    base, kind, adapter = linear_view(module)
    if kind is None:
        raise TypeError(
            f"{type(style).__name__} cannot split '{path}' ({type(module).__name__}): it splits "
            f"nn.Linear, Conv1d/2d/3d and ConvTranspose1d/2d/3d with groups=1 and their default "
            f"forward, and registered adapter layers around them (peft's LoRA Linear); use "
            f"Replicate() for this module or register_linear_kind() for its type")
    _require_float(style, base.weight, path)
    if adapter is not None:
        adapter.check(module, path)
        for down, down_path, up, up_path in _branches(module, adapter):
            for branch, where in ((down, down_path), (up, up_path)):
                if linear_kind(branch) is None:
                    raise TypeError(f"{type(style).__name__} cannot split '{path}': its adapter layer "
                                    f"'{where}' ({type(branch).__name__}) is not linear-like")
    return kind


def _require_float(style: Style, weight: torch.Tensor, path: str) -> None:
    """Partial results are summed across ranks: integer (quantized) weights cannot be."""
    if not (weight.dtype.is_floating_point or weight.dtype.is_complex):
        raise TypeError(f"{type(style).__name__} cannot split '{path}': its weight is {weight.dtype}, and "
                        f"split layers sum floating-point partial results; dequantize it first or use "
                        f"Replicate() for it")


# --------------------------------------------------------------------------------------------
# Column split
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class ColwiseParallel(Style):
    """Split output features. The input must be replicated; the output is split by feature
    unless ``gather_output=True``, which all-gathers it back to full size.

    ``unit`` keeps groups of features together (a head of ``unit`` features is never cut).
    ``parts`` says the output is that many equal blocks fused in one layer (``parts=3`` for
    a fused q/k/v projection); each block is cut alike, so every rank keeps whole q, k and v
    heads of the same indices.

    Example::

        >>> import torch, tensor_parallel as tp
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
        >>> plan = {"0": tp.ColwiseParallel(), "2": tp.RowwiseParallel()}
        >>> model = tp.tensor_parallel(mlp, ["cpu", "cpu"], plan=plan)
    """

    gather_output: bool = False
    unit: int = 1
    parts: int = 1

    @property
    def collectives(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("all_gather",) if self.gather_output else ()

    def check(self, module, path, world_size):
        kind = _require_linear(self, module, path)
        _check_unit(self, linear_view(module)[0].weight.shape[kind.out_dim], path, self.parts)
        if self.gather_output and self.parts > 1:
            raise ValueError(f"ColwiseParallel on '{path}': gather_output=True with parts={self.parts} "
                             f"would gather the fused blocks out of order; keep the output split "
                             f"and follow the layer with a RowwiseParallel layer")

    def shard_specs(self, module, world_size):
        base, kind, _ = linear_view(module)
        shard = even_shard(base.weight.shape[kind.out_dim], world_size, kind.out_dim, self.unit, self.parts)
        return column_cut(module, shard.size, shard.ranges)

    def convert(self, module, *, rank, comm, specs):
        _convert_column(module, rank, comm, specs, self.gather_output)


def _convert_column(module: nn.Module, rank: int, comm: Communicator, specs: Mapping[str, Shard],
                    gather: bool) -> None:
    base, kind, adapter = linear_view(module)
    if adapter is not None:  # the base and each up layer column-split; the gather after their sum
        _convert_column(base, rank, comm, _under(specs, adapter.base), False)
        for _, _, up, up_path in _branches(module, adapter):
            _convert_column(up, rank, comm, _under(specs, up_path), False)
        weight = specs[f"{adapter.base}.weight"]
        if gather:
            _convert_class(module, _GatherOutput)
    else:
        weight = specs["weight"]
        _convert_class(module, _ColumnParallel)
    module.tp_comm, module.tp_kind, module.tp_gather = comm, kind, gather
    module.tp_sizes = tuple(weight.local_size(r) for r in range(comm.world_size))
    if kind.out_attr and hasattr(module, kind.out_attr):
        setattr(module, kind.out_attr, weight.local_size(rank))


class _Parallel:
    """Marks a layer converted by a style (its class is a mixin of this and the layer's class)."""


class _GatherOutput(_Parallel):
    """An adapter layer whose base and up layers are column-split: all-gather their sum."""

    def forward(self, *args, **kwargs):
        return self.tp_comm.all_gather(super().forward(*args, **kwargs), self.tp_kind.feature_dim, self.tp_sizes)


class _ColumnParallel(_Parallel):
    def forward(self, x, *args, **kwargs):
        x = self.tp_comm.enter_parallel(x)
        if self.weight.numel() == 0 and self.tp_kind.feature_dim != -1:
            y = _apply_local(self.tp_kind, self, x)  # an empty slice: convolutions reject it
        else:
            y = super().forward(x, *args, **kwargs)
        if self.tp_gather:
            y = self.tp_comm.all_gather(y, self.tp_kind.feature_dim, self.tp_sizes)
        return y


# --------------------------------------------------------------------------------------------
# Row split
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class RowwiseParallel(Style):
    """Split input features; one all-reduce sums the partial outputs, then the bias is added
    once. The input may be split by feature (the output of a :class:`ColwiseParallel` layer:
    no communication) or replicated (each rank then takes its own slice).

    Example::

        >>> import torch, tensor_parallel as tp
        >>> layer = torch.nn.Sequential(torch.nn.Linear(8, 3))
        >>> model = tp.tensor_parallel(layer, ["cpu", "cpu"], plan={"0": tp.RowwiseParallel()})
        >>> model(torch.randn(2, 8)).shape
        torch.Size([2, 3])
    """

    unit: int = 1
    collectives = ("all_reduce",)

    def check(self, module, path, world_size):
        kind = _require_linear(self, module, path)
        _check_unit(self, linear_view(module)[0].weight.shape[kind.in_dim], path)

    def shard_specs(self, module, world_size):
        base, kind, _ = linear_view(module)
        shard = even_shard(base.weight.shape[kind.in_dim], world_size, kind.in_dim, self.unit)
        return row_cut(module, shard.size, shard.ranges)

    def convert(self, module, *, rank, comm, specs):
        _convert_row(module, rank, comm, specs)


def _convert_row(module: nn.Module, rank: int, comm: Communicator, specs: Mapping[str, Shard]) -> None:
    base, kind, adapter = linear_view(module)
    if adapter is not None:  # the base and each down layer row-split (each all-reduced); up replicated
        _convert_row(base, rank, comm, _under(specs, adapter.base))
        for down, down_path, _, _ in _branches(module, adapter):
            _convert_row(down, rank, comm, _under(specs, down_path))
        if kind.in_attr and hasattr(module, kind.in_attr):
            setattr(module, kind.in_attr, specs[f"{adapter.base}.weight"].local_size(rank))
        return
    shard = specs["weight"]
    module.tp_comm, module.tp_kind, module.tp_rank, module.tp_input = comm, kind, rank, shard
    if kind.in_attr:
        setattr(module, kind.in_attr, shard.local_size(rank))
    _convert_class(module, _RowParallel)


class _RowParallel(_Parallel):
    def forward(self, x, *args, **kwargs):
        kind, shard = self.tp_kind, self.tp_input
        if args or kwargs:
            raise TypeError(f"{type(self).__name__} takes one input tensor, got extra arguments")
        if x.shape[kind.feature_dim] == shard.size and shard.local_size(self.tp_rank) != shard.size:
            x = self.tp_comm.enter_parallel(x)  # a replicated input: its gradient is summed
            x = Shard(kind.feature_dim, shard.size, shard.ranges).take(x, self.tp_rank)
        y = self.tp_comm.all_reduce(_apply_local(kind, self, x))
        if self.bias is not None:
            shape = [1] * y.dim()
            shape[kind.feature_dim] = -1
            y = y + self.bias.view(shape)
        return y


def _apply_local(kind: LinearKind, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer without bias, also when this rank's slice of the weight is empty."""
    weight = module.weight
    if weight.numel() or kind.feature_dim == -1:
        return kind.apply(module, x, weight)
    # convolutions reject empty weights: pad one zero feature, then drop it again
    grow = [1 if d == kind.out_dim else s for d, s in enumerate(weight.shape)]
    if weight.shape[kind.out_dim] == 0:
        padded = torch.cat([weight, weight.new_zeros(grow)], kind.out_dim)
        return kind.apply(module, x, padded).narrow(kind.feature_dim, 0, 0)
    grow = [1 if d == kind.in_dim else s for d, s in enumerate(weight.shape)]
    padded = torch.cat([weight, weight.new_zeros(grow)], kind.in_dim)
    x_shape = list(x.shape)
    x_shape[kind.feature_dim] = 1
    return kind.apply(module, torch.cat([x, x.new_zeros(x_shape)], kind.feature_dim), padded)


def _check_unit(style: Style, size: int, path: str, parts: int = 1) -> None:
    if size % (style.unit * parts):
        raise ValueError(f"{type(style).__name__}(unit={style.unit}, parts={parts}) on '{path}': "
                         f"{size} features are not {parts} blocks of whole units of {style.unit}; "
                         f"pick a unit and parts whose product divides {size}")


# --------------------------------------------------------------------------------------------
# Attention: whole heads per rank, grouped-query aware
# --------------------------------------------------------------------------------------------

#: per-rank quantities an attention module's attributes can be set to
HEAD_QUANTITIES = ("heads", "kv_heads", "groups", "width", "kv_width", "qkv_width")

#: how q, k and v sit in one fused projection
QKV_LAYOUTS = ("blocks", "per_head", "grouped")


@dataclass(frozen=True, repr=False)
class AttentionParallel(Style):
    """Split an attention module by heads: its q/k/v projections by column, its output
    projection by row (one all-reduce), every rank holding whole heads.

    Heads that do not divide by the device count are split unevenly (14 over 4: 4/4/3/3).
    With grouped-query attention each rank holds the key/value heads its query heads read;
    with more ranks than key/value heads, those are replicated. ``attributes`` names the
    module attributes its forward reads that must become per-rank values, as pairs of
    (attribute, quantity) with quantity one of ``heads``, ``kv_heads``, ``groups``
    (query heads per key/value head), ``width`` (heads x head_dim), ``kv_width`` and
    ``qkv_width``.

    An attribute named ``config.X`` is set on a private copy of the module's config, one named
    ``child.X`` on the submodule ``child``.
    ``head_inputs`` names keyword inputs that carry one slice per head, as pairs of (name,
    form): ``"flat"`` for ``(batch * heads, ...)`` (BLOOM's ALiBi), ``"dim1"`` for
    ``(batch, heads, ...)`` (left alone when that dimension is 1); each rank gets its heads.
    ``head_tables`` names child embeddings with one column per head (T5's relative position
    bias), cut to the rank's heads.

    ``local_shapes=True`` is for forwards that reshape with the full sizes they computed
    themselves (``y.view(B, T, C)`` with ``C`` read from the input): inside the module, a
    ``view``/``reshape`` whose shape does not fit and a ``split`` by a full width are given
    the rank's head count or width instead.

    Projections are separate (``q``, ``k``, ``v``) or fused in one (``qkv``) with ``layout``
    ``"blocks"`` (all q, then all k, then all v: GPT-2, Phi-3), ``"per_head"`` (q, k, v of
    head 0, then of head 1...: GPT-NeoX, BLOOM) or ``"grouped"`` (per key/value head, its
    query heads then k then v: Falcon).

    Example::

        >>> import tensor_parallel as tp
        >>> tp.AttentionParallel(num_heads=14, head_dim=64, num_kv_heads=2,
        ...                      attributes=(("num_key_value_groups", "groups"),))
        AttentionParallel(num_heads=14, head_dim=64, num_kv_heads=2, attributes=(('num_key_value_groups', 'groups'),))
    """

    num_heads: int
    head_dim: int
    num_kv_heads: int | None = None
    q: str | None = "q_proj"
    k: str | None = "k_proj"
    v: str | None = "v_proj"
    o: str = "o_proj"
    qkv: str | None = None
    layout: str = "blocks"
    attributes: tuple[tuple[str, str], ...] = ()
    head_inputs: tuple[tuple[str, str], ...] = ()
    head_tables: tuple[str, ...] = ()
    local_shapes: bool = False
    collectives = ("all_reduce",)

    @property
    def kv_heads(self) -> int:
        """Key/value heads (the query heads when not given)."""
        return self.num_kv_heads or self.num_heads

    def _projections(self) -> list[str]:
        return [self.qkv] if self.qkv else [p for p in (self.q, self.k, self.v) if p]

    def check(self, module, path, world_size):
        if self.layout not in QKV_LAYOUTS:
            raise ValueError(f"AttentionParallel on '{path}': layout must be one of {QKV_LAYOUTS}")
        if self.layout == "per_head" and self.qkv and self.kv_heads != self.num_heads:
            raise ValueError(f"AttentionParallel on '{path}': the per_head layout needs as many "
                             f"key/value heads as query heads")
        for name, quantity in self.attributes:
            if quantity not in HEAD_QUANTITIES:
                raise ValueError(f"AttentionParallel on '{path}': attribute {name!r} asks for "
                                 f"{quantity!r}; use one of {HEAD_QUANTITIES}")
        assign_heads(self.num_heads, self.kv_heads, world_size)
        for name in self._projections() + [self.o]:
            try:
                child = module.get_submodule(name)
            except AttributeError:
                raise ValueError(f"AttentionParallel on '{path}': it has no submodule {name!r}; "
                                 f"name its projections with q=, k=, v=, o= or qkv=") from None
            _require_linear(self, child, f"{path}.{name}")
        expected = {"q": self.num_heads, "k": self.kv_heads, "v": self.kv_heads,
                    "qkv": self.num_heads + 2 * self.kv_heads}
        for role in ("q", "k", "v", "qkv"):
            name = getattr(self, role)
            if name and (role == "qkv" or not self.qkv):
                base, kind, _ = linear_view(module.get_submodule(name))
                size = base.weight.shape[kind.out_dim]
                if size != expected[role] * self.head_dim:
                    raise ValueError(f"AttentionParallel on '{path}': {name} has {size} output "
                                     f"features, not {expected[role]} heads of {self.head_dim}")

    def shard_specs(self, module, world_size):
        heads = assign_heads(self.num_heads, self.kv_heads, world_size)
        specs: dict[str, Shard] = {}
        for role, name in (("q", self.q), ("k", self.k), ("v", self.v), ("qkv", self.qkv)):
            if not name or (self.qkv and role != "qkv"):
                continue
            child = module.get_submodule(name)
            base, kind, _ = linear_view(child)
            ranges = tuple(self._ranges(role, q, kv) for q, kv in heads)
            specs.update({f"{name}.{key}": shard for key, shard in
                          column_cut(child, base.weight.shape[kind.out_dim], ranges).items()})
        out = module.get_submodule(self.o)
        base, kind, _ = linear_view(out)
        ranges = tuple(self._ranges("q", q, kv) for q, kv in heads)
        specs.update({f"{self.o}.{key}": shard for key, shard in
                      row_cut(out, base.weight.shape[kind.in_dim], ranges).items()})
        head_ranges = tuple(((q.start, q.stop),) if len(q) else () for q, _ in heads)
        for name in self.head_tables:
            if _has_child(module, name):
                specs[f"{name}.weight"] = Shard(1, self.num_heads, head_ranges)
        return specs

    def _ranges(self, role: str, q: range, kv: range) -> tuple[tuple[int, int], ...]:
        d, h, k = self.head_dim, self.num_heads, self.kv_heads

        def span(heads: range, width: int, offset: int = 0):
            return ((offset + heads.start * width, offset + heads.stop * width),) if len(heads) else ()

        if role == "q":
            return span(q, d)
        if role in ("k", "v"):
            return span(kv, d)
        if self.layout == "blocks":
            return span(q, d) + span(kv, d, h * d) + span(kv, d, (h + k) * d)
        if self.layout == "per_head":
            return span(q, 3 * d)
        group = h // k
        out: tuple[tuple[int, int], ...] = ()
        for g in kv:  # grouped: block g = [its query heads | k | v]
            base = g * (group + 2) * d
            mine = range(max(q.start, g * group), min(q.stop, (g + 1) * group))
            out += span(range(mine.start - g * group, mine.stop - g * group), d, base)
            out += ((base + group * d, base + (group + 2) * d),)
        return out

    def convert(self, module, *, rank, comm, specs):
        for name in self._projections():
            _convert_column(module.get_submodule(name), rank, comm, _under(specs, name), False)
        _convert_row(module.get_submodule(self.o), rank, comm, _under(specs, self.o))
        q, kv = assign_heads(self.num_heads, self.kv_heads, comm.world_size)[rank]
        values = {"heads": len(q), "kv_heads": len(kv), "groups": len(q) // max(len(kv), 1),
                  "width": len(q) * self.head_dim, "kv_width": len(kv) * self.head_dim,
                  "qkv_width": (len(q) + 2 * len(kv)) * self.head_dim}
        for name, quantity in self.attributes:
            _set_attribute(module, name, values[quantity])
        for name in self.head_tables:
            if _has_child(module, name):
                module.get_submodule(name).embedding_dim = len(q)
        if self.local_shapes:
            module._tp_local_sizes = {self.num_heads: len(q), self.kv_heads: len(kv),
                                      self.num_heads * self.head_dim: values["width"],
                                      self.kv_heads * self.head_dim: values["kv_width"]}
            _convert_class(module, _LocalShapes)
        if self.head_inputs:
            module.register_forward_pre_hook(
                functools.partial(_slice_head_inputs, self.head_inputs, self.num_heads, q), with_kwargs=True)
        split = self._projections() + [self.o] + list(self.head_tables)
        for path, sub in module.named_modules():
            if path and sub._parameters and not any(path == n or path.startswith(n + ".") for n in split):
                _sum_gradients_over_ranks(sub, comm)  # per-head norms (q_norm) run on this rank's heads


def _sum_gradients_over_ranks(module: nn.Module, comm: Communicator) -> None:
    """``module``'s replicated parameters work on this rank's heads only: each rank's gradient
    is a part of the unsharded one. Its forward uses them through ``enter_parallel`` (identity;
    under torch.distributed its backward sums the parts over the ranks; in one process the
    ranks' parts meet in the one tensor anyway)."""
    hooks = _EnterParallel(comm)
    module.register_forward_pre_hook(hooks.swap_in)
    module.register_forward_hook(hooks.swap_out, always_call=True, prepend=True)  # last in, first out


class _EnterParallel:
    def __init__(self, comm: Communicator) -> None:
        self.comm = comm
        self.stash: dict[str, torch.Tensor] = {}

    def swap_in(self, module: nn.Module, args) -> None:
        for name, param in list(module._parameters.items()):
            if param is not None and param.requires_grad and torch.is_grad_enabled():
                self.stash[name] = param
                module._parameters[name] = self.comm.enter_parallel(param)

    def swap_out(self, module: nn.Module, args, output) -> None:
        module._parameters.update(self.stash)
        self.stash.clear()


class _LocalShapes(nn.Module):
    """Runs the module's forward with full sizes in reshapes replaced by the rank's."""

    def forward(self, *args, **kwargs):
        with _LocalSizes(self._tp_local_sizes):
            return super().forward(*args, **kwargs)


class _LocalSizes(TorchFunctionMode):
    def __init__(self, sizes: Mapping[int, int]) -> None:
        super().__init__()
        self.sizes = sizes

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in ("view", "reshape") and len(args) > 1 and isinstance(args[0], torch.Tensor):
            shape = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list, torch.Size)) else args[1:]
            if all(isinstance(d, int) for d in shape):
                args = (args[0], _fitting_shape(args[0].numel(), list(shape), self.sizes))
        elif name == "split" and len(args) > 1 and isinstance(args[1], int) and isinstance(args[0], torch.Tensor):
            dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
            size, local = args[1], self.sizes.get(args[1])
            if local and local != size and args[0].shape[dim] % local == 0:
                args = (args[0], local, *args[2:])
        return func(*args, **kwargs)


def _fitting_shape(numel: int, shape: list[int], sizes: Mapping[int, int]) -> list[int]:
    """``shape``, or with one full size (the rightmost that works) replaced by the rank's."""
    if _fits(numel, shape):
        return shape
    for i in reversed(range(len(shape))):
        if shape[i] in sizes:
            candidate = shape[:i] + [sizes[shape[i]]] + shape[i + 1:]
            if _fits(numel, candidate):
                return candidate
    return shape


def _fits(numel: int, shape: list[int]) -> bool:
    known = math.prod(d for d in shape if d != -1)
    return known == numel if -1 not in shape else known > 0 and numel % known == 0


def _has_child(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def _set_attribute(module: nn.Module, name: str, value: int) -> None:
    owner, _, attribute = name.rpartition(".")
    if owner and owner != "config" and _has_child(module, owner):  # "self.num_heads": a child's attribute
        setattr(module.get_submodule(owner), attribute, value)
    elif name.startswith("config."):
        if not getattr(module, "_tp_private_config", False):
            module.config = copy.copy(module.config)
            module._tp_private_config = True
        setattr(module.config, name.partition(".")[2], value)
    else:
        setattr(module, name, value)


def _slice_head_inputs(inputs: tuple[tuple[str, str], ...], num_heads: int, heads: range,
                       module: nn.Module, args: tuple, kwargs: dict):
    for name, form in inputs:
        value = kwargs.get(name)
        if not isinstance(value, torch.Tensor):
            continue
        if form == "flat":
            per_head = value.reshape(-1, num_heads, *value.shape[1:])
            kwargs[name] = per_head[:, heads.start:heads.stop].reshape(-1, *value.shape[1:])
        elif value.dim() > 1 and value.shape[1] == num_heads:
            kwargs[name] = value[:, heads.start:heads.stop]
    return args, kwargs


# --------------------------------------------------------------------------------------------
# Mixture of experts: every expert's intermediate dimension split
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class ExpertsParallel(Style):
    """Split every expert's intermediate dimension in a module holding all experts as fused
    3-D weights: ``gate_up`` of shape (experts, 2 x intermediate, hidden) by column (gate and
    up blocks cut alike), ``down`` of shape (experts, hidden, intermediate) by row. The
    experts' combined output is summed with one all-reduce; routing stays replicated.

    Example::

        >>> import tensor_parallel as tp
        >>> tp.ExpertsParallel()
        ExpertsParallel()
    """

    gate_up: str = "gate_up_proj"
    down: str = "down_proj"
    unit: int = 0
    collectives = ("all_reduce",)

    def _unit(self, intermediate: int) -> int:
        """``unit=0``: slices of whole 8-element groups when possible (grouped matmul kernels
        want 16-byte aligned strides), else single elements."""
        return self.unit or (8 if intermediate % 8 == 0 else 1)

    def check(self, module, path, world_size):
        gate_up, down = getattr(module, self.gate_up, None), getattr(module, self.down, None)
        if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor) \
                or gate_up.dim() != 3 or down.dim() != 3:
            raise TypeError(f"ExpertsParallel cannot split '{path}' ({type(module).__name__}): it "
                            f"needs 3-D expert weights {self.gate_up!r} and {self.down!r}")
        if gate_up.shape[1] != 2 * down.shape[2]:
            raise ValueError(f"ExpertsParallel on '{path}': {self.gate_up} has {gate_up.shape[1]} "
                             f"rows per expert, not twice the {down.shape[2]} of {self.down}")
        biases = [n for n, _ in module.named_parameters(recurse=False) if "bias" in n]
        if biases:
            raise TypeError(f"ExpertsParallel cannot split '{path}': expert biases {biases} would be "
                            f"added once per rank; use Replicate() for it")

    def shard_specs(self, module, world_size):
        intermediate = getattr(module, self.down).shape[2]
        unit = self._unit(intermediate)
        return {self.gate_up: even_shard(2 * intermediate, world_size, dim=1, unit=unit, parts=2),
                self.down: even_shard(intermediate, world_size, dim=2, unit=unit)}

    def convert(self, module, *, rank, comm, specs):
        module.tp_comm = comm
        if hasattr(module, "intermediate_dim"):
            module.intermediate_dim = specs[self.down].local_size(rank)
        _convert_class(module, _ExpertsParallel)


class _ExpertsParallel(_Parallel):
    def forward(self, *args, **kwargs):
        # every float input (hidden states, routing weights) meets this rank's slice of the
        # experts: their gradients are partial sums
        enter = self.tp_comm.enter_parallel
        args = tuple(enter(a) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
        return self.tp_comm.all_reduce(super().forward(*args, **kwargs))


# --------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class EmbeddingParallel(Style):
    """Split an embedding table by vocabulary (``dim=0``: each rank looks up its own rows,
    one all-reduce) or by embedding dimension (``dim=1``: one all-gather).

    Example::

        >>> import torch, tensor_parallel as tp
        >>> emb = torch.nn.Sequential(torch.nn.Embedding(10, 4))
        >>> model = tp.tensor_parallel(emb, ["cpu", "cpu"], plan={"0": tp.EmbeddingParallel(dim=0)})
        >>> model(torch.tensor([[1, 9]])).shape
        torch.Size([1, 2, 4])
    """

    dim: int = 0

    @property
    def collectives(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("all_reduce",) if self.dim == 0 else ("all_gather",)

    def check(self, module, path, world_size):
        if self.dim not in (0, 1):
            raise ValueError(f"EmbeddingParallel(dim={self.dim}) on '{path}': dim must be 0 "
                             f"(vocabulary) or 1 (embedding dimension)")
        if not isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            raise TypeError(f"EmbeddingParallel cannot split '{path}' ({type(module).__name__}): "
                            f"it splits nn.Embedding and nn.EmbeddingBag (and subclasses whose "
                            f"forward looks up, then scales)")
        _require_float(self, module.weight, path)
        if module.max_norm is not None:
            raise TypeError(f"EmbeddingParallel cannot split '{path}': max_norm renormalises whole "
                            f"rows in place; use Replicate() for it")
        if self.dim == 0 and getattr(module, "scale_grad_by_freq", False):
            raise TypeError(f"EmbeddingParallel(dim=0) cannot split '{path}': scale_grad_by_freq "
                            f"counts ids over the whole vocabulary; use dim=1")
        if isinstance(module, nn.EmbeddingBag) and self.dim == 0:
            raise TypeError(f"EmbeddingParallel(dim=0) cannot split the EmbeddingBag '{path}' (its "
                            f"mean and max modes do not add up across ranks); use dim=1")

    def shard_specs(self, module, world_size):
        return {"weight": even_shard(module.weight.shape[self.dim], world_size, self.dim)}

    def convert(self, module, *, rank, comm, specs):
        shard = specs["weight"]
        module.tp_comm = comm
        module.tp_sizes = tuple(shard.local_size(r) for r in range(comm.world_size))
        if self.dim == 1:
            module.embedding_dim = shard.local_size(rank)
            _convert_class(module, _DimParallelEmbedding)
            return
        ((start, stop),) = shard.ranges[rank]
        module.tp_start, module.tp_stop = start, stop
        module.num_embeddings = stop - start
        if module.padding_idx is not None:
            index = module.padding_idx % shard.size
            module.padding_idx = index - start if start <= index < stop else None
        _convert_class(module, _VocabParallelEmbedding)


class _VocabParallelEmbedding(_Parallel):
    def forward(self, ids, *args, **kwargs):
        outside = (ids < self.tp_start) | (ids >= self.tp_stop)
        if self.tp_stop == self.tp_start:  # an empty slice: look up a zero row instead
            zero = self.weight.new_zeros((1, self.embedding_dim))
            out = F.embedding(torch.zeros_like(ids), zero)
        else:  # the subclass's forward (a scaled embedding, say) on this rank's rows
            out = super().forward((ids - self.tp_start).masked_fill(outside, 0), *args, **kwargs)
        return self.tp_comm.all_reduce(out.masked_fill(outside.unsqueeze(-1), 0.0))


class _DimParallelEmbedding(_Parallel):
    def forward(self, *args, **kwargs):
        return self.tp_comm.all_gather(super().forward(*args, **kwargs), -1, self.tp_sizes)


# --------------------------------------------------------------------------------------------
# Replicate
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Replicate(Style):
    """Keep the module whole on every device (the default for anything a plan leaves out).

    Example::

        >>> import torch, tensor_parallel as tp
        >>> model = tp.tensor_parallel(torch.nn.Sequential(torch.nn.LayerNorm(4)), ["cpu", "cpu"],
        ...                            plan={"0": tp.Replicate()})
    """

    def shard_specs(self, module, world_size):
        return {}

    def convert(self, module, *, rank, comm, specs):
        return None
