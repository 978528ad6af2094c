"""Single-process speed, communication and memory, side by side with the unsharded model and
the original tensor_parallel 2.0.0 (in its own venv, driven through a subprocess).

1. Communication: for every built-in plan, the collectives of one forward of 128 tokens over 2
   devices and the bytes they move, in activations (batch x tokens x width x 4 bytes) per
   layer, against the Megatron floor (2 per layer; T5's decoder layers add cross-attention: 3).
   The models have a 7B model's proportions (embedding and LM head under 10% of the
   parameters; width 256, 8 layers, vocabulary 1000); the last row is the speed model below,
   whose vocabulary is 38% of it.
2. Speed: a Llama-architecture model of about 170M parameters (hidden 1024, 8 layers, 16 heads,
   vocabulary 32000, float32): forward latency for 128 tokens and greedy decode time for 32 new
   tokens, split over 2 CPU devices in one process, as ratios to the unsharded model and to
   the original. All three are loaded at once (the original in a subprocess of its venv that
   serves timings) and timed in rounds: each round runs every contender once, in an order that
   rotates, and each ratio is the median over the rounds of the ratio within a round, so that
   the slow drifts of a shared machine's speed (40% between runs minutes apart) cancel.
3. Memory per device after splitting: bytes of parameters and buffers, and the imbalance
   (largest / mean).
4. Hand-off: microseconds per all-reduce of one decode-step activation (1 x 1 x 1024 float32)
   between 2, 3 and 4 thread ranks calling it back to back (the single-process mode's cost per
   collective, 17 per decoded token of the speed model).

Run: ``python -m benchmarks.speed [--peer-venv V]`` (V: the original library's venv, which
``python -m benchmarks.run speed`` creates when missing).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import json
import logging
import os
import statistics
import subprocess
import tempfile
import threading
import time
from typing import Any, Callable, Sequence

import torch
import transformers

import tensor_parallel as tp
from benchmarks.common import RESULTS, write_report
from benchmarks.multiprocess import time_one, warm_up
from tensor_parallel.hf.plans import vocabulary_share

logger = logging.getLogger("benchmarks.speed")

TOKENS = 128
VOCAB = 1000
_PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "original_peer.py")

_LLAMA = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=8)
_WIDE = dict(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=8, num_attention_heads=8)
#: model type -> (config class, its arguments): one model per built-in plan, as data, so that
#: the original library's venv (transformers 4.33) builds the same models
MODELS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(_LLAMA, num_key_value_heads=4)),
    "mistral": ("MistralConfig", dict(_LLAMA, num_key_value_heads=4)),
    "mixtral": ("MixtralConfig", dict(_LLAMA, num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2": ("Qwen2Config", dict(_LLAMA, num_key_value_heads=4)),
    "qwen3": ("Qwen3Config", dict(_LLAMA, num_key_value_heads=4, head_dim=32)),
    "gemma": ("GemmaConfig", dict(_LLAMA, num_key_value_heads=4, head_dim=32)),
    "gemma2": ("Gemma2Config", dict(_LLAMA, num_key_value_heads=4, head_dim=32)),
    "phi3": ("Phi3Config", dict(_LLAMA, num_key_value_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=256, n_layer=8, n_head=8, bos_token_id=0, eos_token_id=0)),
    "gpt_neox": ("GPTNeoXConfig", dict(_WIDE, intermediate_size=1024)),
    "gptj": ("GPTJConfig", dict(vocab_size=VOCAB, n_embd=256, n_layer=8, n_head=8, rotary_dim=16)),
    "opt": ("OPTConfig", dict(vocab_size=VOCAB, hidden_size=256, ffn_dim=1024, num_hidden_layers=8,
                              num_attention_heads=8, word_embed_proj_dim=256)),
    "bloom": ("BloomConfig", dict(vocab_size=VOCAB, hidden_size=256, n_layer=8, n_head=8)),
    "falcon": ("FalconConfig", dict(_WIDE)),
    "t5": ("T5Config", dict(vocab_size=VOCAB, d_model=256, d_kv=32, d_ff=1024, num_layers=8, num_heads=8,
                            decoder_start_token_id=0)),
    "bert": ("BertConfig", dict(_WIDE, intermediate_size=1024)),
    "roberta": ("RobertaConfig", dict(_WIDE, intermediate_size=1024)),
}
#: rounds of the speed measurement: each times every contender once (15: with 7 the median of
#: the decode ratio to the original moved from 1.12 to 1.23 between runs on this 2-core machine)
ROUNDS = 15
SPEED_MODEL = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                   num_attention_heads=16, num_key_value_heads=16)


# --------------------------------------------------------------------------------------------
# Communication
# --------------------------------------------------------------------------------------------


def build(name: str) -> transformers.PreTrainedModel:
    config_class, kwargs = MODELS[name]
    torch.manual_seed(0)
    auto = (transformers.AutoModelForSeq2SeqLM if name == "t5" else
            transformers.AutoModelForMaskedLM if name in ("bert", "roberta") else transformers.AutoModelForCausalLM)
    return auto.from_config(getattr(transformers, config_class)(**kwargs)).eval()


def shape(model) -> dict:
    """Width, layers and the Megatron floor in activations per layer."""
    config = model.config
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or config.d_model
    if config.is_encoder_decoder:
        encoder, decoder = config.num_layers, config.num_decoder_layers
        return {"width": width, "layers": encoder + decoder, "floor": (2 * encoder + 3 * decoder) / (encoder + decoder)}
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    return {"width": width, "layers": layers, "floor": 2.0}


def per_layer(total_bytes: int, facts: dict, tokens: int = TOKENS) -> float:
    """Bytes in activations (tokens x width x 4 bytes) per layer."""
    return total_bytes / (facts["layers"] * tokens * facts["width"] * 4)


def count(model, tokens: int = TOKENS) -> dict:
    """Collectives of one forward of ``tokens`` tokens over 2 CPU devices."""
    split = tp.tensor_parallel(model, ["cpu", "cpu"])
    ids = torch.randint(3, model.config.vocab_size, (1, tokens))
    extra = {"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}
    with torch.no_grad(), tp.count_collectives() as stats:
        split(ids, **extra)
    return {"calls": dict(stats.calls), "bytes": stats.total_bytes, "plan": split.plan}


def communication() -> dict:
    rows = {}
    for name in MODELS:
        model = build(name)
        rows[name] = {**shape(model), **count(model), "vocabulary_share": vocabulary_share(model)}
        del rows[name]["plan"]
    return rows


# --------------------------------------------------------------------------------------------
# Speed and memory
# --------------------------------------------------------------------------------------------


def memory(split) -> list[int]:
    """Bytes of parameters and buffers on each device (a tensor shared by two modules, once)."""
    per_device = []
    for shard in split.module_shards:
        tensors = {id(t): t for t in [*shard.parameters(), *shard.buffers()]}
        per_device.append(sum(t.numel() * t.element_size() for t in tensors.values()))
    return per_device


def run_peer(python: str, *args: str) -> dict | None:
    """Run benchmarks/original_peer.py in the original library's venv; None if it fails."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # never import our library there
    done = subprocess.run([python, _PEER, *args], capture_output=True, text=True, timeout=3600, env=env)
    if done.returncode != 0:
        logger.error("the original library failed:\n%s", done.stderr[-3000:])
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


