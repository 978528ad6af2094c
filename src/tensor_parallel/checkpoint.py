"""Checkpoints: writing state in size-bounded files with an index, and the unsharded view."""

from __future__ import annotations

import abc
import contextlib
import json
import logging
import os
import pickle
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

if TYPE_CHECKING:
    from .split import Shard

__all__ = ["save_tensor_parallel", "write_checkpoint", "parse_size", "infer_sharded_device_map",
           "CheckpointError", "TensorSource", "FileSource", "SplitSource", "TensorInfo", "load_shards",
           "LazyTensor", "unsharded_tensors", "split_tensors", "load_split_state_dict", "set_unsharded_saving"]

logger = logging.getLogger(__name__)

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string such as ``"6GB"``, ``"500MiB"`` or ``"100KB"``.

    Example::

        >>> parse_size("6GB"), parse_size("16MiB"), parse_size(1000)
        (6000000000, 16777216, 1000)
    """
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(size))
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"max_shard_size={size!r} is not a size; write it like 6GB, 500MB or 16MiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def _progress(total: int, description: str, enabled: bool | None):
    """A tqdm bar on interactive terminals (or when asked), else a silent stand-in."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with transformers and huggingface_hub
        enabled = False
    if not enabled:
        return contextlib.nullcontext(_Silent())
    return tqdm(total=total, desc=description, unit="B", unit_scale=True)


class _Silent:
    def update(self, n: int) -> None:
        """Nothing to show."""


def _plan_files(sizes: Mapping[str, int], max_bytes: int) -> list[list[str]]:
    """Keys grouped into files of at most ``max_bytes`` (a larger tensor gets a file alone)."""
    files: list[list[str]] = [[]]
    used = 0
    for key, size in sizes.items():
        if files[-1] and used + size > max_bytes:
            files.append([])
            used = 0
        files[-1].append(key)
        used += size
    return files


