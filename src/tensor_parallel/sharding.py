"""ZeRO-3 sharding of the parameters a plan keeps whole (``sharded=True``).

A plan replicates what it does not split: norms, the biases of row splits, small embeddings.
:func:`shard_replicated` stores each such parameter once, cut 1/N over the ranks (along its
largest dimension, as evenly as possible), at its usual place and name in each shard, so
``state_dict``, checkpoints, optimizers and loads see ordinary tensors of their own.

Whenever a module that owns such pieces runs, its ranks all-gather them into the full tensors
(one collective per module and dtype) and the module runs with those; the full tensors are
dropped after its forward. Backward sends each rank its slice of the summed gradient: in one
process the all-gather's backward is a reduce-scatter over the ranks; under torch.distributed
every rank computes the replicated part of the model identically, so the gradient of a full
tensor is already the sum and each rank keeps its slice (no collective).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import TYPE_CHECKING, Collection, Sequence

import torch
from torch import nn

from .split import Shard, _compact_copy, _RemoteCopies, even_shard, _stop_copying

if TYPE_CHECKING:
    from .comm import Communicator
    from .runtime import TensorParallel

__all__ = ["shard_replicated", "replicated_cut", "parameters_by_device"]

logger = logging.getLogger(__name__)


def replicated_cut(shape: Sequence[int], world_size: int) -> Shard:
    """How :func:`shard_replicated` cuts a tensor of ``shape``: along its largest dimension
    (the first of equals), as evenly as possible.

    Example::

        >>> replicated_cut((64, 48), 3).ranges
        (((0, 22),), ((22, 43),), ((43, 64),))
        >>> replicated_cut((1, 48), 2).dim   # a [1, 48] table is cut along its 48 columns
        1
    """
    if not shape:
        raise ValueError("a 0-dimensional tensor cannot be cut")
    dim = max(range(len(shape)), key=lambda d: (shape[d], -d))
    return even_shard(shape[dim], world_size, dim)


def _split_module(model: nn.Module) -> "TensorParallel":
    from .runtime import TensorParallel

    if isinstance(model, TensorParallel):
        return model
    found = [m for m in model.modules() if isinstance(m, TensorParallel)]
    if len(found) != 1:
        raise TypeError(f"expected a model made by tensor_parallel(), got {type(model).__name__} with "
                        f"{len(found)} split modules inside")
    return found[0]


def shard_replicated(model: nn.Module, param_names: Collection[str] | None = None) -> None:
    """Store the replicated parameters of a split model once, cut 1/N over its ranks (ZeRO-3).

    ``param_names`` are the original module's parameter names (``"transformer.ln_f.weight"``);
    ``None`` means every replicated parameter with at least one dimension. Works in place, also
    on a model built on the meta device (loads then fill each rank's piece), and is idempotent.

    Example::

        >>> import torch, tensor_parallel as tp
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8))
        >>> model = tp.tensor_parallel(mlp, ["cpu", "cpu"])
        >>> shard_replicated(model, ["1.weight"])
        >>> model.module_shards[1][1].weight.shape   # 16 of the LayerNorm's 32 weights
        torch.Size([16])
        >>> torch.allclose(model(torch.ones(1, 8)), mlp(torch.ones(1, 8)), atol=1e-6)
        True
    """
    split = _split_module(model)
    groups = _replicated_groups(split)
    chosen = list(groups.values()) if param_names is None else _chosen(split, groups, param_names)
    if split.world_size == 1:
        logger.info("one rank: nothing to shard")
        return
    holders = [_holders_by_tensor(shard) for shard in split.module_shards]
    for keys in chosen:
        _shard_group(split, keys, holders)
    logger.info("sharded %d replicated parameters over %d ranks", len(chosen), split.world_size)


def _replicated_groups(split: "TensorParallel") -> dict[int, tuple[str, ...]]:
    """Keys of replicated, not yet sharded parameters of rank 0's shard, grouped by tensor
    (tied weights are one group), each with at least one dimension and one element."""
    groups: dict[int, list[str]] = defaultdict(list)
    for key, param in split.module_shards[0].named_parameters(remove_duplicate=False):
        if split.layout.get(key, 0) is None and param.dim() > 0 and param.numel() > 0:
            groups[id(param)].append(key)
    return {i: tuple(keys) for i, keys in groups.items()}


def _chosen(split: "TensorParallel", groups: dict[int, tuple[str, ...]],
            names: Collection[str]) -> list[tuple[str, ...]]:
    if isinstance(names, str):
        raise TypeError(f"sharded_param_names must be a collection of names, got the string {names!r}")
    names = list(names)
    params = dict(split.module_shards[0].named_parameters(remove_duplicate=False))
    group_of = {key: keys for keys in groups.values() for key in keys}
    unknown = [n for n in names if n not in params]
    if unknown:
        replicated = sorted(group_of)
        raise ValueError(f"sharded_param_names names {unknown}, which are not parameters of the model; "
                         f"its replicated parameters are {replicated[:8]}{' ...' if len(replicated) > 8 else ''}")
    cut = [n for n in names if n not in group_of and n not in split.sharded_keys]
    if cut:
        reasons = {n: "a scalar" if params[n].dim() == 0 else "split by the plan" for n in cut}
        raise ValueError(f"sharded_param_names names parameters that are not whole tensors replicated on "
                         f"every rank: {reasons}; shard only parameters the plan replicates")
    return list(dict.fromkeys(group_of[n] for n in names if n in group_of))


def _holders_by_tensor(shard: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Every (module, name) of ``shard`` holding each parameter (tied weights: several)."""
    holders: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
    for module in shard.modules():
        for name, param in module._parameters.items():
            if param is not None:
                holders[id(param)].append((module, name))
    return holders


