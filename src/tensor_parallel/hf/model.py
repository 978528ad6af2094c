"""TensorParallelPreTrainedModel: a split transformers model that is itself a PreTrainedModel."""

from __future__ import annotations

import copy
import functools
import inspect
import json
import logging
import os
from typing import Any, Callable, Collection, Hashable, Mapping, Sequence

import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache

from ..checkpoint import write_checkpoint
from ..legacy import Config
from ..runtime import DeviceLike, RankLocal, TensorParallel, _cut_full_tensors, _original_named_modules
from ..styles import Style, linear_view
from .plans import tied_embeddings

__all__ = ["TensorParallelPreTrainedModel", "ShardedCache"]

logger = logging.getLogger(__name__)

_CACHE_NAMES = ("cache", "past_key_values")


class ShardedCache(Cache, RankLocal):
    """One KV cache per rank behind one Cache object: each rank's attention writes only the
    heads it holds, on its own device, and no cache is ever communicated.

    ``generate`` sees this object: queries go to rank 0's cache (all ranks hold the same
    positions), and changes (beam reordering, cropping, batch selection) go to every rank.

    Example::

        >>> from transformers import DynamicCache
        >>> from tensor_parallel.hf import ShardedCache
        >>> cache = ShardedCache([DynamicCache(), DynamicCache()])
        >>> cache.get_seq_length(), cache.for_rank(1) is cache.caches[1]
        (0, True)
    """

    _broadcast = ("reorder_cache", "crop", "batch_repeat_interleave", "batch_select_indices",
                  "reset", "early_initialization", "offload", "prefetch")

    def __init__(self, caches: Sequence[Cache]) -> None:  # no Cache.__init__: state lives per rank
        self.caches = list(caches)

    def for_rank(self, rank: int) -> Cache:
        return self.caches[rank]

    def __getattr__(self, name: str) -> Any:
        if name == "caches":
            raise AttributeError(name)
        if name in ShardedCache._broadcast:
            return functools.partial(self._call_all, name)
        return getattr(self.caches[0], name)

    def __getattribute__(self, name: str) -> Any:
        if name in ShardedCache._broadcast or name in _DELEGATED_TO_RANK0:
            return ShardedCache.__getattr__(self, name)
        return object.__getattribute__(self, name)

    def _call_all(self, name: str, *args: Any, **kwargs: Any) -> None:
        for cache in self.caches:
            moved = [_to_cache_device(a, cache) for a in args]
            getattr(cache, name)(*moved, **kwargs)

    def __len__(self) -> int:
        return len(self.caches[0])

    def graph_key(self) -> Any:
        """For ``cuda_graphs=True``: the addresses of every rank's cache tensors when they are
        static (a ``StaticCache``, allocated), and the caches' Python state (an encoder-decoder
        cache's ``is_updated``, a sliding window's position counter), which a replay cannot
        change: a call whose Python state differs is another signature. ``None`` (no replays)
        for a growing cache.

        Example::

            >>> from transformers import DynamicCache
            >>> from tensor_parallel.hf import ShardedCache
            >>> ShardedCache([DynamicCache(), DynamicCache()]).graph_key() is None
            True
        """
        if not self.caches[0].is_compileable:
            return None
        parts = []
        for cache in self.caches:
            layers = _cache_layers(cache)
            if not layers:
                return None  # a cache whose tensors we cannot see: no replays on it
            for layer in layers:
                if not getattr(layer, "is_initialized", True):
                    return None
                parts += [(name, t.data_ptr()) for name, t in vars(layer).items() if isinstance(t, torch.Tensor)]
            parts += [_plain_state(holder) for holder in _cache_parts(cache)]
        return id(self), tuple(parts)

    def snapshot(self) -> Callable[[], None]:
        """A function restoring every rank cache's Python state as it is now (used when a
        capture fails after the forward ran its Python side: the call then runs eagerly).

        Example::

            >>> from transformers import DynamicCache
            >>> from tensor_parallel.hf import ShardedCache
            >>> cache = ShardedCache([DynamicCache(), DynamicCache()])
            >>> restore = cache.snapshot(); cache.caches[1].offloading = "changed"; restore()
            >>> cache.caches[1].offloading
            False
        """
        saved = [(holder, {k: copy.copy(v) for k, v in vars(holder).items() if _is_plain(v)})
                 for cache in self.caches for holder in _cache_parts(cache)]

        def restore() -> None:
            for holder, values in saved:
                vars(holder).update(values)
        return restore

    def __repr__(self) -> str:
        return f"ShardedCache({len(self.caches)} x {type(self.caches[0]).__name__})"