@dataclass(frozen=True)
class LazyTensor:
    """A tensor produced only when its file is written (``load()``), so that a save holds one
    file's tensors at a time, never the whole model."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]

    def numel(self) -> int:
        total = 1
        for size in self.shape:
            total *= size
        return total

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


def write_checkpoint(tensors: Iterable[tuple[str, torch.Tensor | LazyTensor]] | Mapping[str, torch.Tensor | LazyTensor],
                     directory: str | os.PathLike, *, max_shard_size: int | str = "5GB",
                     safe_serialization: bool = True, index_name: str | None = None,
                     metadata: Mapping[str, str] | None = None, progress: bool | None = None,
                     extra_files: Mapping[str, str] | None = None) -> list[str]:
    """Write ``tensors`` into files of at most ``max_shard_size`` plus an index, atomically.

    Everything is written to a temporary folder beside ``directory`` and moved into place at
    the end: a save that is killed half-way leaves the previous checkpoint untouched.
    ``extra_files`` maps file names to text (a config) written alongside. Returns the names
    of the weight files.

    Example::

        >>> import tempfile, torch, os
        >>> folder = tempfile.mkdtemp()
        >>> write_checkpoint({"a": torch.zeros(4), "b": torch.ones(4)}, folder, max_shard_size=16)
        ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
    """
    items = dict(tensors)
    max_bytes = parse_size(max_shard_size)
    sizes = {k: t.numel() * t.element_size() for k, t in items.items()}
    groups = _plan_files(sizes, max_bytes)
    stem, ext = ("model", "safetensors") if safe_serialization else ("pytorch_model", "bin")
    names = [f"{stem}-{i + 1:05d}-of-{len(groups):05d}.{ext}" for i in range(len(groups))]
    directory = os.fspath(directory)
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tmp-tensor-parallel-", dir=parent)
    try:
        with _progress(sum(sizes.values()), f"saving {os.path.basename(directory)}", progress) as bar:
            for name, group in zip(names, groups):
                _write_file(os.path.join(staging, name), {k: items[k] for k in group}, metadata, safe_serialization)
                bar.update(sum(sizes[k] for k in group))
        index = {"metadata": {"total_size": sum(sizes.values()), **(metadata or {})},
                 "weight_map": {k: name for name, group in zip(names, groups) for k in group}}
        index_name = index_name or f"{stem}.{ext}.index.json"
        with open(os.path.join(staging, index_name), "w") as handle:
            json.dump(index, handle, indent=2, sort_keys=True)
        for name, text in (extra_files or {}).items():
            with open(os.path.join(staging, name), "w") as handle:
                handle.write(text)
        _replace_folder(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("wrote %d tensors (%d bytes) in %d files to %s", len(items), sum(sizes.values()),
                len(names), directory)
    return names


def _write_file(path: str, tensors: Mapping[str, torch.Tensor | LazyTensor], metadata, safe: bool) -> None:
    owned = {}
    for key, tensor in tensors.items():
        tensor = tensor.load() if isinstance(tensor, LazyTensor) else tensor
        owned[key] = tensor.detach().to("cpu").contiguous().clone()
    if safe:
        from safetensors.torch import save_file

        save_file(owned, path, metadata={"format": "pt", **(metadata or {})})
    else:
        torch.save(owned, path)


def _replace_folder(staging: str, directory: str) -> None:
    """Move ``staging`` to ``directory``; an existing ``directory`` is replaced only now."""
    if os.path.isdir(directory):
        old = directory + ".old-tensor-parallel"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(staging, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, directory)


def _accelerate_device(device: torch.device) -> int | str:
    return device.index if device.type == "cuda" else str(device)


def infer_sharded_device_map(tp_model: nn.Module) -> dict[str, int | str]:
    """A device map for accelerate: each shard's module path to that shard's device (a GPU
    index or ``"cpu"``, as accelerate spells devices).

    Example::

        >>> import torch, tensor_parallel as tp
        >>> model = tp.tensor_parallel(torch.nn.Sequential(torch.nn.Linear(2, 4)), ["cpu", "cpu"])
        >>> tp.infer_sharded_device_map(model)
        {'module_shards.0': 'cpu', 'module_shards.1': 'cpu'}
    """
    from .runtime import TensorParallel

    for path, module in tp_model.named_modules():
        if isinstance(module, TensorParallel):
            prefix = f"{path}." if path else ""
            return {f"{prefix}module_shards.{rank}": _accelerate_device(device)
                    for rank, device in enumerate(module.devices)}
    raise TypeError(f"infer_sharded_device_map expects a model made by tensor_parallel(), got "
                    f"{type(tp_model).__name__} with no split module inside")


@contextlib.contextmanager
def save_tensor_parallel(model: nn.Module) -> Iterator[nn.Module]:
    """Inside this block, ``model.state_dict()`` returns the unsharded state with the original
    module's keys, and ``save_pretrained`` of a split transformers model writes an ordinary
    checkpoint (the name and behaviour of the original library's context manager). ``model``
    may also hold the split model, e.g. a peft model around it: ``save_pretrained`` of the peft
    model then writes ordinary adapter weights.

    Example::

        >>> import torch, tensor_parallel as tp
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
        >>> model = tp.tensor_parallel(mlp, ["cpu", "cpu"])
        >>> with tp.save_tensor_parallel(model):
        ...     state = model.state_dict()
        >>> sorted(state) == sorted(mlp.state_dict())
        True
    """
    set_unsharded_saving(model, True)
    try:
        yield model
    finally:
        set_unsharded_saving(model, False)


def set_unsharded_saving(model: nn.Module, unsharded: bool) -> None:
    """Make ``model.state_dict()`` (and ``save_pretrained``) give the unsharded state, or the
    split state again. The original's ``model.set_preserve_shards_when_saving(not unsharded)``.

    Example::

        >>> import torch, tensor_parallel as tp
        >>> model = tp.tensor_parallel(torch.nn.Sequential(torch.nn.Linear(2, 4)), ["cpu", "cpu"])
        >>> set_unsharded_saving(model, True); sorted(model.state_dict())
        ['0.bias', '0.weight']
        >>> set_unsharded_saving(model, False); len(model.state_dict())
        4
    """
    from .runtime import TensorParallel

    split, stack = [], [model]
    while stack:  # not model.modules(): in the unsharded view a split model lists the original's
        module = stack.pop()
        split += [module] if isinstance(module, TensorParallel) else []
        stack += [child for child in module._modules.values() if child is not None]
    if not split:
        raise TypeError(f"save_tensor_parallel expects a model made by tensor_parallel(), got "
                        f"{type(model).__name__} with no split module inside")
    for module in split:  # save_pretrained of a split transformers model reads it too
        module._unsharded_view = unsharded


# --------------------------------------------------------------------------------------------
# Reading: sources that hand out slices of full tensors without reading the rest
# --------------------------------------------------------------------------------------------


class CheckpointError(ValueError):
    """A checkpoint does not match the model: the message names the file and the tensor."""


@dataclass(frozen=True)
class TensorInfo:
    """Where a full tensor lives and what it is."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str


class TensorSource(abc.ABC):
    """Full tensors by name, read a slice at a time."""

    @abc.abstractmethod
    def keys(self) -> list[str]:
        """Names of the full tensors."""

    @abc.abstractmethod
    def info(self, key: str) -> TensorInfo:
        """Shape, dtype and file of the full tensor ``key``."""

    @abc.abstractmethod
    def read(self, key: str, shard: "Shard | None", rank: int) -> torch.Tensor:
        """Rank ``rank``'s slice of ``key`` cut by ``shard`` (None: the whole tensor)."""

    def close(self) -> None:
        """Release open files."""


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


class FileSource(TensorSource):
    """An ordinary checkpoint folder or file: ``model.safetensors``, sharded safetensors with an
    index, or ``.bin`` files (read with ``weights_only=True``, memory-mapped).

    Example::

        >>> import tempfile, torch
        >>> folder = tempfile.mkdtemp()
        >>> _ = write_checkpoint({"w": torch.arange(6.0).reshape(3, 2)}, folder)
        >>> source = FileSource(folder)
        >>> source.info("w").shape
        (3, 2)
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self.folder = self.path if os.path.isdir(self.path) else os.path.dirname(self.path)
        self._open: dict[str, Any] = {}
        self._infos: dict[str, TensorInfo] = {}
        self._where = self._index()

    def _index(self) -> dict[str, str]:
        if os.path.isfile(self.path) and not self.path.endswith(".json"):
            return {key: os.path.basename(self.path) for key in self._file_keys(os.path.basename(self.path))}
        index = self.path if self.path.endswith(".json") else _find_index(self.folder)
        if index is not None:
            with open(index) as handle:
                weight_map = json.load(handle)["weight_map"]
            for name in sorted(set(weight_map.values())):
                if not os.path.isfile(os.path.join(self.folder, name)):
                    raise CheckpointError(f"{index} names the file {name}, which is missing from {self.folder}")
            return dict(weight_map)
        for single in ("model.safetensors", "pytorch_model.bin"):
            if os.path.isfile(os.path.join(self.folder, single)):
                return {key: single for key in self._file_keys(single)}
        raise CheckpointError(f"{self.path} holds no model.safetensors, pytorch_model.bin or *.index.json")

    def _file_keys(self, name: str) -> list[str]:
        return list(self._handle(name).keys())

    def _handle(self, name: str):
        """An open file. A memory-mapped file's touched pages count as resident while it is
        open, so a safetensors file is opened anew for each tensor (its header is small) and
        a ``.bin`` file is kept open only until the next file is needed (loads read tensors
        grouped by file)."""
        if name.endswith(".safetensors") and name in self._open:
            self.close()
        if name not in self._open:
            self.close()
            path = os.path.join(self.folder, name)
            try:
                if name.endswith(".safetensors"):
                    from safetensors import safe_open

                    self._open[name] = safe_open(path, framework="pt")
                else:
                    self._open[name] = _BinFile(path)
            except CheckpointError:
                raise
            except Exception as error:  # a truncated or corrupt file
                raise CheckpointError(f"cannot read {path}: {type(error).__name__}: {error}") from error
        return self._open[name]

    def keys(self) -> list[str]:
        return list(self._where)

    def info(self, key: str) -> TensorInfo:
        if key not in self._infos:
            name = self._where[key]
            handle = self._handle(name)
            try:
                piece = handle.get_slice(key)
                dtype = _SAFETENSORS_DTYPES.get(piece.get_dtype(), None) if hasattr(piece, "get_dtype") else piece.dtype
                self._infos[key] = TensorInfo(tuple(piece.get_shape()), dtype, name)
            except Exception as error:
                raise CheckpointError(f"{os.path.join(self.folder, name)} does not hold the tensor {key!r} "
                                      f"its index promises ({type(error).__name__}: {error})") from error
        return self._infos[key]

    def read(self, key: str, shard: "Shard | None", rank: int) -> torch.Tensor:
        info = self.info(key)
        try:
            return self._read(self._handle(info.file), key, info, shard, rank)
        except Exception as error:
            raise CheckpointError(f"cannot read {key!r} from {os.path.join(self.folder, info.file)}: "
                                  f"{type(error).__name__}: {error}") from error
        finally:
            if info.file.endswith(".safetensors"):
                self.close()  # unmap: its pages would otherwise stay resident

    @staticmethod
    def _read(handle, key: str, info: TensorInfo, shard: "Shard | None", rank: int) -> torch.Tensor:
        if shard is None:
            return handle.get_tensor(key)
        piece = handle.get_slice(key)
        dim = shard.dim % len(info.shape)
        parts = []
        for start, stop in shard.ranges[rank]:
            index = tuple(slice(start, stop) if d == dim else slice(None) for d in range(len(info.shape)))
            parts.append(piece[index])
        if not parts:
            shape = list(info.shape)
            shape[dim] = 0
            return torch.empty(shape, dtype=info.dtype)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim)

    def close(self) -> None:
        self._open.clear()


def _find_index(folder: str) -> str | None:
    indexes = sorted(f for f in os.listdir(folder) if f.endswith(".index.json"))
    if len(indexes) > 1:
        raise CheckpointError(f"{folder} holds several indexes {indexes}; pass the one to load")
    return os.path.join(folder, indexes[0]) if indexes else None


def _load_weights_only(path: str):
    """``torch.load`` that never runs pickled code; memory-mapped when the file allows it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error).lower() and "zip" not in str(error).lower():
            raise
    return torch.load(path, map_location="cpu", weights_only=True)  # an old, non-zip file


