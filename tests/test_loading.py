"""tp.from_pretrained: ordinary checkpoints straight into each device's slice; re-sharding;
bad checkpoints refused with an error naming the file and the tensor."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import tensor_parallel as tp
from tensor_parallel.checkpoint import CheckpointError
from helpers import assert_close

VOCAB = 97
CONFIGS = {
    "opt": lambda: transformers.OPTConfig(vocab_size=VOCAB, hidden_size=48, ffn_dim=80, num_hidden_layers=2,
                                          num_attention_heads=6, max_position_embeddings=64, word_embed_proj_dim=48),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=6, n_positions=64),
    "llama": lambda: transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80,
                                              num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                                              max_position_embeddings=64),
}
IDS = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])


def _save(tmp_path, name, **kwargs):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()
    folder = tmp_path / name
    model.save_pretrained(folder, **kwargs)
    return model, folder


def _check(split, reference):
    with torch.no_grad():
        assert_close(split(IDS).logits, reference(IDS).logits, "logits of the loaded model")
    assert torch.equal(split.generate(IDS[:1], max_new_tokens=5, do_sample=False),
                       reference.generate(IDS[:1], max_new_tokens=5, do_sample=False))


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_from_pretrained_sharded_safetensors(tmp_path, name, n):
    reference, folder = _save(tmp_path, name, max_shard_size="30KB")
    assert (folder / "model.safetensors.index.json").exists()
    split = tp.from_pretrained(folder, ["cpu"] * n)
    assert isinstance(split, tp.TensorParallelPreTrainedModel)
    assert not [k for k, p in split.named_parameters() if p.device.type == "meta"]
    _check(split, reference)
    if name != "llama":  # tied: each shard's LM head is its embedding slice
        shard = split.module_shards[0]
        assert shard.get_output_embeddings().weight is shard.get_input_embeddings().weight


def test_from_pretrained_single_file_and_class_method(tmp_path):
    reference, folder = _save(tmp_path, "llama")
    assert (folder / "model.safetensors").exists()
    _check(tp.TensorParallelPreTrainedModel.from_pretrained(folder, ["cpu", "cpu"]), reference)


def test_from_pretrained_bin_files(tmp_path):
    reference, folder = _save(tmp_path, "gpt2")
    state = load_file(folder / "model.safetensors")
    os.remove(folder / "model.safetensors")
    torch.save(state, folder / "pytorch_model.bin")
    _check(tp.from_pretrained(folder, ["cpu", "cpu"]), reference)


def test_dtype(tmp_path):
    _, folder = _save(tmp_path, "llama")
    split = tp.from_pretrained(folder, ["cpu", "cpu"], dtype=torch.bfloat16)
    assert {p.dtype for p in split.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("saved, loaded", [(2, 3), (3, 2), (3, 4)])
def test_resharding_a_saved_split_state(tmp_path, saved, loaded):
    reference, folder = _save(tmp_path, "llama")
    tp.from_pretrained(folder, ["cpu"] * saved).save_pretrained(tmp_path / "split", max_shard_size="40KB")
    index = json.loads((tmp_path / "split" / "pytorch_model.bin.index.json").read_text())
    assert index["metadata"]["tensor_parallel_world_size"] == str(saved)
    _check(tp.from_pretrained(tmp_path / "split", ["cpu"] * loaded), reference)


def test_resharding_tied_opt(tmp_path):
    reference, folder = _save(tmp_path, "opt")
    tp.from_pretrained(folder, ["cpu"] * 3).save_pretrained(tmp_path / "split")
    _check(tp.from_pretrained(tmp_path / "split", ["cpu"] * 2), reference)


# --------------------------------------------------------------------------------------------
# Bad checkpoints
# --------------------------------------------------------------------------------------------


def _edit_single(folder, edit):
    path = folder / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


@pytest.mark.parametrize("edit, words", [
    (lambda s: s.pop("model.layers.1.mlp.up_proj.weight"), r"lacks 1 tensor.*model.layers.1.mlp.up_proj.weight"),
    (lambda s: s.__setitem__("model.layers.9.extra", torch.zeros(2)), r"does not have.*'model.layers.9.extra' in model.safetensors"),
    (lambda s: s.__setitem__("model.norm.weight", torch.zeros(3)), r"'model.norm.weight' in model.safetensors has shape \[3\]"),
    (lambda s: s.__setitem__("model.norm.weight", torch.zeros(48, dtype=torch.int32)), r"'model.norm.weight' in model.safetensors is torch.int32"),
])
def test_bad_tensors_are_named(tmp_path, edit, words):
    _, folder = _save(tmp_path, "llama")
    _edit_single(folder, edit)
    with pytest.raises(CheckpointError, match=words):
        tp.from_pretrained(folder, ["cpu", "cpu"])


def test_missing_file_named_in_the_index(tmp_path):
    _, folder = _save(tmp_path, "llama", max_shard_size="30KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    os.remove(folder / victim)
    with pytest.raises(CheckpointError, match=f"names the file {victim}, which is missing"):
        tp.from_pretrained(folder, ["cpu", "cpu"])


def test_truncated_file(tmp_path):
    _, folder = _save(tmp_path, "llama", max_shard_size="30KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    victim = folder / sorted(set(index["weight_map"].values()))[2]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=victim.name):
        tp.from_pretrained(folder, ["cpu", "cpu"])


def test_a_failed_load_leaves_nothing_half_loaded(tmp_path):
    from tensor_parallel.checkpoint import FileSource, load_shards
    from tensor_parallel.hf.loading import empty_model

    _, folder = _save(tmp_path, "llama", max_shard_size="30KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    victim = folder / sorted(set(index["weight_map"].values()))[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[:-100])  # the header is intact: the failure comes mid-load
    model = tp.TensorParallelPreTrainedModel(empty_model(folder), ["cpu", "cpu"])
    with pytest.raises(CheckpointError):
        load_shards(model.wrapped_model, FileSource(folder))
    assert all(p.device.type == "meta" for p in model.parameters())


def test_checkpoint_of_another_architecture(tmp_path):
    _, llama = _save(tmp_path, "llama")
    _, gpt2 = _save(tmp_path, "gpt2")
    (llama / "model.safetensors").unlink()
    (gpt2 / "model.safetensors").rename(llama / "model.safetensors")
    with pytest.raises(CheckpointError, match="another architecture|lacks"):
        tp.from_pretrained(llama, ["cpu", "cpu"])


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/tensor_parallel_pwned",))


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    _, folder = _save(tmp_path, "gpt2")
    state = load_file(folder / "model.safetensors")
    os.remove(folder / "model.safetensors")
    state["transformer.h.0.attn.c_attn.weight"] = _Exploit()
    with open(folder / "pytorch_model.bin", "wb") as handle:
        pickle.dump(state, handle)
    with pytest.raises(CheckpointError, match="refusing to load it"):
        tp.from_pretrained(folder, ["cpu", "cpu"])
    assert not os.path.exists("/tmp/tensor_parallel_pwned")


def test_not_a_folder(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        tp.from_pretrained(tmp_path / "nope", ["cpu", "cpu"])


def test_gradients_after_loading_a_fused_qkv_with_replicated_kv_heads(tmp_path):
    from helpers import assert_gradients_match

    torch.manual_seed(0)
    config = transformers.Phi3Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                     num_attention_heads=6, num_key_value_heads=2, pad_token_id=0)
    reference = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    reference.save_pretrained(tmp_path / "phi3")
    split = tp.from_pretrained(tmp_path / "phi3", ["cpu"] * 3)  # 2 KV heads over 3 ranks, inside qkv_proj
    expected, actual = reference(IDS, labels=IDS), split(IDS, labels=IDS)
    assert_close(actual.loss, expected.loss, "loss")
    expected.loss.backward()
    actual.loss.backward()
    assert_gradients_match(split.wrapped_model, reference)
