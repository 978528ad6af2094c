"""Loading transformers checkpoints straight into each device's slice."""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping, Sequence

import torch
import transformers
from accelerate import init_empty_weights

from ..checkpoint import FileSource, SplitSource, load_shards
from ..plan import resolve_plan
from ..runtime import DeviceLike
from ..sharding import replicated_cut
from ..split import layout_for
from ..styles import Style
from .model import TensorParallelPreTrainedModel
from .plans import plan_for_pretrained

__all__ = ["from_pretrained"]

logger = logging.getLogger(__name__)

SPLIT_INDEX = "pytorch_model.bin.index.json"


def _model_class(config, model_class):
    if model_class is not None:
        return model_class
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM


def _split_metadata(path: str) -> tuple[int | None, list[str]]:
    """The number of ranks a split state in ``path`` was saved for (None for a plain
    checkpoint), and the keys it holds as ZeRO-3 pieces (``sharded=True``)."""
    index = os.path.join(path, SPLIT_INDEX)
    if not os.path.isfile(index):
        return None, []
    with open(index) as handle:
        metadata = json.load(handle).get("metadata", {})
    size = metadata.get("tensor_parallel_world_size")
    return (int(size) if size is not None else None), json.loads(metadata.get("tensor_parallel_sharded", "[]"))


def empty_model(path: str | os.PathLike, *, dtype: torch.dtype | None = None, model_class=None,
                trust_remote_code: bool = False) -> transformers.PreTrainedModel:
    """The model of the checkpoint at ``path``, with its parameters on the meta device."""
    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    cls = _model_class(config, model_class)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code} if trust_remote_code else {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    with init_empty_weights():
        return cls.from_config(config, **kwargs) if hasattr(cls, "from_config") else cls._from_config(config, **kwargs)


def from_pretrained(path: str | os.PathLike, device_ids: Sequence[DeviceLike] | None = None,
                    dtype: torch.dtype | None = None, *, plan: Mapping[str, Style] | None = None,
                    model_class=None, trust_remote_code: bool = False, progress: bool | None = None,
                    **options: Any) -> TensorParallelPreTrainedModel:
    """Load a checkpoint folder straight into a split model: each device reads only its slice
    of each tensor, so host RAM stays near one tensor above the final weights.

    ``path`` is an ordinary Hugging Face checkpoint (safetensors, one file or sharded with an
    index; ``.bin`` read with ``weights_only=True``) or a split state saved by
    :meth:`TensorParallelPreTrainedModel.save_pretrained`, for any number of devices (it is
    re-cut for ``device_ids`` slice by slice, never gathered whole).

    Example::

        >>> import tempfile, torch, transformers, tensor_parallel as tp
        >>> config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
        >>> folder = tempfile.mkdtemp()
        >>> transformers.LlamaForCausalLM(config).save_pretrained(folder)
        >>> model = tp.from_pretrained(folder, ["cpu", "cpu"])
        >>> model.module_shards[1].model.layers[0].mlp.up_proj.weight.shape
        torch.Size([32, 32])
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"{path} is not a folder; pass a local checkpoint folder (download it first)")
    skeleton = empty_model(path, dtype=dtype, model_class=model_class, trust_remote_code=trust_remote_code)
    model = TensorParallelPreTrainedModel(skeleton, device_ids, plan=plan, **options)
    source = _source(path, skeleton, plan)
    ignore = list(getattr(skeleton, "_keys_to_ignore_on_load_unexpected", None) or [])
    load_shards(model.wrapped_model, source, dtype=dtype, ignore_unexpected=ignore, progress=progress)
    model._tie_shards()
    return model.eval()


def _source(path: str, skeleton, plan):
    saved_for, sharded = _split_metadata(path)
    files = FileSource(path)
    if saved_for is None:
        return files
    saved_plan = resolve_plan(skeleton, plan if plan is not None else plan_for_pretrained(skeleton, saved_for),
                              saved_for)
    logger.info("%s holds a split state for %d devices; re-cutting it slice by slice", path, saved_for)
    layout = layout_for(skeleton, saved_plan, saved_for)
    shapes = {key: tuple(tensor.shape) for key, tensor in skeleton.state_dict(keep_vars=True).items()}
    layout.update({key: replicated_cut(shapes[key], saved_for) for key in sharded})
    return SplitSource(files, layout, saved_for)


TensorParallelPreTrainedModel.from_pretrained = staticmethod(from_pretrained)  # type: ignore[assignment]
