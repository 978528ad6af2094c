"""The core engine: plain nn.Modules split over 2, 3 and 4 CPU devices in one process."""

from __future__ import annotations

import contextlib
import copy
import threading
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tensor_parallel as tp
from tensor_parallel.runtime import RankLocal
from helpers import assert_close, assert_gradients_match, check_equivalence, cpu_devices

DEVICE_COUNTS = [2, 3, 4]


def mlp(*sizes: int, act=nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


class GatedMLP(nn.Module):
    """Llama-style: down(silu(gate(x)) * up(x)), plus a residual and a norm."""

    def __init__(self, dim: int = 12, hidden: int = 30) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x):
        h = self.norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Branchy(nn.Module):
    """Data-dependent control flow: fx cannot trace it, so every split is gathered."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 10)
        self.b = nn.Linear(10, 6)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:
            h = h.relu()
        else:
            h = h.tanh()
        return self.b(h) + h[..., :6]


class ReadsWeight(nn.Module):
    """Reads a layer's weight directly: that layer must stay whole."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(17, 8)
        self.proj = nn.Linear(8, 8)

    def forward(self, ids):
        h = self.proj(self.emb(ids))
        return h @ self.emb.weight.t()


class TiedLM(nn.Module):
    def __init__(self, vocab: int = 23, dim: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mlp = mlp(dim, 16, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.mlp(self.emb(ids)))


def _seeded(factory, seed: int = 0):
    torch.manual_seed(seed)
    return factory()


# --------------------------------------------------------------------------------------------
# Equivalence: outputs, gradients, one step
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", DEVICE_COUNTS)
def test_mlp_equals_unsharded_and_costs_one_all_reduce_per_pair(n):
    module = _seeded(lambda: mlp(16, 40, 16, 36, 16))
    x = torch.randn(5, 16)
    model = check_equivalence(module, (x,), n)
    assert model.plan == {"0": tp.ColwiseParallel(), "2": tp.RowwiseParallel(),
                          "4": tp.ColwiseParallel(), "6": tp.RowwiseParallel()}
    with tp.count_collectives() as stats:
        model(x)
    assert dict(stats.calls) == {"all_reduce": 2}
    assert dict(stats.bytes) == {"all_reduce": 2 * 5 * 16 * 4}


@pytest.mark.parametrize("n", DEVICE_COUNTS)
def test_gated_mlp_pairs_through_the_product(n):
    module = _seeded(GatedMLP)
    x = torch.randn(2, 3, 12)
    model = check_equivalence(module, (x,), n)
    assert model.plan == {"gate": tp.ColwiseParallel(), "up": tp.ColwiseParallel(),
                          "down": tp.RowwiseParallel()}
    with tp.count_collectives() as stats:
        model(x)
    assert dict(stats.calls) == {"all_reduce": 1}


@pytest.mark.parametrize("n", DEVICE_COUNTS)
def test_conv_stack_pairs_channels(n):
    module = _seeded(lambda: nn.Sequential(nn.Conv2d(3, 10, 3, padding=1), nn.GELU(),
                                           nn.Conv2d(10, 4, 3), nn.BatchNorm2d(4),
                                           nn.ConvTranspose2d(4, 6, 2), nn.Tanh(),
                                           nn.ConvTranspose2d(6, 5, 3)))
    x = torch.randn(2, 3, 9, 9)
    model = check_equivalence(module, (x,), n)
    assert model.plan["0"] == tp.ColwiseParallel() and model.plan["2"] == tp.RowwiseParallel()
    assert model.plan["4"] == tp.ColwiseParallel() and model.plan["6"] == tp.RowwiseParallel()
    with tp.count_collectives() as stats:
        model(x)
    assert dict(stats.calls) == {"all_reduce": 2}


@pytest.mark.parametrize("n", DEVICE_COUNTS)
def test_conv1d_and_conv3d(n):
    torch.manual_seed(1)
    check_equivalence(nn.Sequential(nn.Conv1d(4, 7, 3), nn.ReLU(), nn.Conv1d(7, 3, 1)),
                      (torch.randn(2, 4, 11),), n)
    check_equivalence(nn.Sequential(nn.Conv3d(2, 5, 2), nn.ReLU(), nn.Conv3d(5, 3, 2)),
                      (torch.randn(1, 2, 5, 5, 5),), n)
    check_equivalence(nn.Sequential(nn.ConvTranspose1d(3, 5, 2), nn.ConvTranspose1d(5, 2, 3)),
                      (torch.randn(2, 3, 6),), n)


@pytest.mark.parametrize("n", DEVICE_COUNTS)
def test_embeddings_split(n):
    class Bags(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(31, 10, padding_idx=3)
            self.bag = nn.EmbeddingBag(19, 6, mode="mean")
            self.out = nn.Linear(16, 5)

        def forward(self, ids, bag_ids, offsets):
            e = self.emb(ids).mean(1)
            return self.out(torch.cat([e, self.bag(bag_ids, offsets)], -1))

    module = _seeded(Bags)
    ids = torch.randint(0, 31, (4, 7))
    ids[0, 0] = 3
    inputs = (ids, torch.randint(0, 19, (12,)), torch.tensor([0, 3, 5, 9]))
    check_equivalence(module, inputs, n)


@pytest.mark.parametrize("n", DEVICE_COUNTS)
@pytest.mark.parametrize("dim", [0, 1])
def test_embedding_parallel_by_vocab_or_dim(n, dim):
    module = _seeded(lambda: nn.Sequential(nn.Embedding(13, 6, padding_idx=12), nn.Linear(6, 4)))
    ids = torch.tensor([[0, 12, 5, 7], [12, 1, 2, 11]])
    plan = {"0": tp.EmbeddingParallel(dim=dim)}
    model = check_equivalence(module, (ids,), n, plan=plan)
    with tp.count_collectives() as stats:
        model(ids)
    assert dict(stats.calls) == {"all_reduce" if dim == 0 else "all_gather": 1}


@pytest.mark.parametrize("n", DEVICE_COUNTS)
def test_untraceable_module_is_gathered_and_correct(n):
    module = _seeded(Branchy)
    x = torch.randn(3, 6)
    model = check_equivalence(module, (x,), n)
    assert model.plan == {"a": tp.ColwiseParallel(gather_output=True),
                          "b": tp.ColwiseParallel(gather_output=True)}


@pytest.mark.parametrize("n", DEVICE_COUNTS)
def test_weight_read_directly_stays_whole(n):
    module = _seeded(ReadsWeight)
    model = check_equivalence(module, (torch.randint(0, 17, (2, 5)),), n)
    assert "emb" not in model.plan


@pytest.mark.parametrize("n", DEVICE_COUNTS)
def test_tied_weights_are_replicated_by_default(n):
    module = _seeded(TiedLM)
    model = check_equivalence(module, (torch.randint(0, 23, (2, 5)),), n)
    assert "emb" not in model.plan and "head" not in model.plan
    shard = model.module_shards[0]
    assert shard.head.weight is shard.emb.weight


@pytest.mark.parametrize("n", DEVICE_COUNTS)
def test_tied_weights_split_the_same_way_stay_tied(n):
    module = _seeded(TiedLM)
    plan = {"emb": tp.EmbeddingParallel(dim=0), "head": tp.ColwiseParallel(gather_output=True)}
    model = check_equivalence(module, (torch.randint(0, 23, (2, 5)),), n, plan=plan)
    for shard in model.module_shards:
        assert shard.head.weight is shard.emb.weight


# --------------------------------------------------------------------------------------------
# Uneven and tiny splits
# --------------------------------------------------------------------------------------------


def test_uneven_split_sizes():
    assert tp.split_sizes(1000, 3) == [334, 333, 333]
    assert tp.split_sizes(2, 4) == [1, 1, 0, 0]
    model = tp.tensor_parallel(mlp(8, 1000, 8), cpu_devices(3))
    assert [s[0].out_features for s in model.module_shards] == [334, 333, 333]
    assert [s[2].in_features for s in model.module_shards] == [334, 333, 333]


@pytest.mark.parametrize("n", [3, 4])
def test_layers_smaller_than_the_device_count(n):
    torch.manual_seed(2)
    check_equivalence(mlp(5, 2, 3, 1), (torch.randn(4, 5),), n)
    check_equivalence(nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU(), nn.Conv2d(2, 1, 1)),
                      (torch.randn(1, 3, 4, 4),), n)
    check_equivalence(nn.Sequential(nn.Conv2d(3, 2, 1)), (torch.randn(1, 3, 4, 4),), n)
    check_equivalence(nn.Sequential(nn.Embedding(2, 3), nn.Linear(3, 1)),
                      (torch.tensor([[0, 1, 1]]),), n, plan={"0": tp.EmbeddingParallel(dim=0),
                                                            "1": tp.RowwiseParallel()})


@pytest.mark.parametrize("n", DEVICE_COUNTS)
def test_row_split_accepts_replicated_input(n):
    module = _seeded(lambda: nn.Sequential(nn.LayerNorm(9), nn.Linear(9, 4)))
    check_equivalence(module, (torch.randn(3, 9),), n, plan={"1": tp.RowwiseParallel()})


@pytest.mark.parametrize("n", [2, 4])
def test_column_unit_keeps_heads_whole(n):
    module = _seeded(lambda: mlp(8, 6 * 4, 8))
    plan = {"0": tp.ColwiseParallel(unit=4), "2": tp.RowwiseParallel(unit=4)}
    model = check_equivalence(module, (torch.randn(2, 8),), n, plan=plan)
    assert all(s[0].out_features % 4 == 0 for s in model.module_shards)


# --------------------------------------------------------------------------------------------
# Training details
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3])
def test_batchnorm_running_stats_match_in_training(n):
    module = _seeded(lambda: nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)))
    reference = copy.deepcopy(module)
    model = tp.tensor_parallel(module, cpu_devices(n))
    x = torch.randn(10, 6)
    for _ in range(2):
        assert_close(model(x), reference(x), "output in training mode")
    state = model.unsharded_state_dict()
    for key in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert_close(state[key], reference.state_dict()[key], key)


