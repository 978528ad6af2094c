"""Translating a legacy :class:`~tensor_parallel.Config` into a plan of styles.

:func:`config_to_plan` reads a Config's four tables against one module: which layers its state
rules cut and how, where its output rules sum or gather, which attributes its attribute rules
change. It picks the style that does the same for each layer, then checks that every tensor is
cut exactly as the Config says and that every collective it asks for has its place. A rule it
cannot express raises ``ValueError`` naming the rule (regex and action) and what to do.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from torch import nn

from .legacy import Config, Scale, Split, StateAction, _first_rule, _parse_string
from .plan import Plan, _is_transformers_model, resolve_plan
from .split import Shard, assign_heads, layout_for
from .styles import AttentionParallel, ColwiseParallel, EmbeddingParallel, RowwiseParallel, Style, linear_kind

__all__ = ["config_to_plan"]

logger = logging.getLogger(__name__)

_FIX = "pass plan= with styles instead (README: 'Coming from tensor_parallel 2.0')"




@dataclass(frozen=True)
class _Action:
    """One input/output/attribute action on one module, with the rule it came from."""

    table: str
    pattern: str
    key: Any
    action: Any

    def describe(self) -> str:
        return f"{self.table} rule {self.pattern!r} {{{self.key!r}: {self.action!r}}}"

    def parsed(self) -> tuple[str, int | None]:
        if isinstance(self.action, str):
            return _parse_string(self.action, self.pattern, self.table)
        if type(self.action) is Split:
            return "split", self.action.dim  # Split(world_size, dim) as an input action
        return "callable", None


_CACHE_ARGUMENTS = {"past_key_value", "past_key_values", "layer_past"}


class _Translation:
    """One Config against one module: the plan, and the checks that it means the same."""

    def __init__(self, config: Config, module: nn.Module, world_size: int) -> None:
        self.config, self.root, self.world_size = config, module, world_size
        self.modules = dict(module.named_modules())
        self.tensors = module.state_dict(keep_vars=True)
        self.rules = self._state_rules()
        self.actions = {path: self._module_actions(path) for path in self.modules}
        self.plan: dict[str, Style] = {}
        self.consumed: set[tuple[str, str, Any]] = set()  # (path, table, key) expressed by the plan

    # -- the Config, per tensor and per module --

    def _state_rules(self) -> dict[str, tuple[re.Pattern, StateAction] | None]:
        """State key -> the rule that cuts it. A tied tensor takes the rule of its first name,
        as in the original (it walked the deduplicated ``named_parameters()``)."""
        first: dict[int, tuple[re.Pattern, StateAction] | None] = {}
        used: set[re.Pattern] = set()
        named = list(self.root.named_parameters()) + list(self.root.named_buffers())
        for name, tensor in named:
            rule = _first_rule(self.config.state_rules, name)
            first.setdefault(id(tensor), rule)
            if rule is not None:
                used.add(rule[0])
        unused = [p.pattern for p in self.config.state_rules if p not in used]
        if unused:
            logger.warning("tensor_parallel_config: state rules that match no tensor of %s: %s",
                           type(self.root).__name__, unused)
        return {key: first.get(id(tensor)) for key, tensor in self.tensors.items()}

    def _module_actions(self, path: str) -> dict[str, dict[Any, _Action]]:
        found: dict[str, dict[Any, _Action]] = {}
        for table, rules in (("input", self.config.input_rules), ("output", self.config.output_rules),
                             ("attr", self.config.attr_rules)):
            mine: dict[Any, _Action] = {}
            for pattern, actions in rules.items():
                if pattern.search(path) is None:
                    continue
                for key, action in actions.items():
                    if key in mine and mine[key].action != action:
                        raise ValueError(f"{table} rules {mine[key].pattern!r} and {pattern.pattern!r} give module "
                                         f"'{path}' two actions for {key!r}: {mine[key].action!r} and {action!r}")
                    mine[key] = _Action(table, pattern.pattern, key, action)
            found[table] = mine
        return found

    def cut(self, key: str) -> Shard | None | str:
        """The Config's cut of state key ``key``: a Shard, None (whole) or "scale"."""
        rule = self.rules.get(key)
        if rule is None:
            return None
        pattern, action = rule
        if isinstance(action, Scale):
            return "scale"
        try:
            return action.shard_for(tuple(self.tensors[key].shape), self.world_size)
        except ValueError as error:
            raise self.error(f"state rule {pattern.pattern!r}: {action!r} on '{key}'", str(error)) from None

    def error(self, rule: str, reason: str, fix: str = _FIX) -> ValueError:
        return ValueError(f"tensor_parallel_config: {rule}: {reason}; {fix}")

    def rule_name(self, key: str) -> str:
        rule = self.rules.get(key)
        return f"state rule {rule[0].pattern!r}: {rule[1]!r}" if rule else f"'{key}' (no state rule: kept whole)"

    # -- styles --

    def run(self) -> Plan:
        for path, module in self.modules.items():
            if linear_kind(module) is not None and module._parameters.get("weight") is not None:
                self._linear(path, module)
            elif isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
                self._embedding(path, module)
        for path, module in self.modules.items():
            if any((path, "attr", key) not in self.consumed for key in self.actions[path]["attr"]):
                self._attention(path, module)  # (a split layer's own size attribute is consumed already)
        self._check_sums()
        self._drop_cache_rules()
        self._check_leftovers()
        self._check_cuts()
        return dict(self.plan)

    def _key(self, path: str, name: str) -> str:
        return f"{path}.{name}" if path else name

    def _linear(self, path: str, module: nn.Module) -> None:
        kind = linear_kind(module)
        weight_key = self._key(path, "weight")
        shard = self.cut(weight_key)
        if shard is None:
            return
        if shard == "scale":
            raise self.error(self.rule_name(weight_key), "a weight is never scaled: Scale is for the bias of a "
                             "layer whose outputs are summed")
        rule = self.rules[weight_key][1]
        unit, parts = getattr(rule, "unit", 1), getattr(rule, "parts", 1)
        if shard.dim == kind.out_dim % module.weight.dim():
            gather = self._gather(path, kind.feature_dim)
            self.plan[path] = ColwiseParallel(gather_output=gather, unit=unit, parts=parts)
            self._size_attributes(path, kind.out_attr, shard)
        elif shard.dim == kind.in_dim % module.weight.dim() and parts == 1:
            self.plan[path] = RowwiseParallel(unit=unit)
            self._size_attributes(path, kind.in_attr, shard)
            kind_of_input, dim = self.actions[path]["input"][0].parsed() if 0 in self.actions[path]["input"] else ("", 0)
            if kind_of_input == "split" and dim == kind.feature_dim:
                self.consumed.add((path, "input", 0))  # a replicated input: our row layer slices it itself
        else:
            raise self.error(self.rule_name(weight_key), f"'{path}' ({type(module).__name__}) is cut along dim "
                             f"{shard.dim}, neither its output features (dim {kind.out_dim}) nor, in one block, its "
                             f"input features (dim {kind.in_dim})")

    def _size_attributes(self, path: str, size_attr: str | None, shard: Shard) -> None:
        """An attribute rule on a split layer may set the size our style sets (``nf`` of a
        GPT-2 Conv1D, ``out_features``) to each rank's slice size."""
        for key, action in self.actions[path]["attr"].items():
            sizes = [shard.local_size(r) for r in range(self.world_size)]
            value = getattr(self.modules[path], key, None)
            kind = action.parsed()[0]
            if key == size_attr and ((kind == "callable" and [action.action(value, rank=r) for r in
                                                              range(self.world_size)] == sizes)
                                     or (kind in ("scale", "scale_int") and value == shard.size)):
                self.consumed.add((path, "attr", key))

    def _gather(self, path: str, feature_dim: int) -> bool:
        """Whether the Config gathers this column layer's output (along its feature dimension)."""
        gather = self.actions[path]["output"].get(0)
        if gather is None or gather.parsed()[0] != "gather":
            return False
        if gather.parsed()[1] != feature_dim:
            raise self.error(gather.describe(), f"'{path}' splits its output along dim {feature_dim}, so a gather "
                             f"must be along that dim")
        self.consumed.add((path, "output", 0))
        return True

    def _embedding(self, path: str, module: nn.Module) -> None:
        key = self._key(path, "weight")
        shard = self.cut(key)
        if shard is None:
            return
        gather = self.actions[path]["output"].get(0)
        if shard == "scale" or shard.dim != 1:
            raise self.error(self.rule_name(key), f"the embedding '{path}' can be cut along its embedding "
                             f"dimension (dim 1, then 'gather -1' its output), not otherwise")
        if gather is None or gather.parsed() != ("gather", -1):
            raise self.error(self.rule_name(key), f"the embedding '{path}' is cut along dim 1, so its output "
                             f"must be gathered: add the output rule {{0: 'gather -1'}} for it")
        self.consumed.add((path, "output", 0))
        self.plan[path] = EmbeddingParallel(dim=1)

    # -- attention: attribute rules on a module holding column layers and one row layer --

    def _attention(self, path: str, module: nn.Module) -> None:
        attrs = list(self.actions[path]["attr"].values())
        home, columns, rows = self._attention_home(path)
        if home is None:
            raise self.error(attrs[0].describe(), f"attribute rules are expressed for an attention block: a module "
                             f"holding q, k and v (or one fused qkv) layers split by output features and, in it or "
                             f"around it, one output layer split by input features; '{path}' holds {len(columns)} "
                             f"and {len(rows)}")
        prefix = path[len(home) + 1:] + "." if path != home else ""  # attributes of a child: "self.num_heads"
        last: str = ""
        for style in self._attention_candidates(home, self.modules[home], columns, rows[0]):
            try:
                attributes = tuple((prefix + name, quantity) for name, quantity in
                                   (self._attribute(module, a, style) for a in attrs))
                style = AttentionParallel(**{**_fields(style), "attributes": attributes})
                style.check(self.modules[home], home, self.world_size)
                self._same_cuts(home, style.shard_specs(self.modules[home], self.world_size))
            except ValueError as error:
                last = str(error)
                continue
            for child in columns + rows:
                del self.plan[child]
            self.plan[home] = style
            self.consumed.update((path, "attr", a.key) for a in attrs)
            self.consumed.update((path, "output", a.key) for a in self.actions[path]["output"].values()
                                 if a.key != 0 and a.parsed()[0] == "callable")
            return
        raise self.error(attrs[0].describe(), f"no split of '{home}' into whole heads matches this Config "
                         f"({last or 'no head size fits its layers'})")

    def _attention_home(self, path: str) -> tuple[str | None, list[str], list[str]]:
        """The module to split as attention: ``path`` if it holds the q/k/v layers and the output
        layer, else the nearest module around it that adds just the output layer (BERT keeps
        ``attention.self`` and ``attention.output.dense`` side by side)."""
        def split_inside(at: str) -> tuple[list[str], list[str]]:
            inside = [p for p in self.plan if p.startswith(f"{at}.") or not at]
            return ([p for p in inside if isinstance(self.plan[p], ColwiseParallel)],
                    [p for p in inside if isinstance(self.plan[p], RowwiseParallel)])

        columns, rows = split_inside(path)
        if len(columns) not in (1, 3) or any(self.plan[c].gather_output for c in columns) or len(rows) > 1:
            return None, columns, rows
        parts = path.split(".") if path else []
        for depth in range(len(parts), -1, -1):
            at = ".".join(parts[:depth])
            around_columns, around_rows = split_inside(at)
            if around_columns != columns or len(around_rows) > 1:
                break
            if len(around_rows) == 1:
                return at, columns, around_rows
        return None, columns, rows

    def _same_cuts(self, path: str, specs: Mapping[str, Shard]) -> None:
        for name, shard in specs.items():
            key = self._key(path, name)
            if self.cut(key) != shard:
                raise ValueError(self._mismatch(key, self.cut(key), shard))

    def _attention_candidates(self, path: str, module: nn.Module, columns: list[str],
                              row: str) -> Iterator[AttentionParallel]:
        rel = lambda p: p[len(path) + 1:] if path else p  # noqa: E731
        outs = [self.modules[c].weight.shape[linear_kind(self.modules[c]).out_dim] for c in columns]
        styles = [self.plan[c] for c in columns] + [self.plan[row]]
        values = [getattr(module, a.key, None) for a in self.actions[path]["attr"].values()]
        width = outs[0] // 3 if len(columns) == 1 else max(outs)
        head_dims = {s.unit for s in styles if s.unit > 1}
        head_dims |= {width // v for v in values if isinstance(v, int) and not isinstance(v, bool) and 0 < v <= width
                      and width % v == 0}
        for head_dim in sorted(head_dims, reverse=True):
            if width % head_dim:
                continue
            heads = width // head_dim
            if len(columns) == 3:
                q = columns[outs.index(max(outs))]
                k, v = [c for c in columns if c != q]
                kv = self.modules[k].weight.shape[linear_kind(self.modules[k]).out_dim] // head_dim
                yield AttentionParallel(num_heads=heads, head_dim=head_dim, num_kv_heads=kv if kv != heads else None,
                                        q=rel(q), k=rel(k), v=rel(v), o=rel(row))
            else:
                layout = "blocks" if styles[0].parts == 3 else "per_head"
                yield AttentionParallel(num_heads=heads, head_dim=head_dim, qkv=rel(columns[0]), o=rel(row),
                                        layout=layout)

    def _attribute(self, module: nn.Module, action: _Action, style: AttentionParallel) -> tuple[str, str]:
        """(attribute, quantity) whose per-rank values are the ones the rule gives."""
        if not hasattr(module, action.key):
            raise self.error(action.describe(), f"{type(module).__name__} has no attribute {action.key!r}")
        value = getattr(module, action.key)
        quantities = _head_quantities(style, self.world_size)
        kind = action.parsed()[0]
        if kind in ("scale", "scale_int"):
            match = [q for q, per_rank in quantities.items() if sum(per_rank) == value]
        elif kind == "callable":
            wanted = [action.action(value, rank=r) for r in range(self.world_size)]
            match = [q for q, per_rank in quantities.items() if per_rank == wanted]
        else:
            raise self.error(action.describe(), "an attribute takes a callable (value, rank) -> value or 'scale'")
        if not match:
            raise ValueError(f"{action.describe()} gives values no head count of {style.num_heads} heads of "
                             f"{style.head_dim} has")
        return action.key, match[0]

    # -- the checks: every collective and every cut the Config asks for is in the plan --

    def _rows(self) -> dict[str, str]:
        """Path of each row-split layer -> the path whose output the Config sums it at."""
        rows = [p for p, s in self.plan.items() if isinstance(s, RowwiseParallel)]
        rows += [self._key(p, s.o) for p, s in self.plan.items() if isinstance(s, AttentionParallel)]
        return {row: self._summed_at(row) for row in rows}

    def _summed_at(self, row: str) -> str:
        parts = row.split(".")
        ancestors = [".".join(parts[:i]) for i in range(len(parts), -1, -1)]
        summed = [a for a in ancestors if a in self.modules and _is_sum(self.actions[a]["output"].get(0))]
        if len(summed) != 1:
            reason = "no output rule sums it" if not summed else f"it is summed {len(summed)} times (at {summed})"
            raise self.error(self.rule_name(self._key(row, "weight")), f"'{row}' is split by input features and "
                             f"{reason}; give it (or the block holding it) exactly one output rule {{0: 'sum'}}")
        return summed[0]

    def _check_sums(self) -> None:
        for row, at in self._rows().items():
            self.consumed.add((at, "output", 0))

    def _drop_cache_rules(self) -> None:
        """The original handed KV caches between ranks with callables on the cache argument;
        every rank here keeps its own cache of its heads."""
        for path in self.modules:
            for action in self.actions[path]["input"].values():
                if action.key in _CACHE_ARGUMENTS and action.parsed()[0] == "callable":
                    logger.info("tensor_parallel_config: dropping %s: every rank keeps its own KV cache",
                                action.describe())
                    self.consumed.add((path, "input", action.key))

    def _check_leftovers(self) -> None:
        for path in self.modules:
            for table in ("input", "output", "attr"):
                for key, action in self.actions[path][table].items():
                    if (path, table, key) not in self.consumed:
                        raise self.error(action.describe(), _leftover_reason(path, table, action, self.plan))

    def _mismatch(self, key: str, wanted: Shard | None | str, held: Shard | None) -> str:
        owner = key.rpartition(".")[0]
        if held is None and not any(owner == p or owner.startswith(f"{p}.") or not p for p in self.plan):
            module = self.modules.get(owner)
            return (f"'{key}' is cut, but '{owner}' ({type(module).__name__}) is not a layer we split: we split "
                    f"Linear and convolution layers, embeddings and attention blocks")
        return (f"the Config holds '{key}' {_say(wanted)}, but its layer's split holds it {_say(held)}; cut the "
                f"weight and the bias of a layer alike, in whole heads where there are heads "
                f"(SplitInChunks(world_size, dim, head_dim))")

    def _check_cuts(self) -> None:
        resolved = resolve_plan(self.root, self.plan, self.world_size)
        layout = layout_for(self.root, resolved, self.world_size)
        row_biases = {self._key(row, "bias") for row in self._rows()}
        for key in self.tensors:
            wanted, held = self.cut(key), layout.get(key)
            if wanted == "scale":
                if key not in row_biases:
                    raise self.error(self.rule_name(key), f"only the bias of a layer split by input features may be "
                                     f"scaled (it is then added once, after the sum); '{key}' is not one")
                continue
            if wanted != held:
                raise self.error(self.rule_name(key), self._mismatch(key, wanted, held))
            if held is None and key in row_biases and self.tensors[key] is not None:
                raise self.error(self.rule_name(key), f"the bias of the row-split layer would be added once per rank "
                                 f"in the original ({self.world_size} times); add Scale (or 'scale') for it")


