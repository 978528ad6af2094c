"""CUDA graphs of a split model's calls (one process, one thread per GPU).

In one process every rank's kernels are launched from one interpreter, so a small step
(a decode step at batch 1) is bound by launch overhead, not by the GPUs. With
``cuda_graphs=True`` a split model records each rank's kernels once and replays them:

* The first call with a given input signature (shapes, dtypes, devices, the other arguments'
  values, and the identity of rank-local objects such as a static KV cache) runs eagerly.
* The second captures. Each rank records its work *between collectives* as CUDA graphs on a
  stream of its own (one capture per rank thread, ``thread_local`` mode, a private memory
  pool per rank). A collective ends the rank's current graph, runs as an ordinary rendezvous
  into static output buffers, and the next graph starts after it. The graphs are then
  replayed once for the result.
* Later calls copy the inputs into static buffers and replay: per rank, one graph launch per
  segment and, per collective, the sum or concatenation into its static buffers, ordered by
  CUDA events (ready event of every rank -> the collective's streams -> done events).

So each call still runs the forward exactly once, the collectives are the same (and counted
by :func:`~tensor_parallel.count_collectives`), and ranks on different GPUs work as ranks on
one GPU do. What cannot be captured (a forward that reads a value on the CPU, ``.item()``,
or allocates from the host) is found at capture: that signature then stays eager, with one
warning. As with any CUDA graph, Python-side effects of the forward (counters held in Python
ints) happen at capture only; tensors updated in place (a static KV cache) are replayed.
Calls with gradients enabled always run eagerly.

This module does not import transformers; :mod:`tensor_parallel.hf.model` gives its KV
cache a graph key and turns on the static cache.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Sequence

import torch
from torch.utils import _pytree as pytree

from .comm import ThreadGroup, record_collective

__all__ = ["GraphedCalls", "graph_key"]

logger = logging.getLogger(__name__)

#: captured signatures kept per model (least recently used dropped first)
MAX_GRAPHS = 8


def graph_key(value: Any) -> Hashable | None:
    """What a non-tensor argument contributes to a call's signature: itself when hashable, the
    object's ``graph_key()`` when it has one (a rank-local KV cache: the addresses of its
    tensors), else ``None`` (the call is not captured).

    Example::

        >>> from tensor_parallel.graphs import graph_key
        >>> graph_key(3), graph_key("x"), graph_key([1, 2]) is None
        (3, 'x', True)
    """
    method = getattr(value, "graph_key", None)
    if callable(method):
        return method()
    try:
        hash(value)
    except TypeError:
        return None
    return value


@dataclass
class _Streams:
    """The streams and events of one split model's replays."""

    devices: list[torch.device]
    rank: list[torch.cuda.Stream] = field(init=False)
    collective: dict[torch.device, torch.cuda.Stream] = field(init=False)
    ready: list[torch.cuda.Event] = field(init=False)
    done: dict[torch.device, torch.cuda.Event] = field(init=False)

    def __post_init__(self) -> None:
        self.rank = [torch.cuda.Stream(d) for d in self.devices]
        self.collective = {d: torch.cuda.Stream(d) for d in dict.fromkeys(self.devices)}
        self.ready = [torch.cuda.Event() for _ in self.devices]
        self.done = {d: torch.cuda.Event() for d in self.collective}

    def after_callers(self) -> None:
        """Rank streams wait for the caller's current streams (the inputs were copied there)."""
        for stream, device in zip(self.rank, self.devices):
            stream.wait_stream(torch.cuda.current_stream(device))

    def callers_after(self) -> None:
        """The caller's current streams wait for every rank's stream (the outputs)."""
        for stream, device in zip(self.rank, self.devices):
            torch.cuda.current_stream(device).wait_stream(stream)

    def wait_done(self, rank: int) -> None:
        """Rank ``rank``'s stream waits for the last collective on every device."""
        for event in self.done.values():
            self.rank[rank].wait_event(event)

    def synchronize(self) -> None:
        for device in self.collective:
            torch.cuda.synchronize(device)


def _result_shape(kind: str, dim: int | None, inputs: Sequence[torch.Tensor]) -> list[int]:
    shape = list(inputs[0].shape)
    if kind == "all_gather":
        shape[dim] = sum(x.shape[dim] for x in inputs)
    return shape


