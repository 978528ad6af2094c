"""Drop-in compatibility with the original library (tensor_parallel 2.0.0).

Code is written here as the original's users wrote it: its public names and signatures, its
README snippets, its custom ``tp.Config`` tables (in the style of its ``slicing_configs.py``
and ``autoconfig.py``), each checked against the unsharded model.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from functools import partial

import pytest
import torch
import torch.nn.functional as F
import transformers
from accelerate import init_empty_weights
from torch import nn

import tensor_parallel as tp
from helpers import assert_close, assert_gradients_match, check_equivalence
from hf_models import build
from tensor_parallel.state_actions import Scale, Split, SplitInChunks, SplitInGroupedChunks, StateAction

# ----------------------------------------------------------------------------------------------
# Every public name, with the original's signature
# ----------------------------------------------------------------------------------------------

ORIGINAL_NAMES = ["Config", "convert_state_dict", "infer_sharded_device_map", "save_tensor_parallel",
                  "tensor_parallel", "Sharded", "TensorParallelPreTrainedModel", "make_distributed_shard",
                  "StateAction", "TensorParallel"]

_ = inspect.Parameter.empty
ORIGINAL_SIGNATURES = {  # positional parameters and defaults, in the original's order
    "tensor_parallel": [("module", _), ("device_ids", None), ("tensor_parallel_config", None),
                        ("distributed", None), ("sharded", None), ("sharded_param_names", None)],
    # sharded: the original's class default was True; ours is None (off), see the README
    "TensorParallel": [("module", _), ("device_ids", None), ("output_device", None), ("output_device_index", None),
                       ("tensor_parallel_config", None), ("delay_init", False), ("distributed", True),
                       ("sharded", None), ("sharded_param_names", None)],
    "TensorParallelPreTrainedModel": [("module", _), ("device_ids", None), ("output_device", None),
                                      ("output_device_index", None), ("tensor_parallel_config", None)],
    "Config": [("state_rules", _), ("input_rules", _), ("output_rules", _), ("attr_rules", _)],
    "convert_state_dict": [("input_state_dict", _), ("tensor_parallel_config", _), ("world_size", _),
                           ("for_pretrained", False)],
    "make_distributed_shard": [("module", _), ("device", _), ("tensor_parallel_config", None)],
    "Sharded": [("module", _), ("sharded_param_names", None)],
    "infer_sharded_device_map": [("tp_model", _)],
    "save_tensor_parallel": [("model", _)],
}


def _positional(obj) -> list[tuple[str, object]]:
    target = obj.__new__ if obj is tp.Sharded else obj
    params = list(inspect.signature(target).parameters.values())
    if params and params[0].name in ("self", "cls"):
        params = params[1:]
    return [(p.name, p.default) for p in params
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def test_every_public_name_of_the_original_exists():
    missing = [name for name in ORIGINAL_NAMES if not hasattr(tp, name)]
    assert not missing
    assert issubclass(tp.TensorParallelPreTrainedModel, transformers.PreTrainedModel)
    assert issubclass(Split, tp.StateAction) and issubclass(Scale, StateAction)


@pytest.mark.parametrize("name", sorted(ORIGINAL_SIGNATURES))
def test_signature_matches_the_original(name):
    assert _positional(getattr(tp, name)) == ORIGINAL_SIGNATURES[name]


def test_our_options_stay_keyword_only():
    for obj in (tp.tensor_parallel, tp.TensorParallel):
        params = inspect.signature(obj).parameters
        assert params["plan"].kind is inspect.Parameter.KEYWORD_ONLY
    assert inspect.signature(tp.TensorParallel).parameters["timeout"].kind is inspect.Parameter.KEYWORD_ONLY


def _mlp(width=16, hidden=40, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width), nn.LayerNorm(width))


def _megatron_config(n: int) -> tp.Config:
    """The Megatron pair, written with strings: one all-reduce."""
    return tp.Config({r"^0\.(weight|bias)$": "split 0", r"^2\.weight$": "split 1", r"^2\.bias$": "scale"},
                     {}, {r"^2$": {0: "sum"}}, {})


def test_arguments_in_the_originals_positions():
    torch.manual_seed(0)
    x = torch.randn(3, 16)
    module = _mlp()
    expected = module(x)
    # tensor_parallel(module, device_ids, tensor_parallel_config, distributed, sharded, sharded_param_names)
    model = tp.tensor_parallel(copy.deepcopy(module), ["cpu", "cpu"], _megatron_config(2), False, False, None)
    assert model.plan == {"0": tp.ColwiseParallel(), "2": tp.RowwiseParallel()}
    assert_close(model(x), expected, "tensor_parallel with positional legacy arguments")
    # TensorParallel(module, device_ids, output_device, output_device_index, config, delay_init, distributed, sharded)
    model = tp.TensorParallel(copy.deepcopy(module), ["cpu:0", "cpu:1"], None, 1, _megatron_config(2), False,
                              False, False, None)
    assert model.output_device == torch.device("cpu", 1) and model.plan["2"] == tp.RowwiseParallel()
    assert_close(model(x), expected, "TensorParallel with positional legacy arguments")
    assert tp.TensorParallel(copy.deepcopy(module), ["cpu:0", "cpu:1"], output_device_index=-1).output_device \
        == torch.device("cpu", 1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(output_device="cpu", output_device_index=0), "either output_device or output_device_index"),
    (dict(output_device_index=2), "output_device_index=2 must index the devices"),
    (dict(plan={}, tensor_parallel_config=tp.Config({}, {}, {}, {})), "either plan= .* or tensor_parallel_config="),
    (dict(sharded=False, sharded_param_names=["3.weight"]), "sharded_param_names is given but sharded=False"),
])
def test_conflicting_legacy_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tp.TensorParallel(_mlp(), ["cpu", "cpu"], **kwargs)


def test_a_config_must_be_a_config():
    with pytest.raises(TypeError, match="tensor_parallel_config must be a tp.Config"):
        tp.tensor_parallel(_mlp(), ["cpu", "cpu"], {"0": tp.ColwiseParallel()})


def test_distributed_true_without_torch_distributed_says_what_to_do():
    with pytest.raises(ValueError, match="torch.distributed is not initialised; launch with torchrun"):
        tp.tensor_parallel(_mlp(), ["cpu"], None, True)
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        tp.make_distributed_shard(_mlp(), "cpu")


# ----------------------------------------------------------------------------------------------
# delay_init: shards built on the CPU, moved to their devices by the first call
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3])
def test_delay_init_builds_on_the_cpu_and_moves_at_the_first_call(n):
    torch.manual_seed(0)
    devices = [f"cpu:{i}" for i in range(n)]  # distinct devices: replicated tensors live on rank 0's
    module = nn.Sequential(nn.Linear(16, 40), nn.GELU(), nn.Linear(40, 16), nn.LayerNorm(16), nn.Linear(16, 37))
    model = tp.TensorParallel(copy.deepcopy(module), devices, delay_init=True)
    assert model.need_delayed_init
    # until then ranks share the replicated LayerNorm as one tensor, like ranks on one device
    assert model.module_shards[0][3].weight is model.module_shards[1][3].weight
    x = torch.randn(4, 16)
    assert_close(model(x), module(x), "output after a delayed init")
    assert not model.need_delayed_init
    # the same checks as an ordinary split: gradients of replicated tensors reach their one copy
    check_equivalence(module, (x,), n, devices=devices, delay_init=True)


# ----------------------------------------------------------------------------------------------
# Configs written as the original's users wrote them
# ----------------------------------------------------------------------------------------------


def heads_of(num_heads: int, *, rank: int, world_size: int) -> int:
    """The original's ``split_num_heads``, as a custom config copies it: the rank's share of heads."""
    return torch.empty(num_heads, device="meta").tensor_split(world_size)[rank].numel()


class Attention(nn.Module):
    """A small attention block whose forward reads ``num_heads`` (the attribute a config scales)."""

    def __init__(self, width: int, heads: int, fused: bool = False) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, width // heads
        if fused:
            self.qkv = nn.Linear(width, 3 * width)
        else:
            self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.o = nn.Linear(width, width)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, -1) if hasattr(self, "qkv") else (self.q(x), self.k(x), self.v(x))
        heads = [y.view(b, t, self.num_heads, self.head_dim).transpose(1, 2) for y in (q, k, v)]
        y = F.scaled_dot_product_attention(*heads, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, fused: bool = False) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(width), Attention(width, heads, fused)
        self.ln2, self.mlp = nn.LayerNorm(width), nn.Sequential(nn.Linear(width, 40), nn.GELU(), nn.Linear(40, width))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def _blocks(width=48, heads=6, fused=False, layers=2):
    torch.manual_seed(0)
    return nn.Sequential(*(Block(width, heads, fused) for _ in range(layers)))


def block_config(n: int, head_dim: int, fused: bool = False) -> tp.Config:
    """A custom config in the style of the original's slicing_configs.py."""
    attention = {
        r".*attn\.qkv\.(weight|bias)$": SplitInGroupedChunks(world_size=n, dim=0, num_groups=3, chunk_size=head_dim),
    } if fused else {
        r".*attn\.(q|k|v)\.(weight|bias)$": SplitInChunks(world_size=n, dim=0, chunk_size=head_dim),
    }
    return tp.Config(
        state_rules={
            **attention,
            r".*attn\.o\.weight$": SplitInChunks(world_size=n, dim=1, chunk_size=head_dim),
            r".*attn\.o\.bias$": Scale(world_size=n),
            r".*mlp\.0\.(weight|bias)$": Split(world_size=n, dim=0),
            r".*mlp\.2\.weight$": Split(world_size=n, dim=1),
            r".*mlp\.2\.bias$": Scale(world_size=n),
        },
        input_rules={},
        output_rules={r".*attn$": {0: "sum"}, r".*mlp$": {0: "sum"}},
        attr_rules={r".*attn$": {"num_heads": "scale" if fused else partial(heads_of, world_size=n)}},
    )


