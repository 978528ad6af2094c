"""GPU speed in one process: ``python -m benchmarks.gpu`` (or ``python -m benchmarks.run gpu``).

The speed benchmark's 170M Llama (float32, then bfloat16), timed on CUDA devices: a forward of
128 tokens and a greedy decode of 32 new tokens after an 8-token prompt, batch 1, for

* the unsharded model on the first GPU (its default growing cache), and with a static cache
  (transformers' ``generate`` then compiles the decode step with ``torch.compile``);
* ours over 2 ranks in one process, eager and with ``cuda_graphs=True``;
* ours on 1 rank with ``cuda_graphs=True`` (the unsharded kernels replayed: what graphs alone give).

The 2 ranks go on ``cuda:0`` and ``cuda:1`` when there are two GPUs; on a machine with one GPU
both are threads on ``cuda:0``, which isolates what one interpreter launching every rank's
kernels costs (the figure users of the original saw as generate slowing down on 2 GPUs). Every
contender runs once per round in an order that rotates from round to round; times are medians
over the rounds, ratios medians of the ratios within a round. Tokens are compared with the
unsharded model's. Without a CUDA device it says so and writes nothing.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
from typing import Any, Callable

from benchmarks.common import RESULTS, write_report

logger = logging.getLogger("benchmarks.gpu")
ROUNDS = 5
MAX_WARM_UPS = 4
TOKENS, PROMPT, NEW_TOKENS = 128, 8, 32
ROWS = ("unsharded", "unsharded, static cache (compiled)", "tensor_parallel, 2 ranks",
        "tensor_parallel, 2 ranks, cuda_graphs", "tensor_parallel, 1 rank, cuda_graphs")


def _contenders(base, dtype, devices: list[str]) -> dict[str, tuple[Any, str | None]]:
    """Row label -> (model, cache_implementation to ask generate for, or None for its default)."""
    import tensor_parallel as tp

    model = copy.deepcopy(base).to(devices[0], dtype)
    return {
        ROWS[0]: (model, None),
        ROWS[1]: (model, "static"),
        ROWS[2]: (tp.tensor_parallel(copy.deepcopy(model), devices), None),
        ROWS[3]: (tp.tensor_parallel(copy.deepcopy(model), devices, cuda_graphs=True), None),
        ROWS[4]: (tp.tensor_parallel(copy.deepcopy(model), devices[:1], cuda_graphs=True), None),
    }


def _timer(model, cache: str | None, ids) -> Callable[[str], float]:
    import torch

    options: dict[str, Any] = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    if cache is not None:
        options["cache_implementation"] = cache

    def run(what: str):
        with torch.no_grad():
            if what == "forward":
                return model(ids, use_cache=False)  # a cache made inside a forward is never replayed
            return model.generate(ids[:, :PROMPT], **options)

    devices = {p.device for p in model.parameters()}

    def synchronize() -> None:
        for device in devices:  # every rank's GPU, not only the current one
            torch.cuda.synchronize(device)

    def timed(what: str) -> float:
        synchronize()
        start = time.perf_counter()
        run(what)
        synchronize()
        return time.perf_counter() - start

    timed.tokens = lambda: run("decode")  # type: ignore[attr-defined]
    return timed


def measure(dtype_name: str, devices: list[str], rounds: int) -> dict[str, Any]:
    """Times of every row in ``rounds`` rotating rounds, after warm-up calls (at least two, until
    none captures graphs), whether its greedy tokens equal the unsharded model's, and replays."""
    import torch
    import transformers

    from benchmarks.speed import SPEED_MODEL

    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SPEED_MODEL)).eval()
    ids = torch.randint(3, SPEED_MODEL["vocab_size"], (1, TOKENS), device=devices[0])
    rows = _contenders(base, getattr(torch, dtype_name), devices)
    timers = {label: _timer(model, cache, ids) for label, (model, cache) in rows.items()}
    failed: dict[str, str] = {}
    for warm_up in range(MAX_WARM_UPS):  # until no call captures graphs any more (at least 2)
        before = _captures(rows)
        for label, timer in list(timers.items()):
            try:
                timer("forward"), timer("decode")
            except Exception as error:  # torch.compile without a working compiler, say: the row says why
                if label == ROWS[0]:
                    raise
                logger.error("%s %s failed: %s", dtype_name, label, error)
                failed[label] = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
                del timers[label], rows[label]
        if warm_up >= 1 and _captures(rows) == before:
            break
    captures_before = _captures(rows)
    samples: dict[str, dict[str, list[float]]] = {label: {"forward": [], "decode": []} for label in rows}
    for index in range(rounds):
        for label in ROWS[index % len(ROWS):] + ROWS[:index % len(ROWS)]:
            for what in ("forward", "decode") if label in timers else ():
                samples[label][what].append(timers[label](what))
    captures = {label: after - before for (label, after), before in zip(_captures(rows).items(), captures_before.values())}
    reference = timers[ROWS[0]].tokens()
    same = {label: bool(torch.equal(timers[label].tokens(), reference)) for label in rows}
    replays = {label: getattr(_graphs(model), "replays", None) for label, (model, _) in rows.items()}
    return {"samples": samples, "same_tokens": same, "replays": replays, "captures_while_timed": captures,
            "failed": failed}


