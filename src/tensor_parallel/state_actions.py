"""The original library's module of state actions, for configs written against it
(``from tensor_parallel.state_actions import Split, Scale``); they live in
:mod:`tensor_parallel.legacy`.

Example::

    >>> from tensor_parallel.state_actions import Scale, Split
    >>> Split(world_size=2, dim=0)
    Split(world_size=2, dim=0)
"""

from .legacy import LegacyStateAction, Scale, Split, SplitInChunks, SplitInGroupedChunks, StateAction

__all__ = ["StateAction", "LegacyStateAction", "Split", "Scale", "SplitInChunks", "SplitInGroupedChunks"]
