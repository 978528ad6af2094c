"""Tiny transformers models built from configs (no downloads), one per architecture."""

from __future__ import annotations

import torch
import transformers

VOCAB = 97  # prime: the vocabulary never splits evenly

# 6 query heads and 2 KV heads: uneven head splits at 4 devices, KV replication at 3 and 4
_COMMON = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
               num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64)

_MHA = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
            num_attention_heads=6, max_position_embeddings=64)

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_COMMON),
    "mistral": lambda: transformers.MistralConfig(**_COMMON),
    "qwen2": lambda: transformers.Qwen2Config(**_COMMON),
    "qwen3": lambda: transformers.Qwen3Config(**_COMMON, head_dim=8),
    "gemma": lambda: transformers.GemmaConfig(**_COMMON, head_dim=8),
    "gemma2": lambda: transformers.Gemma2Config(**_COMMON, head_dim=8),
    "mixtral": lambda: transformers.MixtralConfig(**_COMMON, num_local_experts=4, num_experts_per_tok=2),
    "phi3": lambda: transformers.Phi3Config(**_COMMON, pad_token_id=0),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=6, n_positions=64),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**_MHA),
    "gptj": lambda: transformers.GPTJConfig(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=6, rotary_dim=4,
                                            n_positions=64),
    "opt": lambda: transformers.OPTConfig(vocab_size=VOCAB, hidden_size=48, ffn_dim=80, num_hidden_layers=2,
                                          num_attention_heads=6, max_position_embeddings=64,
                                          word_embed_proj_dim=48),
    "bloom": lambda: transformers.BloomConfig(vocab_size=VOCAB, hidden_size=48, n_layer=2, n_head=6),
    "falcon": lambda: transformers.FalconConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2,
                                                num_attention_heads=6),
    "falcon_alibi": lambda: transformers.FalconConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2,
                                                      num_attention_heads=6, alibi=True, multi_query=False),
    "falcon_new": lambda: transformers.FalconConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2,
                                                    num_attention_heads=6, num_kv_heads=2,
                                                    new_decoder_architecture=True),
    "t5": lambda: transformers.T5Config(vocab_size=VOCAB, d_model=48, d_kv=8, d_ff=80, num_layers=2,
                                        num_heads=6, decoder_start_token_id=0),
    "bert": lambda: transformers.BertConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2,
                                            num_attention_heads=6, intermediate_size=80),
    "roberta": lambda: transformers.RobertaConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2,
                                                  num_attention_heads=6, intermediate_size=80),
}

#: encoder-only models: no generation, and the bidirectional attention of a masked LM
ENCODERS = {"bert", "roberta"}
SEQ2SEQ = {"t5"}

CAUSAL_LM = {name: transformers.AutoModelForCausalLM for name in CONFIGS}
CAUSAL_LM.update({name: transformers.AutoModelForMaskedLM for name in ENCODERS})
CAUSAL_LM.update({name: transformers.AutoModelForSeq2SeqLM for name in SEQ2SEQ})


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
