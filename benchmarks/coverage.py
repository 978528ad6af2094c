"""Coverage sweep: which causal-LM architectures of the installed transformers split correctly.

For every model type in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` this builds a tiny random model
from the type's default config (shrunk generically: width 64, 2 layers, 4 heads, vocabulary
128, ...), runs it unsharded on a (2, 8) batch of token ids, then splits a copy over 2 and 3
CPU devices and compares the logits. Each model type runs in a forked child process with a
wall-clock limit, so a hanging or crashing model cannot stall the sweep.

Usage::

    python -m benchmarks.coverage                      # every type, the library's own plans
    python -m benchmarks.coverage --plans generic      # the generic default planner everywhere
    python -m benchmarks.coverage --types llama,gpt2 --out /tmp/coverage.md

Writes a Markdown report (default ``benchmarks/results/coverage.md``) and the raw results as
JSON next to it (``coverage.json``).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import multiprocessing
import shlex
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import tensor_parallel

logger = logging.getLogger("benchmarks.coverage")

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "coverage.md"
DEVICE_COUNTS = (2, 3)
TIMEOUT_S = 60.0
COLLECTIVE_TIMEOUT_S = 30.0
ATOL = RTOL = 1e-4
BATCH, SEQ = 2, 8
ID_LOW, ID_HIGH = 3, 100
N_LAYERS = 2

# --------------------------------------------------------------------------------------------
# Tiny configs
# --------------------------------------------------------------------------------------------

#: config attribute -> tiny value, set wherever the attribute exists (and is not None)
SIZES: dict[str, int] = {
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "embed_dim"), 64),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers"), N_LAYERS),
    **dict.fromkeys(("num_attention_heads", "n_head", "num_heads"), 4),
    "num_key_value_heads": 2,
    "head_dim": 16,
    **dict.fromkeys(("intermediate_size", "ffn_dim", "n_inner", "d_ff", "moe_intermediate_size",
                     "shared_expert_intermediate_size", "moe_shared_expert_intermediate_size"), 128),
    "vocab_size": 128,
    **dict.fromkeys(("max_position_embeddings", "n_positions"), 128),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts"), 4),
    "num_experts_per_tok": 2,
    # grouped expert routing (deepseek) must fit 4 experts; one dense layer, then MoE layers
    "n_group": 1,
    "topk_group": 1,
}

#: flags set wherever they exist: a causal LM built from an encoder config must be a decoder
FLAGS: dict[str, Any] = {"is_decoder": True}

#: attributes clamped to at most this value, so that 2 layers still mix their kinds (a dense
#: layer then an MoE layer; attention every other layer in hybrid models)
CLAMPS: dict[str, int] = {"first_k_dense_replace": 1, "attn_layer_period": 2, "attn_layer_offset": 1,
                          "expert_layer_period": 2, "expert_layer_offset": 1}

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers")
INDEX_LIST_SUFFIXES = ("_layers", "_idxs", "_indices", "_layer_ids")


def _is_config_dict(key: str, value: Any, sub_configs: set[str]) -> bool:
    return isinstance(value, dict) and (key in sub_configs or "model_type" in value)


def _representative_layers(values: list) -> list:
    """A per-layer list cut to the tiny layer count: the first and the last layer (the last is
    often of the other kind, e.g. full attention after sliding-window layers)."""
    return values[:N_LAYERS - 1] + values[-1:]


def _shrink_layer_lists(data: dict[str, Any], old_layers: int | None) -> None:
    """Cut per-layer lists (``layer_types``...) and drop indices past the new layer count."""
    if not old_layers or old_layers <= N_LAYERS:
        return
    for key, value in list(data.items()):
        if not isinstance(value, list) or not value:
            continue
        if len(value) == old_layers:
            data[key] = _representative_layers(value)
        elif isinstance(key, str) and key.endswith(INDEX_LIST_SUFFIXES) and all(isinstance(v, int) for v in value):
            data[key] = [v for v in value if v < N_LAYERS]


def _clamp_token_ids(data: dict[str, Any], vocab: int) -> None:
    """Token ids outside the tiny vocabulary: pad becomes 0, the others None."""
    for key, value in list(data.items()):
        if not isinstance(key, str):
            continue
        if key.endswith("token_id") and isinstance(value, int) and value >= vocab:
            data[key] = 0 if key == "pad_token_id" else None
        elif key.endswith("token_id") and isinstance(value, list):
            kept = [v for v in value if isinstance(v, int) and v < vocab]
            data[key] = kept or None


def shrink_dict(data: dict[str, Any], sub_configs: set[str] = frozenset()) -> dict[str, Any]:
    """A config's ``to_dict()`` with every size made tiny, sub-configs included (recursively)."""
    data = dict(data)
    old_layers = next((data[k] for k in LAYER_COUNT_KEYS if isinstance(data.get(k), int)), None)
    for key, value in list(data.items()):
        if _is_config_dict(key, value, sub_configs):
            data[key] = shrink_dict(value)
        elif key in SIZES and isinstance(value, int) and not isinstance(value, bool):
            data[key] = SIZES[key]
        elif key in FLAGS:
            data[key] = FLAGS[key]
        elif key in CLAMPS and isinstance(value, int):
            data[key] = min(value, CLAMPS[key])
    if isinstance(data.get("qk_rope_head_dim"), int):  # MLA: the rotary part is the head_dim
        data["head_dim"] = data["qk_rope_head_dim"]
    _shrink_layer_lists(data, old_layers)
    vocab = data.get("vocab_size")
    if isinstance(vocab, int):
        _clamp_token_ids(data, vocab)
    return data


