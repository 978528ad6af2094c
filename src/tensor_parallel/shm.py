"""Shared-memory collectives for CPU ranks of one host (torch.distributed, gloo).

gloo moves every CPU all-reduce through sockets: about a millisecond even for the 4 KB
activation of a decode step, 18 times per token. Ranks on one host can instead meet in one
shared-memory file: each rank copies its tensor into its slot, raises its sequence flag, waits
until every flag has reached the same sequence, and sums (or concatenates) all slots in rank
order, so every rank computes bit-identical results. Two slot sets alternate between
consecutive collectives; a rank writes a slot set only after every rank has arrived at the
previous collective, which means it has finished reading the one before, the last user of
that slot set. No lock, no second barrier.

Used by :class:`~tensor_parallel.comm.DistributedCommunicator` for CPU tensors of a gloo group
whose ranks share a host (found once, with one ``all_gather_object``); larger tensors than a
slot, other devices and other backends go through torch.distributed. ``TENSOR_PARALLEL_SHM=0``
turns it off. A rank that waits checks the others are alive (their process ids are in the
file) and gives up with :class:`~tensor_parallel.comm.CollectiveError` when one has died or
after ``TENSOR_PARALLEL_SHM_TIMEOUT`` seconds (default 600). The file is unlinked as soon as
every rank has mapped it, so nothing is left in ``/dev/shm``, even after a crash.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
import weakref
from typing import Sequence

import torch
import torch.distributed as dist

__all__ = ["SharedMemoryGroup", "shared_memory_group"]

#: bytes of one rank's slot; tensors larger than this go through torch.distributed
SLOT_BYTES = 16 * 2**20
_HEADER = 64  # flags (int64 per rank) and process ids (int64 per rank) come first, in 64-byte units
_groups: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # process group -> transport or None


def shared_memory_group(group) -> "SharedMemoryGroup | None":
    """The shared-memory transport of ``group`` (made at its first CPU collective, on every rank
    at once), or ``None`` where it cannot serve: not gloo, ranks on several hosts, switched off.

    Example::

        >>> from tensor_parallel.shm import shared_memory_group
        >>> import torch.distributed as dist
        >>> dist.is_initialized() or shared_memory_group is not None  # needs a gloo group to do more
        True
    """
    if group in _groups:
        return _groups[group]
    transport = None
    if os.environ.get("TENSOR_PARALLEL_SHM", "1") != "0" and dist.get_backend(group) == "gloo" \
            and dist.get_world_size(group) > 1 and _one_host(group):
        transport = SharedMemoryGroup(group)
    _groups[group] = transport
    return transport


def _one_host(group) -> bool:
    hosts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    return len(set(hosts)) == 1 and os.path.isdir("/dev/shm")


class SharedMemoryGroup:
    """The ranks of one gloo group on one host, meeting in a shared-memory file (see the module)."""

    def __init__(self, group, slot_bytes: int = SLOT_BYTES) -> None:
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.slot_bytes = slot_bytes
        self.timeout = float(os.environ.get("TENSOR_PARALLEL_SHM_TIMEOUT", "600"))
        header = _HEADER * (1 + (16 * self.world_size) // _HEADER)
        size = header + 2 * self.world_size * slot_bytes
        names = [f"/dev/shm/tensor_parallel-{uuid.uuid4().hex}" if self.rank == 0 else None]
        dist.broadcast_object_list(names, src=dist.get_global_rank(group, 0), group=group)
        self.storage = torch.from_file(names[0], shared=True, size=size, dtype=torch.uint8)
        self.flags = self.storage[: 8 * self.world_size].view(torch.int64).numpy()
        self.pids = self.storage[8 * self.world_size: 16 * self.world_size].view(torch.int64).numpy()
        self.pids[self.rank] = os.getpid()
        self.data = self.storage[header:]
        dist.barrier(group=group)  # every rank has mapped the file and written its process id
        if self.rank == 0:
            os.unlink(names[0])
        self.sequence = 0

    def fits(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` can go through shared memory (a CPU tensor no larger than a slot)."""
        return tensor.device.type == "cpu" and tensor.numel() * tensor.element_size() <= self.slot_bytes

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place, in rank order."""
        slots = self._exchange(tensor)
        torch.add(slots[0], slots[1], out=tensor)
        for slot in slots[2:]:
            tensor.add_(slot)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (all of one shape), as new tensors, in rank order."""
        return [slot.clone() for slot in self._exchange(tensor)]

    def _exchange(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        self.sequence += 1
        half = self.sequence % 2
        self._wait(self.sequence - 1)  # everyone is done with the collective that last used this half
        self._slot(half, self.rank, tensor).copy_(tensor)
        self.flags[self.rank] = self.sequence
        self._wait(self.sequence)
        return [self._slot(half, rank, tensor) for rank in range(self.world_size)]

    def _slot(self, half: int, rank: int, like: torch.Tensor) -> torch.Tensor:
        start = (half * self.world_size + rank) * self.slot_bytes
        nbytes = like.numel() * like.element_size()
        return self.data[start: start + nbytes].view(like.dtype).view(like.shape)

    def _wait(self, sequence: int) -> None:
        if self.flags.min() >= sequence:
            return
        from .comm import CollectiveError

        started, spins = time.monotonic(), 0
        while self.flags.min() < sequence:
            spins += 1
            if spins > 64:
                os.sched_yield()  # a waiting rank gives its core to a rank still working
            if spins % 4096 == 0:
                late = [r for r in range(self.world_size) if self.flags[r] < sequence]
                dead = [r for r in late if not _alive(int(self.pids[r]))]
                if dead:
                    raise CollectiveError(f"rank {self.rank} waited in a shared-memory collective for rank(s) "
                                          f"{dead}, whose process has ended")
                if time.monotonic() - started > self.timeout:
                    raise CollectiveError(f"rank {self.rank} waited {self.timeout:.0f} s in a shared-memory "
                                          f"collective for rank(s) {late}; raise TENSOR_PARALLEL_SHM_TIMEOUT if a "
                                          f"shard legitimately runs that long")


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, ended but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def all_gather_pieces(transport: SharedMemoryGroup | None, pieces: Sequence[torch.Tensor], tensor: torch.Tensor,
                      group) -> None:
    """``dist.all_gather(pieces, tensor, group)``, through shared memory when it fits."""
    if transport is not None and transport.fits(tensor):
        for piece, gathered in zip(pieces, transport.all_gather(tensor)):
            piece.copy_(gathered)
        return
    dist.all_gather(list(pieces), tensor, group=group)


def all_reduce_(transport: SharedMemoryGroup | None, tensor: torch.Tensor, group) -> torch.Tensor:
    """``dist.all_reduce(tensor, group)`` (a sum, in place), through shared memory when it fits."""
    if transport is not None and transport.fits(tensor):
        return transport.all_reduce_(tensor)
    dist.all_reduce(tensor, group=group)
    return tensor