def test_gradients_reach_the_input_and_accumulate():
    module = _seeded(lambda: mlp(4, 10, 4))
    reference = copy.deepcopy(module)
    model = tp.tensor_parallel(module, cpu_devices(3))
    x1, x2 = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    r1, r2 = x1.detach().clone().requires_grad_(), x2.detach().clone().requires_grad_()
    for m, a in ((model, x1), (reference, r1)):
        m(a).pow(2).sum().backward()
    for m, a in ((model, x2), (reference, r2)):
        m(a).pow(2).sum().backward()  # accumulates into .grad
    assert_close(x1.grad, r1.grad, "input gradient")
    assert_close(model.unsharded_state_dict()["0.weight"], reference[0].weight.detach(), "weight")
    full = torch.cat([s[0].weight.grad for s in model.module_shards], 0)
    assert_close(full, reference[0].weight.grad, "accumulated gradient")


def test_no_grad_and_inference_mode_reach_the_workers():
    model = tp.tensor_parallel(_seeded(lambda: mlp(4, 6, 4)), cpu_devices(2))
    with torch.no_grad():
        assert not model(torch.randn(1, 4)).requires_grad
    with torch.inference_mode():
        assert model(torch.randn(1, 4)).is_inference()


_SEEN: dict[str, dict] = {}  # a global: each shard is a copy of the module


