"""Bad input is refused at wrap time with a ValueError/TypeError that says what to change."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import torch
from torch import nn

import tensor_parallel as tp


def small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4), nn.LayerNorm(4))


@pytest.mark.parametrize("device_ids, error, words", [
    ([], ValueError, "empty"),
    ("cpu", TypeError, "list of devices"),
    (["cpu", 3.5], TypeError, "int, a str or a torch.device"),
    (["cpu", "tpu:0"], ValueError, "not a device"),
    (["cpu", "meta"], ValueError, "meta"),
    (["cuda:7", "cuda:8"], ValueError, "CUDA device"),
    ([0, 1], ValueError, "CUDA device"),
])
def test_bad_device_ids(device_ids, error, words):
    if torch.cuda.is_available() and words == "CUDA device":
        pytest.skip("this machine has GPUs")
    with pytest.raises(error, match=words):
        tp.tensor_parallel(small(), device_ids)


def test_no_gpu_and_no_device_ids():
    if torch.cuda.is_available():
        pytest.skip("this machine has GPUs")
    with pytest.raises(ValueError, match=r"\['cpu', 'cpu'\]"):
        tp.tensor_parallel(small())


def test_mixed_device_types():
    with pytest.raises(ValueError, match="mixes device types"):
        tp.parse_devices(["cpu", torch.device("cuda", 0)])


def test_plan_pattern_matching_nothing_names_the_paths():
    with pytest.raises(ValueError, match=r"'mlp\.\*' matches no module of Sequential; .*'0', '1'"):
        tp.tensor_parallel(small(), ["cpu", "cpu"], plan={"mlp.*": tp.ColwiseParallel()})


@pytest.mark.parametrize("plan, words", [
    ({"3": tp.RowwiseParallel()}, r"RowwiseParallel cannot split '3' \(LayerNorm\)"),
    ({"1": tp.ColwiseParallel()}, r"ColwiseParallel cannot split '1' \(ReLU\)"),
    ({"0": tp.EmbeddingParallel()}, r"EmbeddingParallel cannot split '0' \(Linear\)"),
    ({"0": tp.ColwiseParallel(unit=3)}, r"8 features are not 1 blocks of whole units of 3"),
])
def test_style_on_a_layer_it_cannot_split(plan, words):
    with pytest.raises((TypeError, ValueError), match=words):
        tp.tensor_parallel(small(), ["cpu", "cpu"], plan=plan)


def test_plan_values_must_be_styles():
    with pytest.raises(TypeError, match="must map a str pattern to a Style"):
        tp.tensor_parallel(small(), ["cpu", "cpu"], plan={"0": "split 0"})
    with pytest.raises(TypeError, match="plan must be a dict"):
        tp.tensor_parallel(small(), ["cpu", "cpu"], plan=[("0", tp.ColwiseParallel())])


def test_custom_forward_subclass_is_refused():
    class Scaled(nn.Linear):
        def forward(self, x):
            return super().forward(x) * self.out_features

    with pytest.raises(TypeError, match="register_linear_kind"):
        tp.tensor_parallel(nn.Sequential(Scaled(3, 4)), ["cpu", "cpu"], plan={"0": tp.ColwiseParallel()})


def test_embedding_with_max_norm_is_refused_and_replicated_by_default():
    module = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0))
    with pytest.raises(TypeError, match="max_norm"):
        tp.tensor_parallel(module, ["cpu", "cpu"], plan={"0": tp.EmbeddingParallel()})
    assert tp.plan_for(module) == {}


def test_tied_weights_cut_differently_are_refused():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    module = nn.Sequential(emb, head)
    with pytest.raises(ValueError, match=r"'0.weight' and '1.weight' share one tensor"):
        tp.tensor_parallel(module, ["cpu", "cpu"], plan={"0": tp.EmbeddingParallel(dim=1)})


def test_unknown_option_and_not_a_module():
    with pytest.raises(TypeError, match="unexpected options"):
        tp.tensor_parallel(small(), ["cpu", "cpu"], shard_everything=True)
    with pytest.raises(TypeError, match="splits an nn.Module"):
        tp.tensor_parallel(lambda x: x, ["cpu", "cpu"])


def test_meta_input_is_refused():
    model = tp.tensor_parallel(small(), ["cpu", "cpu"])
    with pytest.raises(ValueError, match="'meta' device"):
        model(torch.empty(2, 4, device="meta"))


def test_an_error_on_one_rank_reaches_the_caller_without_hanging():
    class MayFail(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 4)
            self.fail = False

        def forward(self, x):
            h = self.a(x)
            if self.fail:
                raise RuntimeError("boom on purpose")
            return self.b(h)

    model = tp.tensor_parallel(MayFail(), ["cpu"] * 3)
    model.module_shards[1].fail = True  # rank 1 fails; ranks 0 and 2 wait in the all-reduce of b
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="boom on purpose") as info:
        model(torch.randn(2, 4))
    assert time.monotonic() - start < 5
    assert "rank 1" in "".join(getattr(info.value, "__notes__", []))
    model.module_shards[1].fail = False  # the model works again afterwards
    assert model(torch.randn(2, 4)).shape == (2, 4)


def test_worker_threads_end_with_the_model():
    import gc
    before = {t.name for t in threading.enumerate()}
    model = tp.tensor_parallel(small(), ["cpu"] * 3)
    model(torch.randn(1, 4))
    del model
    gc.collect()
    time.sleep(0.2)
    assert not [t for t in threading.enumerate()
                if t.name.startswith("tensor_parallel-rank") and t.name not in before]


@pytest.mark.parametrize("rank", [0, 1])
def test_keyboard_interrupt_stops_every_rank(rank):
    class Interrupted(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 4)
            self.stop = False

        def forward(self, x):
            h = self.a(x)
            if self.stop:
                raise KeyboardInterrupt
            return self.b(h)

    model = tp.tensor_parallel(Interrupted(), ["cpu"] * 3)
    model.module_shards[rank].stop = True
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        model(torch.randn(2, 4))
    assert time.monotonic() - start < 5
    model.module_shards[rank].stop = False
    assert model(torch.randn(2, 4)).shape == (2, 4)


def test_a_collective_wait_times_out_with_a_clear_error():
    class Stalls(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 4)
            self.stall = False

        def forward(self, x):
            if self.stall:
                time.sleep(1.5)
            return self.b(self.a(x))

    model = tp.tensor_parallel(Stalls(), ["cpu"] * 2, timeout=0.5)
    model.module_shards[1].stall = True
    with pytest.raises(tp.CollectiveError, match=r"waited 0 s in all_reduce.*raise timeout="):
        model(torch.randn(2, 4))
    model.module_shards[1].stall = False
    time.sleep(1.5)
    assert model(torch.randn(2, 4)).shape == (2, 4)


def _run_ranks(world_size, body):
    """``body(rank, communicator)`` on ``world_size`` threads; every result or error, by rank."""
    from tensor_parallel.comm import ThreadGroup

    group = ThreadGroup(["cpu"] * world_size, timeout=10.0)
    results = [None] * world_size

    def run(rank):
        try:
            results[rank] = body(rank, group.communicator(rank))
        except BaseException as error:  # kept for the assertions
            results[rank] = error
            group.abort(error)
    threads = [threading.Thread(target=run, args=(r,)) for r in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads), "a rank never returned"
    return results


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_thread_collectives_stay_in_step_under_a_long_run(world_size):
    steps = 400

    def body(rank, comm):
        sums = []
        for step in range(steps):  # ranks race: a rank may come back for step + 1 while others wait
            if (step + rank) % 7 == 0:
                time.sleep(0.0005)
            sums.append(comm.all_reduce(torch.tensor([float(step * 10 + rank)])).item())
            gathered = comm.all_gather(torch.tensor([float(rank)]), 0, [1] * world_size)
            assert gathered.tolist() == list(range(world_size))
        return sums

    results = _run_ranks(world_size, body)
    expected = [sum(step * 10 + r for r in range(world_size)) for step in range(steps)]
    assert results == [expected] * world_size  # every rank got every step's own sum


def test_ranks_calling_different_collectives_all_fail_naming_them():
    def body(rank, comm):
        if rank == 1:
            return comm.all_gather(torch.ones(2), 0, [2, 2, 2])
        return comm.all_reduce(torch.ones(2))

    start = time.monotonic()
    results = _run_ranks(3, body)
    assert time.monotonic() - start < 5
    assert all(isinstance(r, tp.CollectiveError) for r in results)
    assert all("ranks called different collectives" in str(r) for r in results)


def test_a_failing_rank_releases_the_ranks_already_waiting():
    def body(rank, comm):
        if rank == 2:
            time.sleep(0.2)  # ranks 0 and 1 are waiting in the all-reduce by now
            raise RuntimeError("rank 2 broke")
        return comm.all_reduce(torch.ones(2))

    start = time.monotonic()
    results = _run_ranks(3, body)
    assert time.monotonic() - start < 5
    assert isinstance(results[2], RuntimeError)
    for waiting in results[:2]:
        assert isinstance(waiting, tp.CollectiveError) and "rank 2 broke" in str(waiting)


class _Slow(nn.Module):
    """A Megatron pair whose shard sleeps ``delay`` seconds before the row split's all-reduce."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 4)
        self.delay = 0.0

    def forward(self, x):
        h = self.a(x)
        time.sleep(self.delay)  # the other ranks reach b's all-reduce first and wait there
        return self.b(h)