class Peer:
    """The original library serving timings from its venv (``original_peer.py serve``)."""

    def __init__(self, python: str, folder: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # never import our library there
        self.errors = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen([python, _PEER, "serve", folder], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.errors, text=True, env=env)
        self.facts = self._answer()  # memory per device and collectives, once loaded and warmed up

    def _answer(self):
        for line in self.process.stdout:
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue  # something else printed on stdout
        self.errors.seek(0)
        raise RuntimeError(f"the original library stopped:\n{self.errors.read()[-3000:]}")

    def __call__(self, what: str) -> float:
        self.process.stdin.write(what + "\n")
        self.process.stdin.flush()
        return self._answer()

    def close(self) -> None:
        try:
            self.process.stdin.write("quit\n")
            self.process.stdin.close()
            self.process.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
        self.errors.close()


def _local(model):
    return lambda what: time_one(model, what)


def speed(python: str | None, rounds: int = ROUNDS) -> dict:
    """Every contender timed once per round, forward then decode, in an order that rotates from
    round to round, so that each round's runs are close in time and the paired ratios cancel
    the machine's slow drifts."""
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SPEED_MODEL)).eval()
    split = tp.tensor_parallel(copy.deepcopy(reference), ["cpu", "cpu"])
    contenders = {"unsharded": _local(reference), "tensor_parallel": _local(split)}
    peer = None
    with tempfile.TemporaryDirectory() as folder:
        if python:
            reference.save_pretrained(folder, safe_serialization=False)
            try:
                peer = Peer(python, folder)
                contenders["original"] = peer
            except RuntimeError as error:
                logger.error("%s", error)
        try:
            warm_up(reference)
            warm_up(split)
            samples = {name: {"forward": [], "decode": []} for name in contenders}
            names = list(contenders)
            for index in range(rounds):
                order = names[index % len(names):] + names[:index % len(names)]
                logger.info("round %d/%d: %s", index + 1, rounds, ", ".join(order))
                for name in order:
                    for what in ("forward", "decode"):
                        samples[name][what].append(contenders[name](what))
        finally:
            if peer is not None:
                peer.close()
    comm = {**count(copy.deepcopy(reference)), **shape(reference), "vocabulary_share": vocabulary_share(reference)}
    del comm["plan"]
    return {"samples": samples, "rounds": rounds, "memory": memory(split), "comm": comm,
            "original": peer.facts if peer is not None else None,
            "unsharded_bytes": sum(t.numel() * t.element_size() for t in [*reference.parameters(), *reference.buffers()])}


