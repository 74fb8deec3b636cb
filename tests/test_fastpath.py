"""torch's private calls and their public fallbacks give the same bits; the choice between them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline import fastpath
from pipeline.model import StackedMlp
from tests.conftest import tiny_params


@pytest.mark.parametrize("private", [True, False])
def test_gradients_are_autograd_grad_bit_for_bit(private):
    config = tiny_params(seeds=[0, 1]).variant("batchnorm")
    model = StackedMlp(config)
    images = torch.rand(2, 8, 784, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(16) % 10
    params = tuple(model.parameters())
    seed = torch.tensor(1 / 8)

    def loss() -> torch.Tensor:
        return F.cross_entropy(model(images).flatten(0, 1), labels, reduction="sum")

    expected = torch.autograd.grad(loss(), params, seed)
    got = fastpath.gradients(loss(), params, seed, private)
    assert len(got) == len(params) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
        assert a.abs().sum() > 0


@pytest.fixture
def fresh_choice():
    fastpath.private_path.cache_clear()
    yield
    fastpath.private_path.cache_clear()


def test_private_calls_pass_their_self_check_on_this_torch(fresh_choice, monkeypatch, capsys):
    monkeypatch.delenv("PIPELINE_FASTPATH", raising=False)
    assert fastpath.private_calls_fail() is None
    assert fastpath.private_path() is True
    assert capsys.readouterr().err == ""


def test_environment_variable_forces_the_public_path(fresh_choice, monkeypatch, capsys):
    monkeypatch.setenv("PIPELINE_FASTPATH", "0")
    assert fastpath.private_path() is False
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("breakage", "reason"), [
    ("removed", "AttributeError: module 'torch' has no attribute '_fused_adamw_'"),
    ("changed", "the fused adam kernel differs from torch.optim's"),
])
def test_a_broken_private_call_falls_back_with_one_line(fresh_choice, monkeypatch, capsys, breakage, reason):
    monkeypatch.delenv("PIPELINE_FASTPATH", raising=False)
    if breakage == "removed":
        monkeypatch.delattr(torch, "_fused_adamw_")
    else:  # still runs, other bits (the kernels are shared, so the outcome is what is faked)
        monkeypatch.setattr(fastpath, "_updated", lambda kind, private: [torch.tensor(float(private))])
    assert fastpath.private_path() is False
    [line] = capsys.readouterr().err.splitlines()
    assert line.endswith(f"failed a self-check ({reason})")
