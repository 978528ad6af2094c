"""Gradients of tensors that several ranks hold overlapping slices of.

A KV head replicated inside a fused q|k|v weight sits in the slice of every rank whose query
heads read it, each in a Parameter of its own (the slices differ elsewhere). Each rank's
backward gives it only its part of that head's gradient; the unsharded model's one tensor
would get the sum. These hooks add the parts up, before accumulation, so gradient accumulation
over several backward passes stays exact:

* one process: once every rank's incoming gradient has arrived and been accumulated, each
  parameter gets the other ranks' parts of the rows it shares;
* torch.distributed: each rank all-reduces its incoming gradient, placed in a full-size
  buffer, and keeps its own slice of the sum.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .split import Shard

__all__ = ["sum_overlapping_gradients"]

_INSTALLED = "_tp_gradient_sum_installed"


def sum_overlapping_gradients(shards: Sequence[nn.Module], ranks: Sequence[int],
                              layout: Mapping[str, Shard | None], comms: Sequence[Any], *,
                              distributed: bool) -> None:
    """Hook every parameter whose slice overlaps another rank's (idempotent).

    Example::

        >>> import torch, tensor_parallel as tp
        >>> model = tp.tensor_parallel(torch.nn.Sequential(torch.nn.Linear(2, 4)), ["cpu", "cpu"])
        >>> model.install_gradient_sums()  # nothing overlaps here: no hook
    """
    for key, shard in layout.items():
        if shard is None or not shard.overlaps():
            continue
        params = [(rank, _parameter(module, key)) for rank, module in zip(ranks, shards)]
        params = [(rank, p) for rank, p in params if p is not None and p.requires_grad]
        if not params or getattr(params[0][1], _INSTALLED, False):
            continue
        if distributed:
            _all_reduce_hook(params[0][1], shard, comms[0])
        else:
            _in_process_hooks(params, shard)


def _parameter(module: nn.Module, key: str) -> nn.Parameter | None:
    path, _, name = key.rpartition(".")
    owner = module.get_submodule(path) if path else module
    param = owner._parameters.get(name)
    return param if isinstance(param, nn.Parameter) and param.device.type != "meta" else None


def _full(shard: Shard, piece: torch.Tensor, rank: int) -> torch.Tensor:
    shape = list(piece.shape)
    shape[shard.dim % piece.dim()] = shard.size
    return shard.place(piece.new_zeros(shape), piece, rank)


def _all_reduce_hook(param: nn.Parameter, shard: Shard, comm) -> None:
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return shard.take(comm.sum_over_ranks(_full(shard, grad, comm.rank)), comm.rank).contiguous()

    param.register_hook(hook)
    setattr(param, _INSTALLED, True)


def _in_process_hooks(params: list[tuple[int, nn.Parameter]], shard: Shard) -> None:
    unique = list({id(p): (rank, p) for rank, p in params}.values())
    if len(unique) < 2:
        return
    incoming: dict[int, torch.Tensor] = {}
    arrived: list[int] = []

    def keep(rank: int):
        def hook(grad: torch.Tensor) -> None:
            if rank in incoming:  # a backward in which some rank got no gradient: start over
                incoming.clear()
                arrived.clear()
            incoming[rank] = grad
        return hook

    def settle(rank: int):
        def hook(param: nn.Parameter) -> None:
            arrived.append(rank)
            if len(arrived) < len(unique):
                return
            total = None
            for r, grad in incoming.items():
                placed = _full(shard, grad.to(unique[0][1].device), r)
                total = placed if total is None else total.add_(placed)
            for r, p in unique:
                if r in incoming:  # add the other ranks' parts of the rows this rank shares
                    mine = _full(shard, incoming[r].to(total.device), r)
                    p.grad.add_(shard.take(total - mine, r).to(p.device))  # 0 where only r holds
            incoming.clear()
            arrived.clear()
        return hook

    for rank, param in unique:
        param.register_hook(keep(rank))
        param.register_post_accumulate_grad_hook(settle(rank))
        setattr(param, _INSTALLED, True)
