"""Hugging Face models: logits, generation, loss and gradients equal the unsharded model."""

from __future__ import annotations

import copy

import pytest
import torch

import tensor_parallel as tp
from helpers import assert_close, assert_gradients_match
from hf_models import CONFIGS, ENCODERS, SEQ2SEQ, VOCAB, build, num_layers

from tensor_parallel.hf.plans import REPLICATE_VOCABULARY_BELOW, vocabulary_share

ARCHITECTURES = sorted(CONFIGS)
GENERATORS = sorted(set(CONFIGS) - ENCODERS)


def _inputs(name, ids):
    return {"decoder_input_ids": ids[:, :4]} if name in SEQ2SEQ else {}


def _sublayers(model) -> int:
    """Blocks that end in a row split: 2 per decoder layer, 3 per T5 decoder layer."""
    layers = num_layers(model)
    if model.config.is_encoder_decoder:
        return 2 * layers + 3 * model.config.num_decoder_layers
    return 2 * layers


def _split(model, n):
    # a rank left waiting (a collective the others never reach) fails in 2 minutes, not 10
    return tp.tensor_parallel(copy.deepcopy(model), ["cpu"] * n, timeout=120)


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
        expected = model(ids, **_inputs(name, ids)).logits
        with tp.count_collectives() as stats:
            actual = split(ids, **_inputs(name, ids)).logits
    assert_close(actual, expected, f"{name} logits")
    # the Megatron floor: one all-reduce of one activation per attention and per MLP block,
    # plus at most one collective for the embedding (one per stack for T5) and one for logits
    sublayers = _sublayers(model)
    reduces = [shape for kind, shape, _ in stats.log if kind == "all_reduce" and shape[-1] == model.config.hidden_size]
    assert len(reduces) >= sublayers, stats
    assert stats.total_calls <= sublayers + (3 if name in SEQ2SEQ else 2), stats


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("name", GENERATORS)
def test_greedy_generation_is_token_identical(name, n):
    model = build(name)
    split = _split(model, n)
    ids = _ids(batch=1, length=5)
    for use_cache in (True, False):
        expected = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=use_cache)
        actual = split.generate(ids, max_new_tokens=8, do_sample=False, use_cache=use_cache)
        assert torch.equal(actual, expected), (name, use_cache)


@pytest.mark.parametrize("name", ["llama", "qwen3", "gpt2", "bloom", "t5"])
def test_beam_search_reorders_the_cache(name):
    model = build(name)
    split = _split(model, 3)
    ids = _ids(batch=1, length=5)
    seen = []
    shard = split.module_shards[1]
    decoder = shard.get_decoder() if name in SEQ2SEQ else shard
    embedding = decoder.get_input_embeddings() if name not in SEQ2SEQ else decoder.embed_tokens
    handle = embedding.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[-1]))
    actual = split.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False)
    handle.remove()
    expected = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False)
    assert torch.equal(actual, expected)
    # after the prompt, the decoder sees one new token per step: the cache is used, not recomputed
    assert set(seen[1:]) == {1}, seen


def test_sampling_with_a_seed():
    model = build("llama")
    split = _split(model, 2)
    ids = _ids(batch=1, length=4)
    torch.manual_seed(123)
    expected = model.generate(ids, max_new_tokens=8, do_sample=True, top_k=0)
    torch.manual_seed(123)
    actual = split.generate(ids, max_new_tokens=8, do_sample=True, top_k=0)
    assert torch.equal(actual, expected)


# falcon (multi-query: one KV head) and falcon_new at 3 devices replicate KV heads inside the
# fused query_key_value weight: the ranks' overlapping slices must add up their gradients
@pytest.mark.parametrize("name, n", [(name, n) for name in ("llama", "gemma2", "gpt2", "mixtral", "bert", "t5",
                                                            "falcon", "falcon_new", "phi3") for n in (2, 3)])
