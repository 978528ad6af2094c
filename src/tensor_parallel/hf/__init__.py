"""The Hugging Face integration: transformers models split with built-in plans.

The core package never imports this folder unless it is given a transformers model.
"""

import transformers
from packaging.version import Version

#: the oldest transformers release the tests run on (pyproject's lower bound; CI checks it)
OLDEST_TRANSFORMERS = (5, 10)


def _check_transformers_version(version: str) -> None:
    if Version(version).release[:2] < OLDEST_TRANSFORMERS:  # pre-releases of 5.10 count as 5.10
        oldest = ".".join(map(str, OLDEST_TRANSFORMERS))
        raise ImportError(f"tensor_parallel's transformers integration needs transformers>={oldest}, "
                          f"found {version}; upgrade it: pip install -U 'transformers>={oldest}'")


_check_transformers_version(transformers.__version__)

from .model import ShardedCache, TensorParallelPreTrainedModel  # noqa: E402
from .convert import merge_checkpoint, save_unsharded, shard_checkpoint  # noqa: E402
from .loading import from_pretrained  # noqa: E402
from .plans import plan_for_pretrained, translate_tp_plan  # noqa: E402

__all__ = ["TensorParallelPreTrainedModel", "ShardedCache", "plan_for_pretrained", "translate_tp_plan",
           "from_pretrained", "shard_checkpoint", "merge_checkpoint", "save_unsharded"]
