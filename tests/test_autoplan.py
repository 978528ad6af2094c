"""Automatic plans: models nobody wrote a plan for split at the Megatron floor, checked."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tensor_parallel as tp
from helpers import assert_close, check_equivalence
from hf_models import VOCAB, build
from nanogpt import GPT, Mixer


def _collectives(model, *inputs) -> dict[str, int]:
    with tp.count_collectives() as stats:
        model(*inputs)
    return dict(stats.calls)


@pytest.mark.parametrize("flash", [False, True])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_nanogpt_attention_and_mlp_split_at_the_floor(n, flash):
    torch.manual_seed(0)
    model = GPT(flash=flash)  # 6 heads: 3 and 4 devices split them unevenly
    ids = torch.randint(0, 64, (2, 10))
    plan = tp.plan_for(model, n, example_inputs=(ids[:1, :4],))
    for block in ("h.0", "h.1"):
        attention = plan[f"{block}.attn"]
        assert isinstance(attention, tp.AttentionParallel) and attention.qkv == "c_attn"
        assert (attention.num_heads, attention.head_dim) == (6, 8)
        assert plan[f"{block}.mlp.c_fc"] == tp.ColwiseParallel()
        assert plan[f"{block}.mlp.c_proj"] == tp.RowwiseParallel()
    assert "lm_head" not in plan  # tied to the embedding: replicated
    split = check_equivalence(model, (ids,), n, plan=plan)
    # 2 blocks x (attention + MLP) = 4 all-reduces; the position embedding's all-gather
    assert _collectives(split, ids) == {"all_reduce": 4, "all_gather": 1}


@pytest.mark.parametrize("n", [2, 3])
def test_mlp_mixer_pairs_token_and_channel_mixing(n):
    torch.manual_seed(0)
    model = Mixer()
    x = torch.randn(3, 8, 12)
    plan = tp.plan_for(model, n, example_inputs=(x[:1],))
    for block in ("blocks.0", "blocks.1"):  # the token MLP works on the transposed sequence axis
        for mlp in ("token_mlp", "channel_mlp"):
            assert plan[f"{block}.{mlp}.0"] == tp.ColwiseParallel()
            assert plan[f"{block}.{mlp}.2"] == tp.RowwiseParallel()
    split = check_equivalence(model, (x,), n, plan=plan)
    assert _collectives(split, x) == {"all_reduce": 4, "all_gather": 2}


class WidthScaled(nn.Module):
    """Scales by its own width: fine whole, wrong when each rank sees only its slice."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)
        self.fine_up, self.fine_down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        h = self.up(x)
        x = x + self.down(h * h.shape[-1] ** -0.5)
        return x + self.fine_down(F.relu(self.fine_up(x)))


def test_self_check_falls_back_for_the_layer_at_fault(caplog):
    torch.manual_seed(0)
    model = WidthScaled()
    x = torch.randn(4, 8)
    with caplog.at_level(logging.INFO, logger="tensor_parallel.autoplan"):
        plan = tp.plan_for(model, 2, example_inputs=(x[:1],))
    assert plan["up"] == tp.ColwiseParallel(gather_output=True)
    assert plan["down"] == tp.ColwiseParallel(gather_output=True)
    assert plan["fine_up"] == tp.ColwiseParallel() and plan["fine_down"] == tp.RowwiseParallel()
    assert any("up: ColwiseParallel(), down: RowwiseParallel() fails its check" in r.message for r in caplog.records)
    check_equivalence(model, (x,), 2, plan=plan)


HF_TYPES = ["llama", "qwen3", "gemma2", "gpt_neox", "opt", "gptj"]


def _generic(model, n):
    """Our built-in plan and the config's shipped tp_plan switched off."""
    from tensor_parallel.hf.plans import _probe_inputs

    return tp.plan_for(model, n, example_inputs=_probe_inputs(model), builtin=False)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("name", HF_TYPES)
def test_transformers_models_without_plans_reach_two_all_reduces_per_layer(name, n):
    model = build(name, attn="eager").eval()
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    plan = _generic(model, n)
    attention = [s for s in plan.values() if isinstance(s, tp.AttentionParallel)]
    assert len(attention) == model.config.num_hidden_layers, tp.format_plan(plan)
    split = tp.tensor_parallel(copy.deepcopy(model), ["cpu"] * n, plan=plan)
    with torch.no_grad():
        assert_close(split(ids).logits, model(ids).logits, f"{name} logits")
        calls = _collectives(split, ids)
    assert calls["all_reduce"] == 2 * model.config.num_hidden_layers, calls
    assert calls.get("all_gather", 0) <= 2, calls  # the embedding and the LM head, at most


@pytest.mark.parametrize("name", ["qwen3", "gpt_neox"])
def test_meta_models_get_the_plan_of_real_ones(name):
    """The seed flow builds on the meta device: the trace runs there, checks on random copies."""
    import transformers
    from accelerate import init_empty_weights

    real = build(name, attn="eager")
    with init_empty_weights():
        empty = transformers.AutoModelForCausalLM.from_config(real.config)
    assert _generic(empty, 3) == _generic(real, 3)


def test_tensor_parallel_takes_example_inputs_for_plain_modules():
    torch.manual_seed(0)
    model = GPT(n_head=4, n_embd=32)
    ids = torch.randint(0, 64, (2, 9))
    split = tp.tensor_parallel(copy.deepcopy(model), ["cpu"] * 2, example_inputs=(ids[:1, :3],))
    assert isinstance(split.plan["h.0.attn"], tp.AttentionParallel)
    assert_close(split(ids), model(ids), "logits")


def test_plan_command_prints_the_automatic_plan(capsys, tmp_path):
    from tensor_parallel.cli import main

    build("qwen2").config.save_pretrained(tmp_path)
    assert main(["plan", str(tmp_path), "--devices", "3", "--automatic"]) == 0
    out = capsys.readouterr().out
    assert "AttentionParallel(" in out and "RowwiseParallel()" in out
    # 2 layers: attention and MLP all-reduce once each; the embedding and LM head gather
    assert "all_gather x2, all_reduce x4" in out


def test_plain_modules_with_one_input_are_probed_without_example_inputs():
    torch.manual_seed(0)
    model = GPT()  # its first weight is an embedding: the probe is 4 token ids
    plan = tp.plan_for(model, 3)
    assert isinstance(plan["h.1.attn"], tp.AttentionParallel)
    assert plan["h.1.mlp.c_proj"] == tp.RowwiseParallel()


def test_planning_leaves_buffers_and_the_random_stream_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Dropout(0.5), nn.ReLU(), nn.Linear(12, 6))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    tp.plan_for(model, 2)
    assert torch.equal(torch.rand(3), expected)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


class ReadsAWeight(nn.Module):
    """Uses ``proj``'s weight itself and never calls ``proj`` (as Mamba's scan does)."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.proj, self.down = nn.Linear(8, 16), nn.Linear(16, 16, bias=False), nn.Linear(16, 8)

    def forward(self, x):
        return self.down(F.linear(F.relu(self.up(x)), self.proj.weight))


def test_weights_read_outside_their_layer_stay_whole():
    torch.manual_seed(0)
    model = ReadsAWeight()
    x = torch.randn(3, 8)
    plan = tp.plan_for(model, 2, example_inputs=(x[:1],))
    assert "proj" not in plan and plan["up"] == tp.ColwiseParallel(gather_output=True)
    check_equivalence(model, (x,), 2, plan=plan)
