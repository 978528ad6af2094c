"""Splitting: cut tensors into per-rank slices and build one shard module per rank.

A :class:`Shard` says how one tensor is cut: along which dimension, and which index ranges
each rank keeps. Ranges may be uneven (1000 over 3 ranks is 334/333/333), empty (a layer
smaller than the device count) or overlap (a replicated KV head), so one description serves
every style, and the same description gathers the slices back into the full tensor.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import torch
from torch import nn

if TYPE_CHECKING:
    from .comm import Communicator
    from .styles import Style

__all__ = ["Shard", "split_sizes", "even_shard", "assign_heads", "build_shards", "gather_tensor", "layout_for",
           "relocate_shards"]

logger = logging.getLogger(__name__)

Ranges = tuple[tuple[int, int], ...]


def split_sizes(total: int, world_size: int, unit: int = 1) -> list[int]:
    """Cut ``total`` into ``world_size`` sizes, as evenly as possible, in whole ``unit`` s.

    Earlier ranks get the extra units. Sizes may be 0 when there are fewer units than ranks.

    Example::

        >>> split_sizes(1000, 3)
        [334, 333, 333]
        >>> split_sizes(14 * 64, 4, unit=64)  # 14 heads of 64 over 4 devices: 4/4/3/3 heads
        [256, 256, 192, 192]
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    if unit < 1 or total % unit:
        raise ValueError(f"size {total} is not a whole number of units of {unit}")
    units, extra = divmod(total // unit, world_size)
    return [(units + (rank < extra)) * unit for rank in range(world_size)]


@dataclass(frozen=True)
class Shard:
    """How one tensor is cut: rank ``r`` keeps ``ranges[r]`` (concatenated) along ``dim``.

    Example::

        >>> import torch
        >>> shard = Shard(dim=0, size=5, ranges=(((0, 3),), ((3, 5),)))
        >>> shard.take(torch.arange(5), 1), shard.local_size(0)
        (tensor([3, 4]), 3)
    """

    dim: int
    size: int
    ranges: tuple[Ranges, ...]

    def local_size(self, rank: int) -> int:
        """Length of rank ``rank``'s slice along :attr:`dim`."""
        return sum(stop - start for start, stop in self.ranges[rank])

    def take(self, tensor: torch.Tensor, rank: int) -> torch.Tensor:
        """Rank ``rank``'s slice of the full ``tensor`` (a view when it is one range)."""
        dim = self.dim % tensor.dim()
        pieces = [tensor.narrow(dim, start, stop - start) for start, stop in self.ranges[rank]]
        if len(pieces) == 1:
            return pieces[0]
        if not pieces:
            return tensor.narrow(dim, 0, 0)
        return torch.cat(pieces, dim)

    def overlaps(self) -> bool:
        """True when some position is held by more than one rank (a replicated head)."""
        held = [p for ranges in self.ranges for a, b in ranges for p in range(a, b)]
        return len(held) != len(set(held))

    def place(self, full: torch.Tensor, piece: torch.Tensor, rank: int) -> torch.Tensor:
        """Write rank ``rank``'s slice ``piece`` into ``full`` at its positions; return ``full``."""
        dim, offset = self.dim % full.dim(), 0
        for start, stop in self.ranges[rank]:
            full.narrow(dim, start, stop - start).copy_(piece.narrow(dim, offset, stop - start))
            offset += stop - start
        return full

    def is_partition(self) -> bool:
        """True when the slices, in rank order, tile the tensor exactly once."""
        flat = [r for ranges in self.ranges for r in ranges if r[1] > r[0]]
        position = 0
        for start, stop in flat:
            if start != position:
                return False
            position = stop
        return position == self.size


def even_shard(size: int, world_size: int, dim: int, unit: int = 1, parts: int = 1) -> Shard:
    """A :class:`Shard` that cuts ``size`` with :func:`split_sizes`, in rank order.

    With ``parts > 1`` the tensor is ``parts`` equal blocks fused along ``dim`` (q, k and v in
    one Linear) and each block is cut the same way: rank r keeps its slice of every block.

    Example::

        >>> even_shard(6, 2, dim=0, parts=3).ranges
        (((0, 1), (2, 3), (4, 5)), ((1, 2), (3, 4), (5, 6)))
    """
    if parts < 1 or size % parts:
        raise ValueError(f"size {size} is not {parts} equal fused parts")
    block = size // parts
    ranges = [[] for _ in range(world_size)]
    for part in range(parts):
        offset = part * block
        for rank, local in enumerate(split_sizes(block, world_size, unit)):
            ranges[rank].append((offset, offset + local))
            offset += local
    return Shard(dim=dim, size=size, ranges=tuple(tuple(r) for r in ranges))


def assign_heads(num_heads: int, num_kv_heads: int, world_size: int) -> list[tuple[range, range]]:
    """For each rank, the query heads and the key/value heads it holds.

    Every rank gets whole heads, as evenly as possible. With grouped-query attention each rank
    holds the key/value heads its query heads read; when there are fewer key/value heads than
    ranks, a key/value head is replicated on the ranks that share its query group.

    Example::

        >>> assign_heads(14, 14, 4)   # uneven: 4/4/3/3 heads
        [(range(0, 4), range(0, 4)), (range(4, 8), range(4, 8)), (range(8, 11), range(8, 11)), (range(11, 14), range(11, 14))]
        >>> assign_heads(8, 2, 4)     # 2 KV heads over 4 ranks: each is held twice
        [(range(0, 2), range(0, 1)), (range(2, 4), range(0, 1)), (range(4, 6), range(1, 2)), (range(6, 8), range(1, 2))]
    """
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not form whole groups over {num_kv_heads} "
                         f"key/value heads")
    group = num_heads // num_kv_heads
    if num_kv_heads >= world_size or group == 1:
        unit_sizes = split_sizes(num_kv_heads, world_size)
        out, start = [], 0
        for n in unit_sizes:
            out.append((range(start * group, (start + n) * group), range(start, start + n)))
            start += n
        return out
    out = []
    for kv, ranks in enumerate(split_sizes(world_size, num_kv_heads)):
        first = kv * group
        for n in split_sizes(group, ranks):
            out.append((range(first, first + n), range(kv, kv + 1) if n else range(kv, kv)))
            first += n
    return out


