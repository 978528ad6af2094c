"""Multi-process mode: torch.distributed with gloo ranks on localhost, each bounded in time."""

from __future__ import annotations

import pytest
import torch
import transformers

import dist_cases
from distributed import assert_all_ok, run_ranks


@pytest.mark.parametrize("world_size", [2, 4])
def test_mlp_outputs_gradients_and_a_step(world_size):
    calls = assert_all_ok(run_ranks(dist_cases.mlp, world_size))
    # the Megatron pair: one all-reduce; the last Linear's split output: one all-gather
    assert calls[0] == {"all_reduce": 1, "all_gather": 1}


@pytest.mark.parametrize("world_size", [2, 4])
def test_llama_logits_generation_and_gradients(world_size):
    tokens = assert_all_ok(run_ranks(dist_cases.llama, world_size))
    assert all(t == tokens[0] for t in tokens)  # every rank generates the same tokens


def test_each_rank_loads_only_its_slices(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=6, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "ckpt")
    sizes = assert_all_ok(run_ranks(dist_cases.load, 2, str(tmp_path / "ckpt")))
    for local, total in sizes:
        assert local < 0.6 * total  # about half, plus the replicated norms


def test_tensor_parallel_inside_data_parallel():
    assert sorted(assert_all_ok(run_ranks(dist_cases.data_and_tensor_parallel, 4))) == [0, 0, 1, 1]


def test_a_failing_rank_does_not_hang_the_others():
    results = run_ranks(dist_cases.one_rank_fails, 2, timeout=90, pg_timeout=20)
    assert results[1][0] == "error" and "on purpose" in results[1][1]
    assert results[0][0] == "ok", results[0]  # rank 0 got an error instead of waiting forever


def test_gradient_checkpointing_under_torch_distributed():
    losses = assert_all_ok(run_ranks(dist_cases.llama_gradient_checkpointing, 2))
    assert losses[0] == losses[1]


def test_gradient_checkpointing_in_one_process_is_refused_clearly():
    import tensor_parallel as tp

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=1,
                                      num_attention_heads=6, num_key_value_heads=2)
    model = tp.tensor_parallel(transformers.LlamaForCausalLM(config), ["cpu", "cpu"])
    with pytest.raises(ValueError, match="one process per rank: launch with torchrun"):
        model.gradient_checkpointing_enable()
