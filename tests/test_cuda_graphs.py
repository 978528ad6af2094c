"""cuda_graphs=True: calls without gradients captured as CUDA graphs and replayed.

The refusals run everywhere; the rest needs a GPU (every rank a thread on cuda:0, each on a
stream of its own, which exercises the same capture, events and collectives as ranks on
several GPUs) and is skipped on CPU-only machines. On the device machine:
``PYTHONPATH=src python -m pytest -q tests/test_cuda_graphs.py``.
"""

from __future__ import annotations

import copy
import functools
import logging

import pytest
import torch
from torch import nn

import tensor_parallel as tp

import hf_models

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEV = "cuda:0"


@pytest.fixture(autouse=True)
def _exact_matmuls():
    """TF32 would make the unsharded and split products round differently."""
    if torch.cuda.is_available():
        saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        yield
        torch.backends.cuda.matmul.allow_tf32 = saved
    else:
        yield


def test_refused_without_cuda_devices():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="cuda_graphs=True needs CUDA devices"):
        tp.tensor_parallel(mlp, ["cpu", "cpu"], cuda_graphs=True)
    with pytest.raises(ValueError, match="needs CUDA devices"):
        tp.tensor_parallel(hf_models.build("llama"), ["cpu", "cpu"], cuda_graphs=True)


def _prefilled(name, n=2):
    """A split model and the ShardedCache of a prefill with a static cache (on the CPU)."""
    model = hf_models.build(name)
    split = tp.tensor_parallel(copy.deepcopy(model), ["cpu"] * n)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        out = split.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation="static",
                             return_dict_in_generate=True)
    return split, out.past_key_values


def test_graph_key_sees_addresses_and_python_state():
    from tensor_parallel.hf import ShardedCache

    split, cache = _prefilled("llama")
    assert isinstance(cache, ShardedCache) and split.wrapped_model._graphs is None
    key = cache.graph_key()
    assert key is not None and key == cache.graph_key()
    layer = cache.caches[1].layers[0]
    layer.keys = layer.keys.clone()  # rank 1's tensor moved: another signature
    assert cache.graph_key() != key
    key = cache.graph_key()
    layer.max_cache_len += 1  # Python state a replay could not update: another signature
    assert cache.graph_key() != key


def test_encoder_decoder_cache_python_state_in_key_and_restored():
    """T5's EncoderDecoderCache marks its cross-attention layers computed (is_updated) in
    Python: the first decoder step of a generate() must not replay a later step's graph, and
    a failed capture must give the eager run the state it found."""
    split, cache = _prefilled("t5")
    inner = cache.caches[0]
    assert inner.is_updated and all(inner.is_updated.values())
    key, restore = cache.graph_key(), cache.snapshot()
    for rank_cache in cache.caches:
        rank_cache.is_updated = {layer: False for layer in rank_cache.is_updated}
    assert cache.graph_key() != key
    restore()
    assert cache.graph_key() == key and all(inner.is_updated.values())
    addresses = [part for part in key[1] if len(part) == 2 and part[0] in ("keys", "values")]
    assert len(addresses) == 2 * 2 * 2 * 2  # 2 ranks x 2 caches (self, cross) x 2 layers x keys/values


def test_same_static_layout():
    from tensor_parallel.hf.model import _same_static_layout
    from transformers import StaticCache

    split, cache = _prefilled("llama")
    config = split.config
    length = cache.caches[0].layers[0].max_cache_len
    assert _same_static_layout(cache.caches[0], StaticCache(config=config, max_cache_len=length), 1)
    assert not _same_static_layout(cache.caches[0], StaticCache(config=config, max_cache_len=length), 2)  # batch
    assert not _same_static_layout(cache.caches[0], StaticCache(config=config, max_cache_len=length + 1), 1)


def test_growing_cache_has_no_graph_key():
    from transformers import DynamicCache

    from tensor_parallel.hf import ShardedCache

    assert ShardedCache([DynamicCache(), DynamicCache()]).graph_key() is None