def test_ctrl_c_while_a_rank_waits_in_a_collective_leaves_the_model_working():
    import os
    import signal

    import copy

    torch.manual_seed(0)
    reference = _Slow()
    model = tp.tensor_parallel(copy.deepcopy(reference), ["cpu"] * 2)
    model.module_shards[1].delay = 1.0
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))  # Ctrl-C while rank 0 waits
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        model(torch.randn(2, 4))
    timer.join()
    for step in range(6):  # no wake-up left over: every call waits for its own all-reduce
        model.module_shards[1].delay = 0.05 * (step % 2)  # rank 0 waits in every other call
        x = torch.randn(3, 4)
        # a sum of 2 partial products instead of one dot product: float32 rounding, 1e-6
        torch.testing.assert_close(model(x), reference(x), atol=1e-6, rtol=1e-6)


def test_a_rank_left_waiting_by_an_aborted_call_never_returns_an_older_result():
    from tensor_parallel.comm import ThreadGroup

    group = ThreadGroup(["cpu"] * 2, timeout=2.0)
    out = [None, None]

    def rank(r, value):
        try:
            out[r] = group.exchange(r, "all_reduce", torch.tensor([value]), lambda xs: [sum(xs)] * 2)
        except tp.CollectiveError as error:
            out[r] = error
    for _ in range(20):
        group.reset()
        pair = [threading.Thread(target=rank, args=(r, 1.0 + r)) for r in range(2)]
        for thread in pair:
            thread.start()
        for thread in pair:
            thread.join()
        assert [o.item() for o in out] == [3.0, 3.0]  # one collective completed: its result, 3
        late = threading.Thread(target=rank, args=(1, 100.0))  # rank 1 waits in the next one
        late.start()
        while not group._waiting[1]:
            time.sleep(0)
        group.abort(RuntimeError("the call failed"))
        group.reset()  # the next call starts before rank 1 has woken up
        late.join(timeout=10)
        assert isinstance(out[1], tp.CollectiveError), out[1]  # never the earlier 3


