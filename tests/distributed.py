"""A small spawn helper: run a function on N gloo ranks on localhost, bounded in time."""

from __future__ import annotations

import datetime
import multiprocessing
import os
import socket
import time
import traceback
from typing import Any, Callable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(fn, rank: int, world_size: int, port: int, args: tuple, results, pg_timeout: float) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # ranks share 2 cores
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=pg_timeout))
        results.put((rank, "ok", fn(rank, world_size, *args)))
    except BaseException as error:  # reported to the test, never lost in a child
        results.put((rank, "error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 180.0,
              pg_timeout: float = 60.0) -> dict[int, tuple[str, Any]]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` forked processes joined by gloo.

    Returns {rank: ("ok", result) or ("error", traceback)}; kills every rank still running
    after ``timeout`` seconds and reports it as ("timeout", None).
    """
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=_entry, args=(fn, r, world_size, port, args, results, pg_timeout))
                 for r in range(world_size)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout
    collected: dict[int, tuple[str, Any]] = {}
    while len(collected) < world_size and time.monotonic() < deadline:
        try:
            rank, status, value = results.get(timeout=0.5)
            collected[rank] = (status, value)
        except Exception:
            if all(not p.is_alive() for p in processes) and results.empty():
                break
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()
    for rank in range(world_size):
        collected.setdefault(rank, ("timeout", None))
    return collected


def assert_all_ok(results: dict[int, tuple[str, Any]]) -> list[Any]:
    failures = {r: v for r, (s, v) in results.items() if s != "ok"}
    assert not failures, "\n".join(f"rank {r}: {results[r][0]}: {v}" for r, v in failures.items())
    return [results[r][1] for r in sorted(results)]
