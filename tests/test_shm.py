"""Shared-memory collectives of CPU ranks on one host (tensor_parallel.shm), against gloo's."""

from __future__ import annotations

import pytest

import shm_cases
from distributed import run_ranks


def _ok(results):
    assert all(status == "ok" for status, _ in results.values()), results
    return {rank: value for rank, (_, value) in results.items()}


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_collectives_equal_gloo(world_size):
    for rank, result in _ok(run_ranks(shm_cases.collectives_match_gloo, world_size)).items():
        assert result["leftovers"] == []  # the file is unlinked once every rank has mapped it
        assert result["sequence"] == 120
        # 2 ranks: one addition, as gloo does it; 3 and 4: sums of 3-4 float32/bf16 numbers
        # in another order (bf16 rounding at |x| < 8: 2**-5)
        assert result["worst"] == 0.0 if world_size == 2 else result["worst"] <= 2 ** -5, result


@pytest.mark.parametrize("world_size", [2, 3])
def test_back_to_back_exact(world_size):
    assert set(_ok(run_ranks(shm_cases.back_to_back, world_size)).values()) == {302}


def test_sub_groups_exact():
    """Data parallel x tensor parallel: groups {1, 3} and {0, 2}, so a group's rank 0 is not global rank 0."""
    assert set(_ok(run_ranks(shm_cases.back_to_back, 4, [[1, 3], [0, 2]])).values()) == {302}


def test_switched_off(monkeypatch):
    monkeypatch.setenv("TENSOR_PARALLEL_SHM", "0")
    assert _ok(run_ranks(shm_cases.switched_off, 2)) == {0: None, 1: None}


def test_a_dead_peer_is_noticed():
    results = run_ranks(shm_cases.peer_dies, 2, timeout=60)
    status, message = results[0]
    assert status == "ok" and "whose process has ended" in message, results
