"""Checkpoints: the split model's state in the original module's keys."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

__all__ = ["save_tensor_parallel"]


@contextlib.contextmanager
def save_tensor_parallel(model: nn.Module) -> Iterator[nn.Module]:
    """Inside this block, ``model.state_dict()`` returns the unsharded state with the original
    module's keys (the name and behaviour of the original library's context manager).

    Example::

        >>> import torch, tensor_parallel as tp
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
        >>> model = tp.tensor_parallel(mlp, ["cpu", "cpu"])
        >>> with tp.save_tensor_parallel(model):
        ...     state = model.state_dict()
        >>> sorted(state) == sorted(mlp.state_dict())
        True
    """
    targets = [m for m in model.modules() if hasattr(m, "unsharded_state_dict")]
    if not targets:
        raise TypeError(f"save_tensor_parallel expects a model made by tensor_parallel(), got "
                        f"{type(model).__name__} with no split module inside")
    if len(targets) == 1 and targets[0] is model:
        model.state_dict = model.unsharded_state_dict  # type: ignore[method-assign]
        try:
            yield model
        finally:
            del model.state_dict
        return
    raise NotImplementedError("save_tensor_parallel on a module that contains a split model "
                              "is not supported yet; call it on the split model itself")