@pytest.mark.parametrize("n", [2, 3])
def test_megatron_pair_from_a_config_costs_one_all_reduce(n):
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    model = check_equivalence(_mlp(), (x,), n, tensor_parallel_config=_megatron_config(n))
    assert model.plan == {"0": tp.ColwiseParallel(), "2": tp.RowwiseParallel()}
    with tp.count_collectives() as stats:
        model(x)
    assert dict(stats.calls) == {"all_reduce": 1}


@pytest.mark.parametrize("fused", [False, True], ids=["q-k-v", "fused-qkv"])
@pytest.mark.parametrize("n, heads", [(2, 6), (3, 6), (3, 4)])  # 4 heads over 3: 2/1/1
def test_attention_and_mlp_config_equals_unsharded(n, heads, fused):
    torch.manual_seed(1)
    x = torch.randn(2, 5, 48)
    config = block_config(n, 48 // heads, fused)
    model = check_equivalence(_blocks(heads=heads, fused=fused), (x,), n, tensor_parallel_config=config)
    attention = model.plan["0.attn"]
    assert isinstance(attention, tp.AttentionParallel) and attention.num_heads == heads
    assert attention.attributes == (("num_heads", "heads"),)
    assert model.plan["0.mlp.0"] == tp.ColwiseParallel() and model.plan["0.mlp.2"] == tp.RowwiseParallel()
    with tp.count_collectives() as stats:
        model(x)
    assert dict(stats.calls) == {"all_reduce": 4}  # 2 blocks x (attention + MLP): the Megatron floor


def test_kv_cache_rules_of_the_original_are_dropped():
    """The original's configs passed KV caches between ranks with callables (select_kv_for_rank on
    the cache argument, a gather of output 1); each rank keeps its own cache here."""
    base = block_config(2, 8)
    state, attrs = ({p.pattern: a for p, a in t.items()} for t in (base.state_rules, base.attr_rules))
    outputs = {r".*attn$": {0: "sum", 1: lambda *kvs: kvs}, r".*mlp$": {0: "sum"}}
    config = tp.Config(state, {r".*attn$": {"layer_past": lambda kv, rank: kv}}, outputs, attrs)
    x = torch.randn(2, 5, 48)
    model = tp.TensorParallel(_blocks(), ["cpu", "cpu"], tensor_parallel_config=config)
    assert isinstance(model.plan["1.attn"], tp.AttentionParallel)
    assert_close(model(x), _blocks()(x), "output with the KV-cache rules dropped")
    config = tp.Config(state, {r".*mlp$": {"mask": lambda m, rank: m}}, outputs, attrs)  # another callable
    with pytest.raises(ValueError, match=r"input rule '\.\*mlp\$' \{'mask'.*a callable"):
        tp.TensorParallel(_blocks(), ["cpu", "cpu"], tensor_parallel_config=config)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("emb_cls", [nn.Embedding, nn.EmbeddingBag])
def test_the_originals_automatic_config_written_by_hand(emb_cls, n):
    """The original's test model, split by a Config like the one its autoconfig.py made."""
    torch.manual_seed(0)
    module = nn.Sequential(emb_cls(num_embeddings=1337, embedding_dim=64), nn.LayerNorm(64), nn.Linear(64, 128),
                           nn.ReLU(), nn.Linear(128, 10))
    config = tp.Config(
        state_rules={r"^0.weight$": Split(world_size=n, dim=1), r"^2.(weight|bias)$": Split(world_size=n, dim=0),
                     r"^4.(weight|bias)$": Split(world_size=n, dim=0)},
        input_rules={},
        output_rules={r"^0$": {0: "gather -1"}, r"^2$": {0: "gather -1"}, r"^4$": {0: "gather -1"}},
        attr_rules={},
    )
    inputs = torch.randint(1, 1000, size=(1, 10))
    model = check_equivalence(module, (inputs,), n, tensor_parallel_config=config)
    assert model.plan == {"0": tp.EmbeddingParallel(dim=1), "2": tp.ColwiseParallel(gather_output=True),
                          "4": tp.ColwiseParallel(gather_output=True)}


def test_the_originals_basic_test_runs_unchanged():
    """tests/test_basic.py of the original: the default split, and its own gradient check."""
    torch.manual_seed(0)
    for devices in [("cpu",), ("cpu", "cpu"), ("cpu", "cpu", "cpu")]:
        model = nn.Sequential(nn.Embedding(num_embeddings=1337, embedding_dim=64), nn.LayerNorm(64),
                              nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        inputs = torch.randint(1, 1000, size=(1, 10))
        ref_out = model(inputs)
        ref_out.norm().backward()
        model_tp = tp.TensorParallel(copy.deepcopy(model), device_ids=devices)
        out_ours = model_tp(inputs)
        out_ours.norm().backward()
        # the original's own tolerances: its check, unchanged (a row split reorders float32 sums by ~1e-7)
        torch.testing.assert_close(ref_out, out_ours, atol=1e-6, rtol=1e-05)
        our_grad = torch.cat([next(shard[0].parameters()).grad for shard in model_tp.module_shards], dim=1)
        torch.testing.assert_close(model[0].weight.grad, our_grad, atol=1e-6, rtol=1e-05)


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.ln, self.head = nn.Embedding(97, 16), nn.LayerNorm(16), nn.Linear(16, 97, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.ln(self.emb(ids)))


@pytest.mark.parametrize("n", [2, 3])
def test_tied_lm_head_split_by_input_features(n):
    """autoconfig.py's special case: the LM head tied to an embedding cut along dim 1 takes a
    split input (``Split(world_size, dim=-1)`` as an input action) and sums its output."""
    torch.manual_seed(0)
    config = tp.Config({r"^emb\.weight$": Split(world_size=n, dim=1)}, {r"^head$": {0: Split(world_size=n, dim=-1)}},
                       {r"^emb$": {0: "gather -1"}, r"^head$": {0: "sum"}}, {})
    model = check_equivalence(TiedLM(), (torch.tensor([[1, 5, 96, 3]]),), n, tensor_parallel_config=config)
    assert model.plan == {"emb": tp.EmbeddingParallel(dim=1), "head": tp.RowwiseParallel()}
    assert model.module_shards[0].head.weight is model.module_shards[0].emb.weight


def test_an_empty_config_splits_nothing():
    model = tp.TensorParallel(_mlp(), ["cpu", "cpu"], tensor_parallel_config=tp.Config({}, {}, {}, {}))
    assert model.plan == {}
    assert all(shard is None for shard in model.layout.values())


def test_a_split_models_own_config_round_trips():
    model = tp.TensorParallel(_blocks(heads=6), ["cpu", "cpu", "cpu"], tensor_parallel_config=block_config(3, 8))
    again = tp.TensorParallel(_blocks(heads=6), ["cpu", "cpu", "cpu"], tensor_parallel_config=model.tensor_parallel_config)
    assert again.plan == model.plan and again.layout == model.layout


def test_the_callers_config_is_not_changed():
    state_rules = {r"^0\.(weight|bias)$": "split 0", r"^2\.weight$": "split 1", r"^2\.bias$": "scale"}
    before = dict(state_rules)
    config = tp.Config(state_rules, {}, {r"^2$": {0: "sum"}}, {})
    tp.TensorParallel(_mlp(), ["cpu", "cpu"], tensor_parallel_config=config)
    assert state_rules == before


# Untranslatable rules: a ValueError that names the rule (regex and action) and what to do.
def _error_cases():
    mlp_rules = {r"^0\.(weight|bias)$": "split 0", r"^2\.weight$": "split 1", r"^2\.bias$": "scale"}

    class Custom(StateAction):
        def __call__(self, tensor, rank):
            return tensor

        def undo(self, tensors):
            return tensors[0]

    return {
        "layer norm cut": (tp.Config({**mlp_rules, r"^3\.weight$": "split 0"}, {}, {r"^2$": {0: "sum"}}, {}),
                           r"'\^3\\\\.weight\$'.*'3' \(LayerNorm\) is not a layer we split"),
        "row without a sum": (tp.Config(mlp_rules, {}, {}, {}), r"'\^2\\\\.weight\$'.*no output rule sums it"),
        "row summed twice": (tp.Config(mlp_rules, {}, {r"^2$": {0: "sum"}, r"^$": {0: "sum"}}, {}),
                             "summed 2 times"),
        "bias added per rank": (tp.Config({r"^0\.(weight|bias)$": "split 0", r"^2\.weight$": "split 1"}, {},
                                          {r"^2$": {0: "sum"}}, {}), r"'2.bias'.*add Scale"),
        "sum with nothing to sum": (tp.Config({}, {}, {r"^3$": {0: "sum"}}, {}),
                                    r"output rule '\^3\$' \{0: 'sum'\}.*nothing to sum"),
        "gather on a container": (tp.Config({}, {}, {r"^$": {0: "gather -1"}}, {}),
                                  r"output rule '\^\$' \{0: 'gather -1'\}.*'<root>' \(not split\)"),
        "a callable": (tp.Config({}, {r"^3$": {0: lambda x, rank: x}}, {}, {}), r"input rule '\^3\$'.*a callable"),
        "bias not cut with its weight": (tp.Config({r"^0\.weight$": "split 0"}, {}, {r"^0$": {0: "gather -1"}}, {}),
                                         r"'0.bias' \(no state rule: kept whole\).*cut the weight and the bias"),
        "wrong world size": (tp.Config({r"^0\.(weight|bias)$": Split(world_size=2, dim=0)}, {},
                                       {r"^0$": {0: "gather -1"}}, {}), r"cuts into 2 parts, but the model is split over 3"),
        "a custom state action": (tp.Config({r"^0\.weight$": Custom()}, {}, {}, {}), "custom state action"),
        "conflicting rules": (tp.Config({}, {r"^0$": {0: "split -1"}, r"0": {0: "split 0"}}, {}, {}),
                              "give module '0' two actions"),
        "unreadable action": (tp.Config({}, {}, {r"^0$": {0: "gather everything"}}, {}), "cannot read the action"),
    }


@pytest.mark.parametrize("case", sorted(_error_cases()))
def test_an_untranslatable_rule_is_named(case):
    config, message = _error_cases()[case]
    with pytest.raises(ValueError, match=message) as caught:
        tp.TensorParallel(_mlp(), ["cpu"] * 3, tensor_parallel_config=config)
    assert "pass plan= with styles instead" in str(caught.value) or case in ("conflicting rules", "unreadable action")


def test_attention_cut_across_heads_is_named():
    # 4 heads of 8 over 3 devices: Split cuts 11/11/10 features, not whole heads
    config = block_config(3, 8)
    config.state_rules = {p: (Split(3, 0) if "(q|k|v)" in p.pattern else a) for p, a in config.state_rules.items()}
    with pytest.raises(ValueError, match=r"attr rule '\.\*attn\$' \{'num_heads'.*no split of '0.attn' into whole heads"):
        tp.TensorParallel(_blocks(width=32, heads=4), ["cpu"] * 3, tensor_parallel_config=config)


def test_attribute_values_no_head_split_gives_are_named():
    config = block_config(2, 8)
    config.attr_rules[next(iter(config.attr_rules))] = {"num_heads": lambda n, rank: n}  # not divided at all
    with pytest.raises(ValueError, match="no split of '0.attn' into whole heads"):
        tp.TensorParallel(_blocks(), ["cpu"] * 2, tensor_parallel_config=config)


def test_deprecated_callable_state_rule_warns():
    with pytest.warns(DeprecationWarning, match="a callable is deprecated"):
        tp.Config({r"weight": lambda tensor, rank: tensor}, {}, {}, {})


def test_state_actions_cut_like_torch_tensor_split():
    t = torch.arange(2 * 7 * 3).reshape(2, 7, 3)
    for rank in range(3):
        assert torch.equal(Split(3, 1)(t, rank), torch.tensor_split(t, 3, dim=1)[rank])
    parts = [Split(3, 1)(t, r) for r in range(3)]
    assert torch.equal(Split(3, 1).undo(parts), t)
    grouped = SplitInGroupedChunks(2, 0, num_groups=3, chunk_size=2)
    fused = torch.arange(12)
    assert torch.equal(grouped(fused, 1), torch.tensor([2, 3, 6, 7, 10, 11]))
    assert torch.equal(grouped.undo([grouped(fused, r) for r in range(2)]), fused)
    assert torch.equal(Scale(4)(torch.ones(2), 0), torch.full((2,), 0.25))


# ----------------------------------------------------------------------------------------------
# The README's snippets, run as its users ran them (tiny models, CPU devices)
# ----------------------------------------------------------------------------------------------


def _opt():
    torch.manual_seed(0)
    config = transformers.OPTConfig(vocab_size=97, hidden_size=48, ffn_dim=80, num_hidden_layers=2,
                                    num_attention_heads=6, max_position_embeddings=64, word_embed_proj_dim=48)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("n", [2, 3])
def test_readme_quickstart(n):
    reference = _opt()
    model = tp.tensor_parallel(copy.deepcopy(reference), ["cpu"] * n)  # <- each device has 1/n of the weights
    inputs = torch.tensor([[5, 6, 7, 8]])
    outputs = model.generate(inputs, num_beams=5, max_new_tokens=6)
    assert torch.equal(outputs, reference.generate(inputs, num_beams=5, max_new_tokens=6))
    loss = model(input_ids=inputs, labels=inputs).loss
    loss.backward()  # training works as usual
    expected = reference(input_ids=inputs, labels=inputs).loss
    expected.backward()
    assert_close(loss, expected, "loss")
    assert_gradients_match(model.wrapped_model, reference)


def test_readme_saving(tmp_path):
    reference = _opt()
    model = tp.tensor_parallel(copy.deepcopy(reference), ["cpu", "cpu"])
    with tp.save_tensor_parallel(model):
        torch.save(model.state_dict(), tmp_path / "state.bin")
        model.save_pretrained(tmp_path / "saved")
    plain = _opt()
    for parameter in plain.parameters():
        nn.init.zeros_(parameter)
    plain.load_state_dict(torch.load(tmp_path / "state.bin"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    for key, value in reference.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value) and torch.equal(loaded.state_dict()[key], value), key


class MyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 40), nn.GELU(), nn.Linear(40, 16))
        self.norm, self.head = nn.LayerNorm(16), nn.Linear(16, 37)

    def forward(self, x):
        return self.head(self.norm(x + self.body(x)))


@pytest.mark.parametrize("parts", [1, 3])
def test_readme_memory_efficient_dispatch(parts):
    torch.manual_seed(0)
    reference = MyModel()
    # Initialize a weightless tensor_parallel model from MyModel
    with init_empty_weights():
        model = tp.TensorParallel(
            MyModel(),
            device_ids=["cpu", "cpu"],  # and prepare it to be put on 2 devices
        )
    keys = list(reference.state_dict())
    for part in range(parts):  # "my_model_part_1_of_5.bin", ...
        state_dict = {k: reference.state_dict()[k] for k in keys[part::parts]}
        # Convert it into a tensor_parallel state_dict
        tensor_parallel_state_dict = tp.convert_state_dict(
            state_dict,
            tensor_parallel_config=model.tensor_parallel_config,
            world_size=len(model.devices),
        )
        # Dispatch the partial state_dict (a part alone is not the whole state: strict=False)
        model.load_state_dict(tensor_parallel_state_dict, strict=parts == 1)
    assert not [name for name, p in model.named_parameters() if p.device.type == "meta"]
    x = torch.randn(3, 16)
    assert_close(model(x), reference(x), "after the memory-efficient dispatch")
    model(x).pow(2).mean().backward()
    reference(x).pow(2).mean().backward()
    assert_gradients_match(model, reference)  # the replicated tensors are one parameter again


def test_convert_state_dict_for_pretrained_and_with_a_hand_written_config():
    reference = _opt()
    with init_empty_weights():
        model = tp.TensorParallelPreTrainedModel(_opt(), ["cpu", "cpu"])
    state = tp.convert_state_dict(reference.state_dict(), model.tensor_parallel_config, 2, for_pretrained=True)
    assert all(k.startswith("wrapped_model.module_shards.") for k in state)
    model.load_state_dict(state)
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        assert_close(model(ids).logits, reference(ids).logits, "logits after convert_state_dict")
    # a user's Config cuts the same way its translated plan does; scaled biases stay whole
    mlp = _mlp()
    state = tp.convert_state_dict(mlp.state_dict(), _megatron_config(2), world_size=2)
    split = tp.TensorParallel(_mlp(seed=1), ["cpu", "cpu"], tensor_parallel_config=_megatron_config(2))
    split.load_state_dict(state)
    assert torch.equal(state["module_shards.1.2.bias"], mlp[2].bias)
    x = torch.randn(2, 16)
    assert_close(split(x), mlp(x), "after loading a state cut by a hand-written Config")


# ----------------------------------------------------------------------------------------------
# Hugging Face: the legacy arguments, get_encoder for encoder-decoders
# ----------------------------------------------------------------------------------------------


def test_t5_get_encoder_and_generate_with_legacy_arguments():
    """The original's test_encoder, plus generate, with output_device_index and delay_init."""
    reference = build("t5")
    encoder_input = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    model = tp.TensorParallelPreTrainedModel(copy.deepcopy(reference), ["cpu:0", "cpu:1", "cpu:2"], None, 1,
                                             delay_init=True, sharded=False)
    assert isinstance(model, transformers.PreTrainedModel) and model.wrapped_model.need_delayed_init
    with torch.no_grad():
        out = model.get_encoder()(encoder_input)  # the first call places the shards
        assert_close(out.last_hidden_state, reference.get_encoder()(encoder_input).last_hidden_state, "encoder")
    assert not model.wrapped_model.need_delayed_init
    assert model.wrapped_model.output_device == torch.device("cpu", 1)
    assert torch.equal(model.generate(encoder_input, max_new_tokens=5, num_beams=2),
                       reference.generate(encoder_input, max_new_tokens=5, num_beams=2))


def inner_dim_of(inner_dim: int, *, rank: int, num_heads: int, world_size: int) -> int:
    """The original's ``split_inner_dim``: the rank's heads times the head size."""
    return heads_of(num_heads, rank=rank, world_size=world_size) * (inner_dim // num_heads)


def bert_config(model_config: transformers.BertConfig, devices) -> tp.Config:
    """The original's built-in ``get_bert_config`` (its slicing_configs.py), as a user copies it."""
    world_size = len(devices)
    num_heads = model_config.num_attention_heads
    head_dim = int(model_config.hidden_size / model_config.num_attention_heads)
    return tp.Config(
        state_rules={
            # BertAttention
            r".*self\.query\.(weight|bias)$": SplitInChunks(world_size=world_size, dim=0, chunk_size=head_dim),
            r"self\.key\.(weight|bias)": SplitInChunks(world_size=world_size, dim=0, chunk_size=head_dim),
            r"self\.value\.(weight|bias)": SplitInChunks(world_size=world_size, dim=0, chunk_size=head_dim),
            r".*attention\.output\.dense\.weight$": SplitInChunks(world_size=world_size, dim=1, chunk_size=head_dim),
            r".*attention\.output\.dense\.bias$": Scale(world_size=world_size),
            # BertIntermediate
            r".*intermediate\.dense\.(weight|bias)$": Split(world_size=world_size, dim=0),
            # BertOutput
            r".*[0-9]\.output\.dense\.weight$": Split(world_size=world_size, dim=1),
            r".*[0-9]\.output\.dense\.bias$": Scale(world_size=world_size),
            # BertEmbeddings
            r".*word_embeddings\.weight$": Split(world_size=world_size, dim=1),
            r".*position_embeddings\.weight$": Split(world_size=world_size, dim=1),
            r".*token_type_embeddings\.weight$": Split(world_size=world_size, dim=1),
        },
        input_rules={},
        output_rules={
            r".*attention\.output\.dense$": {0: "sum"},
            r".*[0-9]\.output\.dense$": {0: "sum"},
            r".*word_embeddings$": {0: "gather -1"},
            r".*position_embeddings$": {0: "gather -1"},
            r".*token_type_embeddings$": {0: "gather -1"},
        },
        attr_rules={
            r".*attention\.self$": {
                "num_attention_heads": partial(heads_of, world_size=world_size),
                "all_head_size": partial(inner_dim_of, num_heads=num_heads, world_size=world_size),
            },
        },
    )


@pytest.mark.parametrize("n", [2, 3])
def test_the_originals_bert_config(n):
    """The original's own documented example of a Config, on its own test model (BertModel)."""
    torch.manual_seed(0)
    model_config = transformers.BertConfig(vocab_size=97, hidden_size=48, num_hidden_layers=2,
                                           num_attention_heads=6, intermediate_size=80)
    reference = transformers.BertModel(model_config).eval()
    devices = ["cpu"] * n
    model = tp.TensorParallel(copy.deepcopy(reference), devices, tensor_parallel_config=bert_config(model_config, devices))
    attention = model.plan["encoder.layer.0.attention"]
    assert isinstance(attention, tp.AttentionParallel) and attention.q == "self.query" and attention.o == "output.dense"
    assert attention.attributes == (("self.num_attention_heads", "heads"), ("self.all_head_size", "width"))
    assert model.module_shards[-1].encoder.layer[0].attention.self.num_attention_heads == 6 // n
    ids = torch.tensor([[5, 6, 7, 8, 9], [1, 2, 3, 4, 96]])
    with tp.count_collectives() as stats:
        out = model(ids)
    assert dict(stats.calls) == {"all_gather": 3, "all_reduce": 4}  # 3 embeddings; 2 per layer
    expected = reference(ids)
    assert_close(out.last_hidden_state, expected.last_hidden_state, "BERT hidden states")
    assert_close(out.pooler_output, expected.pooler_output, "BERT pooled output")
    (out.last_hidden_state.pow(2).mean() + out.pooler_output.pow(2).mean()).backward()
    (expected.last_hidden_state.pow(2).mean() + expected.pooler_output.pow(2).mean()).backward()
    assert_gradients_match(model, reference)


def gpt2_config(model_config: transformers.GPT2Config, devices) -> tp.Config:
    """The original's built-in ``get_gpt2_config``, as a user copies it (its KV-cache helpers
    written out: they are dropped, each rank keeps its own cache)."""
    world_size = len(devices)
    num_heads = model_config.num_attention_heads
    head_dim = model_config.hidden_size // model_config.num_attention_heads
    select_kv_for_rank = lambda kv, rank: kv  # noqa: E731
    gather_kv_across_ranks = lambda *kvs: kvs  # noqa: E731
    return tp.Config(
        state_rules={
            # GPT2Attention
            r".*c_attn\.weight$": SplitInGroupedChunks(world_size=world_size, dim=1, num_groups=3, chunk_size=head_dim),
            r".*c_attn\.bias$": SplitInGroupedChunks(world_size=world_size, dim=0, num_groups=3, chunk_size=head_dim),
            r".*q_attn\.weight$": SplitInChunks(world_size=world_size, dim=1, chunk_size=head_dim),
            r".*q_attn\.bias$": SplitInChunks(world_size=world_size, dim=0, chunk_size=head_dim),
            r".*attn\.c_proj\.weight$": SplitInChunks(world_size=world_size, dim=0, chunk_size=head_dim),
            r".*attn\.c_proj\.bias$": Scale(world_size=world_size),
            # GPT2MLP
            r".*c_fc\.weight$": Split(world_size=world_size, dim=1),
            r".*c_fc\.bias$": Split(world_size=world_size, dim=0),
            r".*mlp\.c_proj\.weight$": Split(world_size=world_size, dim=0),
            r".*mlp\.c_proj\.bias$": Scale(world_size=world_size),
            # GPT2Model
            r".*wte\.weight$": Split(world_size=world_size, dim=1),
            r".*wpe\.weight$": Split(world_size=world_size, dim=1),
            r".*lm_head\.weight$": Split(world_size=world_size, dim=1),
            # note: ^-- lm_head.weight is tied with word_embeddings
        },
        input_rules={
            r".*[0-9]\.attn$": {"layer_past": select_kv_for_rank},
            r".*lm_head$": {0: "split -1"},
        },
        output_rules={
            r".*[0-9]\.attn$": {0: "sum", 1: gather_kv_across_ranks},
            r".*mlp$": {0: "sum"},
            r".*wte$": {0: "gather -1"},
            r".*wpe$": {0: "gather -1"},
            r".*lm_head$": {0: "sum"},
        },
        attr_rules={
            r".*attn\.c_attn$": {"nf": partial(inner_dim_of, num_heads=num_heads, world_size=world_size)},
            r".*attn\.q_attn$": {"nf": partial(inner_dim_of, num_heads=num_heads, world_size=world_size)},
            r".*mlp\.c_fc$": {"nf": partial(heads_of, world_size=world_size)},
            r".*[0-9]\.attn$": {
                "embed_dim": partial(inner_dim_of, num_heads=num_heads, world_size=world_size),
                "num_heads": partial(heads_of, world_size=world_size),
                "split_size": partial(inner_dim_of, num_heads=num_heads, world_size=world_size),
            },
        },
    )


@pytest.mark.parametrize("n", [2, 3])
def test_the_originals_gpt2_config(n):
    """The original's GPT-2 config (fused q|k|v in a Conv1D, tied LM head) on GPT2LMHeadModel."""
    reference = build("gpt2", attn="eager")
    devices = ["cpu"] * n
    model = tp.tensor_parallel(copy.deepcopy(reference), devices, gpt2_config(reference.config, devices))
    attention = model.plan["transformer.h.0.attn"]
    assert isinstance(attention, tp.AttentionParallel) and attention.qkv == "c_attn" and attention.o == "c_proj"
    assert dict(attention.attributes) == {"embed_dim": "width", "num_heads": "heads", "split_size": "width"}
    assert model.plan["lm_head"] == tp.RowwiseParallel()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with tp.count_collectives() as stats, torch.no_grad():
        model(ids)
    assert dict(stats.calls) == {"all_gather": 2, "all_reduce": 5}  # wte, wpe; 2 per layer + the head
    out, expected = model(ids, labels=ids), reference(ids, labels=ids)
    assert_close(out.logits, expected.logits, "GPT-2 logits")
    out.loss.backward()
    expected.loss.backward()
    assert_gradients_match(model.wrapped_model, reference)
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False),
                       reference.generate(ids, max_new_tokens=5, do_sample=False))


