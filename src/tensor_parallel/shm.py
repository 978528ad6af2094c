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
import platform
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
    if dist.get_backend(group) == "gloo" and dist.get_world_size(group) > 1 and _all_agree(group, _wanted()):
        transport = SharedMemoryGroup.create(group)
    _groups[group] = transport
    return transport


def _wanted() -> tuple:
    """What this rank says about shared memory: on or off, and its host (ranks must agree)."""
    on = os.environ.get("TENSOR_PARALLEL_SHM", "1") != "0" and os.path.isdir("/dev/shm") \
        and platform.machine().lower() in ("x86_64", "amd64")  # the protocol relies on x86's store order
    return on, socket.gethostname()


def _all_agree(group, value) -> bool:
    """Whether every rank of ``group`` passes the same, true-ish ``value`` (one collective)."""
    values: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(values, value, group=group)
    return all(v == values[0] for v in values) and bool(values[0] if not isinstance(values[0], tuple) else values[0][0])


class SharedMemoryGroup:
    """The ranks of one gloo group on one host, meeting in a shared-memory file (see the module)."""

    def __init__(self, rank: int, world_size: int, storage: torch.Tensor, header: int, slot_bytes: int) -> None:
        self.rank, self.world_size, self.slot_bytes = rank, world_size, slot_bytes
        self.timeout = float(os.environ.get("TENSOR_PARALLEL_SHM_TIMEOUT", "600"))
        self.storage = storage
        self.flags = storage[: 8 * world_size].view(torch.int64).numpy()
        self.pids = storage[8 * world_size: 16 * world_size].view(torch.int64).numpy()
        self.data = storage[header:]
        self.sequence = 0
        self.broken: BaseException | None = None

    @classmethod
    def create(cls, group, slot_bytes: int = SLOT_BYTES) -> "SharedMemoryGroup | None":
        """Every rank of ``group`` maps one new file, or (all agreeing) none does: ``None`` when
        /dev/shm has no room for it (tmpfs would kill the process at the first page it cannot
        back) or the ranks do not see the same file and processes (containers)."""
        rank, world_size = dist.get_rank(group), dist.get_world_size(group)
        header = _HEADER * (1 + (16 * world_size) // _HEADER)
        size = header + 2 * world_size * slot_bytes
        names = [_reserve(size) if rank == 0 else None]
        dist.broadcast_object_list(names, src=dist.get_global_rank(group, 0), group=group)
        if names[0] is None:
            return None
        storage = None
        try:
            if os.path.exists(names[0]):
                storage = torch.from_file(names[0], shared=True, size=size, dtype=torch.uint8)
                storage[8 * world_size + 8 * rank: 8 * world_size + 8 * rank + 8].view(torch.int64).fill_(os.getpid())
            identity = (os.stat(names[0]).st_dev, os.stat(names[0]).st_ino) if storage is not None else None
        except OSError:
            identity = None
        same = _all_agree(group, (identity is not None, identity))
        if same:  # every rank maps the same file: do they all see each other's processes?
            pids = storage[8 * world_size: 16 * world_size].view(torch.int64).numpy()
            same = _all_agree(group, (all(_alive(int(pid)) for pid in pids), True))
        dist.barrier(group=group)  # nobody opens the file by name any more
        if rank == 0:
            os.unlink(names[0])
        return cls(rank, world_size, storage, header, slot_bytes) if same else None

    def fits(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` can go through shared memory (a CPU tensor no larger than a slot)."""
        return tensor.device.type == "cpu" and tensor.layout == torch.strided \
            and tensor.numel() * tensor.element_size() <= self.slot_bytes

    @torch.no_grad()
    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place, in rank order."""
        slots = self._exchange(tensor)
        torch.add(slots[0], slots[1], out=tensor)
        for slot in slots[2:]:
            tensor.add_(slot)
        return tensor

    @torch.no_grad()
    def all_gather_into(self, pieces: Sequence[torch.Tensor], tensor: torch.Tensor) -> None:
        """Every rank's ``tensor`` (all of one shape) copied into ``pieces``, in rank order."""
        for piece, slot in zip(pieces, self._exchange(tensor)):
            piece.copy_(slot)

    def _exchange(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        if self.broken is not None:
            from .comm import CollectiveError  # comm imports this module

            raise CollectiveError("an earlier shared-memory collective of this group failed; the ranks "
                                  "are out of step") from self.broken
        try:
            sequence = self.sequence + 1
            half = sequence % 2
            self._wait(sequence - 1)  # everyone is done with the collective that last used this half
            self._slot(half, self.rank, tensor).copy_(tensor)
            self.flags[self.rank] = sequence
            self.sequence = sequence
            self._wait(sequence)
        except BaseException as error:  # KeyboardInterrupt too: the ranks cannot meet again
            self.broken = error
            raise
        return [self._slot(half, rank, tensor) for rank in range(self.world_size)]

    def _slot(self, half: int, rank: int, like: torch.Tensor) -> torch.Tensor:
        start = (half * self.world_size + rank) * self.slot_bytes
        nbytes = like.numel() * like.element_size()
        return self.data[start: start + nbytes].view(like.dtype).view(like.shape)

    def _wait(self, sequence: int) -> None:
        if self.flags.min() >= sequence:
            return
        from .comm import CollectiveError

        started, spins, pause = time.monotonic(), 0, 0.0
        while self.flags.min() < sequence:
            spins += 1
            if spins > 64:
                if time.monotonic() - started < 1e-3:
                    os.sched_yield()  # the first millisecond: answer within microseconds
                else:  # then sleep, up to 0.2 ms at a time: a waiting rank does not burn a core
                    pause = min(2e-4, max(2e-5, 2 * pause))
                    time.sleep(pause)
            if spins % 1024 == 0:
                late = [r for r in range(self.world_size) if self.flags[r] < sequence]
                dead = [r for r in late if not _alive(int(self.pids[r]))]
                if dead:
                    raise CollectiveError(f"rank {self.rank} waited in a shared-memory collective for rank(s) "
                                          f"{dead}, whose process has ended")
                if time.monotonic() - started > self.timeout:
                    raise CollectiveError(f"rank {self.rank} waited {self.timeout:.0f} s in a shared-memory "
                                          f"collective for rank(s) {late}; raise TENSOR_PARALLEL_SHM_TIMEOUT if a "
                                          f"shard legitimately runs that long")


def _reserve(size: int) -> str | None:
    """A new file of ``size`` bytes in /dev/shm, its blocks allocated now (None: no room)."""
    name = f"/dev/shm/tensor_parallel-{uuid.uuid4().hex}"
    try:
        fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    except OSError:
        return None
    try:
        os.posix_fallocate(fd, 0, size)
        return name
    except OSError:
        os.unlink(name)
        return None
    finally:
        os.close(fd)


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
        transport.all_gather_into(pieces, tensor)
        return
    dist.all_gather(list(pieces), tensor, group=group)


def all_reduce_(transport: SharedMemoryGroup | None, tensor: torch.Tensor, group) -> torch.Tensor:
    """``dist.all_reduce(tensor, group)`` (a sum, in place), through shared memory when it fits."""
    if transport is not None and transport.fits(tensor):
        return transport.all_reduce_(tensor)
    dist.all_reduce(tensor, group=group)
    return tensor
