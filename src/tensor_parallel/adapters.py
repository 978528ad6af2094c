"""Adapters added to a model after it was split (``peft.get_peft_model(split_model, config)``).

peft wraps every matching layer of every shard in an adapter layer of its own, with branches
sized from the split layer (a column-split layer's ``lora_B`` has its rank's output rows, a
row-split layer's ``lora_A`` its input columns) and initialised per shard. The split model
takes such layers over before it next runs, saves or loads: each branch tensor the style cuts
stays with its rank (its slice of the adapter), each replicated one becomes rank 0's (shared
by the ranks of a device, or copied in forward on another device; broadcast from rank 0 under
torch.distributed), and the branches are converted like those of an adapter present at split
time. Anything else that replaced a split layer is refused with an error naming it.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from .split import Shard, _copy_in_forward, gather_tensor, _refresh_copies
from .styles import (_ColumnParallel, _GatherOutput, _Parallel, _RowParallel, _convert_class, _convert_column,
                     _convert_row, _under, adapter_kind, column_cut, linear_kind, row_cut)

if TYPE_CHECKING:
    from .runtime import TensorParallel

__all__ = ["adopt_adapters"]

logger = logging.getLogger(__name__)


@dataclass
class _Entry:
    """A split layer of one shard: where it sits, and once wrapped, the adapter branches taken over."""

    path: str
    parent: nn.Module
    name: str
    layer: nn.Module  # the split layer, or the adapter layer around it once taken over
    branches: tuple[tuple[str, str], ...] | None = None

    def changed(self) -> bool:
        current = self.parent._modules.get(self.name)
        if current is not self.layer:
            return True
        return self.branches is not None and tuple(adapter_kind(current).branches(current)) != self.branches


class _SplitLayers:
    """Where each split layer of each shard sits, so that an adapter layer that replaced one,
    or a new adapter added to one, is noticed at the cost of one lookup per split layer."""

    def __init__(self, shards: Sequence[nn.Module]) -> None:
        self.per_shard = [_converted(shard) for shard in shards]
        self.mark_shared_bases()

    def mark_shared_bases(self) -> None:
        """An adapter layer whose base weight is the very tensor of an earlier rank's (ranks of
        one device holding the same replicated KV head) must not merge into it a second time."""
        for entries in zip(*self.per_shard):
            seen: set[int] = set()
            for entry in entries:
                if entry.branches is None:
                    continue
                weight = entry.layer.get_submodule(adapter_kind(entry.layer).base).weight
                if id(weight) in seen and not isinstance(entry.layer, _MergeElsewhere):
                    _convert_class(entry.layer, _MergeElsewhere)
                seen.add(id(weight))

    def changed(self) -> list[int]:
        """Indexes of the layers that changed on every shard (peft changes one shard at a time)."""
        return [i for i, entry in enumerate(self.per_shard[0])
                if entry.changed() and all(entries[i].changed() for entries in self.per_shard[1:])]


def _converted(module: nn.Module, path: str = "") -> list[_Entry]:
    """The layers under ``module`` that adapters can wrap: split layers, and replicated linear
    layers and embeddings; an adapter layer around one stands for it and its branches."""
    out = []
    for name, child in module._modules.items():
        if child is None:
            continue
        where = f"{path}.{name}" if path else name
        kind = adapter_kind(child)
        if kind is not None:
            out.append(_Entry(where, module, name, child, tuple(kind.branches(child))))
        elif isinstance(child, (_Parallel, nn.Embedding)) or linear_kind(child) is not None:
            out.append(_Entry(where, module, name, child))
        else:
            out += _converted(child, where)
    return out


class _MergeElsewhere:
    """An adapter layer whose base tensors another rank's adapter layer merges into: it merges
    into scratch copies, so the shared tensors get each delta once (and copies of them made
    for another device are made anew)."""

    def merge(self, *args, **kwargs):
        with _scratch_base(self):
            return super().merge(*args, **kwargs)

    def unmerge(self, *args, **kwargs):
        with _scratch_base(self):
            return super().unmerge(*args, **kwargs)


@contextlib.contextmanager
def _scratch_base(layer: nn.Module):
    base = layer.get_submodule(adapter_kind(layer).base)
    shared = dict(base._parameters)
    for name, param in shared.items():
        if param is not None:
            base._parameters[name] = nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
    try:
        yield
    finally:
        base._parameters.update(shared)
        _refresh_copies(base)  # the shared tensors changed under the copies made of them


def adopt_adapters(split: "TensorParallel") -> None:
    """Take over the adapter layers (and adapters) added to split layers since the last call:
    a no-op, at the cost of one lookup per split layer, when there are none.

    Example::

        >>> import collections, torch, peft, tensor_parallel as tp
        >>> mlp = torch.nn.Sequential(collections.OrderedDict(
        ...     up=torch.nn.Linear(8, 16), act=torch.nn.ReLU(), down=torch.nn.Linear(16, 8)))
        >>> split = tp.tensor_parallel(mlp, ["cpu", "cpu"])
        >>> lora = peft.get_peft_model(split, peft.LoraConfig(target_modules=["up", "down"], r=2))
        >>> split.layout["up.lora_B.default.weight"].ranges   # lora_B: output rows, like "up"
        (((0, 8),), ((8, 16),))
        >>> split.layout["down.lora_A.default.weight"].ranges  # lora_A: input columns, like "down"
        (((0, 8),), ((8, 16),))
    """
    changed = split.split_layers.changed()
    for index in changed:
        entries = [entries[index] for entries in split.split_layers.per_shard]
        _adopt(split, entries)
    if changed:
        split.split_layers.mark_shared_bases()
        split.install_gradient_sums()
        split.reset_cuda_graphs()  # the captured forwards do not run the new adapters
        logger.info("took over adapters on %d split layers", len(changed))


def _adopt(split: "TensorParallel", entries: list[_Entry]) -> None:
    path = entries[0].path
    wrappers = [entry.parent._modules[entry.name] for entry in entries]
    if entries[0].branches is not None and adapter_kind(wrappers[0]) is None:  # unwrapped again (merged)
        _forget(split, entries, wrappers)
        return
    kind = adapter_kind(wrappers[0])
    if entries[0].branches is None:  # the layer itself, now wrapped
        for wrapper, entry in zip(wrappers, entries):
            if kind is None or wrapper.get_submodule(kind.base) is not entry.layer:
                raise ValueError(f"the layer '{path}' of the split model was replaced by {type(wrapper).__name__} "
                                 f"after splitting; only adapter layers around it (peft's LoRA) can be added to a "
                                 f"split model. Change the model before splitting it")
        if isinstance(entries[0].layer, _Parallel) and not isinstance(entries[0].layer, (_ColumnParallel, _RowParallel)):
            raise TypeError(f"adapters on '{path}' ({type(entries[0].layer).__name__}) cannot be split with it; "
                            f"leave it out of the adapter's target modules")
        _rename_keys(split, path, f"{path}.{kind.base}")
    kind.check(wrappers[0], path)
    layers = [wrapper.get_submodule(kind.base) for wrapper in wrappers]
    new = [branch for branch in kind.branches(wrappers[0]) if branch not in (entries[0].branches or ())]
    specs = _branch_specs(split, path, wrappers[0], layers[0], kind.base)
    for key in _branch_keys(wrappers[0], new):
        _place(split, wrappers, key, specs.get(key))
        split.layout[f"{path}.{key}"] = specs.get(key)
    for rank, comm, wrapper, layer, entry in zip(split.shard_ranks, split._comms, wrappers, layers, entries):
        for down_path, up_path in new:
            if isinstance(layer, _ColumnParallel):
                _convert_column(wrapper.get_submodule(up_path), rank, comm, _under(specs, up_path), False)
            elif isinstance(layer, _RowParallel):
                _convert_row(wrapper.get_submodule(down_path), rank, comm, _under(specs, down_path))
        if isinstance(layer, _ColumnParallel) and layer.tp_gather:  # gather base + branches, not the base alone
            layer.tp_gather = False
            wrapper.tp_comm, wrapper.tp_kind, wrapper.tp_sizes = comm, layer.tp_kind, layer.tp_sizes
            _convert_class(wrapper, _GatherOutput)
        entry.layer, entry.branches = wrapper, tuple(kind.branches(wrapper))


def _branch_specs(split: "TensorParallel", path: str, wrapper: nn.Module, layer: nn.Module,
                  base: str) -> dict[str, Shard]:
    """How the wrapped layer's style cuts the adapter layer's tensors (nothing: replicated)."""
    if not isinstance(layer, (_ColumnParallel, _RowParallel)):
        return {}
    cut = split.layout[f"{path}.{base}.weight"]
    return (column_cut if isinstance(layer, _ColumnParallel) else row_cut)(wrapper, cut.size, cut.ranges)


def _forget(split: "TensorParallel", entries: list[_Entry], layers: list[nn.Module]) -> None:
    """The adapter layers were replaced by their split layers (``merge_and_unload``): drop the
    branches' keys, and the base's keys are the layer's own again."""
    path, base = entries[0].path, adapter_kind(entries[0].layer).base
    for wrapper, layer in zip((entry.layer for entry in entries), layers):
        if wrapper.get_submodule(base) is not layer:
            raise ValueError(f"the adapter layer '{path}' was replaced by {type(layer).__name__}, not by its own "
                             f"split layer; change the model before splitting it")
    for key in [k for k in split.layout if k.startswith(path + ".") and not k.startswith(f"{path}.{base}.")]:
        del split.layout[key]
    _rename_keys(split, f"{path}.{base}", path)
    for entry, layer in zip(entries, layers):
        if isinstance(entry.layer, _GatherOutput):  # the layer gathers its own output again
            layer.tp_gather = True
        entry.layer, entry.branches = layer, None


