"""Checkpoints: writing state in size-bounded files with an index, and the unsharded view."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from typing import Iterable, Iterator, Mapping

import torch
from torch import nn

__all__ = ["save_tensor_parallel", "write_checkpoint", "parse_size", "infer_sharded_device_map"]

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


def write_checkpoint(tensors: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor],
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


def _write_file(path: str, tensors: Mapping[str, torch.Tensor], metadata, safe: bool) -> None:
    owned = {k: t.detach().to("cpu").contiguous().clone() for k, t in tensors.items()}
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


def infer_sharded_device_map(model: nn.Module) -> dict[str, int | str]:
    """A device map for accelerate: each shard's module path to that shard's device (a GPU
    index or ``"cpu"``, as accelerate spells devices).

    Example::

        >>> import torch, tensor_parallel as tp
        >>> model = tp.tensor_parallel(torch.nn.Sequential(torch.nn.Linear(2, 4)), ["cpu", "cpu"])
        >>> tp.infer_sharded_device_map(model)
        {'module_shards.0': 'cpu', 'module_shards.1': 'cpu'}
    """
    from .runtime import TensorParallel

    for path, module in model.named_modules():
        if isinstance(module, TensorParallel):
            prefix = f"{path}." if path else ""
            return {f"{prefix}module_shards.{rank}": _accelerate_device(device)
                    for rank, device in enumerate(module.devices)}
    raise TypeError(f"infer_sharded_device_map expects a model made by tensor_parallel(), got "
                    f"{type(model).__name__} with no split module inside")


@contextlib.contextmanager
def save_tensor_parallel(model: nn.Module) -> Iterator[nn.Module]:
    """Inside this block, ``model.state_dict()`` returns the unsharded state with the original
    module's keys (the name and behaviour of the original library's context manager).

    Example::

        >>> import torch, tensor_parallel as tp
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
        >>> model = tp.tensor_parallel(mlp, ["cpu", "cpu"])
        >>> with tp.save_tensor_parallel(model):
        ...     state = model.state_dict()
        >>> sorted(state) == sorted(mlp.state_dict())
        True
    """
    targets = [m for m in model.modules() if hasattr(m, "unsharded_state_dict")]
    if not targets:
        raise TypeError(f"save_tensor_parallel expects a model made by tensor_parallel(), got "
                        f"{type(model).__name__} with no split module inside")
    if len(targets) == 1 and targets[0] is model:
        model.state_dict = model.unsharded_state_dict  # type: ignore[method-assign]
        try:
            yield model
        finally:
            del model.state_dict
        return
    raise NotImplementedError("save_tensor_parallel on a module that contains a split model "
                              "is not supported yet; call it on the split model itself")
