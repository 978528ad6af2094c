"""ZeRO-3 sharding of replicated parameters (sharded=True): equal to the unsharded model in one
process (same and distinct devices, uneven pieces) and under torch.distributed, after loads,
and with less memory per device."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import transformers
from accelerate import init_empty_weights, load_checkpoint_in_model
from torch import nn

import dist_cases
import hf_models
import tensor_parallel as tp
from distributed import assert_all_ok, run_ranks
from helpers import assert_close, assert_gradients_match


def _model():
    torch.manual_seed(0)  # a replicated embedding, a Megatron pair (its row bias is replicated), a norm
    return nn.Sequential(nn.Embedding(10, 12), nn.Linear(12, 40), nn.GELU(), nn.Linear(40, 12), nn.LayerNorm(12))


PLAN = {"1": tp.ColwiseParallel(), "3": tp.RowwiseParallel()}
REPLICATED = {"0.weight", "3.bias", "4.weight", "4.bias"}


@pytest.mark.parametrize("devices", [["cpu", "cpu"], ["cpu:0", "cpu:1"], ["cpu"] * 3, ["cpu:0", "cpu:1", "cpu:2"]],
                         ids=["2-same", "2-distinct", "3-same", "3-distinct"])
def test_outputs_gradients_steps_and_collectives_equal_unsharded(devices):
    module = _model()
    reference = copy.deepcopy(module)
    model = tp.tensor_parallel(module, devices, plan=PLAN, sharded=True)
    assert model.sharded_keys == REPLICATED
    n = len(devices)
    assert model.module_shards[n - 1][0].weight.shape == (10, 12 // n)  # cut along its larger dim
    ids = torch.tensor([[1, 2, 3], [4, 5, 9]])
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, reference)]
    for step in range(2):
        with tp.count_collectives() as stats:
            out = model(ids)
            out.pow(2).mean().backward()
        # 3 modules own pieces: one all-gather each, its backward a reduce-scatter; the pair's all-reduce
        assert dict(stats.calls) == {"all_gather": 3, "reduce_scatter": 3, "all_reduce": 2}
        expected = reference(ids)
        expected.pow(2).mean().backward()
        assert_close(out, expected, f"output, step {step}")
        assert_gradients_match(model, reference)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    state = model.unsharded_state_dict()
    for key, value in reference.state_dict().items():
        assert_close(state[key], value, f"{key} after two SGD steps")


def test_only_the_named_parameters_and_clear_errors():
    model = tp.tensor_parallel(_model(), ["cpu", "cpu"], plan=PLAN, sharded=True, sharded_param_names=["4.weight"])
    assert model.sharded_keys == {"4.weight"}
    assert model.module_shards[0][4].bias.shape == (12,)
    tp.shard_replicated(model, ["4.weight", "3.bias"])  # idempotent for what is done already
    assert model.sharded_keys == {"4.weight", "3.bias"}
    with pytest.raises(ValueError, match=r"\['4.scale'\], which are not parameters"):
        tp.shard_replicated(model, ["4.scale"])
    with pytest.raises(ValueError, match="'1.weight': 'split by the plan'"):
        tp.shard_replicated(model, ["1.weight"])
    with pytest.raises(ValueError, match="pass sharded=True"):
        tp.tensor_parallel(_model(), ["cpu", "cpu"], sharded=False, sharded_param_names=["4.weight"])
    # names alone ask for them (sharded=None, the original's default; see README, tests/test_legacy.py)
    assert tp.tensor_parallel(_model(), ["cpu", "cpu"], plan=PLAN, sharded_param_names=["4.weight"]).sharded_keys \
        == {"4.weight"}
    with pytest.raises(TypeError, match="collection of names"):
        tp.tensor_parallel(_model(), ["cpu", "cpu"], sharded=True, sharded_param_names="4.weight")


@pytest.mark.parametrize("name,n", [("gpt2", 2), ("gpt2", 3), ("llama", 3), ("bert", 2)])
def test_transformers_models_equal_unsharded(name, n):
    reference = hf_models.build(name)
    model = tp.tensor_parallel(copy.deepcopy(reference), ["cpu"] * n, sharded=True)
    params = dict(reference.named_parameters())
    replicated = {k for k, shard in model.wrapped_model.layout.items() if shard is None and k in params}
    assert not replicated and model.wrapped_model.sharded_keys  # every replicated parameter is cut
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
    got, want = model(ids, labels=ids), reference(ids, labels=ids)
    assert_close(got.logits, want.logits, "logits")
    got.loss.backward()
    want.loss.backward()
    assert_gradients_match(model.wrapped_model, reference)
    if name == "gpt2":  # generation gathers the pieces at every step, with and without the cache
        assert torch.equal(model.generate(ids[:1], max_new_tokens=4, do_sample=False),
                           reference.generate(ids[:1], max_new_tokens=4, do_sample=False))


def test_built_on_meta_then_loaded_saved_and_recut(tmp_path):
    n = 3
    reference = hf_models.build("gpt2")
    reference.save_pretrained(tmp_path / "plain")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        want = reference(ids).logits
        model = tp.from_pretrained(tmp_path / "plain", ["cpu"] * n, sharded=True)
        assert_close(model(ids).logits, want, "logits of tp.from_pretrained(sharded=True)")
        model.save_pretrained(tmp_path / "split", max_shard_size="20KB")  # the split state: the pieces

        with init_empty_weights():  # the seed flow, sharded
            empty = tp.TensorParallelPreTrainedModel(
                transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(tmp_path / "split")),
                ["cpu"] * n, sharded=True)
        load_checkpoint_in_model(empty, checkpoint=os.path.join(tmp_path / "split", "pytorch_model.bin.index.json"),
                                 device_map=tp.infer_sharded_device_map(empty))
        assert_close(empty.eval()(ids).logits, want, "logits after the seed flow")

        for devices, sharded in ((2, False), (2, True)):  # the pieces re-cut for another count
            recut = tp.from_pretrained(tmp_path / "split", ["cpu"] * devices, sharded=sharded)
            assert_close(recut(ids).logits, want, f"logits re-cut for {devices} devices, sharded={sharded}")

        model.save_unsharded(tmp_path / "whole")  # an ordinary checkpoint of full tensors
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "whole").eval()
        assert_close(back(ids).logits, want, "logits of the unsharded save")
        with tp.save_tensor_parallel(model):
            state = model.state_dict()
        for key, value in reference.state_dict().items():
            assert_close(state[key], value, key)


def _nbytes(model) -> dict[str, int]:
    return {device: sum(p.numel() * p.element_size() for p in params)
            for device, params in tp.parameters_by_device(model).items()}


@pytest.mark.parametrize("n", [2, 3])
def test_parameter_bytes_per_device_drop_by_the_replicated_share(n):
    devices = [f"cpu:{i}" for i in range(n)]  # distinct devices: replicated tensors live on cpu:0
    reference = hf_models.build("gpt2")
    before = _nbytes(tp.tensor_parallel(copy.deepcopy(reference), devices))
    model = tp.tensor_parallel(copy.deepcopy(reference), devices, sharded=True)
    after = _nbytes(model)
    full = dict(reference.named_parameters(remove_duplicate=False))  # a tied LM head has its own key
    cuts, seen = {}, set()
    for key in sorted(model.wrapped_model.sharded_keys):  # a tied pair is one tensor: count it once
        if id(full[key]) not in seen:
            seen.add(id(full[key]))
            cuts[key] = model.wrapped_model.layout[key]
    replicated = sum(full[key].numel() * 4 for key in cuts)
    pieces = [sum(full[key].numel() // cut.size * cut.local_size(rank) * 4 for key, cut in cuts.items())
              for rank in range(n)]
    assert replicated > 64 * 48 * 4 and sum(pieces) == replicated  # wpe (64 x 48), norms, row biases
    assert after[devices[0]] == before[devices[0]] - replicated + pieces[0]
    for rank in range(1, n):
        assert after[devices[rank]] == before[devices[rank]] + pieces[rank]
    assert max(after.values()) == max(before.values()) - replicated + pieces[0]


def test_under_torch_distributed(tmp_path):
    model = hf_models.build("gpt2")
    model.config.update(dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))  # it trains: no dropout
    model.save_pretrained(tmp_path / "gpt2")
    results = assert_all_ok(run_ranks(dist_cases.sharded, 2, str(tmp_path / "gpt2")))
    calls, pieces = results[0]
    # 2 modules own pieces (the row split's bias, the norm): 2 all-gathers, plus the last layer's;
    # each rank's gradient of a full tensor already is the sum: backward keeps its slice, no collective
    assert calls == {"all_gather": 3, "all_reduce": 2}
    full = dict(hf_models.build("gpt2").named_parameters(remove_duplicate=False))
    for key, numel in pieces.items():  # each rank holds half of each, up to one row (wte: 97 rows -> 49 + 48)
        other = results[1][1][key]
        assert numel + other == full[key].numel() and abs(numel - other) <= full[key][0].numel()