def _compute_into(kind: str, dim: int | None, inputs: Sequence[torch.Tensor], outs: Sequence[torch.Tensor],
                  streams: _Streams, ready: Sequence[torch.cuda.Event]) -> None:
    """The collective, into every rank's static buffer, on the collective streams: sums in
    rank order (as the eager all-reduce, so results are bit-identical), once per device."""
    for stream in streams.collective.values():
        for event in ready:
            stream.wait_event(event)
    with contextlib.ExitStack() as stack:
        for stream in streams.collective.values():
            stack.enter_context(torch.cuda.stream(stream))
        first: dict[torch.device, torch.Tensor] = {}
        for out in outs:
            if out.device in first:
                out.copy_(first[out.device])
                continue
            first[out.device] = out
            if kind == "all_gather":
                torch.cat([x.to(out.device) for x in inputs], dim, out=out)
            elif len(inputs) == 1:
                out.copy_(inputs[0])
            else:
                torch.add(inputs[0].to(out.device), inputs[1].to(out.device), out=out)
                for x in inputs[2:]:
                    out.add_(x.to(out.device))
    for device, stream in streams.collective.items():
        streams.done[device].record(stream)


@dataclass
class _RankProgram:
    """One rank's captured call: graphs between collectives, and the collectives' buffers.
    Captures begin and end on the rank's stream, whatever stream the forward made current."""

    rank: int
    pool: Any
    stream: torch.cuda.Stream
    graphs: list[torch.cuda.CUDAGraph] = field(default_factory=list)
    collectives: list[tuple[str, int | None, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    open: torch.cuda.CUDAGraph | None = None
    output: Any = None

    def begin(self) -> None:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(self.stream):
            graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
        self.open = graph

    def end(self) -> None:
        with torch.cuda.stream(self.stream):
            self.open.capture_end()
        self.graphs.append(self.open)
        self.open = None

    def abandon(self) -> None:
        """End a capture cut short by an error (the error in flight is the one reported)."""
        graph, self.open = self.open, None
        if graph is not None:
            try:
                with torch.cuda.stream(self.stream):
                    graph.capture_end()
            except RuntimeError:
                pass


class _Capture:
    """The collectives' side of one capture: attached to the thread group while it runs."""

    def __init__(self, group: ThreadGroup, streams: _Streams, programs: list[_RankProgram]) -> None:
        self.group, self.streams, self.programs = group, streams, programs

    def collective(self, rank: int, kind: str, tensor: torch.Tensor, dim: int | None) -> torch.Tensor:
        program = self.programs[rank]
        program.end()
        self.streams.ready[rank].record(self.streams.rank[rank])
        out = self.group.exchange(rank, kind, tensor, lambda inputs: self._first_run(kind, dim, inputs))
        self.streams.wait_done(rank)
        program.collectives.append((kind, dim, tensor, out))
        program.begin()
        return out

    def _first_run(self, kind: str, dim: int | None, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        shape = _result_shape(kind, dim, inputs)  # not counted: the replay that follows is
        outs = [torch.empty(shape, dtype=x.dtype, device=x.device) for x in inputs]
        _compute_into(kind, dim, inputs, outs, self.streams, self.streams.ready)
        return outs


@dataclass
class _Captured:
    """A captured signature: the static inputs per device, and every rank's program."""

    static_inputs: dict[torch.device, list[torch.Tensor]]
    programs: list[_RankProgram]
    keep: Any  # the arguments' rank-local objects, alive as long as the graphs use their tensors
    weights: list[tuple[torch.Tensor, int]]  # the model's tensors and their addresses at capture

    def weights_moved(self) -> bool:
        """Whether a parameter or buffer now lives elsewhere (``model.half()``, ``.to(...)``):
        the graphs would read the old addresses."""
        return any(tensor.data_ptr() != address for tensor, address in self.weights)


class GraphedCalls:
    """Captures and replays a split model's calls (see the module's docstring).

    ``run_shards`` asks :meth:`run` first; ``None`` means "run this call eagerly".

    Example (needs CUDA; on CPU a split model refuses ``cuda_graphs=True``)::

        >>> import torch, tensor_parallel as tp
        >>> if torch.cuda.is_available():
        ...     mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).cuda()
        ...     model = tp.tensor_parallel(mlp, ["cuda:0", "cuda:0"], cuda_graphs=True)
        ...     with torch.no_grad():
        ...         outs = [model(torch.ones(2, 8, device="cuda")) for _ in range(3)]  # eager, capture, replay
        ...     assert all(torch.equal(o, outs[0]) for o in outs)
    """

    def __init__(self, group: ThreadGroup, runner: Any, tensors: Callable[[], Iterable[torch.Tensor]],
                 modes: Callable[[], Hashable] = lambda: None, max_graphs: int = MAX_GRAPHS) -> None:
        self.group, self.runner, self.tensors, self.max_graphs = group, runner, tensors, max_graphs
        self.modes = modes  # the model's train/eval mode and the like: part of every signature
        self.devices = list(group.devices)
        self.streams = _Streams(self.devices)
        self.captured: collections.OrderedDict[Hashable, _Captured | str] = collections.OrderedDict()
        self.replays = 0  # calls served by replaying graphs (tests and benchmarks read it)
        self.captures = 0  # signatures captured (a benchmark checks none happens while it times)

    # -- signatures -------------------------------------------------------------------------

    def signature(self, fn: Callable, args: tuple, kwargs: dict) -> Hashable | None:
        """The key of a call, or ``None`` when it cannot be captured."""
        leaves, spec = pytree.tree_flatten((args, kwargs))
        autocast = tuple((torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in ("cuda", "cpu"))
        parts: list[Hashable] = [fn, str(spec), autocast, self.modes()]
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                if leaf.device.type not in ("cuda", "cpu"):
                    return None
                parts.append((tuple(leaf.shape), leaf.dtype, leaf.device, tuple(leaf.stride())))
                continue
            key = graph_key(leaf)
            if key is None and leaf is not None:
                return None
            parts.append((type(leaf), key))
        return tuple(parts)

    # -- running ----------------------------------------------------------------------------

    def run(self, fn: Callable, args: tuple, kwargs: dict,
            bind: Callable[[int, tuple, dict], Callable[[], Any]]) -> list[Any] | None:
        """Every rank's result by replay (capturing first if this signature was seen once), or
        ``None``: run eagerly. ``fn`` identifies the call; ``bind(rank, args, kwargs)`` is that
        rank's call on those arguments (its shard, rank-local arguments resolved)."""
        if torch.is_grad_enabled():
            return None
        key = self.signature(fn, args, kwargs)
        if key is None:
            return None
        entry = self.captured.get(key)
        if entry is None or entry == "eager":
            if entry is None:
                self._remember(key, "seen")
            return None
        self.captured.move_to_end(key)
        if isinstance(entry, _Captured) and entry.weights_moved():
            logger.info("cuda_graphs: the model's tensors moved since capture; capturing again")
            self.clear()
            self._remember(key, "seen")
            return None
        if entry == "seen":
            entry = self._capture(key, args, kwargs, bind)
            if entry is None:
                return None
        return self._replay(entry, args, kwargs)

    def clear(self) -> None:
        """Forget every captured call (they are captured again on their next occurrences). The
        model calls it when its tensors move; call it after changing what the forward does
        in Python (peft's ``set_adapter``, say), which replays cannot see."""
        if any(isinstance(entry, _Captured) for entry in self.captured.values()):
            self.streams.synchronize()
        self.captured.clear()

    def _remember(self, key: Hashable, entry: Any) -> None:
        self.captured[key] = entry
        self.captured.move_to_end(key)
        while len(self.captured) > self.max_graphs:
            _, dropped = self.captured.popitem(last=False)
            if isinstance(dropped, _Captured):
                self.streams.synchronize()  # no replay may still read its buffers

    def _static_inputs(self, args: tuple, kwargs: dict) -> dict[torch.device, list[torch.Tensor]]:
        leaves = pytree.tree_leaves((args, kwargs))
        return {d: [x.to(d, copy=True) for x in leaves if isinstance(x, torch.Tensor)]
                for d in dict.fromkeys(self.devices)}

    def _rank_tree(self, args: tuple, kwargs: dict, static: list[torch.Tensor]) -> tuple[tuple, dict]:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        tensors = iter(static)
        swapped = [next(tensors) if isinstance(x, torch.Tensor) else x for x in leaves]
        return pytree.tree_unflatten(swapped, spec)

    def _capture(self, key, args, kwargs, bind) -> _Captured | None:
        static = self._static_inputs(args, kwargs)
        programs = [_RankProgram(rank, torch.cuda.graph_pool_handle(), self.streams.rank[rank])
                    for rank in range(len(self.devices))]
        capture = _Capture(self.group, self.streams, programs)
        calls = []
        for rank, device in enumerate(self.devices):
            calls.append(self._capturing(programs[rank], bind(rank, *self._rank_tree(args, kwargs, static[device]))))
        restores = [leaf.snapshot() for leaf in pytree.tree_leaves((args, kwargs)) if hasattr(leaf, "snapshot")]
        self.streams.synchronize()
        self.group.capture = capture
        try:
            self.runner.run(calls)
            _check_outputs(programs, calls)
        except Exception as error:  # not capturable: this signature runs eagerly from now on
            logger.warning("cuda_graphs: this call cannot be captured, it runs eagerly (%s: %s)",
                           type(error).__name__, str(error).splitlines()[0] if str(error) else "")
            self._remember(key, "eager")
            self.streams.synchronize()
            _release_generators(self.streams.collective)
            for restore in restores:  # the eager run must find the Python state the capture found
                restore()
            return None
        finally:
            self.group.capture = None
        entry = _Captured(static, programs, keep=[args, kwargs],
                          weights=[(t, t.data_ptr()) for t in self.tensors()])
        self._remember(key, entry)
        self.captures += 1
        return entry

    def _capturing(self, program: _RankProgram, call: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> None:
            with torch.cuda.stream(program.stream):
                program.begin()
                try:
                    program.output = call()
                    program.end()
                except BaseException:
                    program.abandon()
                    raise
        run.call = call  # type: ignore[attr-defined]  # its arguments: what outputs may hold
        return run

    def _replay(self, entry: _Captured, args: tuple, kwargs: dict) -> list[Any]:
        leaves = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        for buffers in entry.static_inputs.values():
            for buffer, leaf in zip(buffers, leaves):
                buffer.copy_(leaf, non_blocking=leaf.device.type != "cpu")  # host memory: read now, as eager
        self.streams.after_callers()
        try:
            self.runner.run([functools.partial(self._replay_rank, program) for program in entry.programs])
        finally:  # also when a rank failed: the caller's next work waits for what was launched
            self.streams.callers_after()
        self.replays += 1
        return [pytree.tree_map(_fresh, program.output) for program in entry.programs]

    def _replay_rank(self, program: _RankProgram) -> None:
        rank, stream = program.rank, program.stream
        with torch.cuda.stream(stream):
            for index, graph in enumerate(program.graphs):
                graph.replay()
                if index == len(program.collectives):
                    break
                kind, dim, tensor, out = program.collectives[index]
                self.streams.ready[rank].record(stream)
                self.group.exchange(rank, kind, (tensor, out), functools.partial(self._replay_collective, kind, dim))
                self.streams.wait_done(rank)

    def _replay_collective(self, kind: str, dim: int | None, items: list[tuple[torch.Tensor, torch.Tensor]]) -> list[None]:
        inputs, outs = [t for t, _ in items], [o for _, o in items]
        record_collective(kind, outs[0].shape, outs[0].dtype)
        _compute_into(kind, dim, inputs, outs, self.streams, self.streams.ready)
        return [None] * len(items)


_PLAIN = (torch.Tensor, bool, int, float, str, torch.dtype, torch.device, type(None))


def _check_outputs(programs: Sequence[_RankProgram], calls: Sequence[Callable[[], None]]) -> None:
    """Outputs may hold tensors (copied for the caller after each replay), plain values, and the
    objects the call was given (a KV cache passed in comes back); any other object (a cache the
    forward made itself) would be the same object on every replay, holding tensors that the
    next replay overwrites: such calls are not replayed."""
    for program, run in zip(programs, calls):
        bound = run.call  # type: ignore[attr-defined]
        given = {id(x) for x in pytree.tree_leaves((bound.args, bound.keywords))}
        for leaf in pytree.tree_leaves(program.output):
            if not isinstance(leaf, _PLAIN) and id(leaf) not in given:
                raise TypeError(f"the output holds a {type(leaf).__name__} made by the forward, which "
                                f"replays would share between calls")


def _release_generators(devices: Iterable[torch.device]) -> None:
    """A capture cut short leaves each device's default random generator in capture mode (its
    epilogue never ran), and every later random op on it fails; one complete capture on each
    device runs the epilogue again."""
    for device in devices:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(torch.cuda.Stream(device)):
            graph.capture_begin()
            torch.ones(1, device=device).add_(1)  # not empty: an empty capture warns
            graph.capture_end()


def _fresh(value: Any) -> Any:
    """A static output is overwritten by the next replay: the caller gets its own copy."""
    return value.clone() if isinstance(value, torch.Tensor) else value
