"""Single-process speed and communication benchmark.

1. Communication: for every built-in plan, the collectives of one forward (batch 1, 16 tokens,
   2 devices, 4 layers, width 256) and the bytes they move per layer, in units of one hidden
   activation (the Megatron floor is 2.0 per layer, plus the embedding and the logits).
2. Speed: a Llama-architecture model of about 170M parameters (hidden 1024, 8 layers, 16 heads,
   vocabulary 32000, float32): forward latency for 128 tokens and greedy decode time for 32 new
   tokens, split over 2 CPU devices in one process, as ratios to the unsharded model measured in
   the same run; and the original tensor_parallel 2.0.0 when its venv exists (``--peer-venv``,
   set up as shared/notes/anchors.md says), driven through a subprocess since the names clash.
3. Memory per device after splitting, and the imbalance between devices.

Run: ``python -m benchmarks.speed`` (writes benchmarks/results/speed-<date>.md).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import os
import platform
import subprocess
import tempfile
import textwrap

import torch
import transformers

import tensor_parallel as tp
from benchmarks.common import write_report
from benchmarks.multiprocess import measure

logger = logging.getLogger("benchmarks.speed")

_SMALL = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8)
ARCHITECTURES = {
    "llama": lambda: transformers.LlamaConfig(**_SMALL, num_key_value_heads=4),
    "mistral": lambda: transformers.MistralConfig(**_SMALL, num_key_value_heads=4),
    "qwen2": lambda: transformers.Qwen2Config(**_SMALL, num_key_value_heads=4),
    "gemma": lambda: transformers.GemmaConfig(**_SMALL, num_key_value_heads=4, head_dim=32),
    "phi3": lambda: transformers.Phi3Config(**_SMALL, num_key_value_heads=4, pad_token_id=0),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=1000, n_embd=256, n_layer=4, n_head=8),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**_SMALL),
    "gptj": lambda: transformers.GPTJConfig(vocab_size=1000, n_embd=256, n_layer=4, n_head=8, rotary_dim=16),
    "opt": lambda: transformers.OPTConfig(vocab_size=1000, hidden_size=256, ffn_dim=512, num_hidden_layers=4,
                                          num_attention_heads=8, word_embed_proj_dim=256),
    "bloom": lambda: transformers.BloomConfig(vocab_size=1000, hidden_size=256, n_layer=4, n_head=8),
    "falcon": lambda: transformers.FalconConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4,
                                                num_attention_heads=8),
}


def communication() -> list[dict]:
    """Collectives and bytes per layer of one forward, for each built-in plan."""
    rows = []
    for name, make in ARCHITECTURES.items():
        torch.manual_seed(0)
        config = make()
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        split = tp.tensor_parallel(model, ["cpu", "cpu"])
        ids = torch.randint(3, 1000, (1, 16))
        with torch.no_grad(), tp.count_collectives() as stats:
            split(ids)
        hidden = config.hidden_size if hasattr(config, "hidden_size") else config.n_embd
        activation = 16 * hidden * 4
        layer_bytes = sum(torch.Size(shape).numel() * 4 for kind, shape, _ in stats.log
                          if kind == "all_reduce" and shape[-1] == hidden and len(shape) == 3)
        layers = config.num_hidden_layers
        rows.append({"model": name, "calls": dict(stats.calls), "layer_activations": layer_bytes / (layers * activation),
                     "all_activations": stats.total_bytes / (layers * activation)})
    return rows


_PEER = textwrap.dedent("""
    import json, sys, time, statistics, torch, transformers
    import tensor_parallel as tp  # the original library, in its own venv
    model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
    model = tp.tensor_parallel(model, ["cpu", "cpu"], sharded=False).eval()
    torch.manual_seed(0)
    prompt = torch.randint(3, 32000, (1, 128)); short = prompt[:, :8]
    with torch.no_grad():
        model(prompt)
        f = []
        for _ in range(5):
            t = time.perf_counter(); model(prompt); f.append(time.perf_counter() - t)
        model.generate(short, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        d = []
        for _ in range(3):
            t = time.perf_counter(); model.generate(short, max_new_tokens=32, min_new_tokens=32, do_sample=False)
            d.append(time.perf_counter() - t)
    print(json.dumps({"forward_128": statistics.median(f), "decode_32": statistics.median(d)}))
""")


def speed(peer_venv: str | None) -> dict:
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                                      num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16)
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(config).eval()
    results = {"unsharded": measure(reference)}
    split = tp.tensor_parallel(copy.deepcopy(reference), ["cpu", "cpu"])
    results["tensor_parallel"] = measure(split)
    results["unsharded (again)"] = measure(reference)  # the machine is noisy: bracket the run
    results["memory"] = _memory(split)
    python = os.path.join(peer_venv, "bin", "python") if peer_venv else None
    if python and os.path.exists(python):
        with tempfile.TemporaryDirectory() as folder:
            reference.save_pretrained(folder, safe_serialization=False)
            out = subprocess.run([python, "-c", _PEER, folder], capture_output=True, text=True, timeout=1800)
            if out.returncode == 0:
                results["original tensor_parallel 2.0.0"] = json.loads(out.stdout.strip().splitlines()[-1])
            else:
                logger.error("the original library failed:\n%s", out.stderr[-2000:])
    return results


def _memory(split) -> dict:
    per_device = []
    for shard in split.module_shards:
        tensors = {id(t): t for t in list(shard.parameters()) + list(shard.buffers())}
        per_device.append(sum(t.numel() * t.element_size() for t in tensors.values()))
    return {"per_device": per_device, "imbalance": max(per_device) / min(per_device)}


def report(comm: list[dict], timings: dict, command: str) -> str:
    base = (timings["unsharded"]["forward_128"] + timings["unsharded (again)"]["forward_128"]) / 2
    base_decode = (timings["unsharded"]["decode_32"] + timings["unsharded (again)"]["decode_32"]) / 2
    lines = [f"# Speed and communication, {datetime.date.today()}", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, CPU only. Command: `{command}`", "",
             "## Communication per forward (2 devices, 4 layers, width 256, 16 tokens)", "",
             "| model | collectives | layer all-reduces, activations per layer | all bytes, activations per layer |",
             "|---|---|---|---|"]
    for row in comm:
        calls = ", ".join(f"{k} x{v}" for k, v in sorted(row["calls"].items()))
        lines.append(f"| {row['model']} | {calls} | {row['layer_activations']:.2f} | {row['all_activations']:.2f} |")
    lines += ["", "The Megatron floor is 2.00 per layer; the last column adds the embedding and the gathered "
              "logits (vocabulary 1000 = 3.9 activations of width 256, spread over 4 layers).", "",
              "## Speed, 170M Llama, float32, 2 CPU devices in one process", "",
              "| run | forward, 128 tokens (s) | ratio | greedy decode, 32 tokens (s) | ratio |", "|---|---|---|---|---|"]
    for name, r in timings.items():
        if name == "memory":
            continue
        lines.append(f"| {name} | {r['forward_128']:.3f} | {r['forward_128'] / base:.2f} | {r['decode_32']:.2f} | "
                     f"{r['decode_32'] / base_decode:.2f} |")
    memory = timings["memory"]
    lines += ["", "Ratios are to the mean of the two unsharded runs that bracket the others.", "",
              "Memory per device after splitting: " + ", ".join(f"{b / 1e6:.0f} MB" for b in memory["per_device"])
              + f" (imbalance {memory['imbalance']:.3f})."]
    if "original tensor_parallel 2.0.0" not in timings:
        lines += ["", "The original library did not run in this run (no peer venv given or found)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-venv", default=os.environ.get("TP_PEER_VENV"),
                        help="venv of the original tensor_parallel 2.0.0 (see shared/notes/anchors.md)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logger.info("communication ...")
    comm = communication()
    logger.info("speed ...")
    timings = speed(args.peer_venv)
    command = "python -m benchmarks.speed" + (f" --peer-venv {args.peer_venv}" if args.peer_venv else "")
    text = report(comm, timings, command)
    write_report("speed", text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
