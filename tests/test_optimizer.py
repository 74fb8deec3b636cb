"""The fused optimizer is torch.optim's own fused update, without torch.optim around it, on
either of pipeline/nn/fastpath.py's paths (private: True, public: False)."""

import pytest
import torch

from pipeline.nn.optimizer import FusedOptimizer
from tests.reference import torch_optimizer
from tests.conftest import tiny_params

SHAPES = [(3, 784, 4), (3, 1, 4), (3, 4, 10)]  # stacked kernel, BN weight, output kernel
PATHS = pytest.mark.parametrize("private", [True, False], ids=["private", "public"])


def _params(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for shape in SHAPES]


def _grads(step: int) -> list[torch.Tensor]:
    return _params(seed=1000 + step)


def _saved(optimizer: FusedOptimizer) -> dict:
    """A checkpoint's copy of the state."""
    return {key: [t.clone() for t in value] if isinstance(value, list) else value
            for key, value in optimizer.state_dict().items()}


@PATHS
@pytest.mark.parametrize(("kind", "weight_decay"), [
    ("adam", None), ("adamw", None), ("sgd", None), ("adam", 0.1), ("adamw", 0.3), ("sgd", 0.01),
])
def test_fused_optimizer_matches_torch_optim_bit_for_bit(kind, weight_decay, private):
    config = tiny_params(train={"optimizer": kind, "weight_decay": weight_decay, "adam_eps": 1e-6}).variant("batchnorm")
    ours, theirs = _params(), _params()
    optimizer, reference = FusedOptimizer(ours, config, private), torch_optimizer(theirs, config)
    for step in range(25):
        grads = _grads(step)
        optimizer.step(grads)
        for param, grad in zip(theirs, grads, strict=True):
            param.grad = grad.clone()
        reference.step()
        for mine, expected in zip(ours, theirs, strict=True):
            assert torch.equal(mine, expected), (kind, step)


@pytest.mark.parametrize(("first_path", "resumed_path"), [(True, True), (False, False), (True, False), (False, True)])
@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_restored_state_continues_exactly_on_either_path(kind, first_path, resumed_path):
    config = tiny_params(train={"optimizer": kind}).variant("batchnorm")
    straight, interrupted = _params(), _params()
    optimizer = FusedOptimizer(straight, config, first_path)
    first = FusedOptimizer(interrupted, config, first_path)
    for step in range(10):
        optimizer.step(_grads(step))
        if step < 6:
            first.step(_grads(step))
    resumed = FusedOptimizer(interrupted, config, resumed_path)
    resumed.load_state_dict(_saved(first))
    for step in range(6, 10):
        resumed.step(_grads(step))
    assert all(torch.equal(a, b) for a, b in zip(straight, interrupted, strict=True))


@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd"])
def test_both_paths_keep_the_same_state(kind):
    """What a checkpoint keeps does not depend on the path that trained it."""
    config = tiny_params(train={"optimizer": kind}).variant("batchnorm")
    states = []
    for private in (True, False):
        optimizer = FusedOptimizer(_params(), config, private)
        for step in range(3):
            optimizer.step(_grads(step))
        states.append(_saved(optimizer))
    private_state, public_state = states
    assert private_state.keys() == public_state.keys() == {"kind", "step", "exp_avg", "exp_avg_sq"}
    assert private_state["step"].dtype == torch.float32 and private_state["step"].shape == ()
    assert torch.equal(private_state["step"], public_state["step"])
    assert private_state["step"].item() == (3 if kind != "sgd" else 0)
    for key in ("exp_avg", "exp_avg_sq"):
        assert all(map(torch.equal, private_state[key], public_state[key])), key


def test_state_of_another_optimizer_is_refused():
    adam = FusedOptimizer(_params(), tiny_params(train={"optimizer": "adam"}).variant("batchnorm"))
    sgd = FusedOptimizer(_params(), tiny_params(train={"optimizer": "sgd"}).variant("batchnorm"))
    with pytest.raises(ValueError, match="'sgd', not 'adam'"):
        adam.load_state_dict(sgd.state_dict())