class _BinFile:
    """A pickled state dict read safely (``weights_only=True``) and memory-mapped."""

    def __init__(self, path: str) -> None:
        try:
            self.tensors = _load_weights_only(path)
        except pickle.UnpicklingError as error:
            raise CheckpointError(f"{path} is a pickle that wants to run code or build objects other than "
                                  f"tensors; refusing to load it (weights_only=True): {error}") from error
        if not isinstance(self.tensors, Mapping) or not all(isinstance(t, torch.Tensor) for t in self.tensors.values()):
            raise CheckpointError(f"{path} does not hold a plain dict of tensors")

    def keys(self):
        return self.tensors.keys()

    def get_slice(self, key: str):
        return _TensorSlice(self.tensors[key])

    def get_tensor(self, key: str) -> torch.Tensor:
        return self.tensors[key]


class _TensorSlice:
    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.dtype = tensor.dtype

    def get_shape(self) -> list[int]:
        return list(self.tensor.shape)

    def __getitem__(self, index):
        return self.tensor[index].clone()


class SplitSource(TensorSource):
    """A split state saved for ``world_size`` ranks (keys ``<prefix><rank>.<key>``), read as
    full tensors: a slice for any other cut is assembled from the pieces that cover it, so
    re-sharding N -> M never holds more than one slice.
    """

    def __init__(self, files: FileSource, layout: Mapping[str, "Shard | None"], world_size: int,
                 prefix: str = "wrapped_model.module_shards.") -> None:
        self.files, self.layout, self.world_size, self.prefix = files, layout, world_size, prefix

    def _name(self, rank: int, key: str) -> str:
        return f"{self.prefix}{rank}.{key}"

    def keys(self) -> list[str]:
        present = set(self.files.keys())
        return [key for key in self.layout if self._name(0, key) in present]

    def info(self, key: str) -> TensorInfo:
        first = self.files.info(self._name(0, key))
        shard = self.layout[key]
        if shard is None:
            return first
        shape = list(first.shape)
        shape[shard.dim % len(shape)] = shard.size
        return TensorInfo(tuple(shape), first.dtype, first.file)

    def read(self, key: str, shard: "Shard | None", rank: int) -> torch.Tensor:
        saved = self.layout[key]
        if saved is None:
            whole = self.files.read(self._name(0, key), None, 0)
            return whole if shard is None else shard.take(whole, rank).clone()
        wanted = ((0, saved.size),) if shard is None else shard.ranges[rank]
        dim = saved.dim
        pieces = [self._read_range(key, saved, dim, start, stop) for start, stop in wanted]
        if not pieces:
            shape = list(self.info(key).shape)
            shape[dim % len(shape)] = 0
            return torch.empty(shape, dtype=self.info(key).dtype)
        return torch.cat(pieces, dim) if len(pieces) > 1 else pieces[0]

    def _read_range(self, key: str, saved: "Shard", dim: int, start: int, stop: int) -> torch.Tensor:
        """Positions [start, stop) of the full tensor, from whichever saved ranks hold them."""
        from .split import Shard

        parts, position = [], start
        while position < stop:
            found = None
            for rank, ranges in enumerate(saved.ranges):
                offset = 0
                for a, b in ranges:
                    if a <= position < b:
                        found = (rank, offset + position - a, min(b, stop) - position)
                        break
                    offset += b - a
                if found:
                    break
            if found is None:
                raise CheckpointError(f"no saved rank holds position {position} of {key!r}")
            rank, local, length = found
            window = Shard(dim, saved.local_size(rank), (((local, local + length),),))
            parts.append(self.files.read(self._name(rank, key), window, 0))
            position += length
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