def _rename_keys(split: "TensorParallel", old: str, new: str) -> None:
    """The tensors directly under module path ``old`` move to module path ``new``."""
    for key in [k for k in split.layout if k.rpartition(".")[0] == old]:
        renamed = f"{new}.{key.rpartition('.')[2]}"
        split.layout[renamed] = split.layout.pop(key)
        if key in split.sharded_keys:
            split.sharded_keys.discard(key)
            split.sharded_keys.add(renamed)


def _branch_keys(wrapper: nn.Module, branches: Sequence[tuple[str, str]]) -> list[str]:
    keys = []
    for down_path, up_path in branches:
        for prefix in (down_path, up_path):
            keys += [f"{prefix}.{name}" for name, _ in wrapper.get_submodule(prefix).named_parameters()]
    return keys


def _place(split: "TensorParallel", wrappers: list[nn.Module], key: str, spec: Shard | None) -> None:
    """Make each rank hold its slice of the adapter tensor ``key`` (all of it when replicated)."""
    owner_path, _, name = key.rpartition(".")
    owners = [wrapper.get_submodule(owner_path) for wrapper in wrappers]
    tensors = [owner._parameters[name] for owner in owners]
    if spec is not None and all(t.shape[spec.dim] == spec.local_size(r) for t, r in zip(tensors, split.shard_ranks)):
        if spec.overlaps():  # ranks that share rows (a replicated KV head) must agree on them
            whole = gather_tensor(spec, split._pieces(spec, [t.detach() for t in tensors]), tensors[0].device)
            with torch.no_grad():
                for tensor, rank in zip(tensors, split.shard_ranks):
                    tensor.copy_(spec.take(whole, rank))
        return  # created at the rank's size: its slice of the adapter
    if split.distributed:
        with torch.no_grad():
            first = tensors[0].detach() * (1 if split.shard_ranks[0] == 0 else 0)
            whole = split._comms[0].sum_over_ranks(first)  # rank 0's tensor on every rank
    else:
        whole = tensors[0].detach()
    if spec is None and not split.distributed:  # one master, as at split time: other devices copy it
        for owner, device in zip(owners, split.devices):
            owner._parameters[name] = tensors[0]
            if device != split.devices[0]:
                _copy_in_forward(owner, [name], device)
        return
    if spec is not None and whole.shape[spec.dim] != spec.size:
        raise ValueError(f"the adapter tensor '{key}' has {whole.shape[spec.dim]} features along dim {spec.dim}: "
                         f"neither this rank's {spec.local_size(split.shard_ranks[0])} nor the layer's {spec.size}")
    for owner, rank, device, tensor in zip(owners, split.shard_ranks, split.devices, tensors):
        value = whole if spec is None else spec.take(whole, rank)
        owner._parameters[name] = _parameter(value, device, tensor)


def _parameter(value: torch.Tensor, device: torch.device, like: nn.Parameter) -> nn.Parameter:
    data = torch.empty(value.shape, dtype=value.dtype, device=device)
    data.copy_(value)
    return nn.Parameter(data, requires_grad=like.requires_grad)