def _graphs(model):
    return getattr(getattr(model, "wrapped_model", None), "_graphs", None)


def _captures(rows: dict[str, tuple[Any, str | None]]) -> dict[str, int]:
    return {label: getattr(_graphs(model), "captures", 0) for label, (model, _) in rows.items()}


def _ratios(samples: dict, label: str, what: str) -> list[float]:
    """Round by round, the unsharded time / this row's time: how many times as fast it is."""
    return [u / t for u, t in zip(samples[ROWS[0]][what], samples[label][what])]


def report(results: dict[str, Any], facts: dict[str, Any], command: str) -> str:
    """The Markdown report: one table per dtype."""
    lines = [f"# GPU speed in one process, {facts['date']}", "",
             f"Command: `{command}`", "",
             f"170M Llama (hidden 1024, 8 layers, vocabulary 32000), batch 1: a forward of {TOKENS} tokens "
             f"(`use_cache=False`) and a greedy decode of {NEW_TOKENS} new tokens after a {PROMPT}-token "
             f"prompt. Ranks: {', '.join(facts['devices'])}"
             + (" (one GPU: the ranks are threads on it)." if len(set(facts["devices"])) == 1 else ".")
             + f" {facts['rounds']} rounds, rotating order; times are medians, ratios medians of the "
               f"ratios within a round (unsharded time / this row's).", ""]
    for dtype_name, result in results.items():
        samples = result["samples"]
        lines += [f"## {dtype_name}", "",
                  "| run | forward (ms) | decode per token (ms) | unsharded / this: forward | "
                  "unsharded / this: decode | tokens = unsharded's | replays |",
                  "|---|---|---|---|---|---|---|"]
        for label in ROWS:
            if label not in samples:
                lines.append(f"| {label} | failed: {result.get('failed', {}).get(label, '')} | | | | | |")
                continue
            forward = statistics.median(samples[label]["forward"]) * 1e3
            decode = statistics.median(samples[label]["decode"]) / NEW_TOKENS * 1e3
            replays = result["replays"][label]
            lines.append(f"| {label} | {forward:.2f} | {decode:.2f} | "
                         f"{statistics.median(_ratios(samples, label, 'forward')):.2f} | "
                         f"{statistics.median(_ratios(samples, label, 'decode')):.2f} | "
                         f"{result['same_tokens'][label]} | {'' if replays is None else replays} |")
        if ROWS[2] not in samples or ROWS[3] not in samples:
            continue
        eager = statistics.median(e / g for e, g in zip(samples[ROWS[2]]["decode"], samples[ROWS[3]]["decode"]))
        graphs = statistics.median(_ratios(samples, ROWS[3], "decode"))
        lines += ["", f"With `cuda_graphs=True`, the 2-rank decode is **{eager:.2f}x** as fast as eager "
                      f"and **{graphs:.2f}x** the unsharded model's default generate (medians of the rounds' ratios).", ""]
        recaptured = {label: n for label, n in result.get("captures_while_timed", {}).items() if n}
        if recaptured:
            lines += [f"Captures while timing (first-call costs inside the timed rounds): {recaptured}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"timed rounds (default {ROUNDS})")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="default float32 bfloat16")
    parser.add_argument("--results", default=RESULTS, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import datetime

    import torch

    if not torch.cuda.is_available():
        logger.warning("no CUDA device: the GPU benchmark is skipped and nothing is written")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 products as the unsharded model's
    count = torch.cuda.device_count()
    devices = ["cuda:0", "cuda:1"] if count >= 2 else ["cuda:0", "cuda:0"]
    results = {}
    for dtype_name in args.dtypes:
        logger.info("%s on %s ...", dtype_name, devices)
        results[dtype_name] = measure(dtype_name, devices, args.rounds)
    facts = {"date": datetime.date.today().isoformat(), "devices": devices, "rounds": args.rounds}
    text = report(results, facts, "python -m benchmarks.run gpu")
    write_report("gpu", text, data={"facts": facts, "results": results}, results=args.results,
                 marks={"unsharded / this": 1.0}, columns=("unsharded / this",))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