class _ModeProbe(nn.Module):
    """Records the autograd and autocast modes each rank's thread runs in."""

    def forward(self, x):
        _SEEN[threading.current_thread().name] = {
            "grad": torch.is_grad_enabled(), "inference": torch.is_inference_mode_enabled(),
            "autocast": torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")}
        return x


@pytest.mark.parametrize("n", [2, 3])
def test_every_rank_runs_in_the_callers_modes_and_only_for_that_call(n):
    model = tp.tensor_parallel(nn.Sequential(nn.Linear(4, 6), _ModeProbe()), cpu_devices(n))
    cases = [(torch.no_grad, {"grad": False, "inference": False, "autocast": False}),
             (torch.inference_mode, {"grad": False, "inference": True, "autocast": False}),
             (lambda: torch.autocast("cpu", dtype=torch.bfloat16), {"grad": True, "inference": False,
                                                                    "autocast": torch.bfloat16}),
             (contextlib.nullcontext, {"grad": True, "inference": False, "autocast": False})]  # restored after each
    for mode, expected in cases:
        _SEEN.clear()
        with mode():
            model(torch.randn(1, 4))
        assert len(_SEEN) == n and all(seen == expected for seen in _SEEN.values()), (mode, _SEEN)


class _Pair(NamedTuple):
    left: torch.Tensor
    right: int


class _PerRank(RankLocal):
    def for_rank(self, rank: int) -> str:
        return f"rank {rank}"


class _InputProbe(nn.Module):
    """Records the containers each rank received, then changes its list in place."""

    def forward(self, x, extra, options, pair):
        _SEEN[threading.current_thread().name] = {"list": id(extra), "dict": id(options), "pair": pair,
                                                  "who": options["nested"][0], "scale": options["scale"]}
        extra.append("changed by a rank")
        return x


def test_each_rank_gets_its_own_containers_with_rank_local_leaves_resolved():
    _SEEN.clear()
    model = tp.tensor_parallel(nn.Sequential(_InputProbe()), cpu_devices(2), plan={})
    extra, options = ["caller's"], {"nested": [_PerRank()], "scale": 2.5}
    pair = _Pair(torch.ones(2), 7)
    model.run_shards(lambda shard, *args: shard[0](*args), torch.zeros(1), extra, options, pair)
    seen = sorted(_SEEN.values(), key=lambda s: s["who"])
    assert [s["who"] for s in seen] == ["rank 0", "rank 1"]
    assert len({s["list"] for s in seen} | {id(extra)}) == 3 and len({s["dict"] for s in seen} | {id(options)}) == 3
    assert extra == ["caller's"] and isinstance(options["nested"][0], _PerRank)  # the caller's, untouched
    assert all(type(s["pair"]) is _Pair and s["pair"].right == 7 and torch.equal(s["pair"].left, pair.left)
               and s["scale"] == 2.5 for s in seen)


def test_an_output_already_on_the_output_device_is_returned_as_it_is():
    model = tp.tensor_parallel(mlp(4, 6, 4), cpu_devices(2))
    output = {"y": torch.ones(1), "pair": _Pair(torch.zeros(1), 1), "cache": object()}
    assert model.forward_output(output) is output
    assert model.forward_output({"who": _PerRank()}) == {"who": "rank 0"}  # still resolved
    with pytest.raises(ValueError, match="'meta' device"):
        model.forward_output((torch.empty(1, device="meta"),))


def test_done_signal_wakes_a_blocked_wait_and_times_out_unset():
    from tensor_parallel.runtime import _Done

    done = _Done()
    assert not done.is_set() and done.wait(timeout=0.01) is False  # tolerance: only that it returns
    woken = []
    waiter = threading.Thread(target=lambda: woken.append(done.wait()), daemon=True)  # only set() ends it
    waiter.start()
    waiter.join(timeout=0.2)  # tolerance: long enough for the waiter to block in acquire()
    assert waiter.is_alive() and not woken
    done.set()
    waiter.join(timeout=30)
    assert not waiter.is_alive() and woken == [True] and done.is_set() and done.wait() is True


_THREADS_SEEN: dict[str, int] = {}  # a global: each shard is a copy of the module


class _ThreadProbe(nn.Module):
    """Records the intra-op thread count each rank's thread runs with."""

    def forward(self, x):
        _THREADS_SEEN[threading.current_thread().name] = torch.get_num_threads()
        return x


@pytest.mark.parametrize("n, per_rank", [(2, 2), (3, 1)])
def test_cpu_ranks_share_the_callers_intra_op_threads(n, per_rank):
    _THREADS_SEEN.clear()
    model = tp.tensor_parallel(nn.Sequential(nn.Linear(4, 6), _ThreadProbe()), cpu_devices(n))
    previous = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        model(torch.randn(2, 4))
        seen = dict(_THREADS_SEEN)
        assert len(seen) == n and set(seen.values()) == {per_rank}, seen  # 4 // n each: no oversubscription
        assert torch.get_num_threads() == 4  # the caller's own count is back
        later = threading.Thread(target=lambda: _THREADS_SEEN.__setitem__("later", torch.get_num_threads()))
        later.start()
        later.join()
        assert _THREADS_SEEN["later"] == 4  # and so is the default of threads started afterwards
    finally:
        torch.set_num_threads(previous)


def test_backward_collectives_are_counted():
    model = tp.tensor_parallel(_seeded(lambda: mlp(4, 6, 4)), cpu_devices(2),
                               plan={"0": tp.ColwiseParallel(gather_output=True)})
    x = torch.randn(3, 4, requires_grad=True)
    with tp.count_collectives() as stats:
        model(x).sum().backward()
    assert dict(stats.calls) == {"all_gather": 1, "reduce_scatter": 1}
    assert stats.bytes["all_gather"] == 3 * 6 * 4


def test_replicated_parameters_are_held_once_per_device():
    module = _seeded(lambda: nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 4)))
    model = tp.tensor_parallel(module, cpu_devices(3))
    assert model.module_shards[0][1].weight is model.module_shards[2][1].weight
    names = {n for n, _ in model.named_parameters()}
    assert "module_shards.0.1.weight" in names and "module_shards.2.1.weight" not in names
    assert all(p.data_ptr() != q.data_ptr() for p in module.parameters() for q in model.parameters())


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------


