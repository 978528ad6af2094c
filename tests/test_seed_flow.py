"""The seed document's memory-efficient dispatch flow (shared/seed/), run as written there
(with its typos fixed: RAM_USAGE_LIMIT -> RAM_LIMIT, model_tp -> model, AutoConfig imported).

Tiny models from configs stand in for facebook/opt-13b; a local folder stands in for the hub.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers
from accelerate import init_empty_weights, load_checkpoint_in_model
from safetensors.torch import load_file
from transformers import AutoConfig

import tensor_parallel as tp
from helpers import assert_close

VOCAB = 97


def _opt():
    return transformers.OPTConfig(vocab_size=VOCAB, hidden_size=48, ffn_dim=80, num_hidden_layers=2,
                                  num_attention_heads=6, max_position_embeddings=64, word_embed_proj_dim=48)


def _gpt2():
    return transformers.GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=6, n_positions=64)


def _llama_gqa():
    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                    num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("make_config", [_opt, _gpt2, _llama_gqa], ids=["opt", "gpt2", "llama-gqa"])
def test_seed_flow(tmp_path, make_config, n):
    torch.manual_seed(0)
    pretrained = tmp_path / "pretrained"
    transformers.AutoModelForCausalLM.from_config(make_config()).save_pretrained(pretrained)
    saved = tmp_path / "split"

    # --- the seed: save the distributed state ---
    RAM_LIMIT = "20KB"  # tiny files, so that the index really has many of them
    model = tp.TensorParallelPreTrainedModel(
        transformers.AutoModelForCausalLM.from_pretrained(pretrained),
        device_ids=["cpu"] * n  # split model but load into RAM
    )
    model.save_pretrained(saved, max_shard_size=RAM_LIMIT)  # save model's distributed state

    # --- the seed: load it on "another machine" ---
    with init_empty_weights():
        model = tp.TensorParallelPreTrainedModel(
            transformers.AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(saved)
            ),
            device_ids=["cpu"] * n  # and prepare it to be put on GPUs 0 and 1
        )
    device_map = tp.infer_sharded_device_map(model)  # assign parameter to devices
    load_checkpoint_in_model(
        model,
        checkpoint=os.path.join(saved, "pytorch_model.bin.index.json"),
        device_map=device_map,
    )

    model.eval()
    reference = transformers.AutoModelForCausalLM.from_pretrained(pretrained).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    assert not [name for name, p in model.named_parameters() if p.device.type == "meta"]
    with torch.no_grad():
        assert_close(model(ids).logits, reference(ids).logits, "logits after the seed flow")
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False),
                       reference.generate(ids, max_new_tokens=5, do_sample=False))
    weight_map = json.loads((saved / "pytorch_model.bin.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 3
    for name in set(weight_map.values()):
        # every file holds at most max_shard_size of tensors, or a single larger tensor
        tensors = load_file(saved / name)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= 20_000 or len(tensors) == 1, (name, size, len(tensors))


def test_tied_embeddings_stay_tied_after_the_seed_flow(tmp_path):
    torch.manual_seed(0)
    model = tp.TensorParallelPreTrainedModel(transformers.AutoModelForCausalLM.from_config(_opt()), ["cpu", "cpu"])
    model.save_pretrained(tmp_path / "split")
    with init_empty_weights():
        empty = tp.TensorParallelPreTrainedModel(transformers.AutoModelForCausalLM.from_config(_opt()), ["cpu", "cpu"])
    load_checkpoint_in_model(empty, checkpoint=str(tmp_path / "split" / "pytorch_model.bin.index.json"),
                             device_map=tp.infer_sharded_device_map(empty))
    for shard in empty.module_shards:
        assert shard.lm_head.weight is shard.model.decoder.embed_tokens.weight


def test_bin_files_when_asked(tmp_path):
    model = tp.TensorParallelPreTrainedModel(transformers.AutoModelForCausalLM.from_config(_gpt2()), ["cpu", "cpu"])
    model.save_pretrained(tmp_path / "split", safe_serialization=False, max_shard_size="50KB")
    names = set(json.loads((tmp_path / "split" / "pytorch_model.bin.index.json").read_text())["weight_map"].values())
    assert names and all(n.endswith(".bin") for n in names)
    with init_empty_weights():
        empty = tp.TensorParallelPreTrainedModel(transformers.AutoModelForCausalLM.from_config(_gpt2()), ["cpu", "cpu"])
    load_checkpoint_in_model(empty, checkpoint=str(tmp_path / "split"), device_map=tp.infer_sharded_device_map(empty))
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert_close(empty.eval()(ids).logits, model.eval()(ids).logits, "logits from .bin files")