# --------------------------------------------------------------------------------------------
# Loading a split model built on the meta device
# --------------------------------------------------------------------------------------------


def _holders(model: nn.Module) -> dict[int, list[tuple[int, str, nn.Module, str, bool]]]:
    """Each meta tensor of the shards -> every (rank, key, module, name, is_param) holding it."""
    groups: dict[int, list] = {}
    for rank, shard in zip(model.shard_ranks, model.module_shards):
        for path, module in shard.named_modules(remove_duplicate=False):
            for is_param, table in ((True, module._parameters), (False, module._buffers)):
                for name, tensor in table.items():
                    if tensor is not None and tensor.device.type == "meta":
                        key = f"{path}.{name}" if path else name
                        groups.setdefault(id(tensor), []).append((rank, key, module, name, is_param))
    return groups


def load_shards(model: nn.Module, source: TensorSource, *, dtype: torch.dtype | None = None,
                ignore_unexpected: Iterable[str] = (), progress: bool | None = None) -> None:
    """Fill every meta tensor of a split model (a :class:`~tensor_parallel.TensorParallel`
    built on the meta device) with its rank's slice, read from ``source`` slice by slice.

    Everything is checked before the first tensor is read (missing and unexpected tensors,
    shapes); a failure raises :class:`CheckpointError` naming the file and tensor.

    Example::

        >>> import tempfile, torch, tensor_parallel as tp
        >>> from tensor_parallel.checkpoint import FileSource, load_shards, write_checkpoint
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
        >>> folder = tempfile.mkdtemp()
        >>> _ = write_checkpoint(mlp.state_dict(), folder)
        >>> model = tp.tensor_parallel(mlp.to("meta"), ["cpu", "cpu"])
        >>> load_shards(model, FileSource(folder))
        >>> model.module_shards[1][2].weight.device
        device(type='cpu')
    """
    groups = _holders(model)
    plan = _check_against(model, source, groups, list(ignore_unexpected))
    plan.sort(key=lambda item: source.info(item[1]).file)  # one file open at a time
    total = sum(_nbytes(source.info(key)) for _, key, _ in plan)
    done: list = []
    try:
        with _progress(total, "loading", progress) as bar:
            for holders, key, rank in plan:
                tensor = source.read(key, model.layout.get(holders[0][1]), rank)
                device = model.devices[model.shard_ranks.index(rank)]
                done.append((holders, _assign(holders, tensor, device, dtype)))
                bar.update(_nbytes(source.info(key)))
    except BaseException:
        for holders, old in reversed(done):  # never a model half-loaded: back to the meta device
            _put(holders, old)
        raise
    finally:
        source.close()
    model.install_gradient_sums()  # the hooks belong to the new Parameter objects