def test_factory_returns_the_originals_types():
    """The original's test_factory: a module gives TensorParallel, a transformers model a PreTrainedModel."""
    model = tp.tensor_parallel(_mlp(), device_ids=["cpu", "cpu"], sharded=False)
    assert isinstance(model, tp.TensorParallel)
    hf = tp.tensor_parallel(build("bloom"), device_ids=["cpu", "cpu"])
    assert isinstance(hf, transformers.PreTrainedModel) and isinstance(hf, tp.TensorParallelPreTrainedModel)


def test_a_hand_written_config_for_a_transformers_mlp():
    """A Config for the MLPs of a transformers model (the attention left whole)."""
    reference = build("llama")
    config = tp.Config({r".*mlp\.(gate|up)_proj\.weight$": Split(2, 0), r".*mlp\.down_proj\.weight$": Split(2, 1)},
                       {}, {r".*mlp$": {0: "sum"}}, {})
    model = tp.tensor_parallel(copy.deepcopy(reference), ["cpu", "cpu"], config)
    assert set(model.plan) == {f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")}
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert_close(model(ids).logits, reference(ids).logits, "logits")
    with tp.count_collectives() as stats, torch.no_grad():
        model(ids)
    assert dict(stats.calls) == {"all_reduce": 2}


# ----------------------------------------------------------------------------------------------
# ZeRO-3: sharded=, sharded_param_names=, Sharded, apply_sharding
# ----------------------------------------------------------------------------------------------


def test_sharded_is_off_unless_asked_for():
    torch.manual_seed(0)
    x = torch.randn(3, 16)
    # sharded=None, the original's default: off, as its factory did (its classes said True)
    assert tp.tensor_parallel(_mlp(), ["cpu", "cpu"]).sharded_keys == set()
    assert tp.TensorParallel(_mlp(), ["cpu", "cpu"]).sharded_keys == set()
    assert tp.TensorParallelPreTrainedModel(build("llama"), ["cpu", "cpu"]).wrapped_model.sharded_keys == set()
    # tensor_parallel(module, device_ids, tensor_parallel_config, distributed, sharded)
    model = tp.tensor_parallel(_mlp(), ["cpu", "cpu"], None, None, True)
    assert model.sharded_keys == {"2.bias", "3.weight", "3.bias"}  # what the plan replicates
    assert_close(model(x), _mlp()(x), "output with ZeRO-3")
    # names alone mean sharded (the original's factory ignored them)
    assert tp.TensorParallel(_mlp(), ["cpu", "cpu"], sharded_param_names=["3.weight"]).sharded_keys == {"3.weight"}
    hf = tp.TensorParallelPreTrainedModel(build("llama"), ["cpu", "cpu"], sharded=True,
                                          sharded_param_names=["model.norm.weight"])
    assert hf.wrapped_model.sharded_keys == {"model.norm.weight"}


def test_the_originals_legacy_test_with_sharded():
    """tests/test_legacy.py of the original: split unsharded, then wrap in Sharded."""
    reference = transformers.BertModel(build("bert").config).eval()
    tp_model = tp.tensor_parallel(copy.deepcopy(reference), ["cpu", "cpu"], sharded=False)
    assert isinstance(tp_model, transformers.PreTrainedModel)
    with pytest.warns(DeprecationWarning, match="Sharded.* is deprecated"):
        tp_model.wrapped_model = tp.Sharded(tp_model.wrapped_model)
    assert tp_model.wrapped_model.sharded_keys  # the norms, biases and embeddings the plan replicates
    ids = torch.zeros(1, 8, dtype=int)
    with torch.no_grad():
        assert_close(tp_model(ids).last_hidden_state, reference(ids).last_hidden_state, "BERT after Sharded")


@pytest.mark.parametrize("n", [2, 3])
def test_the_originals_saving_tests_with_zero3(n):
    """tests/test_saving.py of the original: ``Config({}, {}, {}, {})`` is ZeRO-3 only, and
    ``tensor_parallel(model, devices, sharded=True)``; both save the original state."""
    reference = transformers.BertModel(build("bert").config).eval()
    devices = ["cpu"] * n
    with pytest.warns(DeprecationWarning, match="Sharded.* is deprecated"):
        only_zero3 = tp.Sharded(tp.TensorParallel(copy.deepcopy(reference), devices,
                                                  tensor_parallel_config=tp.Config({}, {}, {}, {})))
    assert only_zero3.plan == {} and only_zero3.sharded_keys == set(dict(reference.named_parameters()))
    both = tp.tensor_parallel(copy.deepcopy(reference), devices, sharded=True)
    for model_tp in (only_zero3, both):
        with tp.save_tensor_parallel(model_tp):
            model_tp_state_dict = model_tp.state_dict()
        assert sorted(model_tp_state_dict) == sorted(reference.state_dict())
        for name, data in reference.state_dict().items():
            assert torch.equal(data, model_tp_state_dict[name]), name  # gathered copies of the same numbers
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert_close(both(ids).last_hidden_state, reference(ids).last_hidden_state, "BERT, TP and ZeRO-3")


def test_the_originals_encoder_test_with_sharded():
    """tests/test_transformers.py::test_encoder of the original, sharded=True, plus delay_init."""
    reference = build("t5")
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    model_tp = tp.tensor_parallel(copy.deepcopy(reference), ["cpu", "cpu"], sharded=True, delay_init=True)
    assert isinstance(model_tp, tp.TensorParallelPreTrainedModel) and model_tp.wrapped_model.sharded_keys
    with torch.no_grad():
        out = model_tp.get_encoder()(ids)
        assert_close(out.last_hidden_state, reference.get_encoder()(ids).last_hidden_state, "encoder with ZeRO-3")


def test_distributed_true_returns_the_module_and_uses_the_config():
    import dist_cases
    from distributed import assert_all_ok, run_ranks

    calls = assert_all_ok(run_ranks(dist_cases.legacy, 2))
    assert calls[0] == {"all_reduce": 1}


@pytest.mark.parametrize("pretrained", [False, True])
def test_the_originals_saving_switch(pretrained):
    """tests/test_saving.py of the original: set_preserve_shards_when_saving both ways."""
    reference = build("bert") if pretrained else _mlp()
    make = tp.TensorParallelPreTrainedModel if pretrained else tp.TensorParallel
    model_tp = make(copy.deepcopy(reference), ["cpu", "cpu", "cpu"])
    model_tp.set_preserve_shards_when_saving(True)
    model_tp.load_state_dict(model_tp.state_dict())
    model_tp.set_preserve_shards_when_saving(False)
    state = model_tp.state_dict()
    assert sorted(state) == sorted(reference.state_dict())
    for name, data in reference.state_dict().items():
        assert torch.equal(data, state[name]), name  # a gathered copy of the very same numbers
    model_tp.set_preserve_shards_when_saving(True)
    assert all(key.startswith(("module_shards.", "wrapped_model.")) for key in model_tp.state_dict())
