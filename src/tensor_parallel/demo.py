"""The demo: a small GPT built from a config, split over CPU devices, checked against itself."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .comm import count_collectives
from .plan import format_plan
from .runtime import tensor_parallel

__all__ = ["GPTConfig", "GPT", "run_demo"]


@dataclass
class GPTConfig:
    """Size of the demo model."""

    vocab_size: int = 512
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64


class Block(nn.Module):
    """Pre-norm attention + MLP block (nanoGPT layout: fused qkv, two-Linear MLP)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.head_size = config.n_embd // config.n_head
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = nn.Sequential(nn.Linear(config.n_embd, 4 * config.n_embd), nn.GELU(),
                                 nn.Linear(4 * config.n_embd, config.n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, _ = x.shape
        # written for any number of heads: a split shard holds fewer of them
        q, k, v = self.c_attn(self.ln_1(x)).chunk(3, dim=2)
        q, k, v = (t.view(batch, time, -1, self.head_size).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (batch, head, time, size)
        x = x + self.c_proj(y.transpose(1, 2).reshape(batch, time, -1))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A tiny decoder-only language model."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.wte(ids) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def megatron_plan(config: GPTConfig) -> dict:
    """The hand-written plan: whole heads per device, two all-reduces per block."""
    from .styles import ColwiseParallel, EmbeddingParallel, RowwiseParallel

    head = config.n_embd // config.n_head
    return {
        "wte": EmbeddingParallel(dim=1),
        "blocks.*.c_attn": ColwiseParallel(parts=3, unit=head),
        "blocks.*.c_proj": RowwiseParallel(unit=head),
        "blocks.*.mlp.0": ColwiseParallel(),
        "blocks.*.mlp.2": RowwiseParallel(),
        "lm_head": ColwiseParallel(gather_output=True),
    }


def _bytes_per_device(model) -> list[int]:
    sizes = []
    for shard in model.module_shards:
        seen = {id(t): t for t in list(shard.parameters()) + list(shard.buffers())}
        sizes.append(sum(t.numel() * t.element_size() for t in seen.values()))
    return sizes


def _collectives(stats) -> str:
    return ", ".join(f"{kind} x{stats.calls[kind]} ({stats.bytes[kind]} bytes)" for kind in sorted(stats.calls))


def run_demo(n_devices: int = 2, seed: int = 0) -> str:
    """Split a small GPT over ``n_devices`` CPU devices; return a report, raise if it differs.

    Example::

        >>> print(run_demo(2).splitlines()[0])
        GPT(vocab 512, 2 layers, 4 heads, width 64): 0.17M parameters, split over 2 CPU devices
    """
    torch.manual_seed(seed)
    config = GPTConfig()
    reference = GPT(config).eval()
    model = tensor_parallel(copy.deepcopy(reference), ["cpu"] * n_devices, plan=megatron_plan(config))
    automatic = tensor_parallel(copy.deepcopy(reference), ["cpu"] * n_devices)
    ids = torch.randint(0, config.vocab_size, (2, 16))
    with torch.no_grad(), count_collectives() as auto_stats:
        auto_logits = automatic(ids)
    with torch.no_grad(), count_collectives() as stats:
        logits = model(ids)
    with torch.no_grad():
        expected = reference(ids)
    error = max((logits - expected).abs().max().item(), (auto_logits - expected).abs().max().item())
    if not math.isfinite(error) or error > 1e-4:
        raise AssertionError(f"the split model differs from the unsharded one by {error}")
    params = sum(p.numel() for p in reference.parameters())
    lines = [
        f"GPT(vocab {config.vocab_size}, {config.n_layer} layers, {config.n_head} heads, width "
        f"{config.n_embd}): {params / 1e6:.2f}M parameters, split over {n_devices} CPU devices",
        "plan (written by hand, Megatron layout):", *("  " + line for line in format_plan(model.plan).splitlines()),
        f"max |logits - unsharded logits| = {error:.2e}  (equal within float32 rounding)",
        "parameter + buffer bytes per device: " + ", ".join(
            f"rank {r}: {b / 1e6:.2f} MB" for r, b in enumerate(_bytes_per_device(model))),
        f"unsharded: {sum(t.numel() * t.element_size() for t in reference.state_dict().values()) / 1e6:.2f} MB",
        "collectives of one forward: " + _collectives(stats),
        "  with the default plan (no plan given): " + _collectives(auto_stats),
    ]
    return "\n".join(lines)