def test_loss_and_gradients(name, n):
    model = build(name, attn="eager")  # eval mode: dropout would make any two runs differ
    split = _split(model, n)
    reference = model
    ids = _ids()
    labels = ids[:, :4].contiguous() if name in SEQ2SEQ else ids  # T5 derives decoder inputs from labels
    expected = reference(ids, labels=labels)
    actual = split(ids, labels=labels)
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
        name = "cache" if "cache" in first else "past_key_values"  # renamed after transformers 5.17
        second = split(ids[:, 4:], **{name: first[name]}, use_cache=True)
        full = model(ids).logits
    assert_close(second.logits, full[:, 4:], "logits computed from the cache")


def test_plan_is_the_megatron_layout_with_a_large_vocabulary_split():
    model = build("llama")  # the embedding and LM head hold 25% of this tiny model
    assert vocabulary_share(model, "model.embed_tokens") > REPLICATE_VOCABULARY_BELOW
    plan = _split(model, 2).plan
    assert isinstance(plan["model.layers.0.self_attn"], tp.AttentionParallel)
    assert plan["model.layers.1.mlp.down_proj"] == tp.RowwiseParallel()
    assert plan["model.embed_tokens"] == tp.EmbeddingParallel(dim=1)
    assert plan["lm_head"] == tp.ColwiseParallel(gather_output=True)


@pytest.mark.parametrize("name", ["gpt2", "opt", "llama"])
def test_vocabulary_share_is_the_same_before_ties_are_made(name):
    from accelerate import init_empty_weights

    model = build(name)
    with init_empty_weights():  # ties are not made there: the head is a second tensor
        empty = type(model)(copy.deepcopy(model.config))
    assert vocabulary_share(empty) == pytest.approx(vocabulary_share(model), rel=1e-12)  # the same counts
    assert tp.plan_for(model, 2) == tp.plan_for(empty, 2)


def _small_vocabulary(name):
    """4 layers with a wide MLP: the embedding and LM head hold 3% to 7% of the parameters,
    as in a 7B Llama (4%)."""
    import transformers

    configs = {
        "llama": lambda: transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=192, num_hidden_layers=4,
                                                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64),
        "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=4, n_head=6, n_positions=64),
        "t5": lambda: transformers.T5Config(vocab_size=VOCAB, d_model=48, d_kv=8, d_ff=192, num_layers=4,
                                            num_heads=6, decoder_start_token_id=0),
    }
    torch.manual_seed(0)
    auto = transformers.AutoModelForSeq2SeqLM if name in SEQ2SEQ else transformers.AutoModelForCausalLM
    return auto.from_config(configs[name](), attn_implementation="eager").eval()


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5"])
def test_a_small_vocabulary_stays_whole_and_costs_no_collective(name):
    model = _small_vocabulary(name)
    embedding = {"llama": "model.embed_tokens", "gpt2": "transformer.wte", "t5": "shared"}[name]
    assert vocabulary_share(model, embedding) < REPLICATE_VOCABULARY_BELOW
    ids = _ids()
    for n in (2, 3):
        split = _split(model, n)
        assert split.plan[embedding] == tp.Replicate()
        assert split.plan["lm_head"] == tp.Replicate()
        with torch.no_grad(), tp.count_collectives() as stats:
            actual = split(ids, **_inputs(name, ids)).logits
            expected = model(ids, **_inputs(name, ids)).logits
        assert_close(actual, expected, f"{name} over {n}")
        # exactly the Megatron floor: the row-split blocks' all-reduces, nothing else
        assert dict(stats.calls) == {"all_reduce": _sublayers(model)}, stats
    assert torch.equal(split.generate(ids[:1], max_new_tokens=6, do_sample=False),
                       model.generate(ids[:1], max_new_tokens=6, do_sample=False))
    labels = ids[:, :4].contiguous() if name in SEQ2SEQ else ids
    expected, actual = model(ids, labels=labels), split(ids, labels=labels)
    assert_close(actual.loss, expected.loss, "loss")
    expected.loss.backward()
    actual.loss.backward()
    assert_gradients_match(split.wrapped_model, model)


def test_shipped_tp_plans_are_translated_with_ties_and_heads_kept():
    import transformers

    # a type without a built-in plan: its config's base_model_tp_plan is translated
    config = transformers.Olmo2Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    for n in (2, 3, 4):
        split = _split(model, n)
        ids = _ids()
        with torch.no_grad():
            assert_close(split(ids).logits, model(ids).logits, f"olmo2 over {n}")
        shard = split.module_shards[0]
        assert shard.lm_head.weight is shard.model.embed_tokens.weight


