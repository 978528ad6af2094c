"""One-GPU check of the CUDA paths: every rank in a thread on the same GPU.

Prints, for 2 and 3 ranks on ``cuda:0``: the largest logits and gradient differences from the
unsharded model on the same GPU (MLP, llama, gpt2, nanoGPT with the automatic plan), whether
greedy generation gives the same tokens, the collectives of one forward. Speed is the GPU
benchmark's: ``python -m benchmarks.run gpu``. Run from the repository root:
``PYTHONPATH=src python scripts/gpu_check.py [cuda:0]``.
"""

from __future__ import annotations

import copy
import sys

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


if __name__ == "__main__":
    print("torch", torch.__version__, "transformers", transformers.__version__, DEV)
    check_correctness()