def load_split_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                          strict: bool = True) -> Any:
    """``model.load_state_dict`` for a split model (keys ``module_shards.<rank>.<key>``) that
    also fills tensors still on the meta device (a model built under ``init_empty_weights``):
    each gets its piece on its rank's device, and a tensor several ranks share stays shared.
    With ``strict=False`` a state dict may hold only some of the tensors (one checkpoint part).

    Example::

        >>> import torch, tensor_parallel as tp
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
        >>> state = tp.tensor_parallel(mlp, ["cpu", "cpu"]).state_dict()
        >>> empty = tp.tensor_parallel(mlp.to("meta"), ["cpu", "cpu"])
        >>> load_split_state_dict(empty, state)
        <All keys matched successfully>
        >>> empty.module_shards[0][0].weight.device
        device(type='cpu')
    """
    from torch.nn.modules.module import _IncompatibleKeys

    expected = set(nn.Module.state_dict(model, keep_vars=True))
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if strict and (missing or unexpected):
        raise RuntimeError(f"Error(s) in loading state_dict for {type(model).__name__}: missing keys {missing[:8]}, "
                           f"unexpected keys {unexpected[:8]}; pass strict=False to load a part of the state")
    filled: set[str] = set()
    for holders in _holders(model).values():
        names = [f"module_shards.{model.shard_ranks.index(rank)}.{key}" for rank, key, *_ in holders]
        name = next((n for n in names if n in state_dict), None)
        if name is None:
            continue
        rank, key, module, local, _ = holders[0]
        shape = (module._parameters if local in module._parameters else module._buffers)[local].shape
        if tuple(state_dict[name].shape) != tuple(shape):
            raise RuntimeError(f"{name!r} has shape {list(state_dict[name].shape)} in the state dict, but rank "
                               f"{rank} holds {list(shape)}; was it cut for another number of devices?")
        _assign(holders, state_dict[name], model.devices[model.shard_ranks.index(rank)], None)
        filled.update(names)
    rest = {k: v for k, v in state_dict.items() if k not in filled and k in expected}
    nn.Module.load_state_dict(model, rest, strict=False)
    model.install_gradient_sums()
    return _IncompatibleKeys(missing, unexpected)


