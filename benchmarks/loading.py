"""Loading benchmark: time and peak RAM of the ways to get a split model from disk.

Builds a ~0.6 GB Llama-architecture model from a config once, saves it (100 MB files) and its
2-device split state, then measures each way in a fresh subprocess, side by side in one run:

* ``transformers``: plain ``AutoModelForCausalLM.from_pretrained`` of the unsharded model;
* ``transformers + split``: the same, then ``tp.tensor_parallel(model, ["cpu", "cpu"])``;
* ``seed flow``: the seed document's ``init_empty_weights`` + ``load_checkpoint_in_model``;
* ``tp.from_pretrained``: our one-call loader, reading each device's slice.

Run: ``python -m benchmarks.loading`` (writes benchmarks/results/loading.md, .png, .json and a
copy in benchmarks/results/history/).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import subprocess
import sys
import tempfile
import textwrap

from benchmarks.common import RESULTS, write_report

logger = logging.getLogger("benchmarks.loading")


_RUN = textwrap.dedent("""
    import json, os, sys, time
    import torch, transformers, accelerate, tensor_parallel as tp, tensor_parallel.hf

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    hf, split, way = sys.argv[1], sys.argv[2], sys.argv[3]
    baseline = status("VmRSS")
    start = time.perf_counter()
    if way == "transformers":
        model = transformers.AutoModelForCausalLM.from_pretrained(hf)
    elif way == "transformers + split":
        model = tp.tensor_parallel(transformers.AutoModelForCausalLM.from_pretrained(hf), ["cpu", "cpu"])
    elif way == "seed flow":
        from accelerate import init_empty_weights, load_checkpoint_in_model
        with init_empty_weights():
            model = tp.TensorParallelPreTrainedModel(
                transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(split)),
                device_ids=["cpu", "cpu"])
        load_checkpoint_in_model(model, checkpoint=os.path.join(split, "pytorch_model.bin.index.json"),
                                 device_map=tp.infer_sharded_device_map(model))
    else:
        model = tp.from_pretrained(hf, ["cpu", "cpu"], progress=False)
    seconds = time.perf_counter() - start
    loaded = status("VmHWM") - baseline
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    weights = sum(t.numel() * t.element_size() for t in tensors.values())
    with torch.no_grad():  # a first forward touches every weight: memory-mapped ones become resident
        model(torch.arange(8).unsqueeze(0))
    print(json.dumps({"seconds": seconds, "peak_after_load": loaded, "weights": weights,
                      "peak_after_forward": status("VmHWM") - baseline}))
""")

WAYS = ("transformers", "transformers + split", "seed flow", "tp.from_pretrained")


def _prepare(folder: str) -> tuple[str, str, int]:
    import torch
    import transformers

    import tensor_parallel as tp

    config = transformers.LlamaConfig(vocab_size=16000, hidden_size=1024, intermediate_size=2816,
                                      num_hidden_layers=10, num_attention_heads=16, num_key_value_heads=4)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    hf, split = os.path.join(folder, "hf"), os.path.join(folder, "split")
    model.save_pretrained(hf, max_shard_size="100MB")
    tp.TensorParallelPreTrainedModel(model, ["cpu", "cpu"]).save_pretrained(split, max_shard_size="100MB",
                                                                            progress=False)
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    return hf, split, largest


def _measure(hf: str, split: str, way: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _RUN, hf, split, way], capture_output=True, text=True,
                         timeout=1200)
    if out.returncode != 0:
        raise RuntimeError(f"{way} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _report(results: dict, largest: int, command: str) -> str:
    mb = 1e6
    weights = results["transformers"]["weights"]
    lines = [
        f"# Loading benchmark, {datetime.date.today()}",
        "",
        f"Model: Llama architecture, {weights / mb:.0f} MB of float32 weights, largest tensor "
        f"{largest / mb:.0f} MB, saved in 100 MB files. Each way runs in a fresh process; peak RAM "
        f"is VmHWM minus the resident size after imports, after loading and again after a first "
        f"forward of 8 tokens (transformers and accelerate leave weights memory-mapped from the "
        f"safetensors files, so their pages become resident only when the forward reads them).",
        "",
        f"Command: `{command}`",
        "",
        "| way | load time (s) | peak RAM after load (MB) | peak RAM after a forward (MB) | "
        "that peak / weights |",
        "|---|---|---|---|---|",
    ]
    for way in WAYS:
        r = results[way]
        lines.append(f"| {way} | {r['seconds']:.2f} | {r['peak_after_load'] / mb:.0f} | "
                     f"{r['peak_after_forward'] / mb:.0f} | {r['peak_after_forward'] / r['weights']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=RESULTS, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as folder:
        logger.info("saving the model once ...")
        hf, split, largest = _prepare(folder)
        results = {}
        for way in WAYS:
            logger.info("measuring %s ...", way)
            results[way] = _measure(hf, split, way)
    report = _report(results, largest, "python -m benchmarks.loading")
    write_report("loading", report, data=results, results=args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
