"""Running: one worker per device, all shards run as one model.

:class:`TensorParallel` holds one shard per device and runs them concurrently: rank 0 in the
calling thread, every other rank in a worker thread of its own. The shards meet only at the
collectives of :mod:`tensor_parallel.comm`. The caller's grad mode, inference mode and
autocast settings are carried into every worker.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging
import os
import queue
import sys
import threading
import weakref
from typing import Any, Callable, Collection, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils import _pytree as pytree

from .comm import CollectiveError, DistributedCommunicator, ThreadGroup, check_timeout
from .legacy import Config, allow_legacy_unpacking
from .legacy_plan import config_to_plan
from .plan import plan_for, resolve_plan
from .adapters import _SplitLayers
from .sharding import shard_replicated
from .split import Shard, build_shards, gather_tensor, relocate_shards
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
        if count == 0:  # the original ran the module whole here, silently
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


class _Done:
    """A one-shot signal, as ``threading.Event`` but on a bare lock: the waiter blocks in
    ``acquire()`` (C code, without the GIL) and is woken by one ``release()``, where an Event
    allocates a lock per wait and re-checks its flag under a Python-level condition (the
    caller waits for every worker once per forward: once per decoded token). Meant for one
    waiting thread (the caller): a Ctrl-C between a waiter's ``acquire()`` and its
    ``release()`` would leave a second blocked waiter to its timeout."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self._set = False

    def set(self) -> None:
        self._set = True
        self._lock.release()

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        if self._set:
            return True
        if self._lock.acquire(timeout=-1 if timeout is None else timeout):
            self._lock.release()  # the signal stays set: later waits return at once
            return True
        return self._set


