"""Plans for transformers architectures, in the Megatron layout.

Built-in plans (:data:`BUILTIN_PLANS`) cut attention by whole heads (grouped-query aware) and
MLPs column -> row: two all-reduces per decoder layer. The embedding and LM head stay whole
when they are a small share of the model; else they are cut by vocabulary, which adds one
collective for the embedding and one for the logits. Architectures without a
built-in plan use the ``base_model_tp_plan`` their config ships, translated into our styles;
the rest fall back to the generic default plan (always correct, gathers after each layer).
"""

from __future__ import annotations

import logging
from typing import Callable, Mapping

import torch
from torch import nn

from ..plan import Plan, path_matches, plan_for
from ..styles import (AttentionParallel, ColwiseParallel, EmbeddingParallel, ExpertsParallel,
                      LinearKind, Replicate, RowwiseParallel, Style, register_linear_kind)

__all__ = ["BUILTIN_PLANS", "plan_for_pretrained", "translate_tp_plan"]

logger = logging.getLogger(__name__)


def _register_conv1d() -> None:
    """transformers' Conv1D (GPT-2): a Linear with its weight stored (in, out)."""
    from transformers.pytorch_utils import Conv1D

    register_linear_kind(Conv1D, LinearKind(out_dim=1, in_dim=0, feature_dim=-1, out_attr="nf",
                                            in_attr=None, apply=lambda m, x, w: x @ w))


def _register_falcon_linear() -> None:
    """Falcon's Linear computes ``x @ W.T + b`` in its own forward: the same contract."""
    from transformers.models.falcon.modeling_falcon import FalconLinear

    register_linear_kind(FalconLinear, LinearKind(out_dim=0, in_dim=1, feature_dim=-1, out_attr="out_features",
                                                  in_attr="in_features", apply=lambda m, x, w: x @ w.T))


_register_conv1d()
_register_falcon_linear()


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _base(module: nn.Module) -> str:
    """Path prefix of the base model inside ``module`` ("model." for LlamaForCausalLM)."""
    for prefix in (getattr(module, "base_model_prefix", ""), "model", "transformer"):
        if prefix and isinstance(getattr(module, prefix, None), nn.Module):
            return prefix + "."
    return ""