def tiny_config(model_type: str) -> transformers.PretrainedConfig:
    """The default config of ``model_type``, shrunk to a tiny model."""
    config = transformers.AutoConfig.for_model(model_type)
    data = shrink_dict(config.to_dict(), set(getattr(config, "sub_configs", {}) or {}))
    for key in ("transformers_version", "model_type"):
        data.pop(key, None)
    return type(config).from_dict(data)


def special_token_ids(data: Any) -> set[int]:
    """Every ``*_token_id``/``*_token_index`` value in a config dict tree (ids to avoid)."""
    found: set[int] = set()
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(key, str) and key.endswith(("token_id", "token_index", "token_ids")):
                values = value if isinstance(value, list) else [value]
                found.update(v for v in values if isinstance(v, int))
            else:
                found |= special_token_ids(value)
    return found


def make_input_ids(config: transformers.PretrainedConfig) -> torch.Tensor:
    """A fixed (2, 8) batch of ids in [3, 100), avoiding every special token id of the config."""
    avoid = special_token_ids(config.to_dict())
    allowed = torch.tensor([i for i in range(ID_LOW, ID_HIGH) if i not in avoid])
    generator = torch.Generator().manual_seed(0)
    return allowed[torch.randint(len(allowed), (BATCH, SEQ), generator=generator)]


def build_model(config: transformers.PretrainedConfig) -> torch.nn.Module:
    """The tiny model, eager attention, float32, eval mode, weights from seed 0."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.float().eval()


# --------------------------------------------------------------------------------------------
# Checking one model type (runs in a child process)
# --------------------------------------------------------------------------------------------


def describe_error(error: BaseException) -> str:
    """Exception type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__


def _innermost_frame(error: BaseException) -> str:
    """``file:line in function`` of the frame that raised (for diagnosing failures)."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return ""
    frame = frames[-1]
    return f"{frame.filename}:{frame.lineno} in {frame.name}"


def plan_source(model: torch.nn.Module, plans: str) -> str:
    """Where the plan comes from: a built-in plan, the config's tp_plan, or the generic planner."""
    if plans == "generic":
        return "generic"
    config = model.config
    if config.model_type in tensor_parallel.hf.plans.BUILTIN_PLANS:
        return "builtin"
    if getattr(config, "base_model_tp_plan", None):
        return "tp_plan"
    return "generic"


def logits_of(output: Any) -> torch.Tensor:
    logits = output.logits if hasattr(output, "logits") else output[0]
    return logits.float()


def check_split(model: torch.nn.Module, ids: torch.Tensor, expected: torch.Tensor, n: int,
                plans: str) -> dict[str, Any]:
    """Split a copy of ``model`` over ``n`` CPU devices, run ``ids``, compare the logits."""
    result: dict[str, Any] = {"ok": False, "max_diff": None, "collectives": {}, "error": None}
    try:
        plan = tensor_parallel.plan_for(model, n) if plans == "generic" else None
        split = tensor_parallel.tensor_parallel(copy.deepcopy(model), ["cpu"] * n, plan=plan,
                                                timeout=COLLECTIVE_TIMEOUT_S)
        with torch.no_grad(), tensor_parallel.count_collectives() as stats:
            actual = logits_of(split(input_ids=ids))
    except Exception as error:  # any failure is a finding, recorded and reported
        result["error"], result["where"] = describe_error(error), _innermost_frame(error)
        return result
    result["collectives"] = dict(stats.calls)
    if actual.shape != expected.shape:
        result["error"] = f"logits shape {tuple(actual.shape)} != unsharded {tuple(expected.shape)}"
        return result
    result["max_diff"] = (actual - expected).abs().max().item()
    result["ok"] = torch.allclose(actual, expected, atol=ATOL, rtol=RTOL)
    if not result["ok"]:
        result["error"] = f"logits differ by {result['max_diff']:.3g}"
    return result


