"""Pre-splitting, merging and unsharded saving of whole checkpoints; atomic saves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers

import tensor_parallel as tp
from helpers import assert_close

IDS = torch.tensor([[5, 6, 7, 8, 9]])


def _gpt2(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=97, n_embd=48, n_layer=2, n_head=6, n_positions=64)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(tmp_path / "hf")
    return model


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "tensor_parallel.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_cli_shard_then_merge_round_trip(tmp_path):
    reference = _gpt2(tmp_path)
    out = _cli("shard", tmp_path / "hf", tmp_path / "split3", "--devices", 3, "--max-shard-size", "40KB")
    assert out.returncode == 0, out.stderr
    index = json.loads((tmp_path / "split3" / "pytorch_model.bin.index.json").read_text())
    assert index["metadata"]["tensor_parallel_world_size"] == "3"
    with torch.no_grad():
        assert_close(tp.from_pretrained(tmp_path / "split3", ["cpu"] * 3)(IDS).logits, reference(IDS).logits, "3")
        assert_close(tp.from_pretrained(tmp_path / "split3", ["cpu"] * 2)(IDS).logits, reference(IDS).logits, "3->2")
    out = _cli("merge", tmp_path / "split3", tmp_path / "merged")
    assert out.returncode == 0, out.stderr
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    for key, value in reference.state_dict().items():
        assert torch.equal(merged.state_dict()[key], value), key


def test_cli_errors_are_one_line(tmp_path):
    out = _cli("merge", tmp_path / "nothing", tmp_path / "out")
    assert out.returncode == 1 and "tensor-parallel merge:" in out.stderr and "Traceback" not in out.stderr
    _gpt2(tmp_path)
    out = _cli("merge", tmp_path / "hf", tmp_path / "out")
    assert out.returncode == 1 and "not a split state" in out.stderr


@pytest.mark.parametrize("n", [2, 3])
def test_save_unsharded_loads_in_plain_transformers(tmp_path, n):
    reference = _gpt2(tmp_path)
    split = tp.from_pretrained(tmp_path / "hf", ["cpu"] * n)
    split.save_unsharded(tmp_path / "plain", max_shard_size="30KB")
    assert (tmp_path / "plain" / "model.safetensors.index.json").exists()
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    with torch.no_grad():
        assert_close(plain(IDS).logits, reference(IDS).logits, "logits of the merged model")


_SLOW_SAVE = textwrap.dedent("""
    import sys, time, torch, transformers, tensor_parallel as tp
    from tensor_parallel import checkpoint
    original = checkpoint._write_file
    def slow(*args, **kwargs):
        original(*args, **kwargs)
        print("file written", flush=True)
        time.sleep(0.5)
    checkpoint._write_file = slow
    config = transformers.GPT2Config(vocab_size=97, n_embd=48, n_layer=2, n_head=6, n_positions=64)
    model = tp.tensor_parallel(transformers.GPT2LMHeadModel(config), ["cpu", "cpu"])
    model.save_pretrained(sys.argv[1], max_shard_size="20KB")
""")


def test_a_killed_save_leaves_the_previous_checkpoint_intact(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=97, n_embd=48, n_layer=2, n_head=6, n_positions=64)
    model = tp.tensor_parallel(transformers.GPT2LMHeadModel(config).eval(), ["cpu", "cpu"])
    target = tmp_path / "ckpt"
    model.save_pretrained(target)
    before = sorted(os.listdir(target))
    saver = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, str(target)], stdout=subprocess.PIPE, text=True)
    assert saver.stdout.readline().strip() == "file written"  # killed in the middle of the save
    saver.send_signal(signal.SIGKILL)
    saver.wait(timeout=30)
    assert sorted(os.listdir(target)) == before
    loaded = tp.from_pretrained(target, ["cpu", "cpu"])
    with torch.no_grad():
        assert_close(loaded(IDS).logits, model(IDS).logits, "the previous checkpoint")


def test_cli_plan_prints_the_plan_and_its_collectives(tmp_path):
    out = _cli("plan", "gpt2", "--devices", 3)
    assert out.returncode == 0, out.stderr
    assert "AttentionParallel" in out.stdout and "collectives per forward over 3 devices" in out.stdout
    # gpt2's default config: 12 layers, 2 all-reduces each; a tied vocab-split embedding and head
    assert "all_reduce x25" in out.stdout and "all_gather x1" in out.stdout
    out = _cli("plan", "no-such-model-type")
    assert out.returncode == 1 and "tensor-parallel plan:" in out.stderr


def test_plan_for_a_transformers_model_is_its_built_in_plan():
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=97, n_embd=48, n_layer=2, n_head=6))
    plan = tp.plan_for(model, 2)
    assert isinstance(plan["transformer.h.*.attn"], tp.AttentionParallel)
    # 1024 positions make the vocabulary 4% of this model: the embedding and LM head stay
    # whole, and only the 2 all-reduces per layer remain
    assert plan["transformer.wte"] == tp.Replicate() and plan["lm_head"] == tp.Replicate()
    assert tp.expected_collectives(model, plan, 2) == {"all_reduce": 4}


def test_save_tensor_parallel_on_a_transformers_model(tmp_path):
    reference = _gpt2(tmp_path)
    split = tp.tensor_parallel(reference, ["cpu", "cpu", "cpu"])
    with tp.save_tensor_parallel(split):
        state = split.state_dict()
        split.save_pretrained(tmp_path / "whole")
    assert state.keys() == reference.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in reference.state_dict().items())
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "whole").eval()
    with torch.no_grad():
        assert_close(plain(IDS).logits, reference(IDS).logits, "saved whole inside save_tensor_parallel")
    assert "wrapped_model.module_shards.0.lm_head.weight" in split.state_dict()