@needs_cuda
@pytest.mark.parametrize("n", [2, 3])
def test_mlp_replays_equal_eager(n):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 40), nn.GELU(), nn.Linear(40, 16)).to(DEV)
    eager = tp.tensor_parallel(copy.deepcopy(mlp), [DEV] * n)
    graphed = tp.tensor_parallel(copy.deepcopy(mlp), [DEV] * n, cuda_graphs=True)
    xs = [torch.randn(4, 16, device=DEV) for _ in range(4)]
    with torch.no_grad():
        outs = []
        for x in xs:  # eager, capture + replay, replay, replay
            with tp.count_collectives() as stats:
                outs.append(graphed(x))
            assert dict(stats.calls) == {"all_reduce": 1}  # replays count their collectives too
        for x, out in zip(xs, outs):  # earlier outputs are not overwritten by later replays
            assert torch.equal(out, eager(x))  # same kernels, same summation order: bit-identical
            # float32 products of 16 and 40 terms, summed in another order than the unsharded model
            torch.testing.assert_close(out, mlp(x), atol=1e-6, rtol=1e-5)
    assert graphed._graphs.replays == 3


def _graphed_mlp(width: int = 16, hidden: int = 40):
    """A seeded MLP on the GPU and its 2-rank split with cuda_graphs=True."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)).to(DEV)
    return mlp, tp.tensor_parallel(copy.deepcopy(mlp), [DEV, DEV], cuda_graphs=True)


@needs_cuda
def test_gradients_run_eagerly():
    _, graphed = _graphed_mlp(8, 16)
    x = torch.randn(2, 8, device=DEV)
    for _ in range(3):
        graphed(x).sum().backward()
    assert graphed._graphs.replays == 0
    assert all(p.grad is not None for p in graphed.parameters())


class _ReadsValue(nn.Module):
    """A forward that reads a value on the host: not capturable."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        h = self.up(x)
        if h.sum().item() > 1e9:  # a host read: illegal while capturing
            h = h * 0
        return self.down(torch.relu(h))


@needs_cuda
def test_uncapturable_call_falls_back_to_eager(caplog):
    torch.manual_seed(0)
    module = _ReadsValue().to(DEV)
    plan = {"up": tp.ColwiseParallel(), "down": tp.RowwiseParallel()}
    graphed = tp.tensor_parallel(copy.deepcopy(module), [DEV, DEV], plan=plan, cuda_graphs=True)
    x = torch.randn(3, 8, device=DEV)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="tensor_parallel.graphs"):
        outs = [graphed(x) for _ in range(4)]
    assert "cannot be captured" in caplog.text
    assert graphed._graphs.replays == 0
    torch.randn(4, device=DEV)  # the failed capture left the random generator usable
    for out in outs:
        # float32 products of 8 and 16 terms, summed in another order than the unsharded model
        torch.testing.assert_close(out, module(x), atol=1e-6, rtol=1e-5)


@needs_cuda
@pytest.mark.parametrize("name", ["llama", "gpt2", "qwen3", "t5"])
@pytest.mark.parametrize("n", [2, 3])
def test_generate_replays_decode_steps(name, n):
    model = hf_models.build(name).to(DEV)
    eager = tp.tensor_parallel(copy.deepcopy(model), [DEV] * n)
    graphed = tp.tensor_parallel(copy.deepcopy(model), [DEV] * n, cuda_graphs=True)
    generator = torch.Generator(DEV).manual_seed(0)
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, return_dict_in_generate=True,
                  output_logits=True)
    with torch.no_grad():
        for attempt in range(2):  # a new prompt of the same shape: the second call replays the first's graphs
            ids = torch.randint(3, hf_models.VOCAB, (2, 5), device=DEV, generator=generator)
            mask = torch.ones_like(ids)
            want = model.generate(ids, attention_mask=mask, cache_implementation="static", disable_compile=True,
                                  **kwargs)
            reference = eager.generate(ids, attention_mask=mask, cache_implementation="static", **kwargs)
            before = graphed.wrapped_model._graphs.replays
            got = graphed.generate(ids, attention_mask=mask, **kwargs)  # static cache by default
            assert torch.equal(got.sequences, want.sequences)
            for step, (mine, theirs) in enumerate(zip(got.logits, reference.logits)):
                # the replay runs the eager split model's kernels in the same order; 1e-6 leaves
                # room for a library picking another kernel on another stream
                torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-6, msg=f"step {step}")
            replayed = graphed.wrapped_model._graphs.replays - before
            if name == "t5":  # the first decoder step computes cross-attention (another signature)
                assert replayed >= (4 if attempt == 0 else 6), replayed
            else:
                # first call: prefill (its static cache not allocated yet) and first decode step eager,
                # then 6 decode steps captured/replayed; second call: prefill seen once (eager), the
                # 7 decode steps replay the graphs of the first call (the ranks' caches are reused)
                assert replayed == (6 if attempt == 0 else 7), replayed


