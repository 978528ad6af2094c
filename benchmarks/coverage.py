"""Coverage sweep: which causal-LM architectures of the installed transformers split correctly.

For every model type in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` this builds a tiny random model
from the type's default config (shrunk generically: width 64, 2 layers, 4 heads, vocabulary
128, ...), runs it unsharded on a (2, 8) batch of token ids, then splits a copy over 2 and 3
CPU devices and compares the logits. Each model type runs in a forked child process with a
wall-clock limit, so a hanging or crashing model cannot stall the sweep.

Usage::

    python -m benchmarks.coverage                      # every type, the library's own plans
    python -m benchmarks.coverage --plans generic      # the generic default planner everywhere
    python -m benchmarks.coverage --types llama,gpt2 --results /tmp/coverage

Writes a Markdown report (``benchmarks/results/coverage.md``, or ``coverage-generic.md``), a
chart of its summary table, and the raw results as JSON next to it, plus a copy of the report
and the JSON in ``benchmarks/results/history/``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import logging
import multiprocessing
import shlex
import sys
import time
import traceback
import warnings
from typing import Any, Callable

import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import tensor_parallel
from benchmarks.common import RESULTS, source_state, write_report

logger = logging.getLogger("benchmarks.coverage")

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

#: config attribute -> tiny value, set wherever the attribute exists (also when it is None,
#: which many configs read as "derive it", and some models then fail to derive)
SIZES: dict[str, int] = {
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "embed_dim"), 64),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers", "encoder_layers",
                     "decoder_layers"), N_LAYERS),
    **dict.fromkeys(("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads",
                     "decoder_attention_heads"), 4),
    "num_key_value_heads": 2,
    **dict.fromkeys(("head_dim", "d_head", "d_kv"), 16),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "n_inner", "d_ff", "moe_intermediate_size",
                     "shared_expert_intermediate_size", "moe_shared_expert_intermediate_size",
                     "encoder_ffn_dim", "decoder_ffn_dim"), 128),
    "vocab_size": 128,
    **dict.fromkeys(("max_position_embeddings", "n_positions"), 128),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "num_experts_per_token"), 2),
    # Mamba-2 heads (bamba, falcon_h1): heads x head size = expand (2) x width
    "mamba_n_heads": 8,
    "mamba_d_head": 16,
    "mamba_d_ssm": 128,
    "n_shared_experts": 1,
}

#: sizes that follow the width: scaled by 64 / the config's original width
WIDTH_RATIO_KEYS = ("attention_hidden_size", "embedding_dim", "lru_width")

#: flags set wherever they exist: a causal LM built from an encoder config must be a decoder
FLAGS: dict[str, Any] = {"is_decoder": True}

#: attributes clamped to at most this value: grouped expert routing (deepseek) over 4 experts,
#: 2 layers that still mix their kinds (a dense layer then an MoE layer, attention every other
#: layer in hybrid models, no KV sharing), Mamba-2 heads that fit their groups, rotary
#: dimensions that fit a head
CLAMPS: dict[str, int] = {
    "n_group": 1, "num_expert_group": 1, "topk_group": 1,
    "first_k_dense_replace": 1, "attn_layer_period": 2, "attn_layer_offset": 1,
    "expert_layer_period": 2, "expert_layer_offset": 1, "num_kv_shared_layers": 0,
    "n_groups": 1, "expand": 1,  # mamba2: heads x head size = expand x width
    "rotary_dim": 8,
}

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers", "decoder_layers")
HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model", "embed_dim")
INDEX_LIST_SUFFIXES = ("_layers", "_idxs", "_indices", "_layer_ids")


def _is_config_dict(key: Any, value: Any, sub_configs: set[str]) -> bool:
    return isinstance(value, dict) and (key in sub_configs or "model_type" in value)


def _first_int(data: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    return next((data[k] for k in keys if isinstance(data.get(k), int)), None)


def kept_layers(data: dict[str, Any], old_layers: int) -> list[int]:
    """Which of the original layers the tiny model keeps: the first, and the layer that differs
    from it in the most per-layer lists and layer-index lists (full attention after sliding
    windows, MoE after dense, attention after Mamba); the last when none differs."""
    per_layer = [v for v in data.values() if isinstance(v, list) and len(v) == old_layers]
    index_lists = [set(v) for k, v in data.items() if isinstance(v, list) and _is_index_list(k, v)]

    def differences(i: int) -> int:
        return (sum(values[i] != values[0] for values in per_layer)
                + sum((i in indices) != (0 in indices) for indices in index_lists))

    best = max(range(1, old_layers), key=lambda i: (differences(i), i == old_layers - 1))
    return [0, best]


def _is_index_list(key: Any, value: list) -> bool:
    return (isinstance(key, str) and key.endswith(INDEX_LIST_SUFFIXES)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value))


def _layer_index(key: Any) -> int | None:
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    return int(key) if isinstance(key, str) and key.isdigit() else None


def _shrink_layer_lists(data: dict[str, Any], old_layers: int | None) -> None:
    """Cut per-layer lists (``layer_types``...), layer-index lists and layer-keyed dicts
    (``per_layer_config``) to the kept layers, renumbered."""
    if not old_layers or old_layers <= N_LAYERS:
        return
    kept = kept_layers(data, old_layers)
    new_index = {old: new for new, old in enumerate(kept)}
    for key, value in list(data.items()):
        if isinstance(value, list) and len(value) == old_layers:
            data[key] = [value[i] for i in kept]
        elif isinstance(value, list) and _is_index_list(key, value):
            data[key] = [new_index[v] for v in value if v in new_index]
        elif isinstance(value, dict) and value and all(_layer_index(k) is not None for k in value):
            data[key] = {type(k)(new_index[_layer_index(k)]): v for k, v in value.items()
                         if _layer_index(k) in new_index}


def _clamp_token_ids(data: dict[str, Any], vocab: int, outside: int | None) -> None:
    """Token ids outside the tiny vocabulary: pad becomes 0, the others ``outside``."""
    for key, value in list(data.items()):
        if not (isinstance(key, str) and key.endswith("token_id")):
            continue
        if isinstance(value, int) and value >= vocab:
            data[key] = 0 if key == "pad_token_id" else outside
        elif isinstance(value, list):
            kept = [v for v in value if isinstance(v, int) and v < vocab]
            data[key] = kept or outside


def _shrink_value(key: Any, value: Any, old_width: int | None) -> Any:
    """The tiny value of one (non-config) attribute."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if key in SIZES and (is_int or value is None):
        return SIZES[key]
    if key in WIDTH_RATIO_KEYS and is_int and old_width:
        return max(1, value * 64 // old_width)
    if key in FLAGS:
        return FLAGS[key]
    if key in CLAMPS and is_int:
        return min(value, CLAMPS[key])
    return value


def shrink_dict(data: dict[str, Any], sub_configs: set[str] = frozenset(),
                outside_token_id: int | None = None) -> dict[str, Any]:
    """A config's ``to_dict()`` with every size made tiny, sub-configs included (recursively)."""
    original, data = data, dict(data)
    old_layers, old_width = _first_int(data, LAYER_COUNT_KEYS), _first_int(data, HIDDEN_KEYS)
    for key, value in list(data.items()):
        if _is_config_dict(key, value, sub_configs):
            data[key] = shrink_dict(value, outside_token_id=outside_token_id)
        else:
            data[key] = _shrink_value(key, value, old_width)
    if "kv_lora_rank" in data:  # multi-head latent attention: one K/V head per query head, and
        data["num_key_value_heads"] = data.get("num_attention_heads")  # head_dim tied to the
        data["head_dim"] = original.get("head_dim") or data.get("qk_rope_head_dim")  # rotary size
    _shrink_layer_lists(data, old_layers)
    if isinstance(data.get("vocab_size"), int):
        _clamp_token_ids(data, data["vocab_size"], outside_token_id)
    return data


def tiny_config(model_type: str) -> transformers.PretrainedConfig:
    """The default config of ``model_type``, shrunk to a tiny model. Token ids outside the
    tiny vocabulary become None, or 0 where the config does not accept None."""
    config = transformers.AutoConfig.for_model(model_type)
    sub_configs = set(getattr(config, "sub_configs", {}) or {})
    for outside in (None, 0):
        data = shrink_dict(config.to_dict(), sub_configs, outside)
        for key in ("transformers_version", "model_type"):
            data.pop(key, None)
        try:
            return type(config).from_dict(data)
        except Exception as error:  # strict dataclass validation: an int field refuses None
            if outside is not None or "token_id" not in str(error):
                raise
    raise AssertionError("unreachable")


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
    """The tiny model, eager attention, float32, eval mode, weights from seed 0. A causal-LM
    class that takes one of the config's sub-configs (musicgen's decoder) is given that one."""
    model_class = transformers.AutoModelForCausalLM._model_mapping[type(config)]
    wanted = getattr(model_class, "config_class", None)
    if isinstance(wanted, type) and not isinstance(config, wanted):
        sub = (getattr(config, name, None) for name in (getattr(config, "sub_configs", None) or {}))
        config = next((c for c in sub if isinstance(c, wanted)), config)
    torch.manual_seed(0)
    model = model_class._from_config(config, attn_implementation="eager")
    return model.float().eval()


# --------------------------------------------------------------------------------------------
# Checking one model type (runs in a child process)
# --------------------------------------------------------------------------------------------


def describe_error(error: BaseException) -> str:
    """Exception type and the first line of its message (two when the first ends in ':',
    as pydantic-style validation errors do)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    message = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    return f"{type(error).__name__}: {message[:300]}"


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


def _generic_plan(model: torch.nn.Module, world_size: int) -> dict:
    """The generic default planner alone (built-in and shipped plans switched off), with the
    same two-token probe forward the library uses for transformers models."""
    from tensor_parallel.hf.plans import _probe_inputs

    return tensor_parallel.plan_for(model, world_size, example_inputs=_probe_inputs(model), builtin=False)


def check_split(model: torch.nn.Module, ids: torch.Tensor, expected: torch.Tensor, n: int,
                plans: str) -> dict[str, Any]:
    """Split a copy of ``model`` over ``n`` CPU devices, run ``ids``, compare the logits."""
    result: dict[str, Any] = {"ok": False, "max_diff": None, "collectives": {}, "split_layers": None,
                              "error": None}
    try:
        plan = _generic_plan(model, n) if plans == "generic" else None
        split = tensor_parallel.tensor_parallel(copy.deepcopy(model), ["cpu"] * n, plan=plan,
                                                timeout=COLLECTIVE_TIMEOUT_S)
        styles = split.plan.values()
        result["split_layers"] = sum(not isinstance(s, tensor_parallel.Replicate) for s in styles)
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
    report({"stage": "building and running unsharded"})
    unsharded = run_unsharded(model_type, report)
    if unsharded is None:
        return
    model, ids, expected = unsharded
    report({"status": "running", "plan_source": plan_source(model, plans),
            "model_class": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
            "blocks": N_LAYERS * (2 if getattr(model.config, "is_encoder_decoder", False) else 1)})
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


def _collect(receiver, result: dict[str, Any], deadline: float) -> bool:
    """Merge the child's reports into ``result`` until it closes the pipe (finished, raised or
    died); False if ``deadline`` passes first."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        if receiver.poll(remaining):
            try:
                result.update(receiver.recv())
            except EOFError:
                return True


