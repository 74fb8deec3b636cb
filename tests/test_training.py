"""The training loop's shortcuts give what the textbook calls give, bit for bit."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.model import StackedMlp
from pipeline.training import gradients
from tests.conftest import tiny_params


def test_gradients_are_autograd_grad_bit_for_bit():
    config = tiny_params(seeds=[0, 1]).variant("batchnorm")
    model = StackedMlp(config, [0, 1])
    images = torch.rand(2, 8, 784, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(16) % 10
    params = tuple(model.parameters())
    seed = torch.tensor(1 / 8)

    def loss() -> torch.Tensor:
        return F.cross_entropy(model(images).flatten(0, 1), labels, reduction="sum")

    expected = torch.autograd.grad(loss(), params, seed)
    got = gradients(loss(), params, seed)
    assert len(got) == len(params) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
        assert a.abs().sum() > 0