def _say(shard: Shard | None | str) -> str:
    if not isinstance(shard, Shard):
        return "whole"
    sizes = [shard.local_size(r) for r in range(len(shard.ranges))]
    return f"cut along dim {shard.dim} into {sizes}" + ("" if shard.is_partition() else " (in blocks)")


def _fields(style: AttentionParallel) -> dict[str, Any]:
    return {name: getattr(style, name) for name in style.__dataclass_fields__}


def _head_quantities(style: AttentionParallel, world_size: int) -> dict[str, list[int]]:
    heads = assign_heads(style.num_heads, style.kv_heads, world_size)
    d = style.head_dim
    return {"heads": [len(q) for q, _ in heads], "kv_heads": [len(kv) for _, kv in heads],
            "width": [len(q) * d for q, _ in heads], "kv_width": [len(kv) * d for _, kv in heads],
            "qkv_width": [(len(q) + 2 * len(kv)) * d for q, kv in heads]}


def _is_sum(action: _Action | None) -> bool:
    return action is not None and action.parsed()[0] == "sum"


def _leftover_reason(path: str, table: str, action: _Action, plan: Mapping[str, Style]) -> str:
    kind = action.parsed()[0]
    where = f"'{path or '<root>'}'" + (f" ({type(plan[path]).__name__})" if path in plan else " (not split)")
    if kind == "callable":
        return f"a callable on {where} cannot be translated: we cannot know what it does"
    if kind == "sum":
        return f"{where} holds no layer split by input features, so there is nothing to sum there"
    if kind == "gather":
        return f"only a layer split by output features (or an embedding split along dim 1) can gather its own output; {where} is not one"
    if kind == "split":
        return f"only a layer split by input features can take a split input; {where} is not one"
    return f"{action.action!r} on {where} has no equivalent in our styles"


