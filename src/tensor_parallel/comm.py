"""Communication: the only place where shards exchange tensors.

A split layer never talks to another device directly. It holds a :class:`Communicator`
(one per rank) and calls ``all_reduce``, ``all_gather`` or ``enter_parallel`` on it. Which
object that is decides how the ranks meet:

* :class:`ThreadGroup` (this module): every rank is a thread of one process. Ranks meet at a
  rendezvous; the last rank to arrive runs one autograd node over the tensors of *all* ranks,
  so forward and backward are one ordinary autograd graph and no backward pass ever waits
  for another thread.
* a ``torch.distributed`` communicator (multi-process mode) implements the same interface
  with Megatron's conjugate operators.

Every logical collective is recorded once (not once per rank) in the recorders opened by
:func:`count_collectives`.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from .shm import all_gather_pieces, all_reduce_, shared_memory_group

__all__ = [
    "CollectiveError",
    "CollectiveStats",
    "Communicator",
    "ThreadGroup",
    "DistributedCommunicator",
    "count_collectives",
]


class CollectiveError(RuntimeError):
    """A collective could not complete: another rank failed, or the wait timed out.

    Example::

        >>> import tensor_parallel as tp
        >>> issubclass(tp.CollectiveError, RuntimeError)
        True
    """


# --------------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------------


@dataclass
class CollectiveStats:
    """Collectives recorded inside one :func:`count_collectives` block.

    ``calls[kind]`` is the number of logical collectives of that kind (one per collective,
    not one per rank) and ``bytes[kind]`` the bytes of the full tensor each rank holds after
    it (for ``all_reduce`` and ``all_gather``) or before it (``reduce_scatter``), summed over
    calls. A backward pass inside the block is counted too: the backward of an all-reduce is
    an ``all_reduce``, the backward of an all-gather a ``reduce_scatter``.

    Example::

        >>> import torch, tensor_parallel as tp
        >>> with tp.count_collectives() as stats:
        ...     pass
        >>> stats.total_calls, stats.total_bytes
        (0, 0)
    """

    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    log: list[tuple[str, tuple[int, ...], torch.dtype]] = field(default_factory=list)

    @property
    def total_calls(self) -> int:
        """All collectives of every kind."""
        return sum(self.calls.values())

    @property
    def total_bytes(self) -> int:
        """Bytes of every kind."""
        return sum(self.bytes.values())

    def _record(self, kind: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        numel = 1
        for size in shape:
            numel *= size
        self.calls[kind] += 1
        self.bytes[kind] += numel * _itemsize(dtype)
        self.log.append((kind, shape, dtype))

    def __repr__(self) -> str:
        parts = [f"{k}: {self.calls[k]} calls, {self.bytes[k]} bytes" for k in sorted(self.calls)]
        return "CollectiveStats(" + "; ".join(parts) + ")"


_recorders: list[CollectiveStats] = []
_recorders_lock = threading.Lock()


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


@contextlib.contextmanager
def count_collectives() -> Iterator[CollectiveStats]:
    """Record every collective run inside the block, by kind, with its size.

    Example::

        >>> import torch, tensor_parallel as tp
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
        >>> model = tp.tensor_parallel(mlp, ["cpu", "cpu"])
        >>> with tp.count_collectives() as stats:
        ...     _ = model(torch.randn(4, 8))
        >>> dict(stats.calls), dict(stats.bytes)
        ({'all_reduce': 1}, {'all_reduce': 128})
    """
    stats = CollectiveStats()
    with _recorders_lock:
        _recorders.append(stats)
    try:
        yield stats
    finally:
        with _recorders_lock:
            _recorders.remove(stats)


def record_collective(kind: str, shape: Sequence[int], dtype: torch.dtype) -> None:
    """Add one logical collective to every open :func:`count_collectives` block."""
    if not _recorders:  # none open (the usual case): no lock to take
        return
    with _recorders_lock:
        for stats in _recorders:
            stats._record(kind, tuple(shape), dtype)


# --------------------------------------------------------------------------------------------
# The interface a split layer sees
# --------------------------------------------------------------------------------------------


class Communicator(abc.ABC):
    """One rank's handle on its group. Split layers call only these methods.

    Example::

        >>> import torch
        >>> from tensor_parallel.comm import ThreadGroup
        >>> comm = ThreadGroup(["cpu"]).communicator(0)   # one rank: collectives are identities
        >>> comm.all_gather(torch.ones(2), dim=0, sizes=[2])
        tensor([1., 1.])
    """

    rank: int
    world_size: int

    @abc.abstractmethod
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all ranks; every rank gets the sum."""

    @abc.abstractmethod
    def all_gather(self, tensor: torch.Tensor, dim: int, sizes: Sequence[int]) -> torch.Tensor:
        """Concatenate every rank's ``tensor`` along ``dim`` in rank order; ``sizes`` are the
        ranks' sizes along ``dim`` (they may differ)."""

    @abc.abstractmethod
    def enter_parallel(self, tensor: torch.Tensor) -> torch.Tensor:
        """Mark a replicated tensor that flows into a split layer (Megatron's ``f``)."""