# Cache's own methods read its layers; a ShardedCache has none, so they go to rank 0's cache.
_DELEGATED_TO_RANK0 = {name for name, _ in inspect.getmembers(Cache)
                       if not name.startswith("__") and name not in ShardedCache._broadcast}


def _cache_parts(cache: Cache) -> list[Any]:
    """A cache, its nested caches (encoder-decoder) and all their layers."""
    parts = [cache]
    for name in ("self_attention_cache", "cross_attention_cache"):
        inner = getattr(cache, name, None)
        if isinstance(inner, Cache):
            parts += [inner]
    return parts + _cache_layers(cache)


def _is_plain(value: Any) -> bool:
    """Python state a replay cannot update: numbers, flags, strings, and dicts/tuples of them."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (tuple, list)):
        return all(_is_plain(v) for v in value) and not any(isinstance(v, (list, dict)) for v in value)
    if isinstance(value, dict):
        return all(_is_plain(k) and _is_plain(v) for k, v in value.items())
    return False


def _plain_state(holder: Any) -> tuple:
    """A hashable fingerprint of ``holder``'s plain Python attributes."""
    def frozen(value: Any) -> Hashable:
        if isinstance(value, dict):
            return tuple(sorted(((k, frozen(v)) for k, v in value.items()), key=repr))
        if isinstance(value, list):
            return tuple(value)
        return value
    return tuple(sorted((k, frozen(v)) for k, v in vars(holder).items() if _is_plain(v)))


def _cache_layers(cache: Cache) -> list[Any]:
    """A cache's layers, those of an encoder-decoder cache's two caches included."""
    layers = list(getattr(cache, "layers", None) or [])
    for name in ("self_attention_cache", "cross_attention_cache"):
        inner = getattr(cache, name, None)
        if isinstance(inner, Cache):
            layers += _cache_layers(inner)
    return layers


def _to_cache_device(value: Any, cache: Cache) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    for layer in _cache_layers(cache):
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor):
            return value.to(keys.device)
    return value


# GenerationMixin's encoder step, under its names up to 5.17 and after; a model may override it
_ENCODER_PREPARATION = ("_prepare_encoder_decoder_kwargs_for_generation",
                        "_maybe_prepare_encoder_kwargs_for_generation",
                        "_prepare_text_encoder_decoder_kwargs_for_generation")


class _ParallelEncoder(nn.Module):
    """The encoder of every shard, run together (what ``generate`` calls for encoder-decoders)."""

    def __init__(self, wrapped: TensorParallel) -> None:
        super().__init__()
        self._wrapped = [wrapped]  # not a submodule: its parameters belong to the parent model
        encoder = wrapped.module_shards[0].get_encoder()
        self.main_input_name = getattr(encoder, "main_input_name", "input_ids")

        @functools.wraps(encoder.forward)  # generate() reads the encoder's signature
        def run(*args: Any, **kwargs: Any) -> Any:
            outputs = wrapped.run_shards(_call_encoder, *args, **kwargs)
            return wrapped.forward_output(outputs[0])

        object.__setattr__(self, "forward", run)


def _call_method(shard: nn.Module, name: str, *args: Any, **kwargs: Any) -> Any:
    return getattr(shard, name)(*args, **kwargs)


