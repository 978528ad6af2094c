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
        assert all(torch.equal(a, b) for a, b in zip(pieces, transport.all_gather(x)))
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