def _shard_group(split: "TensorParallel", keys: tuple[str, ...], holders) -> None:
    """Replace the tensor at ``keys`` in every local shard by that rank's piece."""
    cut = None
    for index, (rank, shard, device, comm) in enumerate(zip(split.shard_ranks, split.module_shards,
                                                             split.devices, split._comms)):
        whole = shard.get_parameter(keys[0])
        cut = cut or replicated_cut(tuple(whole.shape), split.world_size)
        piece = nn.Parameter(_compact_copy(cut.take(whole.detach(), rank), device),
                             requires_grad=whole.requires_grad)
        for module, name in holders[index].pop(id(whole)):
            module._parameters[name] = piece
            _stop_copying(module, name)
            _gather_hook(module, comm).pieces[name] = cut
    for key in keys:
        split.layout[key] = cut
        split.sharded_keys.add(key)


def _gather_hook(module: nn.Module, comm: "Communicator") -> "_GatherPieces":
    for hook in module._forward_pre_hooks.values():
        if isinstance(getattr(hook, "__self__", None), _GatherPieces):
            return hook.__self__
    gather = _GatherPieces(comm)
    # outermost: other hooks of the module (a gradient sum over the ranks) see the full tensors
    module.register_forward_pre_hook(gather.swap_in, prepend=True)
    module.register_forward_hook(gather.swap_out, always_call=True)
    return gather


class _GatherPieces:
    """Forward hooks of a module that owns sharded pieces: all-gather them into the full
    tensors for its forward (one collective per dtype), put the pieces back after it."""

    def __init__(self, comm: "Communicator") -> None:
        self.comm = comm
        self.pieces: dict[str, Shard] = {}
        self.stash: dict[str, nn.Parameter] = {}

    def swap_in(self, module: nn.Module, args) -> None:
        by_dtype: dict[torch.dtype, list[str]] = defaultdict(list)
        for name in self.pieces:
            by_dtype[module._parameters[name].dtype].append(name)
        for names in by_dtype.values():
            full = self._gather([module._parameters[n] for n in names], [self.pieces[n] for n in names])
            for name, tensor in zip(names, full):
                self.stash[name] = module._parameters[name]
                module._parameters[name] = tensor  # a plain tensor, for this call

    def swap_out(self, module: nn.Module, args, output) -> None:
        module._parameters.update(self.stash)
        self.stash.clear()

    def _gather(self, pieces: list[torch.Tensor], cuts: list[Shard]) -> list[torch.Tensor]:
        world = self.comm.world_size
        inner = [_inner_size(piece, cut) for piece, cut in zip(pieces, cuts)]
        sizes = [[cut.local_size(r) * n for cut, n in zip(cuts, inner)] for r in range(world)]
        flat = torch.cat([piece.reshape(-1) for piece in pieces])
        totals = [sum(s) for s in sizes]
        gathered = self.comm.all_gather(flat, 0, totals).split(totals)
        full = []
        for i, (piece, cut) in enumerate(zip(pieces, cuts)):
            parts = []
            for r in range(world):
                shape = list(piece.shape)
                shape[cut.dim] = cut.local_size(r)
                offset = sum(sizes[r][:i])
                parts.append(gathered[r].narrow(0, offset, sizes[r][i]).view(shape))
            full.append(torch.cat(parts, cut.dim))
        return full


def _inner_size(piece: torch.Tensor, cut: Shard) -> int:
    """Elements per position along the cut dimension."""
    size = 1
    for d, n in enumerate(piece.shape):
        if d != cut.dim:
            size *= n
    return size


def parameters_by_device(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The parameters stored on each device of a split model, each counted once: a parameter
    that ranks on one device share counts once, and a replicated parameter that a rank on
    another device only copies in forward counts only where it lives.

    Example::

        >>> import torch, tensor_parallel as tp
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8),
        ...                           torch.nn.LayerNorm(8))
        >>> def nbytes(model):
        ...     return {d: sum(p.numel() * p.element_size() for p in ps)
        ...             for d, ps in tp.parameters_by_device(model).items()}
        >>> nbytes(tp.tensor_parallel(mlp, ["cpu:0", "cpu:1"]))  # LayerNorm, row bias: on cpu:0
        {'cpu:0': 1184, 'cpu:1': 1088}
        >>> nbytes(tp.tensor_parallel(mlp, ["cpu:0", "cpu:1"], sharded=True))  # half on each
        {'cpu:0': 1136, 'cpu:1': 1136}
    """
    split = _split_module(model)
    out: dict[str, dict[int, nn.Parameter]] = defaultdict(dict)
    for shard, device in zip(split.module_shards, split.devices):
        copied = {id(m._parameters[n]) for m in shard.modules() for n in _copied_names(m)}
        for param in shard.parameters():
            if id(param) not in copied:
                out[str(device)].setdefault(id(param), param)
    return {device: list(params.values()) for device, params in out.items()}


def _copied_names(module: nn.Module) -> list[str]:
    names: list[str] = []
    for hook in module._forward_pre_hooks.values():
        if isinstance(getattr(hook, "__self__", None), _RemoteCopies):
            names += hook.__self__.names
    return names
