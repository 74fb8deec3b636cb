"""The fused optimizer is torch.optim's own fused update, without torch.optim around it."""

from __future__ import annotations

import pytest
import torch

from pipeline.optimizer import FusedOptimizer
from tests.conftest import tiny_params, torch_optimizer

SHAPES = [(3, 784, 4), (3, 1, 4), (3, 4, 10)]  # stacked kernel, BN weight, output kernel


def _params(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for shape in SHAPES]


def _grads(step: int) -> list[torch.Tensor]:
    return _params(seed=1000 + step)


@pytest.mark.parametrize(("kind", "weight_decay"), [
    ("adam", None), ("adamw", None), ("sgd", None), ("adam", 0.1), ("adamw", 0.3), ("sgd", 0.01),
])
def test_fused_optimizer_matches_torch_optim_bit_for_bit(kind, weight_decay):
    config = tiny_params(train={"optimizer": kind, "weight_decay": weight_decay, "adam_eps": 1e-6}).variant("batchnorm")
    ours, theirs = _params(), _params()
    optimizer, reference = FusedOptimizer(ours, config), torch_optimizer(theirs, config)
    for step in range(25):
        grads = _grads(step)
        optimizer.step(grads)
        for param, grad in zip(theirs, grads, strict=True):
            param.grad = grad.clone()
        reference.step()
        for mine, expected in zip(ours, theirs, strict=True):
            assert torch.equal(mine, expected), (kind, step)


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_restored_state_continues_exactly(kind):
    config = tiny_params(train={"optimizer": kind}).variant("batchnorm")
    straight, interrupted = _params(), _params()
    optimizer = FusedOptimizer(straight, config)
    first = FusedOptimizer(interrupted, config)
    for step in range(10):
        optimizer.step(_grads(step))
        if step < 6:
            first.step(_grads(step))
    saved = {key: [t.clone() for t in value] if isinstance(value, list) else value
             for key, value in first.state_dict().items()}
    resumed = FusedOptimizer(interrupted, config)
    resumed.load_state_dict(saved)
    for step in range(6, 10):
        resumed.step(_grads(step))
    assert all(torch.equal(a, b) for a, b in zip(straight, interrupted, strict=True))


def test_state_of_another_optimizer_is_refused():
    adam = FusedOptimizer(_params(), tiny_params(train={"optimizer": "adam"}).variant("batchnorm"))
    sgd = FusedOptimizer(_params(), tiny_params(train={"optimizer": "sgd"}).variant("batchnorm"))
    with pytest.raises(ValueError, match="'sgd', not 'adam'"):
        adam.load_state_dict(sgd.state_dict())