def test_state_dict_round_trip_and_unsharded_keys():
    module = _seeded(lambda: mlp(6, 9, 6))
    model = tp.tensor_parallel(module, cpu_devices(3))
    state = model.state_dict()
    other = tp.tensor_parallel(_seeded(lambda: mlp(6, 9, 6), seed=5), cpu_devices(3))
    other.load_state_dict(state)
    x = torch.randn(2, 6)
    assert_close(other(x), model(x), "after load_state_dict")
    with tp.save_tensor_parallel(model):
        full = model.state_dict()
    assert full.keys() == module.state_dict().keys()
    for key, value in module.state_dict().items():
        assert torch.equal(full[key], value), key
    assert "module_shards.0.0.weight" in model.state_dict()  # the context manager is undone


def test_plan_is_printable_data():
    plan = tp.plan_for(mlp(4, 8, 4))
    text = tp.format_plan(plan)
    assert "RowwiseParallel" in text and "all_reduce" in text
    assert eval(repr(plan), vars(tp)) == plan


def test_output_device_and_single_device():
    module = _seeded(lambda: mlp(4, 8, 4))
    x = torch.randn(2, 4)
    model = tp.tensor_parallel(copy.deepcopy(module), ["cpu"], output_device="cpu")
    assert_close(model(x), module(x), "one device")