# --------------------------------------------------------------------------------------------
# Autograd nodes over all ranks at once (single-process mode)
# --------------------------------------------------------------------------------------------


def _sum_on(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Sum in rank order on ``device`` (fixed order: every device gets bit-identical sums)."""
    if len(tensors) == 1:
        return tensors[0].to(device, copy=True)
    total = torch.add(tensors[0].to(device), tensors[1].to(device))  # one pass, a new tensor
    for tensor in tensors[2:]:
        total.add_(tensor.to(device))
    return total


def _per_device(devices: Sequence[torch.device], make: Callable[[torch.device], torch.Tensor]):
    """``make(device)`` once per distinct device, then a private copy for each further rank.

    Ranks on the same device must not share storage: a shard may update its input in place.
    """
    first: dict[torch.device, torch.Tensor] = {}
    out = []
    for device in devices:
        if device in first:
            out.append(first[device].clone())
        else:
            first[device] = make(device)
            out.append(first[device])
    return tuple(out)


def _all_reduce(inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return _per_device([x.device for x in inputs], lambda d: _sum_on(inputs, d))


def _all_gather(dim: int, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return _per_device([x.device for x in inputs], lambda d: torch.cat([x.to(d) for x in inputs], dim))


def _differentiable(inputs: Sequence[torch.Tensor]) -> bool:
    """Whether a collective must be an autograd node (else it skips autograd's overhead,
    about 20 us a call: decode runs 2 collectives per layer per token)."""
    return torch.is_grad_enabled() and any(x.requires_grad for x in inputs)


class _AllReduce(torch.autograd.Function):
    """y_i = sum_j x_j for every rank i. Backward: dx_j = sum_i dy_i (again an all-reduce)."""

    @staticmethod
    def forward(ctx, *inputs: torch.Tensor):
        ctx.devices = [x.device for x in inputs]
        return _all_reduce(inputs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        record_collective("all_reduce", grads[0].shape, grads[0].dtype)
        return _per_device(ctx.devices, lambda d: _sum_on(grads, d))


class _AllGather(torch.autograd.Function):
    """y_i = cat_j x_j for every rank i. Backward: dx_j = sum_i dy_i[slice j] (reduce-scatter)."""

    @staticmethod
    def forward(ctx, dim: int, *inputs: torch.Tensor):
        ctx.dim = dim
        ctx.devices = [x.device for x in inputs]
        ctx.sizes = [x.shape[dim] for x in inputs]
        return _all_gather(dim, inputs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        record_collective("reduce_scatter", grads[0].shape, grads[0].dtype)
        offsets = [sum(ctx.sizes[:j]) for j in range(len(ctx.sizes))]
        pieces = []
        for device, offset, size in zip(ctx.devices, offsets, ctx.sizes):
            pieces.append(_sum_on([g.narrow(ctx.dim, offset, size) for g in grads], device))
        return (None, *pieces)


# --------------------------------------------------------------------------------------------
# Thread group: ranks are threads of one process
# --------------------------------------------------------------------------------------------


def check_timeout(timeout: float | None) -> float | None:
    """``timeout`` in seconds for a wait at a collective: a positive number, or None (no limit);
    a ValueError or TypeError otherwise.

    Example::

        >>> from tensor_parallel.comm import check_timeout
        >>> check_timeout(None), check_timeout(30)
        (None, 30.0)
    """
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds or None (no limit), got {type(timeout).__name__}")
    if not timeout > 0:
        raise ValueError(f"timeout must be more than 0 seconds (or None for no limit), got {timeout}")
    return min(float(timeout), threading.TIMEOUT_MAX)


class ThreadGroup:
    """A group of ranks that are threads of this process, one per entry of ``devices``.

    Each collective is a rendezvous: every rank deposits its tensor; the last to arrive runs
    the operation for all of them (one autograd node) and wakes the others. If any rank fails,
    :meth:`abort` releases the ranks that wait, with :class:`CollectiveError`.

    Example::

        >>> import torch
        >>> from tensor_parallel.comm import ThreadGroup
        >>> group = ThreadGroup(["cpu"])
        >>> group.communicator(0).all_reduce(torch.ones(2))
        tensor([1., 1.])
    """

    def __init__(self, devices: Sequence[torch.device | str], *, timeout: float | None = 600.0) -> None:
        self.devices = [torch.device(d) for d in devices]
        self.world_size = len(self.devices)
        self.timeout = check_timeout(timeout)
        self._mutex = threading.Lock()
        # rank r's wake-up call: held while no signal is pending for r; a waiting rank blocks in
        # acquire() (C code, without the GIL), the rank that completes a collective releases it
        self._wake = [threading.Lock() for _ in self.devices]
        for wake in self._wake:
            wake.acquire()
        self._waiting = [False] * self.world_size  # in exchange, waiting or woken (cleared by the rank)
        self._signalled = [False] * self.world_size  # a signal is pending in the rank's lock
        self._slots: list[torch.Tensor | None] = [None] * self.world_size
        self._kinds: list[str | None] = [None] * self.world_size
        self._arrived = 0
        self._generation = 0  # collectives completed: a waiter returns only its own one's results
        self._epoch = 0  # calls started (reset): a rank left over from an earlier call stops
        self._results: Sequence[torch.Tensor] = ()
        self._error: BaseException | None = None
        self.capture = None  # a tensor_parallel.graphs capture in progress: collectives cut the graphs

    def communicator(self, rank: int) -> "ThreadCommunicator":
        """The handle that rank ``rank``'s layers use."""
        return ThreadCommunicator(self, rank)

    def reset(self) -> None:
        """Forget a past failure so the group can run again (called before each forward, when
        no rank runs)."""
        with self._mutex:
            self._epoch += 1
            self._wake_waiting()  # a rank still waiting from an earlier call wakes and stops
            self._error = None
            self._slots = [None] * self.world_size
            self._kinds = [None] * self.world_size
            self._arrived = 0
            self._results = ()  # the last collective's outputs (and graph) need not outlive the call

    def abort(self, error: BaseException) -> None:
        """Release every waiting rank with a :class:`CollectiveError` caused by ``error``."""
        with self._mutex:
            if self._error is None:
                self._error = error
            self._wake_waiting()

    def exchange(self, rank: int, kind: str, tensor: torch.Tensor,
                 run: Callable[[list[torch.Tensor]], Sequence[torch.Tensor]]) -> torch.Tensor:
        """Deposit ``tensor``; when all ranks are in, ``run`` maps all tensors to all results."""
        with self._mutex:
            if self._error is not None:
                self._raise_if_aborted(rank, kind)
            generation, epoch = self._generation, self._epoch
            self._slots[rank], self._kinds[rank] = tensor, kind
            self._arrived += 1
            if self._arrived == self.world_size:
                return self._complete(rank, kind, run)
            self._waiting[rank] = True
        try:
            woken = self._wake[rank].acquire(timeout=-1 if self.timeout is None else self.timeout)
        except BaseException:  # KeyboardInterrupt while waiting: leave no signal pending
            with self._mutex:
                self._stop_waiting(rank, woken=False)
            raise
        with self._mutex:
            self._stop_waiting(rank, woken)
            if self._epoch != epoch:
                raise CollectiveError(f"rank {rank} ({self.devices[rank]}) was still in {kind} of an earlier "
                                      f"call when a new one started; that call had failed")
            if self._generation != generation:  # this collective completed
                return self._results[rank]
            if self._error is None:  # woken by nobody: the others never came
                self._error = CollectiveError(
                    f"rank {rank} ({self.devices[rank]}) waited {self.timeout:.0f} s in {kind} "
                    f"for the other ranks; raise timeout= if a shard legitimately runs that long")
                self._wake_waiting()
            self._raise_if_aborted(rank, kind)
            raise AssertionError("unreachable")  # pragma: no cover

    def _stop_waiting(self, rank: int, woken: bool) -> None:
        """Rank ``rank`` no longer waits (under the mutex): its signal, if one was sent, is
        consumed, by its wait (``woken``) or now (sent after a timeout or an interrupt), so that
        its next wait does not end at once."""
        if self._signalled[rank] and not woken:
            self._wake[rank].acquire(blocking=False)  # fails if an interrupted wait took it: gone either way
        self._signalled[rank] = False
        self._waiting[rank] = False

    def _wake_waiting(self) -> None:
        """Signal every waiting rank that has no signal pending (under the mutex)."""
        for rank, waiting in enumerate(self._waiting):
            if waiting and not self._signalled[rank]:
                try:
                    self._wake[rank].release()
                except RuntimeError:  # released already: by a wake-up that Ctrl-C cut short
                    pass
                self._signalled[rank] = True

    def _complete(self, rank: int, kind: str, run) -> torch.Tensor:
        if self._kinds.count(kind) != self.world_size:
            self._error = CollectiveError(
                f"ranks called different collectives at the same step: {self._kinds}; every "
                f"shard must run the same collectives in the same order")
            self._wake_waiting()
            raise self._error
        inputs = list(self._slots)
        self._slots = [None] * self.world_size
        self._arrived = 0
        try:
            self._results = run(inputs)
        except BaseException as error:
            self._error = error
            self._wake_waiting()
            raise
        self._generation += 1
        self._wake_waiting()
        return self._results[rank]

    def _raise_if_aborted(self, rank: int, kind: str) -> None:
        if self._error is not None:
            if isinstance(self._error, CollectiveError):
                raise self._error
            raise CollectiveError(
                f"rank {rank} ({self.devices[rank]}) stopped in {kind}: another rank failed "
                f"with {type(self._error).__name__}: {self._error}") from self._error


def _run_all_reduce(inputs: list[torch.Tensor]) -> Sequence[torch.Tensor]:
    """The all-reduce of one thread-group collective (run once, by the last rank to arrive)."""
    record_collective("all_reduce", inputs[0].shape, inputs[0].dtype)
    return _AllReduce.apply(*inputs) if _differentiable(inputs) else _all_reduce(inputs)


def _run_all_gather(dim: int, inputs: list[torch.Tensor]) -> Sequence[torch.Tensor]:
    """The all-gather along ``dim`` of one thread-group collective."""
    shape = list(inputs[0].shape)
    shape[dim] = sum(x.shape[dim] for x in inputs)
    record_collective("all_gather", shape, inputs[0].dtype)
    return _AllGather.apply(dim, *inputs) if _differentiable(inputs) else _all_gather(dim, inputs)


class ThreadCommunicator(Communicator):
    """Rank ``rank`` of a :class:`ThreadGroup`."""

    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group = group
        self.rank = rank
        self.world_size = group.world_size

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.group.capture is not None:
            return self.group.capture.collective(self.rank, "all_reduce", tensor, None)
        return self.group.exchange(self.rank, "all_reduce", tensor, _run_all_reduce)

    def all_gather(self, tensor: torch.Tensor, dim: int, sizes: Sequence[int] = ()) -> torch.Tensor:
        dim = dim % tensor.dim()
        if self.group.capture is not None:
            return self.group.capture.collective(self.rank, "all_gather", tensor, dim)
        return self.group.exchange(self.rank, "all_gather", tensor, functools.partial(_run_all_gather, dim))

    def enter_parallel(self, tensor: torch.Tensor) -> torch.Tensor:
        # In one process the graph is exact: the gradients of the replicated copies already
        # meet in the all-reduce / all-gather nodes and in the input broadcast.
        return tensor


# --------------------------------------------------------------------------------------------
# torch.distributed: one rank per process (Megatron's conjugate operators)
# --------------------------------------------------------------------------------------------
#
# Every process computes the replicated part of the model, the loss included, identically.
# So the gradient of a replicated activation is the same on every rank; an all-reduce's
# backward passes it through, an all-gather's backward keeps this rank's slice, and the input
# of a split layer (enter_parallel) sums the ranks' partial gradients.


def _dist_all_reduce_(tensor: torch.Tensor, group) -> torch.Tensor:
    """Sum over the group in place: through shared memory for CPU ranks of one host, else
    torch.distributed (see :mod:`tensor_parallel.shm`)."""
    return all_reduce_(shared_memory_group(group) if tensor.device.type == "cpu" else None, tensor, group)


def _dist_all_gather(pieces: list[torch.Tensor], tensor: torch.Tensor, group) -> None:
    all_gather_pieces(shared_memory_group(group) if tensor.device.type == "cpu" else None, pieces, tensor, group)


class _DistAllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group):
        record_collective("all_reduce", tensor.shape, tensor.dtype)
        return _dist_all_reduce_(tensor.clone(), group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _DistEnterParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group):
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        record_collective("all_reduce", grad.shape, grad.dtype)
        return _dist_all_reduce_(grad.clone(), ctx.group), None