def run_guarded(model_type: str, plans: str, timeout: float = TIMEOUT_S) -> dict[str, Any]:
    """Check one model type in a forked child; kill it after ``timeout`` seconds."""
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child_main, args=(model_type, plans, sender), daemon=True)
    start = time.monotonic()
    process.start()
    sender.close()  # the child holds the only write end: its exit ends the pipe
    result: dict[str, Any] = {"model_type": model_type, "status": "crashed", "plan_source": None}
    if not _collect(receiver, result, start + timeout):
        process.kill()
        stage = f" ({result['stage']})" if result.get("stage") else ""
        result.update(status="timed_out", error=f"timed out after {timeout:g} s{stage}")
    process.join()
    receiver.close()
    if result["status"] in ("crashed", "running"):
        error = result.get("error") or f"child exited with code {process.exitcode}"
        result.update(status="crashed", error=error)
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


def ran_unsharded(result: dict[str, Any]) -> bool:
    """The tiny model built and ran unsharded (its plan source is known from then on)."""
    return result.get("plan_source") is not None


def split_nothing(result: dict[str, Any]) -> bool:
    """Correct only because the plan split no layer: everything was replicated."""
    splits = result.get("splits", {}).values()
    return result["status"] == "correct" and all(s.get("split_layers") == 0 for s in splits)


