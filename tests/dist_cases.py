"""What each rank runs in the multi-process tests (module level, so forked ranks find it)."""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

import tensor_parallel as tp
from helpers import assert_close


def _mlp():
    torch.manual_seed(0)  # every rank builds the same model
    return nn.Sequential(nn.Linear(16, 40), nn.GELU(), nn.Linear(40, 16), nn.LayerNorm(16), nn.Linear(16, 37))


def _check_grads(model, reference, rank) -> None:
    grads = {k: p.grad for k, p in reference.named_parameters()}
    for key, param in model.module_shards[0].named_parameters():
        spec = model.layout[key]
        want = grads[key] if spec is None else spec.take(grads[key], rank)
        assert_close(param.grad, want, f"rank {rank} gradient of {key}")


def mlp(rank: int, world_size: int):
    module = _mlp()
    reference = copy.deepcopy(module)
    model = tp.tensor_parallel(module)
    assert model.distributed and model.world_size == world_size and len(model.module_shards) == 1
    assert tp.tensor_parallel(_mlp(), ["cpu"]).distributed  # this rank's one device: the same mode
    torch.manual_seed(1)
    x = torch.randn(4, 16)
    with tp.count_collectives() as stats:
        out = model(x)
    calls = dict(stats.calls)
    assert_close(out, reference(x), f"rank {rank} output")
    loss, expected = out.pow(2).mean(), reference(x).pow(2).mean()
    loss.backward()
    expected.backward()
    _check_grads(model, reference, rank)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    assert_close(model(x), reference(x), f"rank {rank} output after one step")
    return calls


def llama(rank: int, world_size: int):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64)
    reference = transformers.LlamaForCausalLM(config).eval()
    model = tp.tensor_parallel(copy.deepcopy(reference))
    assert isinstance(model, tp.TensorParallelPreTrainedModel)
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
    with torch.no_grad():
        assert_close(model(ids).logits, reference(ids).logits, f"rank {rank} logits")
    tokens = model.generate(ids[:1], max_new_tokens=6, do_sample=False)
    assert torch.equal(tokens, reference.generate(ids[:1], max_new_tokens=6, do_sample=False))
    out, expected = model(ids, labels=ids), reference(ids, labels=ids)
    assert_close(out.loss, expected.loss, "loss")
    out.loss.backward()
    expected.loss.backward()
    _check_grads(model.wrapped_model, reference, rank)
    return tokens.tolist()


