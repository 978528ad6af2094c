"""Whole-checkpoint jobs: pre-split a checkpoint for N devices, merge a split one back, and
save a split model as an ordinary checkpoint, one file of tensors in RAM at a time."""

from __future__ import annotations

import logging
import os
from typing import Mapping

from ..checkpoint import (CheckpointError, FileSource, LazyTensor, TensorSource, split_tensors,
                          unsharded_tensors, write_checkpoint)
from ..plan import resolve_plan
from ..split import layout_for
from .loading import SPLIT_INDEX, _source, empty_model
from .model import TensorParallelPreTrainedModel
from .plans import plan_for_pretrained

__all__ = ["shard_checkpoint", "merge_checkpoint", "save_unsharded"]

logger = logging.getLogger(__name__)


def _config_files(path: str) -> dict[str, str]:
    files = {}
    for name in ("config.json", "generation_config.json"):
        full = os.path.join(path, name)
        if os.path.isfile(full):
            with open(full) as handle:
                files[name] = handle.read()
    return files


def _tied_aliases(skeleton) -> dict[str, str]:
    """Tied keys a checkpoint may store once: {"lm_head.weight": "model.embed_tokens.weight"}."""
    tied = getattr(skeleton, "_tied_weights_keys", None)
    config = skeleton.config.get_text_config() if hasattr(skeleton.config, "get_text_config") else skeleton.config
    if isinstance(tied, Mapping) and getattr(config, "tie_word_embeddings", False):
        return dict(tied)
    return {}


class _Aliased(TensorSource):
    """A source where a tied key missing from the files reads its partner."""

    def __init__(self, source: TensorSource, aliases: Mapping[str, str]) -> None:
        self.source = source
        present = set(source.keys())
        self.aliases = {k: v for k, v in aliases.items() if k not in present and v in present}

    def keys(self):
        return list(self.source.keys()) + list(self.aliases)

    def info(self, key):
        return self.source.info(self.aliases.get(key, key))

    def read(self, key, shard, rank):
        return self.source.read(self.aliases.get(key, key), shard, rank)


def shard_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, world_size: int, *,
                     max_shard_size: int | str = "5GB", safe_serialization: bool = True,
                     progress: bool | None = None) -> None:
    """Write ``src`` (an ordinary checkpoint, or a split state for any device count) as the
    split state for ``world_size`` devices, reading one slice at a time.

    Example::

        >>> import tempfile, transformers, tensor_parallel as tp
        >>> from tensor_parallel.hf.convert import shard_checkpoint
        >>> config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16)
        >>> src, dst = tempfile.mkdtemp(), tempfile.mkdtemp()
        >>> transformers.GPT2LMHeadModel(config).save_pretrained(src)
        >>> shard_checkpoint(src, dst, 2)
        >>> tp.from_pretrained(dst, ["cpu", "cpu"]).module_shards[0].lm_head.out_features
        32
    """
    src, dst = os.fspath(src), os.fspath(dst)
    skeleton = empty_model(src)
    plan = resolve_plan(skeleton, plan_for_pretrained(skeleton, world_size), world_size)
    layout = layout_for(skeleton, plan, world_size)
    source = _Aliased(_source(src, skeleton, None), _tied_aliases(skeleton))
    missing = [key for key in layout if key not in set(source.keys())]
    if missing:
        raise CheckpointError(f"the checkpoint {src} lacks {len(missing)} tensor(s) the model needs: {missing[:8]}")
    write_checkpoint(split_tensors(source, layout, world_size), dst, max_shard_size=max_shard_size,
                     safe_serialization=safe_serialization, index_name=SPLIT_INDEX,
                     metadata={"tensor_parallel_world_size": str(world_size)}, progress=progress,
                     extra_files=_config_files(src))


def merge_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, max_shard_size: int | str = "5GB",
                     safe_serialization: bool = True, progress: bool | None = None) -> None:
    """Write a split state as an ordinary checkpoint that ``from_pretrained`` of transformers
    loads, one full tensor assembled at a time.

    Example::

        >>> import tempfile, transformers, tensor_parallel as tp
        >>> from tensor_parallel.hf.convert import merge_checkpoint
        >>> config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16)
        >>> split, merged = tempfile.mkdtemp(), tempfile.mkdtemp()
        >>> tp.tensor_parallel(transformers.GPT2LMHeadModel(config), ["cpu", "cpu"]).save_pretrained(split)
        >>> merge_checkpoint(split, merged)
        >>> transformers.GPT2LMHeadModel.from_pretrained(merged).lm_head.out_features
        64
    """
    src, dst = os.fspath(src), os.fspath(dst)
    skeleton = empty_model(src)
    source = _source(src, skeleton, None)
    if isinstance(source, FileSource):
        raise CheckpointError(f"{src} is not a split state saved by tensor_parallel (no {SPLIT_INDEX} with "
                              f"tensor_parallel_world_size); it is already an ordinary checkpoint")
    tensors = {key: LazyTensor(source.info(key).shape, source.info(key).dtype,
                               lambda key=key: source.read(key, None, 0)) for key in source.keys()}
    write_checkpoint(tensors, dst, max_shard_size=max_shard_size, safe_serialization=safe_serialization,
                     progress=progress, extra_files=_config_files(src))


def save_unsharded(model: TensorParallelPreTrainedModel, directory: str | os.PathLike, *,
                   max_shard_size: int | str = "5GB", safe_serialization: bool = True,
                   progress: bool | None = None) -> None:
    """Save a split model as an ordinary checkpoint, gathering one tensor at a time (also
    ``model.save_unsharded(directory)``).

    Example::

        >>> import tempfile, transformers, tensor_parallel as tp
        >>> config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16)
        >>> model = tp.tensor_parallel(transformers.GPT2LMHeadModel(config), ["cpu", "cpu"])
        >>> folder = tempfile.mkdtemp()
        >>> model.save_unsharded(folder)
        >>> transformers.GPT2LMHeadModel.from_pretrained(folder).lm_head.out_features
        64
    """
    extra = {"config.json": model.config.to_json_string()}
    if getattr(model, "generation_config", None) is not None:
        extra["generation_config.json"] = model.generation_config.to_json_string()
    write_checkpoint(unsharded_tensors(model.wrapped_model), directory, max_shard_size=max_shard_size,
                     safe_serialization=safe_serialization, progress=progress, extra_files=extra)


TensorParallelPreTrainedModel.save_unsharded = save_unsharded  # type: ignore[attr-defined]