def at_floor(result: dict[str, Any]) -> bool:
    """Correct at the Megatron floor: at 2 devices one forward makes at least one all-reduce and
    at most 2 collectives per block, plus 2 (the embedding's and the LM head's)."""
    split = result.get("splits", {}).get("2")
    if result["status"] != "correct" or not split or not result.get("blocks"):
        return False
    calls = split["collectives"]
    return calls.get("all_reduce", 0) >= 1 and sum(calls.values()) <= 2 * result["blocks"] + 2


def totals(results: list[dict[str, Any]]) -> dict[str, int]:
    return {"types": len(results), "ran": sum(map(ran_unsharded, results)),
            "correct": sum(r["status"] == "correct" for r in results),
            "split_nothing": sum(map(split_nothing, results)),
            "at_floor": sum(map(at_floor, results))}


def totals_line(results: list[dict[str, Any]]) -> str:
    t = totals(results)
    share = 100.0 * t["correct"] / t["ran"] if t["ran"] else 0.0
    counts = " and ".join(map(str, DEVICE_COUNTS))
    return (f"{t['types']} types; {t['ran']} run unsharded; {t['correct']} split correctly over "
            f"{counts} CPU devices ({t['correct']}/{t['ran']} = {share:.1f}%); of those, "
            f"{t['split_nothing']} split no layer at all (everything replicated); {t['at_floor']} of "
            f"{t['correct']} at the Megatron floor (<= 2 collectives per block + 2, one all-reduce at least)")


