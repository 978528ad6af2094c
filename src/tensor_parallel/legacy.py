"""The original library's API (``tensor_parallel`` 2.0.0), on top of plans and styles.

A legacy :class:`Config` holds four tables of regex rules: state rules (how each tensor is
cut), input and output rules (what happens to a module's inputs and outputs: ``"split -1"``,
``"gather -1"``, ``"sum"``) and attribute rules (per-rank values of ``num_heads`` and the like).
:func:`config_to_plan` translates one into a plan of styles for a given module, checking that
every tensor is cut exactly as the Config says and that every collective it asks for has its
place; a rule it cannot express raises ``ValueError`` naming the rule.

Also here: the state actions (:class:`StateAction`, :class:`Split`, :class:`Scale`, ...),
:func:`convert_state_dict`, :func:`make_distributed_shard` and :class:`Sharded`.
"""

from __future__ import annotations

import abc
import logging
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Collection, Iterator, Mapping, Sequence

import torch
from torch import nn

from .checkpoint import TensorInfo, TensorSource, split_tensors
from .plan import Plan, _is_transformers_model, resolve_plan
from .split import Shard, assign_heads, even_shard, gather_tensor, layout_for
from .styles import AttentionParallel, ColwiseParallel, EmbeddingParallel, RowwiseParallel, Style, linear_kind

if TYPE_CHECKING:
    from .runtime import DeviceLike

__all__ = ["Config", "StateAction", "LegacyStateAction", "Split", "Scale", "SplitInChunks", "SplitInGroupedChunks",
           "config_to_plan", "convert_state_dict", "make_distributed_shard", "Sharded"]

logger = logging.getLogger(__name__)

_FIX = "pass plan= with styles instead (README: 'Coming from tensor_parallel 2.0')"


# --------------------------------------------------------------------------------------------
# State actions: how a legacy Config cuts one tensor
# --------------------------------------------------------------------------------------------