def _call_encoder(shard: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return shard.get_encoder()(*args, **kwargs)


class TensorParallelPreTrainedModel(PreTrainedModel, GenerationMixin):
    """A transformers model split over several devices; itself a ``PreTrainedModel``.

    ``forward``, ``generate`` (greedy, sampling, beam search, with or without the KV cache) and
    the loss work as on the original model. Each rank keeps its own KV cache of the heads it
    holds, so generation communicates only the per-layer all-reduces.

    Example::

        >>> import torch, transformers, tensor_parallel as tp
        >>> config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        >>> model = transformers.LlamaForCausalLM(config).eval()
        >>> split = tp.TensorParallelPreTrainedModel(model, ["cpu", "cpu"])
        >>> ids = torch.tensor([[1, 2, 3]])
        >>> torch.equal(split.generate(ids, max_new_tokens=4, do_sample=False),
        ...             model.generate(ids, max_new_tokens=4, do_sample=False))
        True
    """

    config_class = PretrainedConfig
    is_parallelizable = True
    model_parallel = True
    # attention runs inside the shards, with the wrapped model's own implementation: the
    # wrapper must not refuse one (the original library broke on transformers 4.36 here)
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return True  # experts run inside the shards, with the wrapped model's implementation

    def __init__(self, module: PreTrainedModel, device_ids: Sequence[DeviceLike] | None = None,
                 output_device: DeviceLike | None = None, output_device_index: int | None = None,
                 tensor_parallel_config: Config | None = None, *, plan: Mapping[str, Style] | None = None,
                 **options: Any) -> None:
        """``options`` are :class:`~tensor_parallel.TensorParallel`'s: ``delay_init``,
        ``distributed``, ``sharded``, ``sharded_param_names``, ``timeout``, ``process_group``,
        ``cuda_graphs`` (then ``generate`` uses a static KV cache by default and replays its
        decode steps as CUDA graphs)."""
        if not isinstance(module, PreTrainedModel):
            raise TypeError(f"TensorParallelPreTrainedModel wraps a transformers PreTrainedModel, got "
                            f"{type(module).__name__}; use tp.tensor_parallel() for other modules")
        super().__init__(copy.deepcopy(module.config))
        # without a plan or a Config, TensorParallel picks plan_for_pretrained's plan for its world size
        self.wrapped_model = TensorParallel(module, device_ids, output_device, output_device_index,
                                            tensor_parallel_config, plan=plan, **options)
        self.register_load_state_dict_pre_hook(_cut_full_tensors)  # original keys load, cut per rank
        self._static_cache: ShardedCache | None = None  # the ranks' last static KV caches, reused
        self._adopt_generation_hooks(module)
        self._adopt_signature(module)
        if tied_embeddings(module):
            self._tie_shards()

    @property
    def tensor_parallel_config(self) -> Config:
        """The split as a legacy ``tp.Config`` (see :attr:`TensorParallel.tensor_parallel_config`)."""
        return self.wrapped_model.tensor_parallel_config

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """As ``nn.Module.load_state_dict`` (keys ``wrapped_model.module_shards.<rank>.<key>``);
        tensors still on the meta device get their piece on their device."""
        prefix = "wrapped_model."
        if any(not k.startswith(prefix) for k in state_dict):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        inner = {k[len(prefix):]: v for k, v in state_dict.items()}
        result = self.wrapped_model.load_state_dict(inner, strict=strict, assign=assign)
        return type(result)([prefix + k for k in result.missing_keys], [prefix + k for k in result.unexpected_keys])

    def set_preserve_shards_when_saving(self, value: bool) -> None:
        """The original's switch: ``False`` makes ``state_dict()`` return the unsharded state
        (what ``tp.save_tensor_parallel(model)`` does inside its block), ``True`` the split one."""
        from ..checkpoint import set_unsharded_saving

        set_unsharded_saving(self, not value)

    def apply_sharding(self, sharded_param_names: Collection[str] | None = None) -> None:
        """ZeRO-3 of the replicated parameters (see :meth:`TensorParallel.apply_sharding`)."""
        self.wrapped_model.apply_sharding(sharded_param_names)

    def _adopt_signature(self, module: PreTrainedModel) -> None:
        """``forward`` shows the wrapped model's signature: Trainer keeps only the dataset
        columns it names, generate() checks the keyword arguments against it."""
        implementation = self._forward

        @functools.wraps(type(module).forward)
        def forward(*args: Any, **kwargs: Any) -> Any:
            return implementation(*args, **kwargs)

        forward.__signature__ = inspect.signature(module.forward)  # type: ignore[attr-defined]
        object.__setattr__(self, "forward", forward)

    def _tie_shards(self) -> None:
        """Make each shard's LM head share its embedding slice, as the config says (a model
        built under ``init_empty_weights`` has its ties undone; both are cut alike)."""
        for shard in self.wrapped_model.module_shards:
            embeddings, head = shard.get_input_embeddings(), linear_view(shard.get_output_embeddings())[0]
            if head.weight is not embeddings.weight and head.weight.shape == embeddings.weight.shape:
                # not setattr: init_empty_weights patches register_parameter to make a new copy
                head._parameters["weight"] = embeddings.weight

    def _adopt_generation_hooks(self, module: PreTrainedModel) -> None:
        """Take over what generation reads from the model class (first shard's implementation)."""
        first = self.wrapped_model.module_shards[0]
        if getattr(module, "generation_config", None) is not None:
            self.generation_config = copy.deepcopy(module.generation_config)
        self.main_input_name = module.main_input_name
        self.loss_type = getattr(module, "loss_type", None)  # Trainer counts shifted labels by it
        for name in ("prepare_inputs_for_generation", "_validate_model_kwargs", "can_generate",
                     "_supports_default_dynamic_cache", "_is_stateful", "_reorder_cache",
                     "_supports_logits_to_keep"):
            if hasattr(first, name):
                object.__setattr__(self, name, getattr(first, name))
        for name in _ENCODER_PREPARATION:
            # A model's own encoder step (multimodal ones merge image features there) runs on
            # every shard at once, each with its own encoder and towers; GenerationMixin's runs
            # here and calls get_encoder(), which runs every shard's encoder.
            own = getattr(type(first), name, None)
            if own is not None and own is not getattr(GenerationMixin, name, None):
                object.__setattr__(self, name, functools.partial(self._on_every_shard, name))

    def _on_every_shard(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Shard method ``name`` called on every rank together; rank 0's result."""
        return self.wrapped_model.forward_output(self.wrapped_model.run_shards(_call_method, name, *args, **kwargs)[0])

    def named_parameters(self, *args: Any, **kwargs: Any):
        self.wrapped_model.adopt_adapters()  # peft lists them right after adding adapters to the shards
        return super().named_parameters(*args, **kwargs)

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        """The split state (keys ``wrapped_model.module_shards.<rank>.<key>``), or inside
        :func:`~tensor_parallel.save_tensor_parallel` the original model's (full tensors)."""
        if self.wrapped_model._unsharded_view:
            return self.wrapped_model.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        return super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)

    def named_modules(self, memo: set | None = None, prefix: str = "", remove_duplicate: bool = True):
        """The shards' modules, or inside :func:`~tensor_parallel.save_tensor_parallel` the
        original model's names (rank 0's shard stands for it)."""
        if self.wrapped_model._unsharded_view:
            yield from _original_named_modules(self, self.wrapped_model, memo, prefix, remove_duplicate)
        else:
            yield from super().named_modules(memo, prefix, remove_duplicate)

    @property
    def module_shards(self) -> nn.ModuleList:
        """One shard of the original model per device."""
        return self.wrapped_model.module_shards

    @property
    def plan(self) -> dict[str, Style]:
        """The plan the model was split with (module path -> style)."""
        return self.wrapped_model.plan

    @property
    def devices(self) -> list[torch.device]:
        """The devices, one per shard."""
        return self.wrapped_model.devices

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._forward(*args, **kwargs)

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.wrapped_model.distributed:  # one rank per process: its own cache, as it is
            return self.wrapped_model(*args, **kwargs)
        name = next((n for n in _CACHE_NAMES if n in kwargs), None)
        given = kwargs.get(name) if name else None
        if given is not None and not isinstance(given, ShardedCache):
            kwargs[name] = self._shard_cache(given, _batch_size(args, kwargs))
        if self.wrapped_model._graphs is not None and name is not None:
            _pad_mask_to_cache(kwargs, kwargs[name])
        outputs = self.wrapped_model.run_shards(_call, *args, **kwargs)
        result = self.wrapped_model.forward_output(outputs[0])
        return _adopt_caches(result, outputs, kwargs.get(name) if name else None)

    def _shard_cache(self, cache: Any, batch_size: int | None = None) -> ShardedCache:
        if not isinstance(cache, Cache):
            raise TypeError(f"a KV cache must be a transformers Cache object, got {type(cache).__name__}")
        if cache.get_seq_length() != 0:
            raise ValueError("this KV cache already holds tokens computed outside the split model; pass "
                             "the cache the split model returned (outputs.past_key_values), or a new one")
        if not cache.is_compileable or self.wrapped_model._graphs is None:
            return ShardedCache([_fresh_copy(cache) for _ in self.wrapped_model.module_shards])
        # With cuda_graphs=True: generate() makes a new, empty static cache per call; the ranks
        # reuse their last one when it has the same layout (reset), which keeps the tensors'
        # addresses, and the graphs captured on them, valid from one generate() to the next
        previous = self._static_cache
        if previous is not None and _same_static_layout(previous.caches[0], cache, batch_size):
            previous.reset()
            return previous
        if previous is not None:
            self.reset_cuda_graphs()  # they hold the old caches: free them
        self._static_cache = ShardedCache([_fresh_copy(cache) for _ in self.module_shards])
        return self._static_cache

    def save_pretrained(self, save_directory: str | os.PathLike, *, max_shard_size: int | str = "5GB",
                        safe_serialization: bool = True, progress: bool | None = None, **kwargs: Any) -> None:
        """Save the split state (every shard's slices) and the config, in files of at most
        ``max_shard_size``, atomically. Load it into a model built the same way, e.g. under
        ``accelerate.init_empty_weights()`` with ``accelerate.load_checkpoint_in_model(model,
        checkpoint=<folder>/pytorch_model.bin.index.json, device_map=tp.infer_sharded_device_map(model))``.

        The index keeps the original library's name, ``pytorch_model.bin.index.json``, so
        scripts written for it run unchanged; the weight files are safetensors unless
        ``safe_serialization=False``.

        Example::

            >>> import os, tempfile, transformers, tensor_parallel as tp
            >>> config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4)
            >>> model = tp.tensor_parallel(transformers.GPT2LMHeadModel(config), ["cpu", "cpu"])
            >>> folder = tempfile.mkdtemp()
            >>> model.save_pretrained(folder, max_shard_size="20KB")
            >>> "pytorch_model.bin.index.json" in os.listdir(folder)
            True
        """
        if self.wrapped_model._unsharded_view:  # inside tp.save_tensor_parallel(model)
            from .convert import save_unsharded

            save_unsharded(self, save_directory, max_shard_size=max_shard_size,
                           safe_serialization=safe_serialization, progress=progress)
            return
        if kwargs:
            logger.info("save_pretrained: ignoring %s (the split state is saved as it is)", sorted(kwargs))
        state = self.state_dict()
        extra = {"config.json": self.config.to_json_string()}
        if getattr(self, "generation_config", None) is not None:
            extra["generation_config.json"] = self.generation_config.to_json_string()
        metadata = {"tensor_parallel_world_size": str(len(self.devices))}
        if self.wrapped_model.sharded_keys:  # their slices are ZeRO-3 pieces: say so for re-cutting
            metadata["tensor_parallel_sharded"] = json.dumps(sorted(self.wrapped_model.sharded_keys))
        write_checkpoint(state, save_directory, max_shard_size=max_shard_size,
                         safe_serialization=safe_serialization, index_name="pytorch_model.bin.index.json",
                         metadata=metadata, progress=progress, extra_files=extra)

    def reset_cuda_graphs(self) -> None:
        """Forget the captured calls of ``cuda_graphs=True`` (see
        :meth:`TensorParallel.reset_cuda_graphs`).

        Example::

            >>> import transformers, tensor_parallel as tp
            >>> config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4)
            >>> tp.tensor_parallel(transformers.GPT2LMHeadModel(config), ["cpu", "cpu"]).reset_cuda_graphs()
        """
        self.wrapped_model.reset_cuda_graphs()

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``GenerationMixin.generate``; with ``cuda_graphs=True`` and no cache chosen, a static
        KV cache (fixed addresses, so the decode steps replay as CUDA graphs). The cache it
        returns stays valid until the next ``generate()``, which reuses the ranks' caches.

        Example::

            >>> import torch, transformers, tensor_parallel as tp
            >>> config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
            ...     num_hidden_layers=1, num_attention_heads=4)
            >>> model = transformers.LlamaForCausalLM(config).eval()
            >>> split = tp.tensor_parallel(model, ["cpu", "cpu"])  # on GPUs: cuda_graphs=True
            >>> split.generate(torch.tensor([[1, 2]]), max_new_tokens=3, do_sample=False).shape
            torch.Size([1, 5])
        """
        config = kwargs.get("generation_config") or self.generation_config
        if self.wrapped_model._graphs is not None and "cache_implementation" not in kwargs \
                and getattr(config, "cache_implementation", None) is None \
                and not any(name in kwargs for name in _CACHE_NAMES):
            kwargs["cache_implementation"] = "static"
        return super().generate(*args, **kwargs)

    def _valid_auto_compile_criteria(self, model_kwargs: dict, generation_config: Any) -> bool:
        """Never compile the split model in generate(): dynamo cannot trace into the ranks'
        threads. With a static cache, ``cuda_graphs=True`` replays the decode steps instead."""
        return False

    @property
    def supports_gradient_checkpointing(self) -> bool:  # type: ignore[override]
        return bool(getattr(self.module_shards[0], "supports_gradient_checkpointing", False))

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute activations in backward, on every shard (one process per rank only).

        In one process the recomputation of every rank would run in the single backward thread,
        and its collectives would wait for ranks that recompute later: under torchrun each rank
        recomputes in its own process and the collectives meet.
        """
        if not self.wrapped_model.distributed:
            raise ValueError("gradient checkpointing needs one process per rank: launch with torchrun "
                             "and split with tp.tensor_parallel(model) after init_process_group(); in one "
                             "process the recomputed collectives of all ranks would share one thread")
        for shard in self.module_shards:
            shard.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self) -> None:
        for shard in self.module_shards:
            shard.gradient_checkpointing_disable()

    def get_encoder(self, *args: Any, **kwargs: Any) -> nn.Module:
        """The encoder of every shard, run together (encoder-decoder models)."""
        return _ParallelEncoder(self.wrapped_model)

    def get_input_embeddings(self) -> nn.Module:
        return self.module_shards[0].get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.module_shards[0].get_output_embeddings()

    def tie_weights(self, *args: Any, **kwargs: Any) -> None:
        """The shards keep the original model's ties; nothing to do."""

    def _init_weights(self, module: nn.Module) -> None:
        """Weights come from the wrapped model; never re-initialise them."""