def config_to_plan(config: Config, module: nn.Module, world_size: int) -> Plan:
    """The plan that splits ``module`` over ``world_size`` ranks as the legacy ``config`` says.

    * a Linear or convolution whose weight is cut by output features becomes
      :class:`~tensor_parallel.ColwiseParallel` (``gather_output=True`` with an output rule
      ``{0: "gather -1"}``; chunk sizes become ``unit``, grouped chunks ``parts``);
    * one cut by input features, with exactly one ``{0: "sum"}`` at itself or a module around it
      and its bias scaled, becomes :class:`~tensor_parallel.RowwiseParallel` (the pair costs one
      all-reduce); an input rule ``{0: "split -1"}`` on it is what it does anyway;
    * an embedding cut along dim 1 with ``{0: "gather -1"}`` becomes ``EmbeddingParallel(dim=1)``;
    * a module with attribute rules that holds q, k, v (or a fused qkv) and one row layer becomes
      :class:`~tensor_parallel.AttentionParallel`, each attribute set to the per-rank quantity
      (heads, kv_heads, width, ...) whose values the rule gives on every rank;
    * input callables on a KV-cache argument are dropped: every rank keeps its own cache.

    Anything else raises ``ValueError`` naming the rule. The tensors are then cut exactly as the
    state rules say, or that too is an error.

    Example::

        >>> import torch, tensor_parallel as tp
        >>> from tensor_parallel.legacy import Split
        >>> from tensor_parallel.legacy_plan import config_to_plan
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
        >>> config = tp.Config({r"^0\\.(weight|bias)$": Split(2, 0)}, {}, {r"^0$": {0: "gather -1"}}, {})
        >>> config_to_plan(config, mlp, 2)
        {'0': ColwiseParallel(gather_output=True)}
    """
    if not isinstance(config, Config):
        raise TypeError(f"tensor_parallel_config must be a tp.Config, got {type(config).__name__}")
    if config.plan is not None:
        return dict(config.plan)
    if _is_transformers_model(module):
        from .hf import plans  # noqa: F401  (teaches the styles transformers' own linear layers)
    return _Translation(config, module, world_size).run()