def load(rank: int, world_size: int, path: str):
    import transformers

    model = tp.from_pretrained(path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert_close(model(ids).logits, reference(ids).logits, f"rank {rank} logits of the loaded model")
    local = sum(p.numel() for p in model.parameters())
    return local, sum(p.numel() for p in reference.parameters())


def data_and_tensor_parallel(rank: int, world_size: int):
    """4 ranks as 2 (data) x 2 (tensor): each data replica is a TP group of 2."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    module = _mlp()
    reference = copy.deepcopy(module)
    model = tp.tensor_parallel(module, process_group=mesh["tp"])
    replica = DistributedDataParallel(model, process_group=mesh["dp"].get_group())
    torch.manual_seed(1)
    batches = torch.randn(2, 4, 16)
    dp_rank = mesh["dp"].get_local_rank()
    replica(batches[dp_rank]).pow(2).mean().backward()  # DDP averages the gradients over dp
    (reference(batches[0]).pow(2).mean() + reference(batches[1]).pow(2).mean()).div(2).backward()
    _check_grads(model, reference, mesh["tp"].get_local_rank())
    return dp_rank


def one_rank_fails(rank: int, world_size: int):
    model = tp.tensor_parallel(_mlp())
    if rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    start = time.monotonic()
    try:
        model(torch.randn(2, 16))
    except Exception as error:
        return f"{type(error).__name__} after {time.monotonic() - start:.1f} s"
    raise AssertionError("rank 0 finished a forward without rank 1")


def llama_gradient_checkpointing(rank: int, world_size: int):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=6, num_key_value_heads=2)
    reference = transformers.LlamaForCausalLM(config)
    model = tp.tensor_parallel(copy.deepcopy(reference))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    reference.train()
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
    out, expected = model(ids, labels=ids), reference(ids, labels=ids)
    assert_close(out.loss, expected.loss, "loss with gradient checkpointing")
    out.loss.backward()
    expected.loss.backward()
    _check_grads(model.wrapped_model, reference, rank)
    return float(out.loss)


def sharded(rank: int, world_size: int, path: str):
    """sharded=True under torch.distributed: an MLP (output, gradients, a step, collectives),
    GPT-2 built on meta and loaded from ``path`` (logits, loss gradients with checkpointing), and
    Qwen3's per-head norms (gradients, with and without sharded=True)."""
    import transformers

    module = _mlp()
    reference = copy.deepcopy(module)
    model = tp.tensor_parallel(module, sharded=True)
    assert model.sharded_keys == {"2.bias", "3.weight", "3.bias"}
    torch.manual_seed(1)
    x = torch.randn(4, 16)
    with tp.count_collectives() as stats:
        out = model(x)
        out.pow(2).mean().backward()
    reference(x).pow(2).mean().backward()
    assert_close(out, reference(x), f"rank {rank} output")
    _check_grads(model, reference, rank)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    assert_close(model(x), reference(x), f"rank {rank} output after one step")

    reference = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    split = tp.from_pretrained(path, sharded=True)  # built on the meta device, then loaded
    split.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    split.train()
    reference.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reference.train()
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
    got, want = split(ids, labels=ids), reference(ids, labels=ids)
    assert_close(got.logits, want.logits, f"rank {rank} GPT-2 logits")
    got.loss.backward()
    want.loss.backward()
    _check_grads(split.wrapped_model, reference, rank)
    pieces = {key: split.module_shards[0].get_parameter(key).numel() for key in split.wrapped_model.sharded_keys}

    import hf_models

    for sharded in (False, True):  # per-head q_norm / k_norm: replicated, each rank's part of the gradient summed
        reference = hf_models.build("qwen3")
        split = tp.tensor_parallel(copy.deepcopy(reference), sharded=sharded)
        got, want = split(ids, labels=ids), reference(ids, labels=ids)
        got.loss.backward()
        want.loss.backward()
        _check_grads(split.wrapped_model, reference, rank)
    return dict(stats.calls), pieces


def lora(rank: int, world_size: int, path: str):
    """LoRA under torch.distributed, both orders: peft first (adapter gradients equal the unsharded
    peft model's), and peft on the split model (its adapters, saved unsharded, load into peft)."""
    import peft
    import transformers

    def grads_match(model, reference):
        split = model.base_model.model.wrapped_model
        want = {k: p.grad for k, p in reference.base_model.model.named_parameters() if p.requires_grad}
        for key, param in split.module_shards[0].named_parameters():
            if param.requires_grad:
                spec = split.layout[key]
                assert_close(param.grad, want[key] if spec is None else spec.take(want[key], rank),
                             f"rank {rank} gradient of {key}")

    config = dict(r=4, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], init_lora_weights=False)
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
    torch.manual_seed(1)
    reference = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(path), peft.LoraConfig(**config))
    model = tp.tensor_parallel(reference)
    got, want = model(input_ids=ids, labels=ids), reference(input_ids=ids, labels=ids)
    assert_close(got.logits, want.logits, f"rank {rank} logits, peft first")
    got.loss.backward()
    want.loss.backward()
    grads_match(model, reference)

    torch.manual_seed(rank)  # peft initialises each rank's adapters differently: rank 0's are taken
    model = peft.get_peft_model(tp.from_pretrained(path), peft.LoraConfig(**config))
    with tp.save_tensor_parallel(model):
        model.save_pretrained(f"{path}-adapter-{rank}")
    reference = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(path),
                                               f"{path}-adapter-{rank}", is_trainable=True)
    got, want = model(input_ids=ids, labels=ids), reference(input_ids=ids, labels=ids)
    assert_close(got.logits, want.logits, f"rank {rank} logits, peft on the split model")
    got.loss.backward()
    want.loss.backward()
    grads_match(model, reference)
    return got.loss.item()


def legacy(rank: int, world_size: int):
    """The original's distributed=True and make_distributed_shard, with a custom Config."""
    import warnings

    from tensor_parallel.state_actions import Scale, Split

    config = tp.Config({r"^0\.(weight|bias)$": Split(world_size, 0), r"^2\.weight$": Split(world_size, 1),
                        r"^2\.bias$": Scale(world_size)}, {}, {r"^2$": {0: "sum"}}, {})
    module = _mlp()
    reference = copy.deepcopy(module)
    model = tp.tensor_parallel(module, ["cpu"], config, True)  # the original returned (shard, names) here
    assert isinstance(model, tp.TensorParallel) and model.distributed
    assert model.plan == {"0": tp.ColwiseParallel(), "2": tp.RowwiseParallel()}  # its Config is used
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shard, names = model  # old code that unpacks still runs
    assert shard is model and names == {"0.weight", "0.bias", "2.weight"}
    assert [w.category for w in caught] == [DeprecationWarning]
    torch.manual_seed(1)
    x = torch.randn(4, 16)
    with tp.count_collectives() as stats:
        out = model(x)
    assert_close(out, reference(x), f"rank {rank} output with a legacy Config")
    out.pow(2).mean().backward()
    reference(x).pow(2).mean().backward()
    _check_grads(model, reference, rank)
    other = tp.make_distributed_shard(_mlp(), "cpu", config)
    assert other.distributed and other.plan == model.plan
    assert_close(other(x), _mlp()(x), f"rank {rank} output of make_distributed_shard")
    threads = tp.tensor_parallel(_mlp(), ["cpu", "cpu"], config if world_size == 2 else None, False)
    assert not threads.distributed and len(threads.module_shards) == 2  # distributed=False: threads here
    assert_close(threads(x), _mlp()(x), f"rank {rank} output of the threads of distributed=False")
    try:
        tp.tensor_parallel(_mlp(), ["cpu", "cpu"], None, True)
    except ValueError as error:
        assert "device_ids must be None or this rank's one device" in str(error)
    else:
        raise AssertionError("distributed=True with two devices in one process was accepted")
    return dict(stats.calls)