class _DistAllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, dim: int, sizes: tuple[int, ...], rank: int, group):
        ctx.dim, ctx.offset, ctx.size = dim, sum(sizes[:rank]), sizes[rank]
        shape = list(tensor.shape)
        shape[dim] = sum(sizes)
        record_collective("all_gather", shape, tensor.dtype)
        widest = max(sizes)
        padded = tensor
        if tensor.shape[dim] < widest:  # torch.distributed gathers equal sizes: pad, then cut
            pad_shape = list(tensor.shape)
            pad_shape[dim] = widest - tensor.shape[dim]
            padded = torch.cat([tensor, tensor.new_zeros(pad_shape)], dim)
        pieces = [torch.empty_like(padded.contiguous()) for _ in sizes]
        _dist_all_gather(pieces, padded.contiguous(), group)
        return torch.cat([p.narrow(dim, 0, n) for p, n in zip(pieces, sizes)], dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.narrow(ctx.dim, ctx.offset, ctx.size).contiguous(), None, None, None, None


class DistributedCommunicator(Communicator):
    """This process's rank of a ``torch.distributed`` process group (gloo on CPU, NCCL on GPUs).

    Example::

        >>> import torch.distributed as dist
        >>> from tensor_parallel.comm import DistributedCommunicator
        >>> DistributedCommunicator  # used by tensor_parallel() when torch.distributed is initialised
        <class 'tensor_parallel.comm.DistributedCommunicator'>
    """

    def __init__(self, group=None) -> None:
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return _DistAllReduce.apply(tensor, self.group)

    def all_gather(self, tensor: torch.Tensor, dim: int, sizes: Sequence[int] = ()) -> torch.Tensor:
        dim = dim % tensor.dim()
        if not sizes:
            raise ValueError("all_gather over torch.distributed needs every rank's size along dim")
        return _DistAllGather.apply(tensor, dim, tuple(sizes), self.rank, self.group)

    def enter_parallel(self, tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.requires_grad:
            return tensor
        return _DistEnterParallel.apply(tensor, self.group)

    def sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """A plain (not differentiable) sum over the group, in place; for gradient hooks."""
        record_collective("all_reduce", tensor.shape, tensor.dtype)
        return _dist_all_reduce_(tensor, self.group)