def handoff(world_sizes: tuple[int, ...] = (2, 3, 4), calls: int = 3000, repeats: int = 3) -> dict[int, float]:
    """Microseconds per all-reduce between thread ranks (best of ``repeats`` loops of
    ``calls``), each rank on one intra-op thread as in a split forward."""
    from tensor_parallel.comm import ThreadGroup

    def loop(world_size: int) -> float:
        group = ThreadGroup(["cpu"] * world_size)
        comms = [group.communicator(r) for r in range(world_size)]
        inputs = [torch.randn(1, 1, 1024) for _ in range(world_size)]

        def rank(r: int) -> None:
            torch.set_num_threads(1)
            with torch.no_grad():
                for _ in range(calls):
                    comms[r].all_reduce(inputs[r])
        threads = [threading.Thread(target=rank, args=(r,)) for r in range(1, world_size)]
        threads_before = torch.get_num_threads()
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        rank(0)
        for thread in threads:
            thread.join()
        torch.set_num_threads(threads_before)
        return (time.perf_counter() - start) / calls * 1e6
    return {w: min(loop(w) for _ in range(repeats)) for w in world_sizes}


def _concurrently(works: Sequence[Callable[[], float]]) -> list[float]:
    """Run each of ``works`` (each returns its seconds) on a thread of its own, all at once,
    each thread on one intra-op thread, started in order; every thread's seconds. The first
    error raised in a thread is raised here."""
    times: list[float] = [0.0] * len(works)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            torch.set_num_threads(1)
            times[i] = works[i]()
        except BaseException as error:  # raised in the caller below, not printed and lost
            errors.append(error)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(works))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return times


def _timed(fn: Callable[[], Any], n: int, until: threading.Event | None = None) -> Callable[[], float]:
    """A work: ``fn`` called ``n`` times (or, with ``until``, until it is set), timed."""
    def run() -> float:
        start = time.perf_counter()
        if until is None:
            for _ in range(n):
                fn()
        else:
            while not until.is_set():
                fn()
        return time.perf_counter() - start
    return run


