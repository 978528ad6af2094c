"""LoRA adapters (peft) on split models: each adapter cut like its layer, in either order
(peft first, or peft on the split model), with the unsharded peft model's outputs and adapter
gradients; adapters saved as ordinary peft checkpoints and loaded into split models."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file

import dist_cases
import hf_models
import tensor_parallel as tp
from distributed import assert_all_ok, run_ranks
from helpers import assert_close

IDS = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
# column-split (q, v, up, the gathered lm_head) and row-split (o, down) layers
TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj", "lm_head"]


def _config(**extra):
    # init_lora_weights=False: lora_B random too, so every adapter changes the outputs
    return peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=TARGETS, init_lora_weights=False, **extra)


def _split_of(model) -> tp.TensorParallel:
    return model.base_model.model.wrapped_model


def _assert_adapter_gradients_match(model, reference) -> int:
    """Every rank's adapter parameters hold their slice of the unsharded adapter gradient."""
    split = _split_of(model)
    want = {k: p.grad for k, p in reference.base_model.model.named_parameters() if p.requires_grad}
    checked = 0
    for rank, shard in zip(split.shard_ranks, split.module_shards):
        for key, param in shard.named_parameters():
            if param.requires_grad and param.numel():
                spec = split.layout[key]
                assert_close(param.grad, want[key] if spec is None else spec.take(want[key], rank),
                             f"gradient of {key} on rank {rank}")
                checked += 1
    return checked


@pytest.mark.parametrize("devices", [["cpu", "cpu"], ["cpu:0", "cpu:1", "cpu:2"]], ids=["2", "3-distinct"])
def test_peft_first_then_split_equals_unsharded(devices):
    torch.manual_seed(1)
    reference = peft.get_peft_model(hf_models.build("llama"), _config())
    model = tp.tensor_parallel(reference, devices)
    assert type(model) is type(reference) and model is not reference
    assert not isinstance(reference.base_model.model, tp.TensorParallelPreTrainedModel)  # left unchanged
    split = _split_of(model)
    n = len(devices)
    assert split.layout["model.layers.0.mlp.up_proj.lora_B.default.weight"].dim == 0  # cut like the column
    assert split.layout["model.layers.0.mlp.up_proj.lora_A.default.weight"] is None
    assert split.layout["model.layers.0.mlp.down_proj.lora_A.default.weight"].dim == 1  # like the row
    assert split.layout["model.layers.0.mlp.down_proj.lora_B.default.weight"] is None
    with tp.count_collectives() as stats:
        got = model(input_ids=IDS, labels=IDS)
    # the base model's 2 all-reduces per layer, plus one of the r-wide adapter activation per
    # row-split layer (o, down); the embedding's and the logits' all-gathers
    assert dict(stats.calls) == {"all_reduce": 4 + 4, "all_gather": 2}
    want = reference(input_ids=IDS, labels=IDS)
    assert_close(got.logits, want.logits, f"logits over {n} devices")
    got.loss.backward()
    want.loss.backward()
    assert _assert_adapter_gradients_match(model, reference) >= 2 * n * len(TARGETS)
    for optimizer in (torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(reference.parameters(), lr=0.1)):
        optimizer.step()
    with torch.no_grad():
        assert_close(model(input_ids=IDS).logits, reference(input_ids=IDS).logits, "logits after a step")


def test_adapters_save_as_ordinary_peft_checkpoints_and_load_into_split_models(tmp_path):
    torch.manual_seed(1)
    base = hf_models.build("llama")
    reference = peft.get_peft_model(copy.deepcopy(base), _config())
    with torch.no_grad():
        want = reference(input_ids=IDS).logits
    reference.save_pretrained(tmp_path / "plain")
    split = tp.tensor_parallel(reference, ["cpu"] * 3)
    with tp.save_tensor_parallel(split):
        split.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    expected = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    assert saved.keys() == expected.keys()
    assert sum("lora_" in key for key in saved) == 2 * (2 * (len(TARGETS) - 1) + 1)  # A and B: 2 layers, lm_head
    for key, value in expected.items():  # exactly what peft writes for the unsharded model
        assert torch.equal(saved[key], value), key
    with torch.no_grad():
        plain = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
        assert_close(plain(input_ids=IDS).logits, want, "logits of the saved adapter, unsharded")
        loaded = peft.PeftModel.from_pretrained(tp.tensor_parallel(copy.deepcopy(base), ["cpu"] * 2),
                                                tmp_path / "adapter")
        assert_close(loaded(input_ids=IDS).logits, want, "logits of the saved adapter loaded into a split model")


