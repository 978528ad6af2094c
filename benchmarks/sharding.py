"""Training memory per device with and without ``sharded=True`` (ZeRO-3 of replicated parameters).

GPT-2 small (124M parameters, built from its config, float32) takes one AdamW step on 64 tokens,
split over 2 devices, with the built-in plan and with a plan that keeps the (tied) token
embedding whole. Measured after the step, on each device: the bytes of the parameters stored
there (``tp.parameters_by_device``), of their gradients and of AdamW's state, in both modes:

* one process, devices ``cpu:0`` and ``cpu:1`` (distinct devices: replicated tensors live once,
  on the first one, and the other copies them in forward);
* torch.distributed, 2 gloo ranks (every rank holds its own copy of the replicated tensors).

Run: ``python -m benchmarks.sharding`` (writes benchmarks/results/sharding-<date>.md).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import multiprocessing
import os
import platform
import socket

from benchmarks.common import write_report

logger = logging.getLogger("benchmarks.sharding")
MB = 1e6


def _model():
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # gpt2 (124M)
    return transformers.GPT2LMHeadModel(config)


def _plan(model, plan_name: str):
    from tensor_parallel.hf.plans import plan_for_pretrained

    plan = plan_for_pretrained(model, 2)
    if plan_name == "embedding whole":
        plan = {path: style for path, style in plan.items() if path not in ("transformer.wte", "lm_head")}
    return plan


def _bytes(model, optimizer) -> dict[str, dict[str, int]]:
    """Per device: parameter, gradient and AdamW-state bytes of the parameters stored there."""
    import tensor_parallel as tp

    out = {}
    for device, params in tp.parameters_by_device(model).items():
        state = [t for p in params for t in optimizer.state.get(p, {}).values() if t.dim() > 0]
        out[device] = {"parameters": sum(p.numel() * p.element_size() for p in params),
                       "gradients": sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None),
                       "optimizer": sum(t.numel() * t.element_size() for t in state)}
    return out


def _step(model) -> None:
    import torch

    ids = torch.randint(0, 50257, (1, 64), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    return optimizer


def measure_threads(plan_name: str, sharded: bool) -> dict[str, dict[str, int]]:
    import tensor_parallel as tp

    model = _model()
    split = tp.tensor_parallel(model, ["cpu:0", "cpu:1"], plan=_plan(model, plan_name), sharded=sharded)
    return _bytes(split, _step(split))


def _rank(rank: int, port: int, plan_name: str, sharded: bool, results) -> None:
    import datetime as dt

    import torch
    import torch.distributed as dist

    import tensor_parallel as tp

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=dt.timedelta(seconds=300))
    try:
        model = _model()
        split = tp.tensor_parallel(model, plan=_plan(model, plan_name), sharded=sharded)
        del model
        results.put((rank, _bytes(split, _step(split))))
    finally:
        dist.destroy_process_group()


def measure_distributed(plan_name: str, sharded: bool) -> dict[str, dict[str, int]]:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ranks = [context.Process(target=_rank, args=(r, port, plan_name, sharded, results)) for r in range(2)]
    for process in ranks:
        process.start()
    out = {}
    for _ in ranks:
        rank, sizes = results.get(timeout=600)
        out[rank] = next(iter(sizes.values()))
    for process in ranks:
        process.join()
    return {f"rank {rank}": out[rank] for rank in sorted(out)}


def measure_unsharded() -> dict[str, int]:
    model = _model()
    optimizer = _step(model)
    params = list(model.parameters())
    return {"parameters": sum(p.numel() * p.element_size() for p in params),
            "gradients": sum(p.grad.numel() * p.grad.element_size() for p in params),
            "optimizer": sum(t.numel() * t.element_size() for p in params for t in optimizer.state[p].values()
                             if t.dim() > 0)}


def _row(label: str, device: str, sizes: dict[str, int]) -> str:
    total = sum(sizes.values())
    return (f"| {label} | {device} | {sizes['parameters'] / MB:.1f} | {sizes['gradients'] / MB:.1f} | "
            f"{sizes['optimizer'] / MB:.1f} | {total / MB:.1f} |")


def report() -> str:
    import torch

    lines = [f"# Training memory per device with sharded=True ({datetime.date.today()})", "",
             "`python -m benchmarks.sharding`", "",
             f"GPT-2 small (124M parameters, float32), one AdamW step on 64 tokens, 2 devices; "
             f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} cores.", "",
             "| run | device | parameters (MB) | gradients (MB) | AdamW state (MB) | total (MB) |",
             "|---|---|---|---|---|---|"]
    lines.append(_row("unsharded", "cpu", measure_unsharded()))
    for plan_name in ("built-in plan", "embedding whole"):
        for mode, measure in (("one process", measure_threads), ("torch.distributed", measure_distributed)):
            for sharded in (False, True):
                logger.info("measuring %s, %s, sharded=%s", plan_name, mode, sharded)
                for device, sizes in measure(plan_name, sharded).items():
                    lines.append(_row(f"{plan_name}, {mode}, sharded={sharded}", device, sizes))
    lines += ["", "Replicated tensors: with the built-in plan the position embedding (3.1 MB), the "
              "LayerNorms and the biases of row splits; with the embedding whole also the tied "
              "token embedding (154 MB). In one process they live once, on the first device; under "
              "torch.distributed once per rank. sharded=True stores each once, half on each device.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="report path (default: benchmarks/results/sharding-<date>.md)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_report("sharding", report(), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
