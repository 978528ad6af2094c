"""Hugging Face models: logits, generation, loss and gradients equal the unsharded model."""

from __future__ import annotations

import copy

import pytest
import torch

import tensor_parallel as tp
from helpers import assert_close, assert_gradients_match
from hf_models import CONFIGS, VOCAB, build, num_layers

ARCHITECTURES = sorted(CONFIGS)


def _split(model, n):
    return tp.tensor_parallel(copy.deepcopy(model), ["cpu"] * n)


def _ids(batch=2, length=7, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_logits_and_collectives(name, n):
    model = build(name)
    split = _split(model, n)
    assert isinstance(split, tp.TensorParallelPreTrainedModel)
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits
        with tp.count_collectives() as stats:
            actual = split(ids).logits
    assert_close(actual, expected, f"{name} logits")
    layers = num_layers(model)
    hidden = model.config.hidden_size
    # the Megatron floor: 2 all-reduces of one activation per decoder layer, plus at most one
    # collective for the embedding and one for the logits
    layer_reduces = [s for kind, s, _ in stats.log if kind == "all_reduce" and s == (2, 7, hidden)]
    assert len(layer_reduces) >= 2 * layers, stats
    assert stats.total_calls <= 2 * layers + 2, stats


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_greedy_generation_is_token_identical(name, n):
    model = build(name)
    split = _split(model, n)
    ids = _ids(batch=1, length=5)
    for use_cache in (True, False):
        expected = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=use_cache)
        actual = split.generate(ids, max_new_tokens=8, do_sample=False, use_cache=use_cache)
        assert torch.equal(actual, expected), (name, use_cache)


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_beam_search_reorders_the_cache(name):
    model = build(name)
    split = _split(model, 3)
    ids = _ids(batch=1, length=5)
    seen = []
    embedding = split.module_shards[1].get_input_embeddings()
    handle = embedding.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[-1]))
    actual = split.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False)
    handle.remove()
    expected = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False)
    assert torch.equal(actual, expected)
    assert seen[0] == 5 and set(seen[1:]) == {1}, seen  # one new token per step: the cache is used


def test_sampling_with_a_seed():
    model = build("llama")
    split = _split(model, 2)
    ids = _ids(batch=1, length=4)
    torch.manual_seed(123)
    expected = model.generate(ids, max_new_tokens=8, do_sample=True, top_k=0)
    torch.manual_seed(123)
    actual = split.generate(ids, max_new_tokens=8, do_sample=True, top_k=0)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_loss_and_gradients(name, n):
    model = build(name, attn="eager")
    model.train()
    split = _split(model, n)
    reference = model
    ids = _ids()
    expected = reference(ids, labels=ids)
    actual = split(ids, labels=ids)
    assert_close(actual.loss, expected.loss, "loss")
    expected.loss.backward()
    actual.loss.backward()
    assert_gradients_match(split.wrapped_model, reference)


def test_eager_and_sdpa_attention():
    for attn in ("eager", "sdpa"):
        model = build("mistral", attn=attn)
        split = _split(model, 3)
        ids = _ids()
        with torch.no_grad():
            assert_close(split(ids).logits, model(ids).logits, attn)


def test_cache_continues_across_calls():
    model = build("llama")
    split = _split(model, 2)
    ids = _ids(batch=1, length=6)
    with torch.no_grad():
        first = split(ids[:, :4], use_cache=True)
        second = split(ids[:, 4:], cache=first.cache, use_cache=True)
        full = model(ids).logits
    assert_close(second.logits, full[:, 4:], "logits computed from the cache")


def test_plan_is_the_megatron_layout():
    split = _split(build("llama"), 2)
    plan = split.plan
    assert isinstance(plan["model.layers.0.self_attn"], tp.AttentionParallel)
    assert plan["model.layers.1.mlp.down_proj"] == tp.RowwiseParallel()
    assert plan["lm_head"] == tp.ColwiseParallel(gather_output=True)
