"""Tiny transformers models built from configs (no downloads), one per architecture."""

from __future__ import annotations

import torch
import transformers

VOCAB = 97  # prime: the vocabulary never splits evenly

# 6 query heads and 2 KV heads: uneven head splits at 4 devices, KV replication at 3 and 4
_COMMON = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
               num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64)

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_COMMON),
    "mistral": lambda: transformers.MistralConfig(**_COMMON),
    "qwen2": lambda: transformers.Qwen2Config(**_COMMON),
    "qwen3": lambda: transformers.Qwen3Config(**_COMMON, head_dim=8),
    "gemma": lambda: transformers.GemmaConfig(**_COMMON, head_dim=8),
    "gemma2": lambda: transformers.Gemma2Config(**_COMMON, head_dim=8),
}

CAUSAL_LM = {name: transformers.AutoModelForCausalLM for name in CONFIGS}


def build(name: str, seed: int = 0, attn: str = "sdpa") -> transformers.PreTrainedModel:
    """The tiny model ``name`` in eval mode with random weights from ``seed``."""
    torch.manual_seed(seed)
    config = CONFIGS[name]()
    try:
        model = CAUSAL_LM[name].from_config(config, attn_implementation=attn)
    except ValueError:  # the architecture has no SDPA path: eager it is
        torch.manual_seed(seed)
        model = CAUSAL_LM[name].from_config(config, attn_implementation="eager")
    return model.eval()


def num_layers(model) -> int:
    config = model.config
    return getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None) or config.num_layers