def gather_tensor(shard: Shard | None, pieces: Sequence[torch.Tensor],
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Rebuild the full tensor from every rank's slice (``shard=None``: replicated)."""
    if shard is None:
        return pieces[0].detach().to(device, copy=True)
    first = pieces[0]
    dim = shard.dim % first.dim()
    shape = list(first.shape)
    shape[dim] = shard.size
    full = torch.empty(shape, dtype=first.dtype, device=device)
    for rank, piece in enumerate(pieces):
        offset = 0
        for start, stop in shard.ranges[rank]:
            full.narrow(dim, start, stop - start).copy_(piece.detach().narrow(dim, offset, stop - start))
            offset += stop - start
    return full


# --------------------------------------------------------------------------------------------
# Building shards
# --------------------------------------------------------------------------------------------


def _compact_copy(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy on ``device`` that owns exactly its elements (never the parent's storage)."""
    if tensor.device.type == "meta" or device.type == "meta":
        return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
    out = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
    out.copy_(tensor.detach())
    return out


def _placeholder(tensor: torch.Tensor) -> torch.Tensor:
    meta = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(meta, requires_grad=tensor.requires_grad)
    return meta


class _Materializer:
    """Turns placeholders into real per-rank tensors, keeping ties and sharing replicas.

    Replicated parameters of ranks on the same device are the *same* Parameter object, so
    their gradients accumulate into one tensor exactly as in the unsharded model. Buffers are
    never shared between ranks (BatchNorm updates them in place once per rank).
    """

    def __init__(self, origin: Mapping[int, torch.Tensor]) -> None:
        self.origin = origin
        self.cache: dict[tuple, torch.Tensor] = {}
        self.masters: dict[tuple, nn.Parameter] = {}
        self.spec_of: dict[int, tuple[Shard | None, str]] = {}

    def make(self, placeholder: torch.Tensor, shard: Shard | None, where: str,
             rank: int, device: torch.device) -> tuple[torch.Tensor, bool]:
        """The tensor rank ``rank`` holds, and whether it lives on another device (a master
        copy that the rank must copy to its device in each forward)."""
        original = self.origin[id(placeholder)]
        self._check_tie(original, shard, where)
        is_param = isinstance(placeholder, nn.Parameter)
        # a parameter slice that several ranks hold (a replicated tensor, a replicated KV head)
        # is one Parameter, so their gradients add up as in the original; ranks on another
        # device use a copy of it made in forward, through which autograd sums just the same
        piece = None if shard is None else (shard.dim, shard.ranges[rank])
        if is_param and (id(original), piece) in self.masters:
            master, home = self.masters[(id(original), piece)]
            return master, home != device
        key = (id(original), piece, device, None if is_param else rank)
        if key not in self.cache:
            data = original if shard is None else shard.take(original, rank)
            data = _compact_copy(data, device)
            self.cache[key] = nn.Parameter(data, original.requires_grad) if is_param else data
            if is_param:
                self.masters[(id(original), piece)] = (self.cache[key], device)
        return self.cache[key], False

    def _check_tie(self, original: torch.Tensor, shard: Shard | None, where: str) -> None:
        seen = self.spec_of.setdefault(id(original), (shard, where))
        if seen[0] != shard:
            raise ValueError(
                f"'{seen[1]}' and '{where}' share one tensor (tied weights) but the plan cuts it "
                f"differently ({_describe(seen[0])} vs {_describe(shard)}); give both modules "
                f"styles that cut it the same way, or untie them before splitting")


def _describe(shard: Shard | None) -> str:
    return "replicated" if shard is None else f"split along dim {shard.dim}"


def build_shards(module: nn.Module, plan: Mapping[str, "Style"], devices: Sequence[torch.device],
                 communicators: Sequence["Communicator"], *, world_size: int | None = None,
                 ranks: Sequence[int] | None = None) -> tuple[list[nn.Module], dict[str, Shard | None]]:
    """The shards of ``module`` for ``ranks`` (default: all, one per device), cut as ``plan``
    says over ``world_size`` ranks, plus the layout of each state key.

    ``plan`` maps exact module paths to styles (see :func:`tensor_parallel.plan.resolve_plan`).
    The shards share no tensor with ``module``; ``module`` is left unchanged. A process of a
    ``torch.distributed`` job builds only its own rank.
    """
    world_size = world_size or len(devices)
    ranks = list(range(world_size)) if ranks is None else list(ranks)
    originals = _all_tensors(module)
    memo = {id(t): _placeholder(t) for t in originals.values()}
    origin = {id(memo[key]): t for key, t in originals.items()}
    specs = {path: style.shard_specs(module.get_submodule(path), world_size) for path, style in plan.items()}
    tensor_specs = _by_owner(specs)
    materializer = _Materializer(origin)
    shards = []
    for rank, device, comm in zip(ranks, devices, communicators):
        skeleton = copy.deepcopy(module, memo=dict(memo))
        remote: dict[nn.Module, list[str]] = {}
        for path, sub in skeleton.named_modules(remove_duplicate=False):
            local = tensor_specs.get(path, {})
            for table in (sub._parameters, sub._buffers):
                for name, tensor in table.items():
                    if tensor is not None and id(tensor) in origin:
                        where = f"{path}.{name}" if path else name
                        table[name], elsewhere = materializer.make(tensor, local.get(name), where, rank, device)
                        if elsewhere:
                            remote.setdefault(sub, []).append(name)
        for path, style in plan.items():
            style.convert(skeleton.get_submodule(path), rank=rank, comm=comm, specs=specs[path])
        for sub, names in remote.items():
            _copy_in_forward(sub, names, device)
        shards.append(skeleton)
    return shards, _layout(module, tensor_specs)


def _copy_in_forward(module: nn.Module, names: Sequence[str], device: torch.device) -> None:
    """``module`` holds master parameters that live on another device: during its forward it
    uses copies on ``device`` (made differentiably, so gradients reach the master; cached
    while the master is unchanged when no gradient is needed), and the masters otherwise."""
    copies = _RemoteCopies(list(names), device)
    module.register_forward_pre_hook(copies.swap_in)
    module.register_forward_hook(copies.swap_out, always_call=True, prepend=True)  # last in, first out


class _RemoteCopies:
    """The forward hooks of :func:`_copy_in_forward` and the names they swap (a list that
    :func:`_stop_copying` shortens when a parameter comes to live on this rank's device)."""

    def __init__(self, names: list[str], device: torch.device) -> None:
        self.names, self.device = names, device
        self.stash: dict[str, nn.Parameter] = {}
        self.cached: dict[str, tuple[int, int, torch.Tensor]] = {}

    def local_copy(self, name: str, master: nn.Parameter) -> torch.Tensor:
        if torch.is_grad_enabled() and master.requires_grad:
            return master.to(self.device)
        mark = (id(master), master._version)
        if name not in self.cached or self.cached[name][:2] != mark:
            self.cached[name] = (*mark, master.detach().to(self.device))
        return self.cached[name][2]

    def swap_in(self, module: nn.Module, args) -> None:
        for name in self.names:  # the master now held (a load may have replaced the object)
            self.stash[name] = module._parameters[name]
            module._parameters[name] = self.local_copy(name, self.stash[name])  # a plain tensor, for this call

    def swap_out(self, module: nn.Module, args, output) -> None:
        module._parameters.update(self.stash)
        self.stash.clear()


def _refresh_copies(module: nn.Module) -> None:
    """Drop the copies ``module``'s forward keeps of masters on another device (their values
    changed without a version bump, e.g. through ``.data``); the next forward copies anew."""
    for hook in module._forward_pre_hooks.values():
        copies = getattr(hook, "__self__", None)
        if isinstance(copies, _RemoteCopies):
            copies.cached.clear()


def _stop_copying(module: nn.Module, name: str) -> None:
    """``module``'s parameter ``name`` now lives on this rank's device: its forward no longer
    copies it from another device (no-op if it never did)."""
    for hook in module._forward_pre_hooks.values():
        copies = getattr(hook, "__self__", None)
        if isinstance(copies, _RemoteCopies) and name in copies.names:
            copies.names.remove(name)
            copies.cached.pop(name, None)


def relocate_shards(shards: Sequence[nn.Module], devices: Sequence[torch.device]) -> None:
    """Move shards built elsewhere (``delay_init=True`` builds them on the CPU) to ``devices``,
    one per shard, keeping what :func:`build_shards` guarantees: a Parameter that several ranks
    hold (a replicated tensor) stays one object, living on the device of the first rank that
    holds it, and ranks on other devices copy it in forward. Meta tensors stay on meta.

    Example::

        >>> import torch, tensor_parallel as tp
        >>> model = tp.TensorParallel(torch.nn.Sequential(torch.nn.Linear(2, 4)), ["cpu", "cpu"], delay_init=True)
        >>> relocate_shards(model.module_shards, [torch.device("cpu")] * 2)
        >>> model.module_shards[1][0].weight.device
        device(type='cpu')
    """
    home: dict[int, torch.device] = {}
    for shard, device in zip(shards, devices):
        moved: dict[int, torch.Tensor] = {}  # this rank's buffers: a tied buffer moves once
        remote: dict[nn.Module, list[str]] = {}
        for sub in shard.modules():
            for name, param in sub._parameters.items():
                if param is None or param.device.type == "meta":
                    continue
                if id(param) not in home:
                    home[id(param)] = device
                    param.data = param.data.to(device)
                elif home[id(param)] != device:
                    remote.setdefault(sub, []).append(name)
            for name, buffer in sub._buffers.items():
                if buffer is not None and buffer.device.type != "meta":
                    sub._buffers[name] = moved.setdefault(id(buffer), buffer.to(device))
        for sub, names in remote.items():
            _copy_in_forward(sub, names, device)


def layout_for(module: nn.Module, plan: Mapping[str, "Style"], world_size: int) -> dict[str, Shard | None]:
    """How each key of ``module.state_dict()`` is cut over ``world_size`` ranks by a resolved
    ``plan``, without building anything (works on the meta device).

    Example::

        >>> import torch, tensor_parallel as tp
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
        >>> layout_for(mlp, {"0": tp.ColwiseParallel()}, 2)["0.weight"].ranges
        (((0, 3),), ((3, 6),))
    """
    specs = {path: style.shard_specs(module.get_submodule(path), world_size) for path, style in plan.items()}
    return _layout(module, _by_owner(specs))


def _by_owner(specs: Mapping[str, Mapping[str, Shard]]) -> dict[str, dict[str, Shard]]:
    """Style path -> {"child.weight": Shard} becomes owner path -> {"weight": Shard}."""
    owners: dict[str, dict[str, Shard]] = {}
    cut_by: dict[str, str] = {}
    for path, table in specs.items():
        for key, shard in table.items():
            full = f"{path}.{key}" if path else key
            if full in cut_by:
                raise ValueError(f"'{full}' is cut by the style on '{cut_by[full] or '<root>'}' and again by "
                                 f"the style on '{path or '<root>'}'; leave one of them out of the plan")
            cut_by[full] = path
            owner, _, name = full.rpartition(".")
            owners.setdefault(owner, {})[name] = shard
    return owners


def _all_tensors(module: nn.Module) -> dict[int, torch.Tensor]:
    tensors: dict[int, torch.Tensor] = {}
    for sub in module.modules():
        for table in (sub._parameters, sub._buffers):
            for tensor in table.values():
                if tensor is not None:
                    tensors[id(tensor)] = tensor
    return tensors


def _layout(module: nn.Module, specs: Mapping[str, Mapping[str, Shard]]) -> dict[str, Shard | None]:
    """For each key of ``module.state_dict()``: how that tensor is cut (None: replicated)."""
    layout: dict[str, Shard | None] = {}
    for key in module.state_dict(keep_vars=True):
        path, _, name = key.rpartition(".")
        layout[key] = specs.get(path, {}).get(name)
    return layout