def cores(repeats: int = 3) -> dict[str, float]:
    """What this machine's two cores give two threads of one process, the single-process
    mode's ceiling (best of ``repeats`` each): for each kind of work, the throughput of two
    threads doing it at once over one thread's alone (2.0: two independent cores; 1.0: no
    gain), and the speed of small operators beside a thread that streams weights over their
    speed alone (what a rank's Python forward keeps while the other rank multiplies).

    ``compute``: products of 256 x 256 matrices (in cache); ``bandwidth``: one-row products
    with a 64 MB weight of each thread's own (memory bound, as decode is); ``small ops``: adds
    on 1 x 64 tensors (interpreter and dispatcher bound; each op releases and retakes the GIL).
    """
    a, x, vector = torch.randn(256, 256), torch.ones(1, 64), torch.randn(1024, 1)
    weights = [torch.randn(16384, 1024) for _ in range(2)]
    kinds = {"compute": lambda i: _timed(lambda: torch.mm(a, a), 600),
             "bandwidth": lambda i: _timed(functools.partial(torch.mm, weights[i], vector), 40),
             "small ops": lambda i: _timed(lambda: x.add(1.0), 20000)}
    out, alone = {}, {}
    threads_before = torch.get_num_threads()
    try:
        for kind, make in kinds.items():
            alone[kind] = min(_concurrently([make(0)])[0] for _ in range(repeats))
            together = min(max(_concurrently([make(0), make(1)])) for _ in range(repeats))
            out[f"{kind}: two threads / one"] = 2 * alone[kind] / together
        beside = min(_beside_streaming(kinds["small ops"](0), weights[1], vector) for _ in range(repeats))
        out["small ops beside a thread streaming weights / alone"] = alone["small ops"] / beside
    finally:
        torch.set_num_threads(threads_before)
    return out


def _beside_streaming(work: Callable[[], float], weight: torch.Tensor, vector: torch.Tensor) -> float:
    """Seconds of ``work`` while another thread, started first, streams ``weight`` (one-row
    products) until the work ends."""
    stop, streaming = threading.Event(), threading.Event()

    def stream() -> float:
        streaming.set()
        return _timed(functools.partial(torch.mm, weight, vector), 0, until=stop)()

    def timed_then_stop() -> float:
        streaming.wait()
        try:
            return work()
        finally:
            stop.set()
    return _concurrently([stream, timed_then_stop])[1]


def call_overhead(calls: int = 2000, repeats: int = 3) -> dict[str, float]:
    """Microseconds per forward of a Megatron pair of 64-wide layers (one all-reduce) on one
    token, unsharded and split over 1 and 2 CPU devices (best of ``repeats``): what the split
    model adds to each call, which a decode step pays once per token."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).eval()
    x = torch.randn(1, 1, 64)
    models = {"unsharded": mlp, **{f"{w} device{'s' * (w > 1)}": tp.tensor_parallel(copy.deepcopy(mlp), ["cpu"] * w) for w in (1, 2)}}

    def per_call(model) -> float:
        with torch.no_grad():
            model(x)
            start = time.perf_counter()
            for _ in range(calls):
                model(x)
            return (time.perf_counter() - start) / calls * 1e6
    return {name: min(per_call(model) for _ in range(repeats)) for name, model in models.items()}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def paired(samples: dict, mine: str, theirs: str, what: str) -> list[float]:
    """Round by round, ``theirs`` time / ``mine``: how many times as fast ``mine`` is."""
    return [t / m for m, t in zip(samples[mine][what], samples[theirs][what])]


def _summary(ratios: list[float]) -> str:
    """Median of the rounds' ratios | their range (two table cells)."""
    return f"{statistics.median(ratios):.2f} | {min(ratios):.2f} to {max(ratios):.2f}"


def _calls(calls: dict) -> str:
    return ", ".join(f"{kind} x{n}" for kind, n in sorted(calls.items())) or "none"


