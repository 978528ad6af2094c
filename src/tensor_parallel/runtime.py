"""Running: one worker per device, all shards run as one model.

:class:`TensorParallel` holds one shard per device and runs them concurrently: rank 0 in the
calling thread, every other rank in a worker thread of its own. The shards meet only at the
collectives of :mod:`tensor_parallel.comm`. The caller's grad mode, inference mode and
autocast settings are carried into every worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import queue
import threading
import weakref
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils import _pytree as pytree

from .comm import CollectiveError, DistributedCommunicator, ThreadGroup
from .plan import plan_for, resolve_plan
from .split import build_shards, gather_tensor
from .styles import Replicate, Style

__all__ = ["TensorParallel", "tensor_parallel", "parse_devices", "RankLocal"]

logger = logging.getLogger(__name__)

DeviceLike = int | str | torch.device


# --------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------


def parse_devices(device_ids: Sequence[DeviceLike] | None) -> list[torch.device]:
    """Turn ``device_ids`` into devices: ints are CUDA ordinals, ``None`` is every visible GPU.

    Example::

        >>> parse_devices(["cpu", "cpu"])
        [device(type='cpu'), device(type='cpu')]
    """
    if device_ids is None:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError("device_ids=None means every visible CUDA device, but none is visible; "
                             "pass device_ids explicitly, e.g. ['cpu', 'cpu'] to split on the CPU")
        return [torch.device("cuda", i) for i in range(count)]
    if isinstance(device_ids, (str, int, torch.device)) or not isinstance(device_ids, Sequence):
        raise TypeError(f"device_ids must be a list of devices such as ['cuda:0', 'cuda:1'] or "
                        f"['cpu', 'cpu'], got {device_ids!r}")
    if len(device_ids) == 0:
        raise ValueError("device_ids is empty; pass at least one device, e.g. ['cpu', 'cpu']")
    devices = [_parse_device(d) for d in device_ids]
    types = sorted({d.type for d in devices})
    if len(types) > 1:
        raise ValueError(f"device_ids mixes device types {types} ({list(device_ids)}); split over "
                         f"devices of one type, e.g. all CUDA GPUs or all 'cpu'")
    return [_check_available(d, given) for d, given in zip(devices, device_ids)]


def _parse_device(device: DeviceLike) -> torch.device:
    if isinstance(device, bool) or not isinstance(device, (int, str, torch.device)):
        raise TypeError(f"a device id must be an int, a str or a torch.device, got {device!r}")
    try:
        parsed = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"{device!r} is not a device: {error}") from None
    if parsed.type == "meta":
        raise ValueError("'meta' is not a device to run on; build the model under "
                         "accelerate.init_empty_weights() and pass real device_ids instead")
    return parsed


def _check_available(device: torch.device, given: DeviceLike) -> torch.device:
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = 0 if device.index is None else device.index
    if index >= count:
        raise ValueError(f"device {given!r}: this machine sees {count} CUDA device(s); use ids "
                         f"below {count}, or 'cpu'")
    return torch.device("cuda", index)


# --------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------


class _Worker:
    """A daemon thread that runs one rank's calls, in the caller's autograd modes."""

    def __init__(self, name: str) -> None:
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            task = self.tasks.get()
            if task is None:
                return
            task()
            del task  # do not keep the last call's tensors alive while idle

    def stop(self) -> None:
        self.tasks.put(None)


class _Call:
    """One rank's part of a forward: its function, its result or its error."""

    def __init__(self, fn: Callable[[], Any], modes: Callable[[], contextlib.AbstractContextManager],
                 threads: int | None = None) -> None:
        self.fn, self.modes, self.threads = fn, modes, threads
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def __call__(self) -> None:
        try:
            if self.threads is not None and torch.get_num_threads() != self.threads:
                torch.set_num_threads(self.threads)  # this worker thread's own intra-op threads
            with self.modes():
                self.result = self.fn()
        except BaseException as error:  # handed back to the caller, never lost in a thread
            self.error = error
        finally:
            self.done.set()