def by_plan_source(results: list[dict[str, Any]]) -> dict[str, tuple[int, int, int, int]]:
    """plan source -> (correct, run unsharded, correct but split no layer, at the floor)."""
    table: dict[str, tuple[int, int, int, int]] = {}
    for source in ("builtin", "tp_plan", "generic"):
        ran = [r for r in results if r.get("plan_source") == source]
        correct = sum(r["status"] == "correct" for r in ran)
        table[source] = (correct, len(ran), sum(map(split_nothing, ran)), sum(map(at_floor, ran)))
    return table


def _diff(result: dict[str, Any], n: int) -> str:
    split = result.get("splits", {}).get(str(n))
    if not split or split["max_diff"] is None:
        return "-" if not split else "error"
    return f"{split['max_diff']:.1e}"


def _count(result: dict[str, Any], kind: str, n: int = 2) -> str:
    split = result.get("splits", {}).get(str(n))
    return str(split["collectives"].get(kind, 0)) if split and split["error"] is None else "-"


def _field(result: dict[str, Any], name: str, n: int = 2) -> str:
    value = result.get("splits", {}).get(str(n), {}).get(name)
    return "-" if value is None else str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(results: list[dict[str, Any]], meta: dict[str, str]) -> str:
    """The report: provenance, totals, the breakdown by plan source, one row per model type."""
    lines = [
        "# Coverage: causal-LM architectures of transformers split over CPU devices", "",
        f"- date: {meta['date']}",
        f"- transformers {meta['transformers']}, torch {meta['torch']}, "
        f"tensor_parallel {meta['tensor_parallel']} at {meta['source']}",
        f"- sweep wall time: {meta['wall_s']} s",
        f"- plans: `{meta['plans']}`",
        f"- reproduce: `{meta['command']}`",
        f"- tiny configs: width 64, {N_LAYERS} layers, 4 heads (2 KV), vocabulary 128, eager attention, "
        f"float32; input ids ({BATCH}, {SEQ}); logits compared with atol = rtol = {ATOL:g}; "
        f"{TIMEOUT_S:.0f} s per type", "",
        f"**{totals_line(results)}**", "",
        "| plan source | run unsharded | correct | of the correct: split no layer | at the floor |",
        "|---|---|---|---|---|",
    ]
    for source, (correct, ran, nothing, floor) in by_plan_source(results).items():
        lines.append(f"| {source} | {ran} | {correct} | {nothing} | {floor} |")
    lines += ["", "Layers split: the plan's entries at 2 devices that are not `Replicate()`. Collectives: "
              "logical calls in one forward at 2 devices.", "",
              "| type | status | plan | layers split @2 | max diff @2 | max diff @3 | all_reduce @2 | "
              "all_gather @2 | floor | reason |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model_type']} | {r['status']} | {r.get('plan_source') or '-'} | "
                     f"{_field(r, 'split_layers')} | {_diff(r, 2)} | {_diff(r, 3)} | "
                     f"{_count(r, 'all_reduce')} | {_count(r, 'all_gather')} | "
                     f"{'yes' if at_floor(r) else '-'} | {_cell(short_reason(r))} |")
    return "\n".join(lines) + "\n"