@needs_cuda
def test_outputs_holding_new_objects_are_not_replayed(caplog):
    """A forward that builds a KV cache itself (use_cache=True, none given) returns it: replays
    would hand every caller the same object, so such calls stay eager."""
    model = hf_models.build("llama").to(DEV)
    graphed = tp.tensor_parallel(copy.deepcopy(model), [DEV, DEV], cuda_graphs=True)
    ids = torch.randint(3, hf_models.VOCAB, (1, 6), device=DEV)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="tensor_parallel.graphs"):
        outs = [graphed(ids) for _ in range(3)]
        assert graphed.wrapped_model._graphs.replays == 0 and "made by the forward" in caplog.text
        assert outs[0].past_key_values is not outs[1].past_key_values
        for out in outs:
            # float32 logits of a 2-layer model, summed in another order than the unsharded one
            torch.testing.assert_close(out.logits, model(ids).logits, atol=1e-5, rtol=1e-5)
        plain = [graphed(ids, use_cache=False).logits for _ in range(3)]  # nothing made: replayed
        assert graphed.wrapped_model._graphs.replays == 2
        for logits in plain:
            torch.testing.assert_close(logits, model(ids).logits, atol=1e-5, rtol=1e-5)


@needs_cuda
def test_moved_weights_and_resets_capture_again():
    mlp, graphed = _graphed_mlp()
    x = torch.randn(4, 16, device=DEV)
    # float32 products of 16 and 40 terms summed in another order than the unsharded model
    close = functools.partial(torch.testing.assert_close, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        for _ in range(3):
            graphed(x)
        assert graphed._graphs.replays == 2
        for p in graphed.parameters():
            p.data = p.data.clone()  # same shapes, new addresses: the old graphs would read freed memory
        close(graphed(x), mlp(x))  # noticed: eager
        assert graphed._graphs.replays == 2
        close(graphed(x), mlp(x))  # captured again, replayed
        assert graphed._graphs.replays == 3
        graphed.double()
        mlp.double()
        for _ in range(2):  # another signature: eager, then captured and replayed
            torch.testing.assert_close(graphed(x.double()), mlp(x.double()), atol=1e-12, rtol=1e-12)
        assert graphed._graphs.replays == 4
        for module in (graphed, mlp):
            for p in module.parameters():
                p.mul_(2)  # in place: same addresses, so the replays read the new values
        torch.testing.assert_close(graphed(x.double()), mlp(x.double()), atol=1e-12, rtol=1e-12)
        assert graphed._graphs.replays == 5
        graphed.reset_cuda_graphs()
        graphed(x.double())
        assert graphed._graphs.replays == 5  # forgotten: this call runs eagerly again


def test_refusals_come_before_building(monkeypatch):
    """Bad combinations are refused before any shard is built (no half-built model)."""
    import tensor_parallel.runtime as runtime

    def fail(*args, **kwargs):
        raise AssertionError("shards were built")

    monkeypatch.setattr(runtime, "build_shards", fail)
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="needs CUDA devices"):
        tp.tensor_parallel(mlp, ["cpu", "cpu"], cuda_graphs=True)
    with pytest.raises(ValueError, match="use one or the other"):
        tp.tensor_parallel(mlp, ["cpu", "cpu"], cuda_graphs=True, sharded=True)