def _caller_modes() -> Callable[[], contextlib.AbstractContextManager]:
    """A factory re-entering the calling thread's grad, inference and autocast modes."""
    grad = torch.is_grad_enabled()
    inference = torch.is_inference_mode_enabled()
    autocast = {t: (torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in ("cpu", "cuda")}

    @contextlib.contextmanager
    def modes():
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode(inference))
            stack.enter_context(torch.set_grad_enabled(grad))
            for device_type, (enabled, dtype) in autocast.items():
                if enabled:
                    stack.enter_context(torch.autocast(device_type, dtype=dtype))
            yield
    return modes


class ShardRunner:
    """Runs one callable per rank concurrently; the first failure aborts every rank."""

    def __init__(self, group: ThreadGroup) -> None:
        self.group = group
        self.workers = [_Worker(f"tensor_parallel-rank{r}") for r in range(1, group.world_size)]
        weakref.finalize(self, _stop_all, list(self.workers))

    def run(self, fns: Sequence[Callable[[], Any]]) -> list[Any]:
        """Call ``fns[r]`` on rank ``r`` (rank 0 in this thread) and return every result."""
        self.group.reset()
        modes = _caller_modes()
        caller_threads = torch.get_num_threads()
        threads = self._threads_per_rank(caller_threads)
        calls = [_Call(fn, modes, threads) for fn in fns]
        for worker, call in zip(self.workers, calls[1:]):
            worker.tasks.put(self._guarded(call))
        try:
            self._guarded(calls[0])()
            for call in calls[1:]:
                call.done.wait()
        except BaseException as error:  # KeyboardInterrupt while waiting: release every rank
            self.group.abort(error)
            for call in calls[1:]:
                call.done.wait(timeout=self.group.timeout)
            raise
        finally:
            if torch.get_num_threads() != caller_threads:
                torch.set_num_threads(caller_threads)  # also the default of threads started later
        self._raise_first_error(calls)
        return [call.result for call in calls]

    def _threads_per_rank(self, caller_threads: int) -> int | None:
        """CPU ranks share the caller's intra-op threads (2 ranks on 2 threads: 1 each), so the
        ranks' thread pools do not fight over the cores; GPU ranks keep theirs."""
        if self.group.devices[0].type != "cpu":
            return None
        return max(1, caller_threads // self.group.world_size)

    def _guarded(self, call: _Call) -> Callable[[], None]:
        def run() -> None:
            call()
            if call.error is not None:
                self.group.abort(call.error)
        return run

    def _raise_first_error(self, calls: Sequence[_Call]) -> None:
        errors = [(rank, c.error) for rank, c in enumerate(calls) if c.error is not None]
        if not errors:
            return
        # the rank that failed first is the one whose error is not a CollectiveError
        rank, error = next(((r, e) for r, e in errors if not isinstance(e, CollectiveError)), errors[0])
        if hasattr(error, "add_note"):
            error.add_note(f"(raised by the shard on rank {rank}, device {self.group.devices[rank]})")
        raise error

    def close(self) -> None:
        _stop_all(self.workers)


def _stop_all(workers: Sequence[_Worker]) -> None:
    for worker in workers:
        worker.stop()
    for worker in workers:
        if worker.thread is not threading.current_thread():
            worker.thread.join(timeout=10.0)


class _LocalRunner:
    """A torch.distributed rank: this process runs its one shard itself."""

    def run(self, fns: Sequence[Callable[[], Any]]) -> list[Any]:
        return [fn() for fn in fns]


@dataclasses.dataclass
class _Placement:
    mode: str
    world_size: int
    ranks: list[int]
    devices: list[torch.device]
    comms: list[Any]
    runner: Any


def _placement(device_ids, process_group, timeout: float) -> _Placement:
    """Threads over ``device_ids`` in this process, or this process's rank of a job (when
    torch.distributed is initialised and ``device_ids`` is None, or names this rank's one device)."""
    joined = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    own_device = None
    if process_group is None and joined and device_ids is not None and len(device_ids) == 1:
        own_device = _check_available(_parse_device(device_ids[0]), device_ids[0])  # this rank's device
        device_ids = None
    if process_group is None and device_ids is None and joined:
        process_group = dist.group.WORLD
    if process_group is None:
        devices = parse_devices(device_ids)
        group = ThreadGroup(devices, timeout=timeout)
        return _Placement("threads", len(devices), list(range(len(devices))), devices,
                          [group.communicator(r) for r in range(len(devices))], ShardRunner(group))
    if device_ids is not None:
        raise ValueError("pass either device_ids (one process, one thread per device) or a process "
                         "group (one process per rank, under torchrun), not both")
    comm = DistributedCommunicator(_group_of(process_group))
    device = own_device or _local_device(comm.group)
    return _Placement("torch.distributed", comm.world_size, [comm.rank], [device], [comm], _LocalRunner())


def _group_of(process_group):
    """A process group, or the group of a 1-D DeviceMesh (or of a named mesh dimension)."""
    if hasattr(process_group, "get_group"):
        return process_group.get_group()
    return process_group


def _local_device(group) -> torch.device:
    """This rank's device: LOCAL_RANK's GPU with NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class RankLocal:
    """An input that is a different object on each rank (a KV cache, say): on rank ``r`` the
    shard receives ``for_rank(r)`` instead of this object."""

    def for_rank(self, rank: int) -> Any:
        raise NotImplementedError


def _to_device(tree: Any, device: torch.device, rank: int = 0) -> Any:
    def move(leaf):
        if isinstance(leaf, RankLocal):
            return leaf.for_rank(rank)
        if isinstance(leaf, torch.Tensor):
            if leaf.device.type == "meta":
                raise ValueError("an input tensor is on the 'meta' device and holds no data; pass "
                                 "real tensors (on any device) to the model")
            return leaf.to(device)
        return leaf
    return pytree.tree_map(move, tree)


class TensorParallel(nn.Module):
    """A module split over several devices that runs as the original module.

    ``forward`` takes the original module's arguments and returns its outputs on
    ``output_device`` (default: the first device). ``parameters()`` yields every shard's
    slices and, once per device, the replicated parameters, so an optimizer over
    ``model.parameters()`` steps the split model exactly as the unsharded one.

    Example::

        >>> import torch, tensor_parallel as tp
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
        >>> model = tp.TensorParallel(mlp, ["cpu", "cpu"])
        >>> x = torch.randn(4, 8)
        >>> torch.allclose(model(x), mlp(x), atol=1e-6)
        True
    """

    def __init__(self, module: nn.Module, device_ids: Sequence[DeviceLike] | None = None, *,
                 plan: Mapping[str, Style] | None = None, output_device: DeviceLike | None = None,
                 timeout: float = 600.0, process_group: Any = None) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"tensor_parallel splits an nn.Module, got {type(module).__name__}")
        placement = _placement(device_ids, process_group, timeout)
        world_size = placement.world_size
        if plan is None:
            plan = plan_for(module, world_size)
        self.plan = resolve_plan(module, plan, world_size)
        self.devices, self.shard_ranks, self.world_size = placement.devices, placement.ranks, world_size
        self.output_device = self.devices[0] if output_device is None else \
            _check_available(_parse_device(output_device), output_device)
        shards, self.layout = build_shards(module, self.plan, placement.devices, placement.comms,
                                           world_size=world_size, ranks=placement.ranks)
        self.module_shards = nn.ModuleList(shards)
        self._runner = placement.runner
        self._comms = placement.comms
        self.install_gradient_sums()
        logger.info("split %s over %d ranks (%s here): %d layers split, the rest replicated",
                    type(module).__name__, world_size, placement.mode,
                    sum(not isinstance(style, Replicate) for style in self.plan.values()))

    @property
    def distributed(self) -> bool:
        """True in a torch.distributed job: this process holds one rank's shard."""
        return isinstance(self._runner, _LocalRunner)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward_output(self.run_shards(_call_shard, *args, **kwargs)[0])

    def install_gradient_sums(self) -> None:
        """Make ranks that hold overlapping slices of a tensor (a KV head replicated inside a
        fused q|k|v weight) add up their gradients, as the unsharded model's one tensor would.
        Called after building and after loading (a load puts new Parameter objects in place).
        """
        from .grads import sum_overlapping_gradients

        sum_overlapping_gradients(self.module_shards, self.shard_ranks, self.layout, self._comms,
                                  distributed=self.distributed)

    def forward_output(self, output: Any) -> Any:
        """``output`` (rank 0's result) moved to :attr:`output_device`.

        Example::

            >>> import torch, tensor_parallel as tp
            >>> model = tp.tensor_parallel(torch.nn.Sequential(torch.nn.Linear(2, 2)), ["cpu", "cpu"])
            >>> model.forward_output({"y": torch.ones(1)})["y"].device
            device(type='cpu')
        """
        return _to_device(output, self.output_device)

    def run_shards(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Call ``fn(shard, *args, **kwargs)`` on every rank at once, with the arguments moved
        to that rank's device (and :class:`RankLocal` ones resolved); return every rank's result.

        Example::

            >>> import torch, tensor_parallel as tp
            >>> model = tp.tensor_parallel(torch.nn.Sequential(torch.nn.Linear(2, 4)), ["cpu", "cpu"])
            >>> [out.shape for out in model.run_shards(lambda shard, x: shard(x), torch.ones(1, 2))]
            [torch.Size([1, 4]), torch.Size([1, 4])]
        """
        calls = []
        for rank, shard, device in zip(self.shard_ranks, self.module_shards, self.devices):
            rank_args, rank_kwargs = _to_device((args, kwargs), device, rank)
            calls.append(functools.partial(fn, shard, *rank_args, **rank_kwargs))
        return self._runner.run(calls)

    def unsharded_state_dict(self, device: DeviceLike = "cpu") -> dict[str, torch.Tensor]:
        """The original module's ``state_dict``: same keys, full tensors, gathered on ``device``.

        Example::

            >>> import torch, tensor_parallel as tp
            >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
            >>> state = tp.tensor_parallel(mlp, ["cpu", "cpu"]).unsharded_state_dict()
            >>> all(torch.equal(state[k], v) for k, v in mlp.state_dict().items())
            True
        """
        states = [shard.state_dict() for shard in self.module_shards]
        return {key: gather_tensor(shard, [s[key] for s in states], device)
                for key, shard in self.layout.items()}

    def extra_repr(self) -> str:
        return f"devices={[str(d) for d in self.devices]}"


def _call_shard(shard: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return shard(*args, **kwargs)


def _is_hf_pretrained(module: nn.Module) -> bool:
    """A transformers PreTrainedModel, recognised without importing transformers."""
    return any(cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers")
               for cls in type(module).__mro__)


def tensor_parallel(module: nn.Module, device_ids: Sequence[DeviceLike] | None = None, *,
                    plan: Mapping[str, Style] | None = None, output_device: DeviceLike | None = None,
                    **options: Any) -> nn.Module:
    """Split ``module`` over ``device_ids`` and return a module that runs like it.

    ``device_ids`` lists one device per shard (repeats allowed: ``["cpu", "cpu"]``); ``None``
    means every visible GPU. ``plan`` maps module-path patterns to styles; without one,
    :func:`~tensor_parallel.plan.plan_for` derives one.

    Example::

        >>> import torch, tensor_parallel as tp
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
        >>> model = tp.tensor_parallel(mlp, ["cpu", "cpu"])
        >>> model(torch.randn(2, 8)).shape
        torch.Size([2, 8])
    """
    allowed = {"timeout", "process_group"}
    unknown = set(options) - allowed
    if unknown:
        raise TypeError(f"tensor_parallel() got unexpected options {sorted(unknown)}; it accepts "
                        f"device_ids, plan, output_device and {sorted(allowed)}")
    if _is_hf_pretrained(module):
        from .hf import TensorParallelPreTrainedModel
        return TensorParallelPreTrainedModel(module, device_ids, output_device=output_device,
                                             plan=plan, **options)
    return TensorParallel(module, device_ids, plan=plan, output_device=output_device, **options)

