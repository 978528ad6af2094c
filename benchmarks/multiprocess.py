"""Multi-process benchmark: our torch.distributed mode against transformers' own tensor
parallelism (``from_pretrained(path, tp_plan="auto")``), both under torchrun with 2 gloo ranks
on this machine's CPU, and the unsharded model, side by side in one run.

The model is a Llama-architecture model of about 170M parameters built from a config (hidden
1024, 8 layers, 16 heads, vocabulary 32000, float32), saved once. Measured: forward latency for
128 tokens (median of 5 after a warm-up) and greedy decode time for 32 new tokens (median of 3).
The two ranks of each TP run use one intra-op thread each; the unsharded model uses both cores.

Run: ``python -m benchmarks.multiprocess`` (writes benchmarks/results/multiprocess.md,
.png, .json and a copy in benchmarks/results/history/).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.common import RESULTS, write_report

logger = logging.getLogger("benchmarks.multiprocess")


def _prompt():
    import torch

    return torch.randint(3, 32000, (1, 128), generator=torch.Generator().manual_seed(0))


def time_one(model, what: str) -> float:
    """Seconds of one forward of 128 tokens (``what="forward"``) or of one greedy decode of 32
    new tokens after an 8-token prompt (``"decode"``). Every contender is timed by this code."""
    import torch

    prompt = _prompt()
    with torch.no_grad():
        start = time.perf_counter()
        if what == "forward":
            model(prompt)
        else:
            model.generate(prompt[:, :8], max_new_tokens=32, min_new_tokens=32, do_sample=False)
        return time.perf_counter() - start


def warm_up(model) -> None:
    """One forward and one short decode: first-call costs stay out of the timings."""
    import torch

    with torch.no_grad():
        model(_prompt())
        model.generate(_prompt()[:, :8], max_new_tokens=4, min_new_tokens=4, do_sample=False)


def measure(model, repeats: int = 5) -> dict:
    """Forward latency (128 tokens, median of ``repeats``) and greedy decode time (32 new
    tokens, median of 3), in seconds, after a warm-up."""
    warm_up(model)
    forwards = [time_one(model, "forward") for _ in range(repeats)]
    decodes = [time_one(model, "decode") for _ in range(3)]
    return {"forward_128": statistics.median(forwards), "decode_32": statistics.median(decodes)}


def worker(mode: str, path: str, out: str) -> None:
    """One rank (or the single unsharded process)."""
    import torch
    import transformers

    if mode == "unsharded":
        torch.set_num_threads(2)
        model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    elif mode == "ours":
        import torch.distributed as dist

        import tensor_parallel as tp

        torch.set_num_threads(1)
        dist.init_process_group("gloo")
        model = tp.from_pretrained(path, progress=False)
    else:
        torch.set_num_threads(1)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, tp_plan="auto").eval()
    result = measure(model)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out, "w") as handle:
            json.dump(result, handle)


def _prepare(folder: str) -> str:
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                                      num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16)
    torch.manual_seed(0)
    path = os.path.join(folder, "llama-170m")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def _run(mode: str, path: str, folder: str) -> dict:
    out = os.path.join(folder, f"{mode}.json")
    command = [sys.executable, "-m", "benchmarks.multiprocess", "--worker", mode, path, out]
    if mode != "unsharded":
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                   "--master-port", "29533", "-m", "benchmarks.multiprocess", "--worker", mode, path, out]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1500,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if done.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{done.stderr[-3000:]}")
    with open(out) as handle:
        return json.load(handle)


def _report(results: dict, command: str) -> str:
    base = results["unsharded"]
    lines = [
        f"# Multi-process benchmark, {datetime.date.today()}",
        "",
        f"Llama architecture, 170M "
        f"parameters, float32; 2 ranks with gloo under torchrun, one thread each; unsharded: one "
        f"process, {os.cpu_count()} threads.",
        "",
        f"Command: `{command}`",
        "",
        "| run | forward, 128 tokens (s) | ratio to unsharded | greedy decode, 32 tokens (s) | ratio to unsharded |",
        "|---|---|---|---|---|",
    ]
    names = {"unsharded": "unsharded", "ours": "tensor_parallel, 2 ranks",
             "hf": "transformers tp_plan=\"auto\", 2 ranks"}
    for mode in ("unsharded", "ours", "hf"):
        r = results.get(mode)
        if r is None:
            lines.append(f"| {names[mode]} | failed | | | |")
            continue
        lines.append(f"| {names[mode]} | {r['forward_128']:.3f} | {r['forward_128'] / base['forward_128']:.2f} | "
                     f"{r['decode_32']:.2f} | {r['decode_32'] / base['decode_32']:.2f} |")
    if "hf" in results:
        lines += ["", f"Ours against transformers' TP: forward {results['hf']['forward_128'] / results['ours']['forward_128']:.2f}x "
                      f"as fast, decode {results['hf']['decode_32'] / results['ours']['decode_32']:.2f}x as fast."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=3, metavar=("MODE", "PATH", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--results", default=RESULTS, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        logger.info("saving the model once ...")
        path = _prepare(folder)
        for mode in ("unsharded", "ours", "hf"):
            logger.info("measuring %s ...", mode)
            try:
                results[mode] = _run(mode, path, folder)
            except RuntimeError as error:
                logger.error("%s", error)
    report = _report(results, "python -m benchmarks.multiprocess")
    write_report("multiprocess", report, data=results, results=args.results, marks={"ratio": 1.0},
                 columns=("ratio",))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
