"""One-GPU check of the CUDA paths: every rank in a thread on the same GPU.

Prints, for 2 and 3 ranks on ``cuda:0``: the largest logits and gradient differences from the
unsharded model on the same GPU (MLP, llama, gpt2, nanoGPT with the automatic plan), whether
greedy generation gives the same tokens, the collectives of one forward; then the time of a
forward (128 tokens) and of greedy decode (32 tokens) of a 170M llama in float32 and bf16,
unsharded and split over 2 ranks on the one GPU (what one interpreter launching every
rank's kernels costs). Run from the repository root: ``PYTHONPATH=src python scripts/gpu_check.py``.
"""

from __future__ import annotations

import copy
import sys
import time

import torch
import transformers

sys.path.insert(0, "tests")
import hf_models  # noqa: E402
from nanogpt import GPT  # noqa: E402

import tensor_parallel as tp  # noqa: E402

DEV = sys.argv[1] if len(sys.argv) > 1 else "cuda:0"  # "cpu": a dry run of the checks
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def worst_grad(split, reference) -> float:
    want = {k: p.grad for k, p in reference.named_parameters(remove_duplicate=False) if p.grad is not None}
    worst = 0.0
    for rank, shard in zip(split.shard_ranks, split.module_shards):
        for key, p in shard.named_parameters(remove_duplicate=False):
            if p.grad is None or key not in want or p.numel() == 0:
                continue
            spec = split.layout[key]
            w = want[key] if spec is None else spec.take(want[key], rank)
            worst = max(worst, (p.grad - w.to(p.grad.device)).abs().max().item())
    return worst


def check_correctness() -> None:
    ids = torch.randint(3, hf_models.VOCAB, (2, 9), device=DEV, generator=torch.Generator(torch.device(DEV)).manual_seed(0))
    for n in (2, 3):
        torch.manual_seed(0)
        mlp = torch.nn.Sequential(torch.nn.Linear(16, 40), torch.nn.GELU(), torch.nn.Linear(40, 16)).to(DEV)
        x = torch.randn(4, 16, device=DEV)
        split = tp.tensor_parallel(copy.deepcopy(mlp), [DEV] * n)
        with tp.count_collectives() as stats:
            out = split(x)
        out.square().sum().backward()
        mlp(x).square().sum().backward()
        print(f"mlp x{n}: out diff {(out - mlp(x)).abs().max().item():.1e} grad diff "
              f"{worst_grad(split, mlp):.1e} collectives {dict(stats.calls)}")
        for name in ("llama", "gpt2", "qwen3"):
            ref = hf_models.build(name).to(DEV)
            split = tp.tensor_parallel(copy.deepcopy(ref), [DEV] * n)
            with tp.count_collectives() as stats:
                out = split(ids, labels=ids)
            out.loss.backward()
            exp = ref(ids, labels=ids)
            exp.loss.backward()
            with torch.no_grad():
                same = torch.equal(split.generate(ids[:1, :4], max_new_tokens=8, do_sample=False),
                                   ref.generate(ids[:1, :4], max_new_tokens=8, do_sample=False))
            print(f"{name} x{n}: logits diff {(out.logits - exp.logits).abs().max().item():.1e} grad diff "
                  f"{worst_grad(split.wrapped_model, ref):.1e} greedy same {same} collectives {dict(stats.calls)}")
        torch.manual_seed(0)
        gpt = GPT(flash=True).to(DEV)
        tok = torch.randint(0, 64, (2, 10), device=DEV)
        split = tp.tensor_parallel(copy.deepcopy(gpt), [DEV] * n)
        with tp.count_collectives() as stats:
            out = split(tok)
        print(f"nanoGPT auto x{n}: out diff {(out - gpt(tok)).abs().max().item():.1e} "
              f"attention split {isinstance(split.plan['h.0.attn'], tp.AttentionParallel)} collectives {dict(stats.calls)}")


def timed(fn, repeats: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def check_speed() -> None:
    """Rows: the unsharded model (its default growing cache, then a static cache), 2 ranks on
    the one GPU eagerly, the same with cuda_graphs=True, and 1 rank with cuda_graphs=True (the
    unsharded model's kernels, replayed: what graphs alone give)."""
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                                      num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 32000, (1, 128), device=DEV)
    for dtype in (torch.float32, torch.bfloat16):
        model = copy.deepcopy(base).to(DEV, dtype)
        rows = [("unsharded", model, None),
                ("unsharded, static cache (generate compiles it)", model, "static"),
                ("2 ranks, one process", tp.tensor_parallel(copy.deepcopy(model), [DEV, DEV]), None),
                ("2 ranks, one process, cuda_graphs", tp.tensor_parallel(copy.deepcopy(model), [DEV, DEV],
                                                                         cuda_graphs=True), None),
                ("1 rank, cuda_graphs", tp.tensor_parallel(copy.deepcopy(model), [DEV], cuda_graphs=True), None)]
        tokens = {}
        for label, m, cache in rows:
            options = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False)
            if cache is not None:  # else the model's own choice (static with cuda_graphs=True)
                options["cache_implementation"] = cache
            with torch.no_grad():
                forward = timed(lambda: m(ids, use_cache=False))  # a cache made by the forward is never replayed
                decode = timed(lambda: m.generate(ids[:, :8], **options), 3)
                tokens[label] = m.generate(ids[:, :8], **options)
            graphs = getattr(getattr(m, "wrapped_model", None), "_graphs", None)
            replays = f", {graphs.replays} replays" if graphs is not None else ""
            same = torch.equal(tokens[label], tokens["unsharded"])
            print(f"speed {str(dtype)[6:]} {label}: forward 128 tok {forward * 1e3:.1f} ms, "
                  f"decode 32 tok {decode * 1e3:.0f} ms ({decode / 32 * 1e3:.2f} ms/token){replays}, "
                  f"tokens = unsharded's: {same}")
        del rows, model


if __name__ == "__main__":
    print("torch", torch.__version__, "transformers", transformers.__version__, DEV)
    parts = sys.argv[2:] or ["correctness", "speed"]
    if "correctness" in parts:
        check_correctness()
    if DEV.startswith("cuda") and "speed" in parts:
        check_speed()