class _Call:
    """One rank's part of a forward: its function, its result or its error. A failure aborts
    the group (``on_error``) before the call counts as done, so the abort never lands in a
    later call. ``modes`` (the caller's autograd modes) is ``None`` for the caller's own rank,
    which runs in them already (so a mode its forward sets without restoring it stays set in
    the caller's thread, as for an unsplit module)."""

    def __init__(self, fn: Callable[[], Any], modes: Callable[[], contextlib.AbstractContextManager] | None,
                 threads: int | None = None, on_error: Callable[[BaseException], None] | None = None) -> None:
        self.fn, self.modes, self.threads, self.on_error = fn, modes, threads, on_error
        self.done = _Done()
        self.result: Any = None
        self.error: BaseException | None = None

    def __call__(self) -> None:
        try:
            if self.threads is not None and torch.get_num_threads() != self.threads:
                torch.set_num_threads(self.threads)  # this worker thread's own intra-op threads
            if self.modes is None:
                self.result = self.fn()
            else:
                with self.modes():
                    self.result = self.fn()
        except BaseException as error:  # handed back to the caller, never lost in a thread
            self.error = error
            if self.on_error is not None:
                self.on_error(error)
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
        self._unfinished: list[tuple[int, _Call]] = []  # ranks an interrupted call left running
        weakref.finalize(self, _stop_all, list(self.workers))

    def run(self, fns: Sequence[Callable[[], Any]]) -> list[Any]:
        """Call ``fns[r]`` on rank ``r`` (rank 0 in this thread) and return every result."""
        self._wait_for_last_run()
        self.group.reset()
        modes = _caller_modes()
        caller_threads = torch.get_num_threads()
        threads = self._threads_per_rank(caller_threads)
        calls = [_Call(fn, None if rank == 0 else modes, threads, self.group.abort) for rank, fn in enumerate(fns)]
        for worker, call in zip(self.workers, calls[1:]):
            worker.tasks.put(call)
        try:
            calls[0]()
            for call in calls[1:]:
                call.done.wait()
        except BaseException as error:  # KeyboardInterrupt while waiting: release every rank
            self.group.abort(error)
            self._unfinished = list(enumerate(calls[1:], start=1))
            for call in calls[1:]:
                call.done.wait(timeout=self.group.timeout)
            self._unfinished = [(rank, call) for rank, call in self._unfinished if not call.done.is_set()]
            raise
        finally:
            if torch.get_num_threads() != caller_threads:
                torch.set_num_threads(caller_threads)  # also the default of threads started later
        self._raise_first_error(calls)
        return [call.result for call in calls]

    def _wait_for_last_run(self) -> None:
        """A call interrupted while its ranks ran (Ctrl-C twice) may leave a rank still
        running: the next call waits for it (it stops at its next collective) before it starts."""
        for rank, call in self._unfinished:
            if not call.done.wait(timeout=self.group.timeout):
                raise CollectiveError(
                    f"rank {rank} ({self.group.devices[rank]}) is still running an earlier, interrupted "
                    f"call after {self.group.timeout:.0f} s; this model cannot run until it stops")
        self._unfinished = []

    def _threads_per_rank(self, caller_threads: int) -> int | None:
        """CPU ranks share the caller's intra-op threads (2 ranks on 2 threads: 1 each), so the
        ranks' thread pools do not fight over the cores; GPU ranks keep theirs."""
        if self.group.devices[0].type != "cpu":
            return None
        return max(1, caller_threads // self.group.world_size)

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


def _placement(device_ids, process_group, timeout: float, distributed: bool | None = None) -> _Placement:
    """Threads over ``device_ids`` in this process, or this process's rank of a job (when
    torch.distributed is initialised and ``device_ids`` is None, or names this rank's one device).
    ``distributed=False`` always means threads in this process."""
    check_timeout(timeout)  # refused at wrap time in either mode
    if distributed is False:
        if process_group is not None:
            raise ValueError("distributed=False runs one thread per device in this process; it takes "
                             "device_ids, not a process_group")
        return _thread_placement(device_ids, timeout)
    joined = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    own_device = None
    if process_group is None and joined and device_ids is not None and len(device_ids) == 1:
        own_device = _check_available(_parse_device(device_ids[0]), device_ids[0])  # this rank's device
        device_ids = None
    if process_group is None and device_ids is None and joined:
        process_group = dist.group.WORLD
    if process_group is None:
        return _thread_placement(device_ids, timeout)
    if device_ids is not None:
        raise ValueError("pass either device_ids (one process, one thread per device) or a process "
                         "group (one process per rank, under torchrun), not both")
    comm = DistributedCommunicator(_group_of(process_group))
    device = own_device or _local_device(comm.group)
    return _Placement("torch.distributed", comm.world_size, [comm.rank], [device], [comm], _LocalRunner())


def _thread_placement(device_ids, timeout: float) -> _Placement:
    devices = parse_devices(device_ids)
    group = ThreadGroup(devices, timeout=timeout)
    return _Placement("threads", len(devices), list(range(len(devices))), devices,
                      [group.communicator(r) for r in range(len(devices))], ShardRunner(group))


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

    def graph_key(self) -> Any:
        """What identifies this object's tensors for ``cuda_graphs=True`` (a replay reuses their
        addresses), or ``None``: calls with it run eagerly."""
        return None


_PLAIN = (int, float, bool, str, bytes, type(None))


def _to_device(tree: Any, device: torch.device, rank: int = 0) -> Any:
    """``tree`` with its tensors on ``device`` and its :class:`RankLocal` leaves resolved for
    ``rank``, in new containers (each rank gets its own). Tuples, lists and dicts are walked
    here; other containers (named tuples, ``ModelOutput``...) by ``torch.utils._pytree``,
    whose generic walk costs tens of microseconds a call, twice per rank per decoded token."""
    def move(leaf):
        if isinstance(leaf, RankLocal):
            return leaf.for_rank(rank)
        if isinstance(leaf, torch.Tensor):
            if leaf.device.type == "meta":
                raise ValueError("an input tensor is on the 'meta' device and holds no data; pass "
                                 "real tensors (on any device) to the model")
            return leaf.to(device)
        return leaf

    def walk(node):
        kind = type(node)
        if kind is tuple:
            return tuple([walk(x) for x in node])
        if kind is list:
            return [walk(x) for x in node]
        if kind is dict:
            return {key: walk(value) for key, value in node.items()}
        if isinstance(node, (torch.Tensor, RankLocal)):
            return move(node)
        if isinstance(node, _PLAIN):
            return node
        return pytree.tree_map(move, node)
    return walk(tree)


def _all_on(tree: Any, device: torch.device) -> bool:
    """Whether every tensor in ``tree`` is on ``device`` already and it holds no
    :class:`RankLocal` (then it need not be rebuilt)."""
    if type(tree) in (tuple, list):
        return all(_all_on(x, device) for x in tree)
    if isinstance(tree, (torch.Tensor, RankLocal, *_PLAIN)):
        return _leaf_on(tree, device)
    return all(_leaf_on(leaf, device) for leaf in pytree.tree_leaves(tree))


def _leaf_on(leaf: Any, device: torch.device) -> bool:
    if isinstance(leaf, torch.Tensor):
        return leaf.device == device
    return not isinstance(leaf, RankLocal)


class TensorParallel(nn.Module):
    """A module split over several devices that runs as the original module.

    ``forward`` takes the original module's arguments and returns its outputs on
    ``output_device`` (default: the first device). ``parameters()`` yields every shard's
    slices and, once per device, the replicated parameters, so an optimizer over
    ``model.parameters()`` steps the split model exactly as the unsharded one.

    The positional arguments are the original library's, in its order:
    ``output_device_index`` picks ``device_ids[index]`` as the output device;
    ``tensor_parallel_config`` is a legacy :class:`~tensor_parallel.Config`, translated into a
    plan; ``delay_init=True`` builds the shards on the CPU and moves each to its device at the
    first call; ``distributed=False`` keeps one thread per device even under torch.distributed;
    ``sharded=True`` (or ``sharded_param_names`` alone) stores the replicated parameters once,
    cut 1/N over the ranks, and gathers them for use (ZeRO-3; see
    :func:`~tensor_parallel.sharding.shard_replicated`); ``sharded_param_names`` limits that
    to the named parameters. Our own options are keyword-only: ``plan``, ``timeout`` (seconds
    a rank waits at a collective for the others before every rank fails with
    :class:`~tensor_parallel.CollectiveError`; default 600, ``None``: no limit),
    ``process_group``, ``example_inputs``.

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

    def __init__(self, module: nn.Module, device_ids: Sequence[DeviceLike] | None = None,
                 output_device: DeviceLike | None = None, output_device_index: int | None = None,
                 tensor_parallel_config: Config | None = None, delay_init: bool = False, distributed: bool | None = True,
                 sharded: bool | None = None, sharded_param_names: Collection[str] | None = None, *,
                 plan: Mapping[str, Style] | None = None, timeout: float | None = 600.0, process_group: Any = None,
                 example_inputs: Any = None, cuda_graphs: bool = False) -> None:
        super().__init__()
        sharded = _wants_sharding(sharded, sharded_param_names)
        if not isinstance(module, nn.Module):
            raise TypeError(f"tensor_parallel splits an nn.Module, got {type(module).__name__}")
        if cuda_graphs and sharded:
            raise ValueError("cuda_graphs=True replays inference calls; sharded=True (ZeRO-3) is for training "
                             "and re-gathers parameters on every call: use one or the other")
        placement = _placement(device_ids, process_group, timeout, distributed)
        graphs = _graphed_calls(placement, self._tensors, self._modes) if cuda_graphs else None  # refused early
        world_size = placement.world_size
        plan = _choose_plan(module, plan, tensor_parallel_config, world_size, example_inputs)
        self.plan = resolve_plan(module, plan, world_size)
        self.devices, self.shard_ranks, self.world_size = placement.devices, placement.ranks, world_size
        self.output_device = _output_device(self.devices, output_device, output_device_index)
        build_on = [torch.device("cpu")] * len(placement.devices) if delay_init else placement.devices
        shards, self.layout = build_shards(module, self.plan, build_on, placement.comms,
                                           world_size=world_size, ranks=placement.ranks)
        self.module_shards = nn.ModuleList(shards)
        self.need_delayed_init = bool(delay_init)
        self._runner = placement.runner
        self._comms = placement.comms
        self._graphs = graphs
        self.sharded_keys: set[str] = set()
        self.split_layers = _SplitLayers(shards)
        self._unsharded_view = False  # inside save_tensor_parallel(): state_dict() has the original keys
        self.register_load_state_dict_pre_hook(_cut_full_tensors)
        self.install_gradient_sums()
        if sharded:
            self.apply_sharding(sharded_param_names)
        logger.info("split %s over %d ranks (%s here): %d layers split, the rest replicated",
                    type(module).__name__, world_size, placement.mode,
                    sum(not isinstance(style, Replicate) for style in self.plan.values()))

    @property
    def tensor_parallel_config(self) -> Config:
        """The split as a legacy :class:`~tensor_parallel.Config`: one exact state rule per
        split tensor, and the plan itself, so :func:`~tensor_parallel.convert_state_dict` cuts a
        state dict exactly as this model holds it.

        Example::

            >>> import torch, tensor_parallel as tp
            >>> model = tp.TensorParallel(torch.nn.Sequential(torch.nn.Linear(2, 4)), ["cpu", "cpu"])
            >>> model.tensor_parallel_config.plan
            {'0': ColwiseParallel(gather_output=True)}
        """
        return Config.from_layout(self.layout, self.plan, self.world_size)

    def set_preserve_shards_when_saving(self, value: bool) -> None:
        """The original's switch: ``False`` makes ``state_dict()`` return the unsharded state
        (what ``tp.save_tensor_parallel(model)`` does inside its block), ``True`` the split one.

        Example::

            >>> import torch, tensor_parallel as tp
            >>> model = tp.TensorParallel(torch.nn.Sequential(torch.nn.Linear(2, 4)), ["cpu", "cpu"])
            >>> model.set_preserve_shards_when_saving(False); sorted(model.state_dict())
            ['0.bias', '0.weight']
        """
        from .checkpoint import set_unsharded_saving

        set_unsharded_saving(self, not value)

    def apply_sharding(self, sharded_param_names: Collection[str] | None = None) -> None:
        """Store the replicated parameters once, cut 1/N over the ranks, gathered for use
        (ZeRO-3, :func:`~tensor_parallel.sharding.shard_replicated`); ``sharded_param_names``
        (the original module's names) limits it to those. Calling it again shards what is left.

        Example::

            >>> import torch, tensor_parallel as tp
            >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8))
            >>> model = tp.TensorParallel(mlp, ["cpu", "cpu"])
            >>> model.apply_sharding(["1.weight"]); sorted(model.sharded_keys)
            ['1.weight']
        """
        if getattr(self, "_graphs", None) is not None:
            raise ValueError("this model replays CUDA graphs (cuda_graphs=True); sharding its parameters "
                             "would change them under the graphs: split it again without cuda_graphs")
        shard_replicated(self, sharded_param_names)

    @property
    def distributed(self) -> bool:
        """True in a torch.distributed job: this process holds one rank's shard."""
        return isinstance(self._runner, _LocalRunner)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward_output(self.run_shards(_call_shard, *args, **kwargs)[0])

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """As ``nn.Module.load_state_dict`` (keys ``module_shards.<rank>.<key>``, as
        :func:`~tensor_parallel.convert_state_dict` makes them), and tensors still on the meta
        device (a model built under ``init_empty_weights``) get their piece on their device."""
        from .checkpoint import load_split_state_dict

        self.reset_cuda_graphs()  # assign=True puts new tensors in place: graphs would read the old
        if assign or not any(t.device.type == "meta" for t in nn.Module.state_dict(self, keep_vars=True).values()):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        return load_split_state_dict(self, state_dict, strict=strict)

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
        if _all_on(output, self.output_device):
            return output  # rank 0's output as it is (rebuilding a ModelOutput costs a tree walk)
        return _to_device(output, self.output_device)

    def place_delayed(self) -> None:
        """Move shards built with ``delay_init=True`` to their devices (done by the first call).

        Example::

            >>> import torch, tensor_parallel as tp
            >>> model = tp.TensorParallel(torch.nn.Sequential(torch.nn.Linear(2, 4)), ["cpu", "cpu"], delay_init=True)
            >>> model.place_delayed(); model.need_delayed_init
            False
        """
        if self.need_delayed_init:
            relocate_shards(self.module_shards, self.devices)
            self.need_delayed_init = False

    def run_shards(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Call ``fn(shard, *args, **kwargs)`` on every rank at once, with the arguments moved
        to that rank's device (and :class:`RankLocal` ones resolved); return every rank's result.

        Example::

            >>> import torch, tensor_parallel as tp
            >>> model = tp.tensor_parallel(torch.nn.Sequential(torch.nn.Linear(2, 4)), ["cpu", "cpu"])
            >>> [out.shape for out in model.run_shards(lambda shard, x: shard(x), torch.ones(1, 2))]
            [torch.Size([1, 4]), torch.Size([1, 4])]
        """
        self.place_delayed()
        self.adopt_adapters()
        if self._graphs is not None:
            results = self._graphs.run(fn, args, kwargs, functools.partial(self._bind, fn))
            if results is not None:
                return results
        return self._runner.run([self._bind(fn, index, args, kwargs) for index in range(len(self.module_shards))])

    def _tensors(self) -> list[torch.Tensor]:
        """Every parameter and buffer of every shard (CUDA graphs check their addresses)."""
        return [t for shard in self.module_shards for t in (*shard.parameters(), *shard.buffers())]

    def _modes(self) -> tuple[bool, ...]:
        """Each shard's train/eval flag (a graph captured in one mode must not serve the other)."""
        return tuple(shard.training for shard in self.module_shards)

    def reset_cuda_graphs(self) -> None:
        """With ``cuda_graphs=True``: forget the captured calls, so the next ones are captured
        again. Needed after changing what the forward does in Python state (peft's
        ``set_adapter``, a flag read by a module); moved weights and adopted adapters are
        noticed by themselves.

        Example::

            >>> import torch, tensor_parallel as tp
            >>> model = tp.tensor_parallel(torch.nn.Sequential(torch.nn.Linear(2, 4)), ["cpu", "cpu"])
            >>> model.reset_cuda_graphs()  # nothing captured: nothing to forget
        """
        if getattr(self, "_graphs", None) is not None:
            self._graphs.clear()

    def _bind(self, fn: Callable[..., Any], index: int, args: tuple, kwargs: dict) -> Callable[[], Any]:
        """The call ``fn(shard, *args, **kwargs)`` of this process's ``index``-th shard, with the
        arguments on its device and :class:`RankLocal` ones resolved."""
        rank_args, rank_kwargs = _to_device((args, kwargs), self.devices[index], self.shard_ranks[index])
        return functools.partial(fn, self.module_shards[index], *rank_args, **rank_kwargs)

    def unsharded_state_dict(self, device: DeviceLike = "cpu") -> dict[str, torch.Tensor]:
        """The original module's ``state_dict``: same keys, full tensors, gathered on ``device``.

        Example::

            >>> import torch, tensor_parallel as tp
            >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
            >>> state = tp.tensor_parallel(mlp, ["cpu", "cpu"]).unsharded_state_dict()
            >>> all(torch.equal(state[k], v) for k, v in mlp.state_dict().items())
            True
        """
        self.adopt_adapters()
        states = [shard.state_dict() for shard in self.module_shards]
        return {key: gather_tensor(shard, self._pieces(shard, [s[key] for s in states]), device)
                for key, shard in self.layout.items()}

    def _pieces(self, shard: Shard | None, local: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every rank's slice of one tensor: all here in one process, all-gathered from the
        other processes under torch.distributed (every rank must ask for the same keys)."""
        if shard is None or not self.distributed:
            return local
        sizes = [shard.local_size(r) for r in range(self.world_size)]
        dim = shard.dim % local[0].dim()
        return list(self._comms[0].all_gather(local[0].detach(), dim, sizes).split(sizes, dim))

    def adopt_adapters(self) -> None:
        """Take over adapter layers (peft's LoRA) added to the shards since the last call; see
        :func:`tensor_parallel.adapters.adopt_adapters`. Called before every run, save and load."""
        if hasattr(self, "split_layers"):
            from .adapters import adopt_adapters

            adopt_adapters(self)

    def named_parameters(self, *args: Any, **kwargs: Any):
        self.adopt_adapters()
        return super().named_parameters(*args, **kwargs)

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        """The split state (keys ``module_shards.<rank>.<key>``), or inside
        :func:`~tensor_parallel.save_tensor_parallel` the original module's (full tensors)."""
        self.adopt_adapters()
        if not self._unsharded_view:
            return super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        destination = collections.OrderedDict() if destination is None else destination
        for key, tensor in self.unsharded_state_dict().items():
            destination[prefix + key] = tensor
        return destination

    def named_modules(self, memo: set | None = None, prefix: str = "", remove_duplicate: bool = True):
        """The shards' modules, or inside :func:`~tensor_parallel.save_tensor_parallel` the
        original module's names (rank 0's shard stands for it), so that savers that pick
        entries of ``state_dict()`` by module (peft's adapter saving) find them."""
        if self._unsharded_view:
            yield from _original_named_modules(self, self, memo, prefix, remove_duplicate)
        else:
            yield from super().named_modules(memo, prefix, remove_duplicate)

    def extra_repr(self) -> str:
        return f"devices={[str(d) for d in self.devices]}"


def _original_named_modules(owner: nn.Module, split: TensorParallel, memo: set | None, prefix: str,
                           remove_duplicate: bool = True):
    """``owner`` (a split model, or the model holding one), then the original module's
    submodules by their original names (rank 0's copies stand for them)."""
    memo = set() if memo is None else memo
    if owner not in memo:
        memo.add(owner)
        yield prefix, owner
    root = split.module_shards[0]
    for name, module in root.named_modules(memo, prefix, remove_duplicate):
        if module is not root:
            yield name, module


def _cut_full_tensors(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook of a split model (or of a model holding one as
    ``wrapped_model``): tensors under the original keys are cut into each rank's slice, so an
    ordinary state (adapter weights, say) loads into the split model."""
    split = getattr(module, "wrapped_model", module)
    if not isinstance(split, TensorParallel):
        return
    split.adopt_adapters()
    if "peft" in sys.modules:  # peft writes adapter checkpoints without the adapter's name
        from .hf.peft import rename_adapter_keys

        rename_adapter_keys(split.layout, state_dict, prefix)
    inner = prefix + ("wrapped_model." if split is not module else "")
    for key, shard in split.layout.items():
        full = state_dict.pop(prefix + key, None)
        if full is None:
            continue
        for index, rank in enumerate(split.shard_ranks):
            state_dict[f"{inner}module_shards.{index}.{key}"] = full if shard is None else shard.take(full, rank)


def _graphed_calls(placement: _Placement, tensors: Callable[[], Any], modes: Callable[[], Any]) -> Any:
    """The CUDA-graph runner of ``cuda_graphs=True``, refused where it cannot work."""
    if placement.mode != "threads":
        raise ValueError("cuda_graphs=True captures the ranks of one process; under torch.distributed each "
                         "process launches only its own kernels: capture its forward yourself, e.g. with "
                         "torch.compile(model, mode='reduce-overhead'), or pass device_ids for one process")
    if any(d.type != "cuda" for d in placement.devices):
        raise ValueError(f"cuda_graphs=True needs CUDA devices, got {[str(d) for d in placement.devices]}; "
                         f"drop cuda_graphs or pass device_ids such as ['cuda:0', 'cuda:1']")
    from .graphs import GraphedCalls

    return GraphedCalls(placement.runner.group, placement.runner, tensors, modes)


def _call_shard(shard: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return shard(*args, **kwargs)


def _wants_sharding(sharded: bool | None, names: Collection[str] | None) -> bool:
    """ZeRO-3 or not. ``sharded=None``, the original's default, means off unless names are given
    (its factory ignored the names then; here they mean what they say)."""
    if sharded is None:
        return names is not None
    if names is not None and not sharded:
        raise ValueError("sharded_param_names is given but sharded=False; pass sharded=True to shard them")
    return bool(sharded)


def _choose_plan(module: nn.Module, plan: Mapping[str, Style] | None, config: Config | None, world_size: int,
                 example_inputs: Any = None) -> Mapping[str, Style]:
    """``plan``, or the plan a legacy ``Config`` translates to, or the default plan."""
    if config is None:
        return plan_for(module, world_size, example_inputs=example_inputs) if plan is None else plan
    if plan is not None:
        raise ValueError("pass either plan= (styles) or tensor_parallel_config= (a legacy tp.Config), not both")
    if not isinstance(config, Config):
        raise TypeError(f"tensor_parallel_config must be a tp.Config, got {type(config).__name__}; "
                        f"to give styles, pass plan= instead")
    return config_to_plan(config, module, world_size)


def _output_device(devices: Sequence[torch.device], output_device: DeviceLike | None,
                   output_device_index: int | None) -> torch.device:
    if output_device is not None and output_device_index is not None:
        raise ValueError("pass either output_device or output_device_index, not both")
    if output_device_index is not None:
        if isinstance(output_device_index, bool) or not isinstance(output_device_index, int) \
                or not -len(devices) <= output_device_index < len(devices):
            raise ValueError(f"output_device_index={output_device_index!r} must index the devices of this "
                             f"process, {[str(d) for d in devices]}")
        return devices[output_device_index]
    if output_device is None:
        return devices[0]
    return _check_available(_parse_device(output_device), output_device)


def _is_hf_pretrained(module: nn.Module) -> bool:
    """A transformers PreTrainedModel, recognised without importing transformers."""
    return any(cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers")
               for cls in type(module).__mro__)


def _is_peft_model(module: nn.Module) -> bool:
    """A peft PeftModel, recognised without importing peft."""
    return any(cls.__name__ == "PeftModel" and cls.__module__.startswith("peft")
               for cls in type(module).__mro__)


def tensor_parallel(module: nn.Module, device_ids: Sequence[DeviceLike] | None = None,
                    tensor_parallel_config: Config | None = None, distributed: bool | None = None,
                    sharded: bool | None = None, sharded_param_names: Collection[str] | None = None, *,
                    plan: Mapping[str, Style] | None = None, output_device: DeviceLike | None = None,
                    **options: Any) -> nn.Module:
    """Split ``module`` over ``device_ids`` and return a module that runs like it.

    ``device_ids`` lists one device per shard (repeats allowed: ``["cpu", "cpu"]``); ``None``
    means every visible GPU, or this rank's device under torch.distributed. ``plan`` maps
    module-path patterns to styles; without one, :func:`~tensor_parallel.plan.plan_for`
    derives one (``example_inputs=``, a tuple of positional inputs or a dict of keyword inputs,
    small is best, lets it trace one forward and split attention heads and every column -> row
    pair it finds, each checked). A transformers model becomes a
    :class:`~tensor_parallel.TensorParallelPreTrainedModel`; a peft model (LoRA) comes back as
    a peft model around the split model, each adapter cut like its layer (see
    :mod:`tensor_parallel.hf.peft`).

    The other positional arguments are the original library's: ``tensor_parallel_config`` (a
    legacy :class:`~tensor_parallel.Config`, translated into a plan), ``distributed``
    (``None``: one process per rank when torch.distributed is initialised; ``True`` requires
    it; ``False`` never), ``sharded`` and ``sharded_param_names`` (ZeRO-3 of the replicated
    parameters, see :func:`~tensor_parallel.sharding.shard_replicated`; off unless asked for). Keyword options: ``output_device``,
    ``output_device_index``, ``delay_init``, ``example_inputs``, ``timeout`` (seconds at a
    collective, see :class:`TensorParallel`), ``process_group``, ``cuda_graphs`` (replay calls without gradients as CUDA graphs, see :mod:`tensor_parallel.graphs`;
    a transformers model then generates with a static KV cache).

    Example::

        >>> import torch, tensor_parallel as tp
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
        >>> model = tp.tensor_parallel(mlp, ["cpu", "cpu"])
        >>> model(torch.randn(2, 8)).shape
        torch.Size([2, 8])
    """
    allowed = {"timeout", "process_group", "output_device_index", "delay_init", "example_inputs", "cuda_graphs"}
    unknown = set(options) - allowed
    if unknown:
        raise TypeError(f"tensor_parallel() got unexpected options {sorted(unknown)}; it accepts "
                        f"device_ids, tensor_parallel_config, distributed, sharded, sharded_param_names, "
                        f"plan, output_device and {sorted(allowed)}")
    if distributed:
        _check_distributed_request(device_ids, options.get("process_group"))
    legacy = dict(tensor_parallel_config=tensor_parallel_config, distributed=distributed,
                  sharded=sharded, sharded_param_names=sharded_param_names)
    if _is_peft_model(module):  # split the model inside, adapters included; a peft model comes back
        from .hf.peft import split_peft_model
        return split_peft_model(module, device_ids, plan=plan, output_device=output_device, **legacy, **options)
    if _is_hf_pretrained(module):
        from .hf import TensorParallelPreTrainedModel
        model: nn.Module = TensorParallelPreTrainedModel(module, device_ids, output_device=output_device,
                                                         plan=plan, **legacy, **options)
        multi_process = model.wrapped_model.distributed
    else:
        model = TensorParallel(module, device_ids, output_device=output_device, plan=plan, **legacy, **options)
        multi_process = model.distributed
    if multi_process:  # the original returned (module, names) here: unpacking still works, with a warning
        allow_legacy_unpacking(model)
    return model


def _check_distributed_request(device_ids: Sequence[DeviceLike] | None, process_group: Any) -> None:
    """``distributed=True``: one process per rank, so torch.distributed must be initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("distributed=True splits over the processes of a torch.distributed job, but "
                         "torch.distributed is not initialised; launch with torchrun and call "
                         "torch.distributed.init_process_group() first, or pass device_ids to split "
                         "over the devices of this process")
    if device_ids is not None and len(device_ids) != 1:
        raise ValueError(f"distributed=True: each process holds one rank, so device_ids must be None or "
                         f"this rank's one device, got {list(device_ids)}")