def test_a_failing_rank_aborts_before_its_call_counts_as_done():
    from tensor_parallel.runtime import _Call

    seen = []

    def fail():
        raise ValueError("boom")
    call = _Call(fail, contextlib.nullcontext, on_error=lambda error: seen.append(call.done.is_set()))
    call()
    # the caller may start the next call as soon as done is set: the abort must be in by then
    assert seen == [False] and call.done.is_set() and isinstance(call.error, ValueError)


def test_an_interrupted_call_with_a_rank_still_running_does_not_disturb_the_next():
    import copy
    import os
    import signal

    torch.manual_seed(0)
    reference = _Slow()
    model = tp.tensor_parallel(copy.deepcopy(reference), ["cpu"] * 2, timeout=0.5)
    model.module_shards[1].delay = 1.5  # rank 1 computes for 1.5 s, longer than the 0.5 s timeout
    for at in (0.2, 0.4):  # Ctrl-C twice: rank 0's wait in the all-reduce, then the wait for rank 1
        threading.Timer(at, os.kill, (os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        model(torch.randn(2, 4))
    time.sleep(0.2)  # both signals delivered; rank 1 is still in its 1.5 s
    model.module_shards[1].delay = 0.0
    x = torch.randn(3, 4)
    # the next call waits for rank 1's old call to stop, then runs on its own
    # (a sum of 2 partial products instead of one dot product: float32 rounding, 1e-6)
    torch.testing.assert_close(model(x), reference(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("timeout, error, words", [
    (0, ValueError, "more than 0 seconds"),
    (-1.0, ValueError, "more than 0 seconds"),
    ("10", TypeError, "number of seconds or None"),
])
def test_a_bad_timeout_is_refused_when_wrapping(timeout, error, words):
    with pytest.raises(error, match=words):
        tp.tensor_parallel(small(), ["cpu"] * 2, timeout=timeout)


@pytest.mark.parametrize("timeout", [None, float("inf"), 1e10])
def test_no_limit_and_huge_timeouts_run(timeout):
    model = tp.tensor_parallel(small(), ["cpu"] * 2, timeout=timeout)
    # partial sums added over 2 ranks instead of one dot product: float32 rounding, 1e-6
    torch.testing.assert_close(model(torch.ones(2, 4)), small()(torch.ones(2, 4)), atol=1e-6, rtol=1e-6)


def test_integer_weights_cannot_be_split_and_are_replicated_by_default():
    layer = nn.Linear(4, 4)
    layer.weight = nn.Parameter(layer.weight.data.to(torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="its weight is torch.int8"):
        tp.tensor_parallel(nn.Sequential(layer), ["cpu", "cpu"], plan={"0": tp.ColwiseParallel()})
    assert tp.plan_for(nn.Sequential(layer)) == {}


def test_creating_and_deleting_models_does_not_leak():
    import gc

    def rss():
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * 4096

    def cycle():
        model = tp.tensor_parallel(nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 256)), ["cpu"] * 3)
        model(torch.randn(4, 256)).sum().backward()
        del model
        gc.collect()

    for _ in range(3):
        cycle()
    before = rss()
    for _ in range(20):
        cycle()
    # each model holds 2 MB of weights and gradients: 20 leaked models would add 40+ MB
    assert rss() - before < 16 * 2**20
    assert len([t for t in threading.enumerate() if t.name.startswith("tensor_parallel-rank")]) < 4


def test_too_old_transformers_is_refused_at_import_with_the_version_to_install():
    import pathlib
    import re

    from tensor_parallel.hf import OLDEST_TRANSFORMERS, _check_transformers_version

    pyproject = (pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text()
    bounds = set(re.findall(r'"transformers>=([0-9.]+)"', pyproject))
    assert bounds == {".".join(map(str, OLDEST_TRANSFORMERS))}  # the bound CI tests is the one enforced
    with pytest.raises(ImportError, match=r"needs transformers>=5\.10, found 5\.9\.1; upgrade it"):
        _check_transformers_version("5.9.1")
    with pytest.raises(ImportError, match=r"found 5\.9\.0rc1"):
        _check_transformers_version("5.9.0rc1")
    for version in ("5.10.4", "5.10rc1", "5.10.0.dev0", "5.24.0", "6.0.0.dev0", "10.1"):
        _check_transformers_version(version)
