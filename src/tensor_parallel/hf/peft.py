"""LoRA adapters of peft on split models.

peft's LoRA ``Linear`` is registered as an adapter layer (:class:`~tensor_parallel.styles.AdapterKind`),
so every style that splits a linear layer splits its adapters the same way: column split, each
``lora_B`` by output rows like the base layer (``lora_A`` replicated); row split, each
``lora_A`` by input columns like the base layer, its small ``r``-wide output all-reduced, then
``lora_B`` replicated.

Both orders work:

* ``peft.get_peft_model(model, config)`` then :func:`tensor_parallel.tensor_parallel`: the
  peft model comes back as a peft model of the same class around the split model;
* ``tp.tensor_parallel(model, ...)`` then ``peft.get_peft_model(split, config)`` (or
  ``PeftModel.from_pretrained(split, adapter_dir)``): peft adds the adapters to every shard,
  and the split model takes them over (:func:`tensor_parallel.adapters.adopt_adapters`).

Inside ``with tp.save_tensor_parallel(peft_model):``, ``peft_model.save_pretrained(dir)`` writes
ordinary (unsharded) adapter weights, and adapter weights with the original names load into
the split model (``load_state_dict`` cuts them).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any, Mapping

from peft import PeftModel
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from ..styles import AdapterKind, register_adapter_kind

__all__ = ["split_peft_model", "rename_adapter_keys"]


def _lora_branches(module: nn.Module) -> list[tuple[str, str]]:
    return [(f"lora_A.{name}", f"lora_B.{name}") for name in module.lora_A if name in module.lora_B]


def _check_lora(module: nn.Module, path: str) -> None:
    variants = sorted(set(getattr(module, "lora_variant", {})) | {n for n, on in module.use_dora.items() if on})
    if variants:
        raise TypeError(f"'{path}' holds adapters {variants} of a LoRA variant (DoRA, ...) whose extra weights are "
                        f"computed from the whole base weight; split only plain LoRA adapters, or use "
                        f"Replicate() for '{path}'")


register_adapter_kind(LoraLinear, AdapterKind(base="base_layer", branches=_lora_branches, check=_check_lora))


def split_peft_model(peft_model: PeftModel, device_ids: Any = None, **options: Any) -> PeftModel:
    """Split the model inside a peft model (adapters included, each cut like its layer) and
    return a peft model of the same class around the split model; ``peft_model`` is left
    unchanged. ``tp.tensor_parallel(peft_model, ...)`` calls this.

    Example::

        >>> import torch, transformers, peft, tensor_parallel as tp
        >>> config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
        >>> lora = peft.get_peft_model(transformers.LlamaForCausalLM(config),
        ...                            peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "o_proj"], r=4))
        >>> split = tp.tensor_parallel(lora, ["cpu", "cpu"])
        >>> type(split).__name__, split.base_model.model.module_shards[1].model.layers[0].self_attn.q_proj.lora_B.default.weight.shape
        ('PeftModelForCausalLM', torch.Size([16, 4]))
    """
    from ..runtime import tensor_parallel

    tuner = peft_model.base_model
    if peft_model.active_peft_config.is_prompt_learning or not hasattr(tuner, "model"):
        raise TypeError(f"tensor_parallel splits peft models of adapter layers (LoRA); "
                        f"{type(tuner).__name__} is prompt learning: split the base model first, then "
                        f"add the prompt with peft")
    split = tensor_parallel(tuner.model, device_ids, **options)
    tuner = copy.copy(tuner)  # shallow copies: the caller's peft model keeps its own model
    tuner._modules = dict(tuner._modules, model=split)
    shell = copy.copy(peft_model)
    shell._modules = dict(peft_model._modules, base_model=tuner)
    if hasattr(shell, "base_model_prepare_inputs_for_generation") and hasattr(split, "prepare_inputs_for_generation"):
        shell.base_model_prepare_inputs_for_generation = split.prepare_inputs_for_generation
    return shell


def rename_adapter_keys(layout: Mapping[str, Any], state_dict: dict, prefix: str) -> None:
    """Rename the keys of an ordinary adapter checkpoint, which peft writes without the adapter's
    name (``...q_proj.lora_A.weight``), to the split model's keys (``...q_proj.lora_A.default.weight``),
    in place, for layers holding one adapter (else the name is ambiguous, and the key is left).

    Example::

        >>> state = {"m.q.lora_A.weight": 1}
        >>> rename_adapter_keys({"q.lora_A.default.weight": None}, state, "m.")
        >>> state
        {'m.q.lora_A.default.weight': 1}
    """
    by_alias: dict[str, list[str]] = defaultdict(list)
    for key in layout:
        parts = key.split(".")
        for i, part in enumerate(parts[:-2]):
            if part in ("lora_A", "lora_B"):
                by_alias[".".join(parts[:i + 1] + parts[i + 2:])].append(key)
    for alias, keys in by_alias.items():
        if len(keys) == 1 and prefix + alias in state_dict and prefix + keys[0] not in state_dict:
            state_dict[prefix + keys[0]] = state_dict.pop(prefix + alias)