def grouped_failures(results: list[dict[str, Any]]) -> dict[str, dict[str, list[str]]]:
    """``[status] reason`` -> model type -> the device counts it failed at (empty: not split)."""
    groups: dict[str, dict[str, list[str]]] = {}
    for r in results:
        failed = [(n, s["error"]) for n, s in r.get("splits", {}).items() if not s["ok"]]
        if r["status"] != "split_fails":
            failed = [(None, r["error"])] if r.get("error") else []
        for n, error in failed:
            counts = groups.setdefault(f"[{r['status']}] {error}", {}).setdefault(r["model_type"], [])
            counts.extend([n] if n else [])
    return dict(sorted(groups.items(), key=lambda item: -len(item[1])))


def summary(results: list[dict[str, Any]]) -> str:
    """The totals, the plan-source breakdown and the failures grouped by reason (stdout)."""
    lines = [totals_line(results)]
    lines += [f"  {source}: {correct}/{ran} correct ({nothing} of them split no layer, {floor} at the floor)"
              for source, (correct, ran, nothing, floor) in by_plan_source(results).items()]
    lines.append("failures by reason:")
    for reason, types in grouped_failures(results).items():
        named = [f"{t} @{','.join(ns)}" if ns else t for t, ns in sorted(types.items())]
        lines.append(f"{len(types):3d} x {reason}\n      {', '.join(named)}")
    nothing = sorted(r["model_type"] for r in results if split_nothing(r))
    if nothing:
        lines.append(f"correct but split no layer: {', '.join(nothing)}")
    return "\n".join(lines)


def write_reports(results: list[dict[str, Any]], meta: dict[str, str], folder: str) -> None:
    name = "coverage" if meta["plans"] == "auto" else f"coverage-{meta['plans']}"
    write_report(name, render_markdown(results, meta), data={"meta": meta, "results": results}, results=folder,
                 columns=("run unsharded", "correct"))


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.coverage",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--plans", choices=("auto", "generic"), default="auto",
                        help="auto: the library's choice (built-in, tp_plan, generic); generic: "
                             "tensor_parallel.plan_for(model, builtin=False) for every model")
    parser.add_argument("--types", default=None, help="comma-separated model types (default: all)")
    parser.add_argument("--results", default=RESULTS, help="results folder (default benchmarks/results)")
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
            "tensor_parallel": tensor_parallel.__version__, "source": source_state(), "plans": args.plans,
            "command": shlex.join(["python", "-m", "benchmarks.coverage", *argv_used])}
    start = time.monotonic()
    results = sweep(selected_types(args.types), args.plans)
    meta["wall_s"] = f"{time.monotonic() - start:.0f}"
    write_reports(results, meta, args.results)
    logger.info("%s", summary(results))


if __name__ == "__main__":
    main()
