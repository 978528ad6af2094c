"""tensor_parallel: split a PyTorch model over several devices in one line.

Example::

    >>> import torch, tensor_parallel as tp
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    >>> model = tp.tensor_parallel(mlp, ["cpu", "cpu"])
    >>> model(torch.randn(2, 8)).shape
    torch.Size([2, 8])
"""

from .checkpoint import infer_sharded_device_map, save_tensor_parallel
from .legacy import Config, Sharded, StateAction, convert_state_dict, make_distributed_shard
from .comm import CollectiveError, CollectiveStats, Communicator, count_collectives
from .plan import Plan, expected_collectives, format_plan, plan_for, resolve_plan
from .runtime import TensorParallel, parse_devices, tensor_parallel
from .sharding import parameters_by_device, shard_replicated
from .split import Shard, split_sizes
from .styles import (AdapterKind, AttentionParallel, ColwiseParallel, ExpertsParallel, EmbeddingParallel, LinearKind,
                     Replicate, RowwiseParallel, Style, register_adapter_kind, register_linear_kind)

__version__ = "0.1.0"

__all__ = [
    "tensor_parallel",
    "TensorParallel",
    "Plan",
    "plan_for",
    "resolve_plan",
    "format_plan",
    "expected_collectives",
    "Style",
    "ColwiseParallel",
    "AttentionParallel",
    "ExpertsParallel",
    "RowwiseParallel",
    "EmbeddingParallel",
    "Replicate",
    "LinearKind",
    "register_linear_kind",
    "AdapterKind",
    "register_adapter_kind",
    "Shard",
    "split_sizes",
    "count_collectives",
    "CollectiveStats",
    "CollectiveError",
    "Communicator",
    "shard_replicated",
    "parameters_by_device",
    "save_tensor_parallel",
    "infer_sharded_device_map",
    "parse_devices",
    "TensorParallelPreTrainedModel",
    "from_pretrained",
    # the original library's names (tensor_parallel 2.0.0): see tensor_parallel.legacy
    "Config",
    "StateAction",
    "convert_state_dict",
    "make_distributed_shard",
    "Sharded",
]

_HF_NAMES = {"TensorParallelPreTrainedModel", "ShardedCache", "plan_for_pretrained", "translate_tp_plan",
             "from_pretrained"}


def __getattr__(name: str):
    """Hugging Face names load transformers only when first used."""
    if name in _HF_NAMES:
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'tensor_parallel' has no attribute {name!r}")