class StateAction(abc.ABC):
    """What a state rule does to one tensor: ``action(tensor, rank)`` is rank ``rank``'s part,
    ``action.undo(parts)`` the whole tensor again.

    :meth:`shard_for` says the same as a :class:`~tensor_parallel.Shard`; the translation into
    a plan needs it, so a subclass of your own that does not implement it cannot be translated.

    Example::

        >>> import torch, tensor_parallel as tp
        >>> from tensor_parallel.legacy import Split
        >>> isinstance(Split(world_size=2, dim=0), tp.StateAction)
        True
    """

    @abc.abstractmethod
    def __call__(self, tensor: torch.Tensor, rank: int) -> torch.Tensor:
        """Rank ``rank``'s part of ``tensor``."""

    @abc.abstractmethod
    def undo(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """The whole tensor from every rank's part."""

    def shard_for(self, shape: Sequence[int], world_size: int) -> Shard | None:
        """How a tensor of ``shape`` is cut over ``world_size`` ranks (None: kept whole)."""
        raise ValueError(f"{self!r} is a custom state action; a cut cannot be read from it")


class LegacyStateAction(StateAction):
    """A callable ``action(tensor, rank)`` (and its optional reverse), the oldest form of a state
    rule. It runs, but its cut cannot be known, so a Config holding one cannot be translated.

    Example::

        >>> import torch
        >>> action = LegacyStateAction(lambda t, rank: t[rank:rank + 1])
        >>> action(torch.arange(3), 1)
        tensor([1])
    """

    def __init__(self, action: Callable[[torch.Tensor, int], torch.Tensor],
                 reverse_action: Callable[[Sequence[torch.Tensor]], torch.Tensor] | None = None) -> None:
        self.action, self.reverse_action = action, reverse_action

    def __call__(self, tensor: torch.Tensor, rank: int) -> torch.Tensor:
        return self.action(tensor, rank)

    def undo(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.reverse_action is None:
            raise ValueError(f"{self!r} has no reverse action, so its parts cannot be put together again")
        return self.reverse_action(tensors)

    def __repr__(self) -> str:
        return f"LegacyStateAction({getattr(self.action, '__name__', self.action)!r})"


class _Cut(StateAction):
    """A state action that cuts along ``dim`` in whole ``unit`` s, ``parts`` fused blocks alike;
    ``world_size=None`` means the model's device count."""

    unit = 1
    parts = 1

    def __init__(self, world_size: int | None, dim: int) -> None:
        if world_size is not None and (isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1):
            raise ValueError(f"{type(self).__name__}: world_size must be a positive int, got {world_size!r}")
        self.world_size, self.dim = world_size, dim

    def _world(self, world_size: int | None) -> int:
        if self.world_size is not None and world_size is not None and world_size != self.world_size:
            raise ValueError(f"{self!r} cuts into {self.world_size} parts, but the model is split over "
                             f"{world_size} devices; build the Config for {world_size} devices")
        world = world_size or self.world_size
        if world is None:
            raise ValueError(f"{self!r} was written as a string and knows no world size; call it through a Config")
        return world

    def shard_for(self, shape: Sequence[int], world_size: int | None = None) -> Shard:
        dim = self.dim % len(shape)
        return even_shard(shape[dim], self._world(world_size), dim, self.unit, self.parts)

    def __call__(self, tensor: torch.Tensor, rank: int) -> torch.Tensor:
        return self.shard_for(tuple(tensor.shape)).take(tensor, rank)

    def undo(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        dim = self.dim % tensors[0].dim()
        shape = list(tensors[0].shape)
        shape[dim] = sum(t.shape[dim] for t in tensors)
        return gather_tensor(self.shard_for(shape, len(tensors)), list(tensors))

    def __repr__(self) -> str:
        if getattr(self, "text", None):
            return repr(self.text)
        extra = "".join(f", {k}={v}" for k, v in (("chunk_size", self.unit), ("num_groups", self.parts)) if v != 1)
        return f"{type(self).__name__}(world_size={self.world_size}, dim={self.dim}{extra})"


class Split(_Cut):
    """Cut along ``dim`` into ``world_size`` parts, earlier parts one longer when uneven
    (``torch.tensor_split``'s sizes).

    Example::

        >>> import torch
        >>> Split(world_size=3, dim=0)(torch.arange(7), 0)
        tensor([0, 1, 2])
    """


class SplitInChunks(_Cut):
    """Cut along ``dim`` in whole chunks of ``chunk_size`` (whole heads).

    Example::

        >>> import torch
        >>> SplitInChunks(world_size=2, dim=0, chunk_size=2)(torch.arange(6), 1)
        tensor([4, 5])
    """

    def __init__(self, world_size: int | None, dim: int, chunk_size: int, optional: bool = False) -> None:
        super().__init__(world_size, dim)
        self.unit, self.optional = chunk_size, optional

    def __call__(self, tensor: torch.Tensor | None, rank: int) -> torch.Tensor | None:
        if tensor is None and self.optional:
            return None
        return super().__call__(tensor, rank)


class SplitInGroupedChunks(_Cut):
    """``num_groups`` fused blocks (q|k|v) along ``dim``, each cut alike in chunks of
    ``chunk_size``: every rank keeps its chunks of every block.

    Example::

        >>> import torch
        >>> SplitInGroupedChunks(world_size=2, dim=0, num_groups=3, chunk_size=1)(torch.arange(6), 0)
        tensor([0, 2, 4])
    """

    def __init__(self, world_size: int | None, dim: int, num_groups: int, chunk_size: int) -> None:
        super().__init__(world_size, dim)
        self.parts, self.unit = num_groups, chunk_size


class Scale(StateAction):
    """Divide by ``world_size`` (the bias of a layer whose outputs are summed over the ranks).

    Our row-split layers add their bias once, after the all-reduce, so a scaled tensor is
    held whole: :meth:`shard_for` is None and :func:`convert_state_dict` keeps it as it is.

    Example::

        >>> import torch
        >>> Scale(world_size=2)(torch.ones(2), 0)
        tensor([0.5000, 0.5000])
    """

    def __init__(self, world_size: int | None) -> None:
        self.world_size = world_size

    def __call__(self, tensor: torch.Tensor, rank: int) -> torch.Tensor:
        return tensor / self.world_size

    def undo(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return tensors[0] * self.world_size

    def shard_for(self, shape: Sequence[int], world_size: int) -> None:
        return None

    def __repr__(self) -> str:
        return repr(self.text) if getattr(self, "text", None) else f"Scale(world_size={self.world_size})"


class _Exact(StateAction):
    """One tensor's cut as a split model holds it (the rules of ``model.tensor_parallel_config``)."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard

    def shard_for(self, shape: Sequence[int], world_size: int) -> Shard:
        if world_size != len(self.shard.ranges) or shape[self.shard.dim] != self.shard.size:
            raise ValueError(f"this rule cuts {self.shard.size} positions over {len(self.shard.ranges)} ranks, "
                             f"not a tensor of shape {list(shape)} over {world_size}")
        return self.shard

    def __call__(self, tensor: torch.Tensor, rank: int) -> torch.Tensor:
        return self.shard.take(tensor, rank)

    def undo(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return gather_tensor(self.shard, list(tensors))

    def __repr__(self) -> str:
        return f"_Exact(dim={self.shard.dim}, size={self.shard.size})"


def _state_action(action: Any, pattern: str) -> StateAction:
    """A state rule's action as a StateAction: strings and the deprecated callables too."""
    if isinstance(action, StateAction):
        return action
    if isinstance(action, str):
        kind, dim = _parse_string(action, pattern, "state")
        made = Split(None, dim) if kind == "split" else Scale(None) if kind == "scale" else None
        if made is not None:
            made.text = action
            return made
        raise ValueError(f"state rule {pattern!r}: {action!r} is not a state action; use 'split <dim>', "
                         f"'scale' or a StateAction such as Split(world_size, dim)")
    if callable(action):
        warnings.warn(f"state rule {pattern!r}: a callable is deprecated; use a StateAction such as "
                      f"Split(world_size, dim)", DeprecationWarning, stacklevel=4)
        return LegacyStateAction(action)
    if isinstance(action, tuple) and len(action) == 2 and all(callable(a) for a in action):
        warnings.warn(f"state rule {pattern!r}: a tuple of callables is deprecated; use a StateAction such as "
                      f"Split(world_size, dim)", DeprecationWarning, stacklevel=4)
        return LegacyStateAction(*action)
    raise TypeError(f"state rule {pattern!r}: {action!r} ({type(action).__name__}) is not a state action; "
                    f"use Split(world_size, dim), Scale(world_size) or a string such as 'split 0'")


def _parse_string(action: str, pattern: str, table: str) -> tuple[str, int | None]:
    """``"split -1"`` -> ("split", -1); ``"gather"`` -> ("gather", -1); ``"sum"`` -> ("sum", None)."""
    kind, *options = action.split()
    if kind in ("split", "gather") and len(options) <= 1:
        try:
            return kind, int(options[0]) if options else -1
        except ValueError:
            pass
    elif kind in ("sum", "scale", "scale_int") and not options:
        return kind, None
    raise ValueError(f"{table} rule {pattern!r}: cannot read the action {action!r}; write 'split <dim>', "
                     f"'gather <dim>', 'sum' or 'scale'")


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


class Config:
    """The original library's configuration: four tables of regex rules.

    ``state_rules`` maps patterns over state keys (``r".*mlp\\.up\\.weight$"``) to state actions
    (:class:`Split`, :class:`Scale`, ``"split 0"``); ``input_rules``, ``output_rules`` and
    ``attr_rules`` map patterns over module paths to ``{argument or output index or attribute:
    action}``. ``Config({}, {}, {}, {})`` splits nothing. The caller's dicts are not changed.
    :func:`config_to_plan` shows how each rule becomes a style.

    Example::

        >>> import torch, tensor_parallel as tp
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
        >>> config = tp.Config({r"0\\.(weight|bias)$": "split 0", r"2\\.weight$": "split 1",
        ...                     r"2\\.bias$": "scale"}, {}, {r"^2$": {0: "sum"}}, {})
        >>> tp.TensorParallel(mlp, ["cpu", "cpu"], tensor_parallel_config=config).plan
        {'0': ColwiseParallel(), '2': RowwiseParallel()}
    """

    def __init__(self, state_rules: Mapping[str | re.Pattern, Any], input_rules: Mapping[str | re.Pattern, Mapping],
                 output_rules: Mapping[str | re.Pattern, Mapping], attr_rules: Mapping[str | re.Pattern, Mapping]) -> None:
        for name, table in (("state_rules", state_rules), ("input_rules", input_rules),
                            ("output_rules", output_rules), ("attr_rules", attr_rules)):
            if not isinstance(table, Mapping):
                raise TypeError(f"Config: {name} must be a dict from regex patterns to actions, got "
                                f"{type(table).__name__}")
        self.state_rules = {_compile(p, "state"): _state_action(a, _source(p)) for p, a in state_rules.items()}
        self.input_rules = _module_rules(input_rules, "input")
        self.output_rules = _module_rules(output_rules, "output")
        self.attr_rules = _module_rules(attr_rules, "attr")
        #: a plan this Config stands for exactly (a split model's own ``tensor_parallel_config``)
        self.plan: Plan | None = None

    @classmethod
    def from_layout(cls, layout: Mapping[str, Shard | None], plan: Mapping[str, Style], world_size: int) -> "Config":
        """The Config of a split model: one exact state rule per split tensor, and its plan.

        Example::

            >>> from tensor_parallel.split import even_shard
            >>> config = Config.from_layout({"w": even_shard(4, 2, 0), "b": None}, {}, 2)
            >>> [rule.pattern for rule in config.state_rules]
            ['^w$']
        """
        config = cls({f"^{re.escape(key)}$": _Exact(shard) for key, shard in layout.items() if shard is not None},
                     {}, {}, {})
        config.plan = dict(plan)
        return config

    def cut(self, key: str, shape: Sequence[int], world_size: int) -> Shard | None:
        """How the state key ``key`` (a tensor of ``shape``) is cut: the first matching state
        rule's cut, None when it is held whole (no rule, or :class:`Scale`).

        Example::

            >>> import tensor_parallel as tp
            >>> tp.Config({r"weight$": "split 1"}, {}, {}, {}).cut("fc.weight", (4, 6), 3).ranges
            (((0, 2),), ((2, 4),), ((4, 6),))
        """
        rule = _first_rule(self.state_rules, key)
        if rule is None:
            return None
        pattern, action = rule
        try:
            return action.shard_for(tuple(shape), world_size)
        except ValueError as error:
            raise ValueError(f"state rule {pattern.pattern!r}: {action!r} on '{key}': {error}") from None

    def __repr__(self) -> str:
        if self.plan is not None:
            return f"Config(plan={self.plan})"
        tables = (self.state_rules, self.input_rules, self.output_rules, self.attr_rules)
        return "Config(" + ", ".join(repr({p.pattern: a for p, a in t.items()}) for t in tables) + ")"


def _source(pattern: str | re.Pattern) -> str:
    return pattern.pattern if isinstance(pattern, re.Pattern) else pattern


def _compile(pattern: str | re.Pattern, table: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except (re.error, TypeError) as error:
        raise ValueError(f"{table} rule {pattern!r} is not a regular expression: {error}") from None


def _module_rules(rules: Mapping, table: str) -> dict[re.Pattern, dict]:
    out = {}
    for pattern, actions in rules.items():
        if not isinstance(actions, Mapping):
            raise TypeError(f"{table} rule {_source(pattern)!r}: expected a dict such as {{0: 'sum'}}, got "
                            f"{type(actions).__name__}")
        out[_compile(pattern, table)] = {_key(k): a for k, a in actions.items()}
    return out


def _key(key: Any) -> Any:
    return int(key) if isinstance(key, str) and key.strip().isdigit() else key


def _first_rule(rules: Mapping[re.Pattern, StateAction], key: str) -> tuple[re.Pattern, StateAction] | None:
    return next(((p, a) for p, a in rules.items() if p.search(key) is not None), None)


# --------------------------------------------------------------------------------------------
# Translating a Config into a plan
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# State dicts, distributed shards, Sharded, the old tuple
# --------------------------------------------------------------------------------------------


class _MemorySource(TensorSource):
    """Tensors of a state dict in memory, read a slice at a time."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.tensors = state_dict

    def keys(self) -> list[str]:
        return list(self.tensors)

    def info(self, key: str) -> TensorInfo:
        tensor = self.tensors[key]
        return TensorInfo(tuple(tensor.shape), tensor.dtype, "<state_dict>")

    def read(self, key: str, shard: Shard | None, rank: int) -> torch.Tensor:
        tensor = self.tensors[key]
        return tensor if shard is None else shard.take(tensor, rank).clone()


def convert_state_dict(input_state_dict: Mapping[str, torch.Tensor], tensor_parallel_config: Config,
                       world_size: int, for_pretrained: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of a split model made from ``input_state_dict`` (any part of the original
    module's state): keys ``module_shards.<rank>.<key>`` (``wrapped_model.module_shards...`` with
    ``for_pretrained=True``), each holding that rank's cut, for ``model.load_state_dict``.

    Give it ``model.tensor_parallel_config`` to cut exactly as ``model`` holds its tensors.
    Tensors a rule scales are kept whole (our row layers add the bias once).

    Example::

        >>> import torch, tensor_parallel as tp
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
        >>> model = tp.TensorParallel(mlp, ["cpu", "cpu"])
        >>> state = tp.convert_state_dict(mlp.state_dict(), model.tensor_parallel_config, world_size=2)
        >>> model.load_state_dict(state)
        <All keys matched successfully>
    """
    if not isinstance(tensor_parallel_config, Config):
        raise TypeError(f"tensor_parallel_config must be a tp.Config (e.g. model.tensor_parallel_config), got "
                        f"{type(tensor_parallel_config).__name__}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    layout = {key: tensor_parallel_config.cut(key, tuple(tensor.shape), world_size)
              for key, tensor in input_state_dict.items()}
    prefix = "wrapped_model.module_shards." if for_pretrained else "module_shards."
    lazy = split_tensors(_MemorySource(input_state_dict), layout, world_size, prefix)
    return {key: tensor.load() for key, tensor in lazy.items()}


def make_distributed_shard(module: nn.Module, device: "DeviceLike", tensor_parallel_config: Config | None = None,
                           **options: Any) -> nn.Module:
    """This process's shard of ``module`` in a torch.distributed job, on ``device``: the split
    module in multi-process mode (``tp.tensor_parallel(module, [device], config,
    distributed=True)``). The original returned ``(shard, names)``; unpacking it still works,
    with a DeprecationWarning. ``config=`` is accepted for ``tensor_parallel_config``.

    Example::

        >>> import torch, tensor_parallel as tp
        >>> tp.make_distributed_shard(torch.nn.Sequential(torch.nn.Linear(2, 2)), "cpu")
        Traceback (most recent call last):
        ...
        ValueError: distributed=True splits over the processes of a torch.distributed job, ...
    """
    from .runtime import tensor_parallel

    if "config" in options:
        if tensor_parallel_config is not None:
            raise ValueError("pass either tensor_parallel_config or config, not both")
        tensor_parallel_config = options.pop("config")
    return tensor_parallel(module, [device], tensor_parallel_config, True, **options)


class Sharded(nn.Module):
    """Deprecated: ``Sharded(model, names)`` is ``model.apply_sharding(names)`` (ZeRO-3 of the
    replicated parameters) and returns ``model`` itself, as the original's last version did.

    Example::

        >>> import tensor_parallel as tp
        >>> issubclass(tp.Sharded, object)
        True
    """

    def __new__(cls, module: nn.Module, sharded_param_names: Collection[str] | None = None) -> nn.Module:  # type: ignore[misc]
        warnings.warn("tp.Sharded(model) is deprecated; call model.apply_sharding() or pass sharded=True",
                      DeprecationWarning, stacklevel=2)
        if not hasattr(module, "apply_sharding"):
            raise TypeError(f"Sharded wraps a model made by tensor_parallel(), got {type(module).__name__}")
        module.apply_sharding(sharded_param_names)
        return module


class _LegacyUnpacking:
    """Lets ``model, names = tp.tensor_parallel(..., distributed=True)`` run, with a warning."""

    def __iter__(self) -> Iterator[Any]:
        warnings.warn("tensor_parallel(..., distributed=True) returns the split module itself, not "
                      "(module, names); write `model = tp.tensor_parallel(...)` instead of unpacking it",
                      DeprecationWarning, stacklevel=2)
        wrapped = getattr(self, "wrapped_model", self)
        names = {key for key, shard in wrapped.layout.items() if shard is not None
                 and key in dict(wrapped.module_shards[0].named_parameters(remove_duplicate=False))}
        return iter((self, names))


_UNPACKING_CLASSES: dict[type, type] = {}


def allow_legacy_unpacking(model: nn.Module) -> None:
    """Make ``model`` (one rank's split model) unpack as the original's ``(shard, names)``.

    Example::

        >>> import torch, warnings, tensor_parallel as tp
        >>> model = tp.tensor_parallel(torch.nn.Sequential(torch.nn.Linear(2, 4)), ["cpu", "cpu"])
        >>> allow_legacy_unpacking(model)
        >>> with warnings.catch_warnings(record=True):
        ...     shard, names = model
        >>> shard is model, sorted(names)
        (True, ['0.bias', '0.weight'])
    """
    cls = type(model)
    if cls not in _UNPACKING_CLASSES:
        _UNPACKING_CLASSES[cls] = type(cls.__name__, (_LegacyUnpacking, cls), {"__module__": cls.__module__,
                                                                               "__qualname__": cls.__qualname__})
    model.__class__ = _UNPACKING_CLASSES[cls]