def test_static_cache_and_left_padded_batches():
    model = build("llama")
    split = _split(model, 3)
    ids = _ids(batch=1, length=4)
    expected = model.generate(ids, max_new_tokens=5, do_sample=False, cache_implementation="static")
    assert torch.equal(split.generate(ids, max_new_tokens=5, do_sample=False, cache_implementation="static"), expected)
    padded = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    options = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(split.generate(padded, **options), model.generate(padded, **options))


def test_a_type_without_any_plan_uses_the_generic_planner():
    import transformers

    config = transformers.BartConfig(vocab_size=VOCAB, d_model=48, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=6, decoder_attention_heads=6, encoder_ffn_dim=80,
                                     decoder_ffn_dim=80, max_position_embeddings=64)
    assert not getattr(config, "base_model_tp_plan", None)
    torch.manual_seed(0)
    model = transformers.BartForCausalLM(config).eval()
    assert tp.plan_for(model, 2)  # the generic planner splits something
    for n in (2, 3):
        with torch.no_grad():
            assert_close(_split(model, n)(_ids()).logits, model(_ids()).logits, f"bart over {n}")


def test_replicated_kv_heads_on_distinct_devices_get_exact_gradients():
    model = build("llama", attn="eager")
    split = tp.tensor_parallel(copy.deepcopy(model), ["cpu:0", "cpu:1", "cpu:2"])  # 2 KV heads, 3 devices
    ids = _ids()
    expected, actual = model(ids, labels=ids), split(ids, labels=ids)
    assert_close(actual.loss, expected.loss, "loss")
    expected.loss.backward()
    actual.loss.backward()
    assert_gradients_match(split.wrapped_model, model)


@pytest.mark.parametrize("n", [2, 3])
def test_a_models_own_encoder_step_runs_on_every_shard(n):
    """Multimodal encoder-decoders override generate()'s encoder step (Florence2 merges image
    features there, calling super()); it must run on every shard together, each with its own
    encoder, or rank 0's encoder waits alone for the others' collectives."""
    from transformers import GenerationMixin

    hook = next(name for name in ("_maybe_prepare_encoder_kwargs_for_generation",  # transformers >= 5.18
                                  "_prepare_encoder_decoder_kwargs_for_generation") if hasattr(GenerationMixin, name))
    ran = []

    def own_step(self, *args, **kwargs):
        ran.append(self)
        return getattr(super(type(self), self), hook)(*args, **kwargs)

    model = build("t5")
    model.__class__ = type("T5WithOwnEncoderStep", (type(model),), {hook: own_step})
    split = _split(model, n)
    ids = _ids(batch=1, length=5)
    with torch.no_grad():
        actual = split.generate(ids, max_new_tokens=6, do_sample=False)
        assert sorted(map(id, ran)) == sorted(map(id, split.module_shards))  # once per shard, by itself
        expected = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("model_type", ["bart", "marian", "pegasus", "prophetnet", "led", "fsmt", "blenderbot", "mvp"])
def test_encoder_decoders_beyond_t5(model_type, n):
    """Sequence-to-sequence types of transformers, from their default configs shrunk to tiny
    size (the coverage benchmark's shrinking): logits of a forward with decoder inputs and
    greedy generation, which runs every shard's encoder once, equal the unsharded model's."""
    import transformers

    from benchmarks.coverage import make_input_ids, tiny_config

    config = tiny_config(model_type)
    model_class = transformers.AutoModelForSeq2SeqLM._model_mapping[type(config)]
    torch.manual_seed(0)
    model = model_class._from_config(config, attn_implementation="eager").float().eval()
    ids = make_input_ids(config)
    split = _split(model, n)
    with torch.no_grad():
        assert_close(split(input_ids=ids, decoder_input_ids=ids[:, :4]).logits,
                     model(input_ids=ids, decoder_input_ids=ids[:, :4]).logits, "logits")
        expected = model.generate(ids[:1], max_new_tokens=5, do_sample=False)
        assert torch.equal(split.generate(ids[:1], max_new_tokens=5, do_sample=False), expected)
