"""Shared checks: a split model must equal the unsharded one in outputs, gradients and a step."""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

import tensor_parallel as tp

# Tolerance for float32 comparisons with the unsharded model. A row split sums the partial
# products of each rank and then adds them, where one matmul sums them in one go: the same
# numbers added in another order, which moves float32 results by a few ulps (~1e-7 relative
# per addition, inner sizes below 1000 here). 1e-5 leaves a wide margin over that, and is
# still 4 orders of magnitude below the error of any wrong cut, misplaced bias or lost
# gradient (O(1e-1) on these random models).
ATOL = 1e-5
RTOL = 1e-5


def assert_close(actual, expected, what: str = "") -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def cpu_devices(n: int) -> list[str]:
    return ["cpu"] * n


def assert_gradients_match(model: tp.TensorParallel, reference: nn.Module) -> None:
    """Every parameter of every shard holds its slice of the unsharded gradient."""
    reference_grads = {k: p.grad for k, p in reference.named_parameters(remove_duplicate=False)}
    for rank, shard in enumerate(model.module_shards):
        for key, param in shard.named_parameters(remove_duplicate=False):
            spec = model.layout[key]
            if param.numel() == 0:  # an empty slice (layer smaller than the device count)
                continue
            assert param.grad is not None, f"rank {rank} {key}: no gradient"
            want = reference_grads[key] if spec is None else spec.take(reference_grads[key], rank)
            assert_close(param.grad, want, f"gradient of {key} on rank {rank}")


def check_equivalence(module: nn.Module, inputs: tuple, n_devices: int, *,
                      plan=None, loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      lr: float = 0.1, devices: list[str] | None = None, **options) -> tp.TensorParallel:
    """Split a copy of ``module`` over ``n_devices`` CPU devices (or ``devices``) and compare with
    ``module``: outputs, every parameter's gradient (as this shard's slice), and one SGD step.
    ``options`` go to ``tp.tensor_parallel`` (e.g. ``tensor_parallel_config``)."""
    loss = loss or (lambda y: (y.float() ** 2).mean())
    reference = copy.deepcopy(module)
    model = tp.tensor_parallel(module, devices or cpu_devices(n_devices), plan=plan, **options)

    expected = reference(*inputs)
    actual = model(*inputs)
    assert_close(actual, expected, "forward output")

    loss(expected).backward()
    loss(actual).backward()
    assert_gradients_match(model, reference)

    torch.optim.SGD(reference.parameters(), lr=lr).step()
    torch.optim.SGD(model.parameters(), lr=lr).step()
    stepped = model.unsharded_state_dict()
    for key, value in reference.state_dict().items():
        assert_close(stepped[key], value, f"{key} after one SGD step")
    assert_close(model(*inputs), reference(*inputs), "forward output after one SGD step")
    return model