def _heads(config, heads="num_attention_heads", kv="num_key_value_heads") -> tuple[int, int, int]:
    num_heads = getattr(config, heads)
    num_kv = getattr(config, kv, None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return num_heads, num_kv, head_dim


def tied_embeddings(module: nn.Module) -> bool:
    """Whether the LM head shares the input embedding's weight: by identity, or by the config
    (under ``init_empty_weights`` the ties of a freshly built model are not made yet)."""
    embeddings = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    if embeddings is None or head is None or not hasattr(head, "weight"):
        return False
    config = module.config.get_text_config() if hasattr(module.config, "get_text_config") else module.config
    return head.weight is embeddings.weight or bool(getattr(config, "tie_word_embeddings", False))


_tied = tied_embeddings


#: The embedding and the LM head stay whole on every device when they hold less than this share
#: of the model's parameters (a 7B Llama: 4%): copying them costs little memory and saves the
#: embedding's collective and the all-gather of the logits (1 + vocabulary / width activations
#: per forward). Above it (small models with a large vocabulary) they are cut by vocabulary.
REPLICATE_VOCABULARY_BELOW = 0.10


def vocabulary_share(module: nn.Module, embedding: str | None = None, head: str | None = None) -> float:
    """The share of ``module``'s parameters held by the embedding and the LM head (paths in
    ``module``; default: its input and output embeddings), a tied pair counted once.

    Example::

        >>> import transformers
        >>> from tensor_parallel.hf.plans import vocabulary_share
        >>> config = transformers.LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=4)
        >>> round(vocabulary_share(transformers.LlamaForCausalLM(config)), 2)
        0.55
    """
    total = sum(p.numel() for p in module.parameters())
    embedding_module = module.get_submodule(embedding) if embedding else module.get_input_embeddings()
    head_module = getattr(module, head, None) if head else module.get_output_embeddings()
    weight = getattr(embedding_module, "weight", None)
    vocabulary = weight.numel() if isinstance(weight, torch.Tensor) else 0
    head_weight = getattr(head_module, "weight", None)
    if isinstance(head_weight, torch.Tensor) and head_weight is not weight:
        if _tied(module):  # tied by the config, not yet in fact (under init_empty_weights)
            total -= head_weight.numel()
        else:
            vocabulary += head_weight.numel()
    return vocabulary / total if total else 0.0


def _embedding_and_head(module: nn.Module, embedding: str, head: str = "lm_head") -> Plan:
    """Whole embedding and LM head when they are a small share of the model
    (:data:`REPLICATE_VOCABULARY_BELOW`); else a vocabulary-split embedding and LM head (they
    stay tied when tied), or the cheaper embedding-dim split of an untied embedding (an
    all-gather instead of an all-reduce)."""
    has_head = isinstance(getattr(module, head, None), nn.Module)
    if vocabulary_share(module, embedding, head) < REPLICATE_VOCABULARY_BELOW:
        return {embedding: Replicate(), **({head: Replicate()} if has_head else {})}
    plan: Plan = {embedding: EmbeddingParallel(dim=0 if _tied(module) else 1)}
    if has_head:
        plan[head] = ColwiseParallel(gather_output=True)
    return plan


def _matches(module: nn.Module, pattern: str) -> bool:
    return any(path_matches(path, pattern) for path, _ in module.named_modules())


def _present(module: nn.Module, plan: Plan) -> Plan:
    """Drop entries for modules this model does not have (a base model has no LM head)."""
    return {pattern: style for pattern, style in plan.items() if _matches(module, pattern)}


# --------------------------------------------------------------------------------------------
# Built-in plans
# --------------------------------------------------------------------------------------------


def _llama_like(module: nn.Module) -> Plan:
    """llama, mistral, qwen2, qwen3, gemma, gemma2 and their kin."""
    config, base = module.config, _base(module)
    num_heads, num_kv, head_dim = _heads(config)
    layer = f"{base}layers.*"
    plan = _embedding_and_head(module, f"{base}embed_tokens")
    plan.update({
        f"{layer}.self_attn": AttentionParallel(num_heads=num_heads, head_dim=head_dim, num_kv_heads=num_kv,
                                                attributes=(("num_key_value_groups", "groups"),)),
        f"{layer}.mlp.gate_proj": ColwiseParallel(),
        f"{layer}.mlp.up_proj": ColwiseParallel(),
        f"{layer}.mlp.down_proj": RowwiseParallel(),
    })
    return plan


def _mixtral(module: nn.Module) -> Plan:
    """Llama attention; every expert's intermediate dimension split, the router replicated."""
    plan = _llama_like(module)
    layer = f"{_base(module)}layers.*"
    for name in ("gate_proj", "up_proj", "down_proj"):
        del plan[f"{layer}.mlp.{name}"]
    plan[f"{layer}.mlp.experts"] = ExpertsParallel()
    return plan


def _phi3(module: nn.Module) -> Plan:
    """Fused q|k|v blocks and fused gate|up; the attention reads head counts from its config."""
    config, base = module.config, _base(module)
    num_heads, num_kv, head_dim = _heads(config)
    layer = f"{base}layers.*"
    plan = _embedding_and_head(module, f"{base}embed_tokens")
    plan.update({
        f"{layer}.self_attn": AttentionParallel(
            num_heads=num_heads, head_dim=head_dim, num_kv_heads=num_kv, q=None, k=None, v=None,
            qkv="qkv_proj", layout="blocks",
            attributes=(("num_key_value_groups", "groups"), ("num_key_value_heads", "kv_heads"),
                        ("config.num_attention_heads", "heads"))),
        f"{layer}.mlp.gate_up_proj": ColwiseParallel(parts=2),
        f"{layer}.mlp.down_proj": RowwiseParallel(),
    })
    return plan


def _gpt2(module: nn.Module) -> Plan:
    config, base = module.config, _base(module)
    heads = config.n_head
    plan = _embedding_and_head(module, f"{base}wte")
    plan.update({
        f"{base}h.*.attn": AttentionParallel(num_heads=heads, head_dim=config.n_embd // heads, q=None,
                                             k=None, v=None, qkv="c_attn", o="c_proj", layout="blocks",
                                             attributes=(("split_size", "width"),)),
        f"{base}h.*.mlp.c_fc": ColwiseParallel(),
        f"{base}h.*.mlp.c_proj": RowwiseParallel(),
    })
    return plan


def _gpt_neox(module: nn.Module) -> Plan:
    config, base = module.config, _base(module)
    heads = config.num_attention_heads
    plan = _embedding_and_head(module, f"{base}embed_in", head="embed_out")
    plan.update({
        f"{base}layers.*.attention": AttentionParallel(
            num_heads=heads, head_dim=config.hidden_size // heads, q=None, k=None, v=None,
            qkv="query_key_value", o="dense", layout="per_head"),
        f"{base}layers.*.mlp.dense_h_to_4h": ColwiseParallel(),
        f"{base}layers.*.mlp.dense_4h_to_h": RowwiseParallel(),
    })
    return plan


def _gptj(module: nn.Module) -> Plan:
    config, base = module.config, _base(module)
    heads = config.n_head
    plan = _embedding_and_head(module, f"{base}wte")
    plan.update({
        f"{base}h.*.attn": AttentionParallel(
            num_heads=heads, head_dim=config.n_embd // heads, o="out_proj",
            attributes=(("num_attention_heads", "heads"),)),  # read by transformers <= 5.17
        f"{base}h.*.mlp.fc_in": ColwiseParallel(),
        f"{base}h.*.mlp.fc_out": RowwiseParallel(),
    })
    return plan


def _opt(module: nn.Module) -> Plan:
    config, base = module.config, _base(module)
    heads = config.num_attention_heads
    plan = _embedding_and_head(module, f"{base}decoder.embed_tokens")
    plan.update({
        f"{base}decoder.layers.*.self_attn": AttentionParallel(
            num_heads=heads, head_dim=config.hidden_size // heads, o="out_proj",
            attributes=(("num_heads", "heads"),)),
        f"{base}decoder.layers.*.fc1": ColwiseParallel(),
        f"{base}decoder.layers.*.fc2": RowwiseParallel(),
    })
    return plan


def _bloom(module: nn.Module) -> Plan:
    """Per-head fused q/k/v; the ALiBi tensor built for all heads is cut to the rank's heads."""
    config, base = module.config, _base(module)
    heads = config.n_head
    plan = _embedding_and_head(module, f"{base}word_embeddings")
    plan.update({
        f"{base}h.*.self_attention": AttentionParallel(
            num_heads=heads, head_dim=config.hidden_size // heads, q=None, k=None, v=None,
            qkv="query_key_value", o="dense", layout="per_head",
            attributes=(("num_heads", "heads"),), head_inputs=(("alibi", "flat"),)),
        f"{base}h.*.mlp.dense_h_to_4h": ColwiseParallel(),
        f"{base}h.*.mlp.dense_4h_to_h": RowwiseParallel(),
    })
    return plan


def _falcon(module: nn.Module) -> Plan:
    """All three fused layouts: grouped (new decoder), per head, and multi-query (q blocks,
    one k and v replicated on every rank)."""
    config, base = module.config, _base(module)
    heads = config.num_attention_heads
    if config.new_decoder_architecture:
        kv, layout = config.num_kv_heads, "grouped"
    elif config.multi_query:
        kv, layout = 1, "blocks"
    else:
        kv, layout = heads, "per_head"
    plan = _embedding_and_head(module, f"{base}word_embeddings")
    plan.update({
        f"{base}h.*.self_attention": AttentionParallel(
            num_heads=heads, head_dim=config.hidden_size // heads, num_kv_heads=kv, q=None, k=None,
            v=None, qkv="query_key_value", o="dense", layout=layout,
            attributes=(("num_heads", "heads"), ("num_kv_heads", "kv_heads")),
            head_inputs=(("alibi", "dim1"), ("attention_mask", "dim1"))),
        f"{base}h.*.mlp.dense_h_to_4h": ColwiseParallel(),
        f"{base}h.*.mlp.dense_4h_to_h": RowwiseParallel(),
    })
    return plan


def _t5(module: nn.Module) -> Plan:
    """Encoder and decoder; the relative position bias table is cut to the rank's heads."""
    config = module.config
    attention = AttentionParallel(num_heads=config.num_heads, head_dim=config.d_kv, q="q", k="k", v="v",
                                  o="o", attributes=(("n_heads", "heads"), ("inner_dim", "width")),
                                  head_tables=("relative_attention_bias",))
    if vocabulary_share(module, "shared") < REPLICATE_VOCABULARY_BELOW:
        plan: Plan = dict.fromkeys(("shared", "encoder.embed_tokens", "decoder.embed_tokens", "lm_head"), Replicate())
    else:
        embedding = EmbeddingParallel(dim=0 if _tied(module) else 1)
        plan = {"shared": embedding, "encoder.embed_tokens": embedding, "decoder.embed_tokens": embedding}
        if _tied(module):
            plan["lm_head"] = ColwiseParallel(gather_output=True)
    for stack in ("encoder", "decoder"):
        plan[f"{stack}.block.*.layer.0.SelfAttention"] = attention
        plan[f"{stack}.block.*.layer.1.EncDecAttention"] = attention
        plan[f"{stack}.block.*.layer.*.DenseReluDense.wi*"] = ColwiseParallel()
        plan[f"{stack}.block.*.layer.*.DenseReluDense.wo"] = RowwiseParallel()
    return plan


def _bert_like(module: nn.Module) -> Plan:
    """bert and roberta: heads whole per rank; the tied MLM decoder (its bias is tied too) and
    the embeddings stay whole."""
    config, base = module.config, _base(module)
    heads = config.num_attention_heads
    layer = f"{base}encoder.layer.*"
    return {
        f"{layer}.attention": AttentionParallel(
            num_heads=heads, head_dim=config.hidden_size // heads, q="self.query", k="self.key",
            v="self.value", o="output.dense"),
        f"{layer}.intermediate.dense": ColwiseParallel(),
        f"{layer}.output.dense": RowwiseParallel(),
    }


BUILTIN_PLANS: dict[str, Callable[[nn.Module], Plan]] = {
    "llama": _llama_like,
    "mistral": _llama_like,
    "qwen2": _llama_like,
    "qwen3": _llama_like,
    "gemma": _llama_like,
    "gemma2": _llama_like,
    "mixtral": _mixtral,
    "phi3": _phi3,
    "gpt2": _gpt2,
    "gpt_neox": _gpt_neox,
    "gptj": _gptj,
    "opt": _opt,
    "bloom": _bloom,
    "falcon": _falcon,
    "t5": _t5,
    "bert": _bert_like,
    "roberta": _bert_like,
}


# --------------------------------------------------------------------------------------------
# Shipped tp_plans
# --------------------------------------------------------------------------------------------

_SIMPLE_STYLES: dict[str, Style] = {
    "colwise": ColwiseParallel(),
    "rowwise": RowwiseParallel(),
    "rowwise_split_input": RowwiseParallel(),
    "colwise_gather_output": ColwiseParallel(gather_output=True),
    "packed_colwise": ColwiseParallel(parts=2),
    "embedding_rowwise": EmbeddingParallel(dim=0),
    "embedding_colwise": EmbeddingParallel(dim=1),
}


def translate_tp_plan(module: nn.Module, tp_plan: dict[str, str], world_size: int = 2) -> Plan:
    """Our plan for a transformers ``base_model_tp_plan`` (paths relative to the base model).

    The q/k/v column splits and the o row split of an attention module become one
    :class:`AttentionParallel` (whole heads, uneven and GQA-aware). An attention module we
    cannot recognise keeps transformers' plain splits only where its heads divide evenly by
    ``world_size`` (what those plans assume), else it stays whole. Entries we cannot express
    (expert parallelism, MLA projections) stay whole too: always correct, if less split.

    Example::

        >>> import transformers
        >>> from tensor_parallel.hf import translate_tp_plan
        >>> config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
        >>> model = transformers.LlamaForCausalLM(config)
        >>> sorted(translate_tp_plan(model, config.base_model_tp_plan))[:2]
        ['model.layers.*.mlp.down_proj', 'model.layers.*.mlp.gate_proj']
    """
    base = _base(module)
    groups: dict[str, dict[str, str]] = {}
    for pattern, action in tp_plan.items():
        parent, _, leaf = pattern.rpartition(".")
        groups.setdefault(parent, {})[leaf] = action
    plan: Plan = {}
    for parent, roles in groups.items():
        path = f"{base}{parent}" if parent else base.rstrip(".")
        if parent and _is_attention(module, path):
            style = _attention_from_config(module, path, roles)
            if style is not None:
                plan[path] = style
            elif _plain_attention_ok(module, path, roles, world_size):
                plan.update({f"{path}.{leaf}": _SIMPLE_STYLES[a] for leaf, a in roles.items()})
            else:
                logger.info("tp_plan attention at %s: not recognised and not splittable as it is "
                            "over %d devices; it stays whole", path, world_size)
            continue
        for leaf, action in roles.items():
            target = f"{path}.{leaf}" if path else leaf
            if action == "moe_tp_experts" and _has_special_parts(tp_plan, f"{parent}.{leaf}" if parent else leaf):
                logger.info("tp_plan experts at %s have parts we cannot split alike; they stay whole", target)
                continue
            style = _translate_entry(module, target, action)
            if style is None:
                logger.info("tp_plan entry %s: %r is not translated; it stays whole", target, action)
                continue
            plan[target] = style
    if _sparse_activations(module):  # an MLP that takes statistics over its intermediate features
        plan = {p: s for p, s in plan.items() if not p.rpartition(".")[0].endswith("mlp")}
    return _present(module, _keep_ties(module, plan))


def _has_special_parts(tp_plan: Mapping[str, str], experts: str) -> bool:
    """Entries inside an experts module other than its fused weights (an identity expert, say):
    their output would be summed once per rank by the experts' all-reduce."""
    inside = {p: a for p, a in tp_plan.items() if p.startswith(experts + ".")}
    return any(a not in ("packed_colwise", "colwise", "rowwise") for a in inside.values())


def _translate_entry(module: nn.Module, pattern: str, action: str) -> Style | None:
    if action == "moe_tp_experts":
        style: Style = ExpertsParallel()
        return style if _checks(module, pattern, style) else None
    style = _SIMPLE_STYLES.get(action)
    return style if style is not None and _checks(module, pattern, style) else None


def _checks(module: nn.Module, pattern: str, style: Style) -> bool:
    """``style`` can split every module ``pattern`` matches (and it matches some)."""
    matched = False
    for path, sub in module.named_modules():
        if path_matches(path, pattern):
            matched = True
            try:
                style.check(sub, path, 1)
            except (TypeError, ValueError):
                return False
    return matched


def _plain_attention_ok(module: nn.Module, path: str, roles: dict[str, str], world_size: int) -> bool:
    """transformers' own plain q/k/v/o splits: right only when heads divide evenly and every
    entry is an ordinary column/row split of a submodule (no per-head parameters)."""
    if any(action not in ("colwise", "rowwise") for action in roles.values()):
        return False
    if list(roles.values()).count("rowwise") != 1:  # one output projection, one all-reduce
        return False
    if not all(_checks(module, f"{path}.{leaf}", _SIMPLE_STYLES[a]) for leaf, a in roles.items()):
        return False
    return _heads_divide(module, world_size)


def _sparse_activations(module: nn.Module) -> bool:
    pattern = getattr(_text_config(module), "activation_sparsity_pattern", None)
    return bool(pattern) and any(pattern)


def _text_config(module: nn.Module):
    config = module.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _is_attention(module: nn.Module, pattern: str) -> bool:
    return any(path_matches(path, pattern) and any(word in type(sub).__name__ for word in ("Attention", "Attn", "MLA"))
               for path, sub in module.named_modules())


def _heads_divide(module: nn.Module, world_size: int) -> bool:
    try:
        num_heads, num_kv, _ = _heads(_text_config(module))
    except Exception:  # configs with per-layer head counts and the like
        return False
    return num_heads % world_size == 0 and num_kv % world_size == 0


def _keep_ties(module: nn.Module, plan: Plan) -> Plan:
    """A tied embedding and LM head must be cut alike: by vocabulary, both."""
    if not tied_embeddings(module):
        return plan
    embedding = next((p for p, s in plan.items() if isinstance(s, EmbeddingParallel)), None)
    if embedding is None:
        return plan
    plan[embedding] = EmbeddingParallel(dim=0)
    if isinstance(getattr(module, "lm_head", None), nn.Module):
        plan["lm_head"] = ColwiseParallel(gather_output=True)
    return plan


_ROLE_NAMES = {"q": ("q_proj", "query", "q"), "k": ("k_proj", "key", "k"), "v": ("v_proj", "value", "v")}


def _attention_from_config(module: nn.Module, path: str, roles: dict[str, str]) -> AttentionParallel | None:
    rows = [leaf for leaf, action in roles.items() if action == "rowwise"]
    columns = {leaf for leaf, action in roles.items() if action == "colwise"}
    names = {role: next((n for n in options if n in columns), None) for role, options in _ROLE_NAMES.items()}
    if len(rows) != 1 or None in names.values() or columns != set(names.values()):
        return None
    try:
        num_heads, num_kv, head_dim = _heads(_text_config(module))
    except Exception:  # configs with per-layer head counts and the like
        return None
    style = AttentionParallel(num_heads=num_heads, head_dim=head_dim, num_kv_heads=num_kv, q=names["q"],
                              k=names["k"], v=names["v"], o=rows[0],
                              attributes=(("num_key_value_groups", "groups"),))
    for sub_path, sub in module.named_modules():
        if path_matches(sub_path, path):
            try:
                style.check(sub, sub_path, 1)
            except (TypeError, ValueError) as error:
                logger.info("tp_plan attention at %s not recognised: %s", path, error)
                return None
    return style


# --------------------------------------------------------------------------------------------
# Choosing
# --------------------------------------------------------------------------------------------


def plan_for_pretrained(module: nn.Module, world_size: int) -> Plan:
    """The plan for a transformers model: built-in, else translated tp_plan, else generic.

    Example::

        >>> import transformers
        >>> from tensor_parallel.hf import plan_for_pretrained
        >>> config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
        >>> plan = plan_for_pretrained(transformers.LlamaForCausalLM(config), 2)
        >>> plan["model.layers.*.mlp.down_proj"]
        RowwiseParallel()
    """
    model_type = getattr(module.config, "model_type", None)
    if model_type in BUILTIN_PLANS:
        return _present(module, BUILTIN_PLANS[model_type](module))
    tp_plan = getattr(module.config, "base_model_tp_plan", None) or {}
    if tp_plan:
        plan = translate_tp_plan(module, dict(tp_plan), world_size)
        if plan:
            logger.info("%s: no built-in plan; translated the tp_plan its config ships", model_type)
            return plan
    logger.info("%s: no built-in or usable shipped plan; using the generic default plan", model_type)
    return plan_for(module, world_size, example_inputs=_probe_inputs(module), builtin=False)


def _probe_inputs(module: nn.Module) -> dict | None:
    """A two-token input for one probe forward (finds weights read outside their layer)."""
    name = getattr(module, "main_input_name", "input_ids")
    if name != "input_ids":
        return None
    device = next((p.device for p in module.parameters()), None)
    inputs: dict = {"input_ids": torch.tensor([[1, 2]], device=device)}
    if hasattr(module.config, "use_cache"):
        inputs["use_cache"] = False  # a probe needs no cache (and some caches are sized oddly)
    if getattr(module.config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = torch.tensor([[1]], device=device)
    return inputs