def run_unsharded(model_type: str, report: Callable[[dict], None]) -> tuple[Any, Any, Any] | None:
    """Build and run the tiny model; ``None`` (and a report) if that fails."""
    try:
        config = tiny_config(model_type)
        model = build_model(config)
        ids = make_input_ids(config)
        with torch.no_grad():
            expected = logits_of(model(input_ids=ids))
        if not torch.isfinite(expected).all():
            raise FloatingPointError("unsharded logits are not finite")
    except Exception as error:  # an architecture the tiny config cannot build or run
        report({"status": "unsharded_fails", "error": describe_error(error),
                "where": _innermost_frame(error)})
        return None
    return model, ids, expected


def check_model_type(model_type: str, plans: str, report: Callable[[dict], None]) -> None:
    """Everything for one model type; ``report`` receives each stage's results as it ends."""
    unsharded = run_unsharded(model_type, report)
    if unsharded is None:
        return
    model, ids, expected = unsharded
    report({"status": "running", "plan_source": plan_source(model, plans), "model_class": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters())})
    splits: dict[str, Any] = {}
    for n in DEVICE_COUNTS:
        report({"stage": f"split over {n}"})
        splits[str(n)] = check_split(model, ids, expected, n, plans)
        report({"splits": dict(splits)})
    correct = all(s["ok"] for s in splits.values())
    report({"status": "correct" if correct else "split_fails", "stage": None})


def _child_main(model_type: str, plans: str, connection) -> None:
    """Entry point of the child process: quiet libraries, one thread, results over the pipe."""
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    logging.getLogger("tensor_parallel").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    try:
        check_model_type(model_type, plans, connection.send)
    except BaseException as error:  # never leave the parent without an answer
        connection.send({"status": "crashed", "error": describe_error(error)})
    finally:
        connection.close()


# --------------------------------------------------------------------------------------------
# The sweep (parent process)
# --------------------------------------------------------------------------------------------


def run_guarded(model_type: str, plans: str, timeout: float = TIMEOUT_S) -> dict[str, Any]:
    """Check one model type in a forked child; kill it after ``timeout`` seconds."""
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child_main, args=(model_type, plans, sender), daemon=True)
    start = time.monotonic()
    process.start()
    sender.close()
    result: dict[str, Any] = {"model_type": model_type, "status": "crashed", "plan_source": None}
    while True:
        remaining = timeout - (time.monotonic() - start)
        if remaining <= 0:
            result.update(status="timed_out", error=f"timed out after {timeout:.0f} s"
                          + (f" ({result['stage']})" if result.get("stage") else ""))
            process.kill()
            break
        if not receiver.poll(min(remaining, 1.0)):
            if not process.is_alive() and not receiver.poll():
                break
            continue
        try:
            result.update(receiver.recv())
        except EOFError:
            break
    process.join()
    if result["status"] in ("crashed", "running"):
        result.update(status="crashed", error=result.get("error") or f"child exited with code {process.exitcode}")
    result.pop("stage", None)
    result["seconds"] = round(time.monotonic() - start, 2)
    return result


def sweep(model_types: list[str], plans: str) -> list[dict[str, Any]]:
    """Check every model type in turn, logging one line each."""
    results = []
    for index, model_type in enumerate(model_types, 1):
        result = run_guarded(model_type, plans)
        logger.info("[%3d/%d] %-28s %-16s %6.1fs %s", index, len(model_types), model_type,
                    result["status"], result["seconds"], short_reason(result))
        results.append(result)
    return results


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def failure_reasons(result: dict[str, Any]) -> list[str]:
    """Every failure of one model type, one string each (empty when it split correctly)."""
    if result["status"] != "split_fails":
        return [result["error"]] if result.get("error") else []
    return [f"{n} devices: {s['error']}" for n, s in result["splits"].items() if not s["ok"]]


def short_reason(result: dict[str, Any]) -> str:
    return "; ".join(failure_reasons(result))


def totals(results: list[dict[str, Any]]) -> dict[str, int]:
    ran = [r for r in results if r["status"] in ("correct", "split_fails")]
    return {"types": len(results), "ran": len(ran),
            "correct": sum(r["status"] == "correct" for r in results)}


def totals_line(results: list[dict[str, Any]]) -> str:
    t = totals(results)
    share = 100.0 * t["correct"] / t["ran"] if t["ran"] else 0.0
    counts = " and ".join(map(str, DEVICE_COUNTS))
    return (f"{t['types']} types; {t['ran']} run unsharded; {t['correct']} split correctly over "
            f"{counts} CPU devices ({t['correct']}/{t['ran']} = {share:.1f}%)")