def _fresh_copy(cache: Cache) -> Cache:
    """A private copy of an empty cache; streams and events (an offloaded cache's) are shared,
    not copied: they cannot be."""
    memo: dict[int, Any] = {}
    for holder in [cache, *getattr(cache, "layers", [])]:
        for value in vars(holder).values():
            if isinstance(value, (torch.Stream, torch.Event)) or type(value).__name__ in ("Stream", "Event"):
                memo[id(value)] = value
    return copy.deepcopy(cache, memo)


def _pad_mask_to_cache(kwargs: dict, cache: Any) -> None:
    """For ``cuda_graphs=True``: a 2-D attention mask that grows by one column per decode step
    is padded with zeros to the static cache's length, as the model's own mask code pads it,
    so every decode step has the same input shapes (one captured graph serves them all)."""
    mask = kwargs.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or not isinstance(cache, ShardedCache) \
            or not cache.caches[0].is_compileable:
        return
    layers = getattr(cache.caches[0], "layers", None) or []  # the self-attention layers the mask is for
    if not all(getattr(layer, "is_initialized", True) for layer in layers):
        return  # prefill: the first call with this cache, never replayed
    length = max((getattr(layer, "max_cache_len", 0) or 0 for layer in layers), default=0)
    if mask.shape[-1] < length:
        kwargs["attention_mask"] = torch.nn.functional.pad(mask, (0, length - mask.shape[-1]))


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    """The batch size of a forward's inputs (``input_ids``, ``inputs_embeds`` or their decoder
    counterparts), if given."""
    names = ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds")
    for value in (*args[:1], *(kwargs.get(name) for name in names)):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