def comm_table(rows: dict, original: dict | None, speed_comm: dict, speed_original: dict | None) -> list[str]:
    lines = ["| model | vocabulary share | collectives | bytes per forward (MB) | activations per layer | floor | "
             "original: collectives | original: activations per layer |", "|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        theirs = (original or {}).get(name, {"error": "not run"})
        their_calls = (_calls(theirs["calls"]) if "calls" in theirs else "not run" if not original else
                       "absent" if theirs.get("absent") else "fails")
        their_layer = f"{per_layer(theirs['bytes'], row):.2f}" if "bytes" in theirs else "n/a"
        lines.append(f"| {name} | {row['vocabulary_share']:.1%} | {_calls(row['calls'])} | {row['bytes'] / 1e6:.2f} | "
                     f"{per_layer(row['bytes'], row):.2f} | {row['floor']:.2f} | {their_calls} | {their_layer} |")
    theirs = (speed_original or {}).get("comm")
    their_layer = f"{per_layer(theirs['bytes'], speed_comm):.2f}" if theirs else "n/a"
    lines.append(f"| llama 170M (speed model) | {speed_comm['vocabulary_share']:.1%} | {_calls(speed_comm['calls'])} | "
                 f"{speed_comm['bytes'] / 1e6:.2f} | {per_layer(speed_comm['bytes'], speed_comm):.2f} | 2.00 | "
                 f"{_calls(theirs['calls']) if theirs else 'not run'} | {their_layer} |")
    return lines


def _section(heading: str, text: str, header: tuple[str, str], rows: dict | None, number: str) -> list[str]:
    """A two-column table under its heading (nothing when ``rows`` is empty)."""
    if not rows:
        return []
    return (["", f"## {heading}", "", text, "", f"| {header[0]} | {header[1]} |", "|---|---|"]
            + [f"| {key} | {number.format(value)} |" for key, value in rows.items()])


def report(comm: dict, original_comm: dict | None, result: dict, command: str) -> str:
    samples, original = result["samples"], result["original"]
    lines = [f"# Speed, communication and memory in one process, {datetime.date.today()}", "",
             f"Command: `{command}`", "",
             f"## Communication per forward (2 devices, {TOKENS} tokens)", ""]
    lines += comm_table(comm, original_comm, result["comm"], original)
    lines += ["", "Activations per layer: bytes / (layers x tokens x width x 4 bytes). The floor is Megatron's: 2 "
              "all-reduces of one activation per layer (T5: 3 per decoder layer). The original runs on transformers "
              "4.33: `absent` means that version has no such architecture, `fails` that the original raised (the error "
              "is in speed.json).", "",
              "## Speed, 170M Llama, float32, 2 CPU devices in one process", "",
              f"{result['rounds']} rounds; in each, every contender runs one forward of {TOKENS} tokens and one greedy "
              "decode of 32 new tokens, in an order that rotates from round to round. Times are medians over the "
              "rounds; ratios are medians of the ratios within each round (runs close in time), with their range.", "",
              "| run | forward, 128 tokens (s) | greedy decode, 32 tokens (s) | unsharded / this: forward | rounds | "
              "unsharded / this: decode | rounds |", "|---|---|---|---|---|---|---|"]
    for name in samples:
        forward, decode = (statistics.median(samples[name][w]) for w in ("forward", "decode"))
        lines.append(f"| {name} | {forward:.3f} | {decode:.2f} | {_summary(paired(samples, name, 'unsharded', 'forward'))} | "
                     f"{_summary(paired(samples, name, 'unsharded', 'decode'))} |")
    if "original" in samples:
        lines += ["", "Against the original, ours is **"
                  f"{statistics.median(paired(samples, 'tensor_parallel', 'original', 'forward')):.2f}x** as fast on the "
                  f"forward and **{statistics.median(paired(samples, 'tensor_parallel', 'original', 'decode')):.2f}x** on "
                  "decode (medians of the rounds' ratios), ratios by round:", "",
                  "| ours vs the original | median | rounds |", "|---|---|---|",
                  f"| forward | {_summary(paired(samples, 'tensor_parallel', 'original', 'forward'))} |",
                  f"| decode | {_summary(paired(samples, 'tensor_parallel', 'original', 'decode'))} |"]
    else:
        lines += ["", "The original did not run (no venv given, or it failed)."]
    lines += ["", "## Memory per device after splitting", "",
              "| run | device 0 (MB) | device 1 (MB) | imbalance (largest / mean) | all devices / unsharded |",
              "|---|---|---|---|---|"]
    unsharded = result["unsharded_bytes"]
    for name, per_device in (("tensor_parallel", result["memory"]),
                             ("original", original["memory"] if original else None)):
        if per_device:
            mean = sum(per_device) / len(per_device)
            lines.append(f"| {name} | {per_device[0] / 1e6:.0f} | {per_device[1] / 1e6:.0f} | "
                         f"{max(per_device) / mean:.3f} | {sum(per_device) / unsharded:.2f} |")
    lines += ["", f"The unsharded model holds {unsharded / 1e6:.0f} MB."]
    lines += _section(
        "Hand-off between thread ranks", "One all-reduce of a decode-step activation (1 x 1 x 1024 float32), every "
        "rank a thread calling it back to back (best of 3 loops of 3000).",
        ("ranks", "microseconds per all-reduce"), result.get("handoff"), "{:.1f}")
    lines += _section(
        "Cost of one call", "Microseconds per forward of a Megatron pair of 64-wide layers on one token (best of 3 "
        "loops of 2000): what splitting adds to every call, which decode pays once per token.",
        ("run", "microseconds per call"), result.get("call_overhead"), "{:.1f}")
    lines += _section(
        "What this machine's two cores give", "Two threads of one process each doing the same work at once, against "
        "one thread alone: the two threads' throughput over one thread's (2.00: two independent cores; 1.00: no "
        "gain), and small operators' speed beside a thread streaming weights over their speed alone (what a rank's "
        "Python forward keeps while the other rank multiplies). This bounds the single-process mode here: its ranks "
        "are such threads. Compute: 256 x 256 matrix "
        "products in cache; bandwidth: one-row products with a 64 MB weight each (as decode); small ops: adds on "
        "1 x 64 tensors (the Python forward's operators; each releases and retakes the GIL).",
        ("measure", "ratio"), result.get("cores"), "{:.2f}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-venv", default=os.environ.get("TP_PEER_VENV"),
                        help="venv of the original tensor_parallel 2.0.0 (python -m benchmarks.run creates one)")
    parser.add_argument("--results", default=RESULTS, help="results folder (default benchmarks/results)")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"speed rounds (default {ROUNDS})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    python = os.path.join(args.peer_venv, "bin", "python") if args.peer_venv else None
    if python and not os.path.exists(python):
        parser.error(f"--peer-venv {args.peer_venv}: no bin/python there")
    logger.info("speed ...")  # first: the timings, while the machine is as it was at the start
    result = speed(python, args.rounds)
    logger.info("hand-off ...")
    result["handoff"] = handoff()
    logger.info("cost of one call, what the cores give ...")
    result["call_overhead"] = call_overhead()
    result["cores"] = cores()
    logger.info("communication ...")
    comm = communication()
    specs = {name: [cls, kwargs, TOKENS] for name, (cls, kwargs) in MODELS.items()}
    original_comm = run_peer(python, "comm", json.dumps(specs)) if python else None
    command = "python -m benchmarks.speed" + (f" --peer-venv {os.path.relpath(args.peer_venv)}" if python else "")
    data = {"communication": comm, "original_communication": original_comm, **result}
    write_report("speed", report(comm, original_comm, result, command), data=data, results=args.results,
                 marks={"unsharded / this": 1.0, "activations per layer": 2.0},
                 columns=("activations per layer", "unsharded / this", "imbalance"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