@pytest.mark.parametrize("devices", [["cpu", "cpu"], ["cpu:0", "cpu:1", "cpu:2"]], ids=["2", "3-distinct"])
def test_peft_on_the_split_model(tmp_path, devices):
    base = hf_models.build("llama")
    split = tp.tensor_parallel(copy.deepcopy(base), devices)
    model = peft.get_peft_model(split, _config())  # peft adds adapters to every shard; the split model takes them over
    assert model.base_model.model is split
    got = model(input_ids=IDS, labels=IDS)
    with tp.save_tensor_parallel(model):  # what the split model holds, as one ordinary adapter
        model.save_pretrained(tmp_path / "adapter")
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter", is_trainable=True)
    want = reference(input_ids=IDS, labels=IDS)
    assert_close(got.logits, want.logits, "logits")
    got.loss.backward()
    want.loss.backward()
    _assert_adapter_gradients_match(model, reference)

    model.add_adapter("second", _config())  # a second adapter on the same layers
    model.set_adapter("second")
    with torch.no_grad():
        second = model(input_ids=IDS).logits
        with tp.save_tensor_parallel(model):
            model.save_pretrained(tmp_path / "both")
        reference.load_adapter(tmp_path / "both" / "second", adapter_name="second")
        reference.set_adapter("second")
        assert_close(second, reference(input_ids=IDS).logits, "logits with the second adapter")

        merged = model.merge_and_unload()  # back to the split model, adapters merged into its slices
        assert merged is split
        assert_close(merged(input_ids=IDS).logits, second, "logits of the merged model")
        state = merged.wrapped_model.unsharded_state_dict()
        assert not [key for key in state if "lora_" in key or "base_layer" in key]
        assert state.keys() == base.state_dict().keys()


class _Block(torch.nn.Module):
    """A Megatron pair and a replicated head: adapters on split and on replicated layers."""

    def __init__(self):
        super().__init__()
        self.up, self.down, self.head = torch.nn.Linear(12, 40), torch.nn.Linear(40, 12), torch.nn.Linear(12, 7)

    def forward(self, x):
        return self.head(torch.relu(self.down(torch.relu(self.up(x)))))


@pytest.mark.parametrize("n", [2, 3])
def test_plain_module_adapters_on_split_and_replicated_layers(tmp_path, n):
    torch.manual_seed(0)
    block = _Block()
    plan = {"up": tp.ColwiseParallel(), "down": tp.RowwiseParallel()}  # "head" stays whole
    config = dict(r=3, target_modules=["up", "down", "head"], init_lora_weights=False)
    model = peft.get_peft_model(tp.tensor_parallel(copy.deepcopy(block), ["cpu"] * n, plan=plan), peft.LoraConfig(**config))
    x = torch.randn(4, 12)
    got = model(x)
    with tp.save_tensor_parallel(model):
        model.save_pretrained(tmp_path / "adapter")
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(block), tmp_path / "adapter", is_trainable=True)
    assert_close(got, reference(x), "output")
    got.pow(2).mean().backward()
    reference(x).pow(2).mean().backward()
    split = model.base_model.model
    shards = split.module_shards
    assert shards[1].head.lora_A.default.weight is shards[0].head.lora_A.default.weight  # replicated: one tensor
    want = {k: p.grad for k, p in reference.base_model.model.named_parameters() if p.requires_grad}
    for rank, shard in enumerate(shards):
        for key, param in shard.named_parameters():
            if param.requires_grad:
                spec = split.layout[key]
                assert_close(param.grad, want[key] if spec is None else spec.take(want[key], rank), key)


def test_sharded_with_lora():
    torch.manual_seed(1)
    reference = peft.get_peft_model(hf_models.build("gpt2"), peft.LoraConfig(
        task_type="CAUSAL_LM", r=4, target_modules=["c_attn", "c_proj", "c_fc"], init_lora_weights=False,
        fan_in_fan_out=True))
    model = tp.tensor_parallel(reference, ["cpu"] * 3, sharded=True)
    split = _split_of(model)
    assert "transformer.h.0.attn.c_attn.lora_A.default.weight" in split.sharded_keys  # replicated adapters too
    got, want = model(input_ids=IDS, labels=IDS), reference(input_ids=IDS, labels=IDS)
    assert_close(got.logits, want.logits, "logits")
    got.loss.backward()
    want.loss.backward()
    _assert_adapter_gradients_match(model, reference)


def test_clear_errors():
    dora = peft.get_peft_model(hf_models.build("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(TypeError, match="DoRA"):
        tp.tensor_parallel(dora, ["cpu", "cpu"])
    split = tp.tensor_parallel(hf_models.build("llama"), ["cpu", "cpu"])
    split.module_shards[0].model.layers[0].mlp.up_proj = torch.nn.Identity()
    split.module_shards[1].model.layers[0].mlp.up_proj = torch.nn.Identity()
    with pytest.raises(ValueError, match="'model.layers.0.mlp.up_proj' of the split model was replaced by Identity after splitting"):
        split(IDS)


def test_under_torch_distributed(tmp_path):
    hf_models.build("llama").save_pretrained(tmp_path / "llama")
    losses = assert_all_ok(run_ranks(dist_cases.lora, 2, str(tmp_path / "llama")))
    assert losses[0] == losses[1]
