"""Property-based tests: random shapes, head counts, device counts and valid plans; the split
model always equals the unsharded one. Bounded example counts keep CI short."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import tensor_parallel as tp
from helpers import assert_close, assert_gradients_match

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


class Attention(nn.Module):
    """Grouped-query attention written for any number of local heads (views use -1)."""

    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.head_dim, self.groups = head_dim, heads // kv_heads
        self.q = nn.Linear(dim, heads * head_dim)
        self.k = nn.Linear(dim, kv_heads * head_dim)
        self.v = nn.Linear(dim, kv_heads * head_dim)
        self.o = nn.Linear(heads * head_dim, dim)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        k, v = (z.repeat_interleave(self.groups, dim=1) for z in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


@SETTINGS
@given(sizes=st.lists(st.integers(1, 40), min_size=2, max_size=5), devices=st.integers(1, 5),
       gather=st.lists(st.booleans(), min_size=5, max_size=5), seed=st.integers(0, 2**16))
def test_random_mlp_random_valid_plan(sizes, devices, gather, seed):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers += [nn.Linear(a, b), nn.GELU()]
    module = nn.Sequential(*layers[:-1])
    # a valid plan: each Linear either column-split (gathered, or feeding the next as a row
    # split) or row-split on a replicated input, or left whole
    plan, previous_split = {}, False
    for i in range(0, len(layers) - 1, 2):
        choice = gather[(i // 2) % len(gather)]
        if previous_split:
            plan[str(i)] = tp.RowwiseParallel()
            previous_split = False
        elif choice and i + 2 < len(layers) - 1:
            plan[str(i)] = tp.ColwiseParallel()  # its split output feeds the next Linear (GELU between)
            previous_split = True
        elif choice:
            plan[str(i)] = tp.ColwiseParallel(gather_output=True)
        else:
            plan[str(i)] = tp.RowwiseParallel()
    reference = copy.deepcopy(module)
    model = tp.tensor_parallel(module, ["cpu"] * devices, plan=plan)
    x = torch.randn(3, sizes[0], requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    assert_close(model(x), reference(x_ref), "output")
    model(x).pow(2).sum().backward()
    reference(x_ref).pow(2).sum().backward()
    assert_close(x.grad, x_ref.grad, "input gradient")
    assert_gradients_match(model, reference)


@SETTINGS
@given(kv_heads=st.integers(1, 4), groups=st.integers(1, 3), head_dim=st.sampled_from([2, 4, 8]),
       devices=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_random_attention_heads_and_devices(kv_heads, groups, head_dim, devices, seed):
    torch.manual_seed(seed)
    heads = kv_heads * groups
    module = Attention(16, heads, kv_heads, head_dim)
    style = tp.AttentionParallel(num_heads=heads, head_dim=head_dim, num_kv_heads=kv_heads, q="q", k="k", v="v",
                                 o="o", attributes=(("groups", "groups"),))
    reference = copy.deepcopy(module)
    model = tp.tensor_parallel(module, ["cpu"] * devices, plan={"": style})
    x = torch.randn(2, 5, 16)
    with tp.count_collectives() as stats:
        out = model(x)
    assert_close(out, reference(x), "attention output")
    assert dict(stats.calls) == {"all_reduce": 1}
    out.pow(2).sum().backward()
    reference(x).pow(2).sum().backward()
    assert_gradients_match(model, reference)
