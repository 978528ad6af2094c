"""Functions run on gloo ranks by tests/test_shm.py (module level: forked processes import them)."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from tensor_parallel.comm import CollectiveError
from tensor_parallel.shm import SLOT_BYTES, shared_memory_group


def collectives_match_gloo(rank: int, world_size: int):
    transport = shared_memory_group(dist.group.WORLD)
    assert transport is not None
    generator = torch.Generator().manual_seed(rank)
    worst = 0.0
    for step in range(60):  # many in a row: the two slot sets alternate
        dtype = torch.bfloat16 if step % 5 == 4 else torch.float32
        shape = (1 + step % 3, 7 + step)
        x = torch.randn(shape, generator=generator).to(dtype)
        want = x.clone()
        dist.all_reduce(want)
        got = transport.all_reduce_(x.clone())
        # gloo sums 2 ranks exactly as we do; with more ranks its order may differ by float rounding
        worst = max(worst, (got.float() - want.float()).abs().max().item())
        pieces = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(pieces, x)
        mine = [torch.empty_like(x) for _ in range(world_size)]
        transport.all_gather_into(mine, x)
        assert all(torch.equal(a, b) for a, b in zip(pieces, mine))
    # after a collective every rank knows rank 0 has passed the point where it unlinks the file
    leftovers = [name for name in os.listdir("/dev/shm") if name.startswith("tensor_parallel-")]
    big = torch.ones(SLOT_BYTES // 4 + 1)
    assert not transport.fits(big)
    return {"leftovers": leftovers, "worst": worst, "sequence": transport.sequence}


def switched_off(rank: int, world_size: int):
    return shared_memory_group(dist.group.WORLD)


def peer_dies(rank: int, world_size: int):
    transport = shared_memory_group(dist.group.WORLD)
    transport.all_reduce_(torch.ones(4))
    if rank == 1:
        os._exit(0)  # gone without a word
    start = time.monotonic()
    try:
        transport.all_reduce_(torch.ones(4))
    except CollectiveError as error:
        return f"{error} after {time.monotonic() - start:.1f} s"
    raise AssertionError("the collective finished without rank 1")


def _inputs(rank: int, step: int) -> torch.Tensor:
    """Rank ``rank``'s input at ``step``: every rank can make every rank's."""
    generator = torch.Generator().manual_seed(1000 * step + rank)
    shape = (1 + step % 4, 3 + (step * 7) % 11)
    x = torch.randn(shape, generator=generator)
    return x.to(torch.bfloat16) if step % 6 == 5 else x


def back_to_back(rank: int, world_size: int, members=None):
    """Hundreds of shared-memory collectives with nothing else in between (ranks run ahead of
    each other by up to one collective, randomly delayed), compared exactly with the sums in
    rank order and the concatenations, computed here from every rank's regenerated inputs."""
    group = dist.group.WORLD
    if members is not None:  # sub-groups: every rank creates every group, in the same order
        groups = [dist.new_group(m) for m in members]
        group = next(g for g, m in zip(groups, members) if rank in m)
        ranks = next(m for m in members if rank in m)
    else:
        ranks = list(range(world_size))
    transport = shared_memory_group(group)
    assert transport is not None
    me = ranks.index(rank)
    delay = torch.Generator().manual_seed(rank)
    for step in range(300):
        if torch.rand((), generator=delay) < 0.05:
            time.sleep(0.002)
        everyone = [_inputs(r, step) for r in ranks]
        if step % 3 == 2:
            pieces = [torch.empty_like(everyone[me]) for _ in ranks]
            transport.all_gather_into(pieces, everyone[me])
            assert all(torch.equal(a, b) for a, b in zip(pieces, everyone)), step
        else:
            want = everyone[0] + everyone[1]
            for x in everyone[2:]:
                want += x
            got = transport.all_reduce_(everyone[me].t().contiguous().t() if step % 5 == 0 else everyone[me].clone())
            assert torch.equal(got, want), step
    odd = torch.arange(6, dtype=torch.int64).reshape(2, 3)[:, ::2]  # an int, non-contiguous input
    assert torch.equal(transport.all_reduce_(odd.clone()), odd * len(ranks))
    assert transport.all_reduce_(torch.empty(0)).numel() == 0
    return transport.sequence
