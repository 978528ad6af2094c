"""The Hugging Face integration: transformers models split with built-in plans.

The core package never imports this folder unless it is given a transformers model.
"""

from .model import ShardedCache, TensorParallelPreTrainedModel
from .convert import merge_checkpoint, save_unsharded, shard_checkpoint
from .loading import from_pretrained
from .plans import plan_for_pretrained, translate_tp_plan

__all__ = ["TensorParallelPreTrainedModel", "ShardedCache", "plan_for_pretrained", "translate_tp_plan",
           "from_pretrained", "shard_checkpoint", "merge_checkpoint", "save_unsharded"]