def test_outputs_in_containers():
    class Multi(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 5), nn.Linear(5, 2)

        def forward(self, x, *, scale=1.0):
            h = self.a(x)
            return {"h": h, "y": (self.b(h.relu()) * scale,)}

    module = _seeded(Multi)
    model = tp.tensor_parallel(copy.deepcopy(module), cpu_devices(2))
    x = torch.randn(2, 3)
    out, ref = model(x, scale=2.0), module(x, scale=2.0)
    assert_close(out["h"], ref["h"], "h")
    assert_close(out["y"][0], ref["y"][0], "y")


class BranchyReader(Branchy):
    """Untraceable (data-dependent branch) and reads a layer's weight outside that layer."""

    def forward(self, x):
        h = self.a(x)
        h = h.relu() if h.sum() > 0 else h.tanh()
        return self.b(h) + x @ self.a.weight.t()[:, :6]


@pytest.mark.parametrize("n", [2, 3])
def test_a_probe_forward_finds_weights_read_outside_their_layer(n):
    module = _seeded(BranchyReader)
    x = torch.randn(3, 6)
    plan = tp.plan_for(module, n, example_inputs=(x,))
    assert "a" not in plan and plan["b"] == tp.ColwiseParallel(gather_output=True)
    check_equivalence(module, (x,), n, plan=plan)


@pytest.mark.parametrize("n", [2, 3])
def test_torch_composite_modules_are_left_whole_and_correct(n):
    module = _seeded(lambda: nn.Sequential(
        nn.Linear(8, 16), nn.TransformerEncoderLayer(16, 4, dim_feedforward=24, dropout=0.0, batch_first=True),
        nn.Linear(16, 5)))
    x = torch.randn(2, 5, 8)
    plan = tp.plan_for(module)
    assert not [p for p in plan if p.startswith("1.")]  # MultiheadAttention reads out_proj.weight itself
    module.eval()
    reference = copy.deepcopy(module)
    model = tp.tensor_parallel(module, cpu_devices(n))
    with torch.no_grad():
        assert_close(model(x), reference(x), "encoder layer output")


def test_multihead_attention_alone():
    module = _seeded(lambda: nn.MultiheadAttention(16, 4, batch_first=True))
    assert tp.plan_for(module) == {}  # out_proj is read directly by the functional forward


@pytest.mark.parametrize("n", [2, 3])
def test_replicated_parameters_on_distinct_devices_get_exact_gradients(n):
    # "cpu:0", "cpu:1"... are distinct devices to the library (as two GPUs would be) while
    # running on the CPU: replicated tensors then live once, on the first device, and the
    # other ranks copy them in forward, so their gradients add up in the one master
    module = _seeded(lambda: nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.ReLU(), nn.Linear(12, 6)))
    reference = copy.deepcopy(module)
    devices = [f"cpu:{i}" for i in range(n)]
    model = tp.tensor_parallel(module, devices)
    assert model.module_shards[1][1].weight is model.module_shards[0][1].weight
    x = torch.randn(4, 6)
    assert_close(model(x), reference(x), "output")
    model(x).pow(2).sum().backward()
    reference(x).pow(2).sum().backward()
    assert_gradients_match(model, reference)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    with torch.no_grad():
        assert_close(model(x), reference(x), "output after a step (cached copies refreshed)")