def _same_static_layout(old: Cache, new: Cache, batch_size: int | None) -> bool:
    """Whether ``old`` (a rank's static cache, used before) can stand in for the new empty
    ``new``: same class, layers of the same classes and lengths, allocated for this batch."""
    old_layers, new_layers = _cache_layers(old), _cache_layers(new)
    if type(old) is not type(new) or not old_layers or len(old_layers) != len(new_layers):
        return False
    for before, now in zip(old_layers, new_layers):
        if type(before) is not type(now):
            return False
        for name in ("max_cache_len", "sliding_window"):
            if getattr(before, name, None) != getattr(now, name, None):
                return False
        wanted = getattr(now, "max_batch_size", None)  # set only when allocated before transformers 5.1x
        if wanted is not None and getattr(before, "max_batch_size", None) != wanted:
            return False
        keys = getattr(before, "keys", None)
        if isinstance(keys, torch.Tensor) and keys.dim() > 0 and keys.shape[0] != batch_size:
            return False
    return True


def _call(shard: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return shard(*args, **kwargs)


def _adopt_caches(result: Any, outputs: Sequence[Any], given: ShardedCache | None) -> Any:
    """Put one ShardedCache of every rank's cache where rank 0's cache is in the output."""
    if not hasattr(result, "keys"):
        return result
    for name in _CACHE_NAMES:
        if name in result.keys() and isinstance(result[name], Cache):
            if given is not None and result[name] is given.caches[0]:
                result[name] = given
            else:
                result[name] = ShardedCache([out[name] for out in outputs])
    return result