def by_plan_source(results: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """plan source -> (correct, run unsharded)."""
    table: dict[str, tuple[int, int]] = {}
    for source in ("builtin", "tp_plan", "generic"):
        ran = [r for r in results if r.get("plan_source") == source]
        table[source] = (sum(r["status"] == "correct" for r in ran), len(ran))
    return table


def _diff(result: dict[str, Any], n: int) -> str:
    split = result.get("splits", {}).get(str(n))
    if not split or split["max_diff"] is None:
        return "-" if not split else "error"
    return f"{split['max_diff']:.1e}"


def _count(result: dict[str, Any], kind: str, n: int = 2) -> str:
    split = result.get("splits", {}).get(str(n))
    return str(split["collectives"].get(kind, 0)) if split and split["error"] is None else "-"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(results: list[dict[str, Any]], meta: dict[str, str]) -> str:
    """The report: provenance, totals, the breakdown by plan source, one row per model type."""
    lines = [
        "# Coverage: causal-LM architectures of transformers split over CPU devices", "",
        f"- date: {meta['date']}",
        f"- transformers {meta['transformers']}, torch {meta['torch']}, tensor_parallel {meta['tensor_parallel']}",
        f"- plans: `{meta['plans']}`",
        f"- reproduce: `{meta['command']}`",
        f"- tiny configs: width 64, {N_LAYERS} layers, 4 heads (2 KV), vocabulary 128, eager attention, "
        f"float32; input ids ({BATCH}, {SEQ}); logits compared with atol = rtol = {ATOL:g}; "
        f"{TIMEOUT_S:.0f} s per type", "",
        f"**{totals_line(results)}**", "",
        "| plan source | correct / run unsharded |", "|---|---|",
    ]
    for source, (correct, ran) in by_plan_source(results).items():
        lines.append(f"| {source} | {correct} / {ran} |")
    lines += ["", "| type | status | plan | max diff @2 | max diff @3 | all_reduce @2 | all_gather @2 | reason |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model_type']} | {r['status']} | {r.get('plan_source') or '-'} | {_diff(r, 2)} | "
                     f"{_diff(r, 3)} | {_count(r, 'all_reduce')} | {_count(r, 'all_gather')} | "
                     f"{_cell(short_reason(r))} |")
    return "\n".join(lines) + "\n"


def summary(results: list[dict[str, Any]]) -> str:
    """The totals, the plan-source breakdown and the failures grouped by reason (stdout)."""
    lines = [totals_line(results)]
    lines += [f"  {source}: {correct}/{ran} correct" for source, (correct, ran) in by_plan_source(results).items()]
    groups: dict[str, list[str]] = {}
    for r in results:
        for reason in failure_reasons(r):
            groups.setdefault(f"[{r['status']}] {reason.split(': ', 1)[-1] if r['status'] == 'split_fails' else reason}",
                              []).append(r["model_type"])
    for reason, types in sorted(groups.items(), key=lambda item: -len(item[1])):
        lines.append(f"{len(types):3d} x {reason}\n      {', '.join(sorted(set(types)))}")
    return "\n".join(lines)


def write_reports(results: list[dict[str, Any]], meta: dict[str, str], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_markdown(results, meta))
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    logger.info("wrote %s and %s", out, out.with_suffix(".json"))


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.coverage", description=__doc__.splitlines()[0])
    parser.add_argument("--plans", choices=("auto", "generic"), default="auto",
                        help="auto: the library's choice (built-in, tp_plan, generic); generic: "
                             "tensor_parallel.plan_for(model) for every model")
    parser.add_argument("--types", default=None, help="comma-separated model types (default: all)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown report path (JSON next to it)")
    return parser.parse_args(argv)


def selected_types(types: str | None) -> list[str]:
    available = list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if types is None:
        return available
    chosen = [t.strip() for t in types.split(",") if t.strip()]
    unknown = [t for t in chosen if t not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]
    if unknown:
        raise SystemExit(f"not causal-LM model types of transformers {transformers.__version__}: {unknown}")
    return chosen


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    import tensor_parallel.hf  # noqa: F401  (imported before forking: every child shares it)
    argv_used = sys.argv[1:] if argv is None else argv
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "transformers": transformers.__version__, "torch": torch.__version__,
            "tensor_parallel": tensor_parallel.__version__, "plans": args.plans,
            "command": shlex.join(["python", "-m", "benchmarks.coverage", *argv_used])}
    start = time.monotonic()
    results = sweep(selected_types(args.types), args.plans)
    meta["wall_s"] = f"{time.monotonic() - start:.0f}"
    write_reports(results, meta, args.out)
    print(summary(results))


if __name__ == "__main__":
    main()