def _nbytes(info: TensorInfo) -> int:
    numel = 1
    for size in info.shape:
        numel *= size
    return numel * torch.empty((), dtype=info.dtype).element_size()


def _check_against(model, source: TensorSource, groups, ignore: list[str]):
    """(holders, source key, rank) per meta tensor; raises before anything is read."""
    available = set(source.keys())
    used: set[str] = set()
    plan, missing = [], []
    for holders in groups.values():
        keys = [key for _, key, *_ in holders]
        key = next((k for k in keys if k in available), None)
        if key is None:
            missing.append(keys[0])
            continue
        used.update(k for k in keys if k in available)
        _check_shape(model, source, key, holders[0])
        plan.append((holders, key, holders[0][0]))
    if missing:
        missing = sorted(set(missing))
        raise CheckpointError(f"the checkpoint {_where(source)} lacks {len(missing)} tensor(s) the model "
                              f"needs: {missing[:8]}")
    unexpected = sorted(k for k in available - used
                        if not any(re.search(pattern, k) for pattern in ignore))
    if unexpected:
        info = source.info(unexpected[0])
        raise CheckpointError(f"the checkpoint holds {len(unexpected)} tensor(s) the model does not have, "
                              f"e.g. {unexpected[0]!r} in {info.file}: {unexpected[:8]}; is it a checkpoint "
                              f"of another architecture?")
    return plan


