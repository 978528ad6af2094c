"""The original library's API (``tensor_parallel`` 2.0.0), on top of plans and styles.

A legacy :class:`Config` holds four tables of regex rules: state rules (how each tensor is
cut), input and output rules (what happens to a module's inputs and outputs: ``"split -1"``,
``"gather -1"``, ``"sum"``) and attribute rules (per-rank values of ``num_heads`` and the like).
:func:`tensor_parallel.legacy_plan.config_to_plan` translates one into a plan of styles.

Also here: the state actions (:class:`StateAction`, :class:`Split`, :class:`Scale`, ...),
:func:`convert_state_dict`, :func:`make_distributed_shard` and :class:`Sharded`.
"""

from __future__ import annotations

import abc
import re
import warnings
from typing import TYPE_CHECKING, Any, Callable, Collection, Iterator, Mapping, Sequence

import torch
from torch import nn

from .checkpoint import TensorInfo, TensorSource, split_tensors
from .plan import Plan
from .split import Shard, even_shard, gather_tensor
from .styles import Style

if TYPE_CHECKING:
    from .runtime import DeviceLike

__all__ = ["Config", "StateAction", "LegacyStateAction", "Split", "Scale", "SplitInChunks", "SplitInGroupedChunks",
           "convert_state_dict", "make_distributed_shard", "Sharded", "allow_legacy_unpacking"]


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
    :func:`~tensor_parallel.legacy_plan.config_to_plan` shows how each rule becomes a style.

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

        >>> import torch, warnings, tensor_parallel as tp
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8))
        >>> model = tp.TensorParallel(mlp, ["cpu", "cpu"])
        >>> with warnings.catch_warnings(record=True):
        ...     sharded = tp.Sharded(model, ["1.weight"])
        >>> sharded is model, sorted(model.sharded_keys)
        (True, ['1.weight'])
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