def _where(source: TensorSource) -> str:
    files = getattr(source, "files", source)
    return getattr(files, "path", type(source).__name__)


def _check_shape(model, source: TensorSource, key: str, holder) -> None:
    rank, local_key, module, name, _ = holder
    local = (module._parameters if name in module._parameters else module._buffers)[name]
    shard = model.layout.get(local_key)
    expected = list(local.shape)
    if shard is not None:
        expected[shard.dim % len(expected)] = shard.size
    info = source.info(key)
    if tuple(expected) != tuple(info.shape):
        raise CheckpointError(f"{key!r} in {info.file} has shape {list(info.shape)}, but the model needs "
                              f"{expected}; is it a checkpoint of another configuration?")
    if info.dtype is not None and info.dtype.is_floating_point != local.dtype.is_floating_point:
        raise CheckpointError(f"{key!r} in {info.file} is {info.dtype}, but the model holds {local.dtype} there")


def _assign(holders, tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """Put ``tensor`` in every holder; return what was there (the meta tensor)."""
    _, _, module, name, is_param = holders[0]
    old = module._parameters[name] if is_param else module._buffers[name]
    target = dtype if (dtype is not None and old.dtype.is_floating_point) else old.dtype
    data = tensor.to(device=device, dtype=target)
    if data.data_ptr() == tensor.data_ptr() and device.type == "cpu":
        data = data.clone()  # never keep a view into a memory-mapped file
    _put(holders, nn.Parameter(data, requires_grad=old.requires_grad) if is_param else data)
    return old


def _put(holders, tensor: torch.Tensor) -> None:
    for _, _, holder, name, is_param in holders:
        (holder._parameters if is_param else holder._buffers)[name] = tensor


# --------------------------------------------------------------------------------------------
# Streams of tensors to write: unsharded from a split model, or split from a source
# --------------------------------------------------------------------------------------------


def unsharded_tensors(model: nn.Module) -> dict[str, LazyTensor]:
    """The original module's state, each full tensor gathered from the shards only when its
    file is written.

    Example::

        >>> import torch, tensor_parallel as tp
        >>> model = tp.tensor_parallel(torch.nn.Sequential(torch.nn.Linear(2, 4)), ["cpu", "cpu"])
        >>> lazy = unsharded_tensors(model)
        >>> lazy["0.weight"].shape, lazy["0.weight"].load().shape
        ((4, 2), torch.Size([4, 2]))
    """
    from .split import gather_tensor

    shards = [shard.state_dict(keep_vars=True) for shard in model.module_shards]
    out = {}
    for key, shard in model.layout.items():
        pieces = [state[key] for state in shards]
        shape = list(pieces[0].shape)
        if shard is not None:
            shape[shard.dim % len(shape)] = shard.size
        out[key] = LazyTensor(tuple(shape), pieces[0].dtype,
                              lambda shard=shard, pieces=pieces: gather_tensor(shard, pieces))
    return out


def split_tensors(source: TensorSource, layout: Mapping[str, "Shard | None"], world_size: int,
                  prefix: str = "wrapped_model.module_shards.") -> dict[str, LazyTensor]:
    """The split state for ``world_size`` ranks (keys ``<prefix><rank>.<key>``), each slice
    read from ``source`` only when its file is written."""
    out = {}
    for rank in range(world_size):
        for key, shard in layout.items():
            info = source.info(key)
            shape = list(info.shape)
            if shard is not None:
                shape[shard.dim % len(shape)] = shard.local_size(rank)
            out[f"{prefix}{rank}.{key}"] = LazyTensor(
                tuple(shape), info.dtype, lambda key=key, shard=shard, rank=rank: source.read(key, shard, rank))
    return out
