"""The hand-derived step is autograd's, bit for bit: every layer type, activation, K, width and depth."""

import copy
import itertools

import pytest
import torch
from torch import nn

from pipeline.nn import backprop
from pipeline.nn.backprop import Backprop, autograd_gradients
from pipeline.data import as_images
from pipeline.nn.model import StackedMlp
from tests.conftest import tiny_params

ROWS = 200
GENERATOR = torch.Generator().manual_seed(0)
PIXELS = torch.randint(0, 256, (ROWS, 784), dtype=torch.uint8, generator=GENERATOR)
LABELS = torch.randint(0, 10, (ROWS,), generator=GENERATOR)


def config_of(norm="batch", activation="relu", replicas=2, bias_before_bn=False, hidden_sizes=(32, 16)):
    config = tiny_params(seeds=list(range(replicas)), train={"bias_before_bn": bias_before_bn,
                                                             "hidden_sizes": list(hidden_sizes)})
    return config.variant("batchnorm").model_copy(update={"norm": norm, "activation": activation})


def both_ways(config, batch: int, seed: int = 0):
    """(autograd's gradients, the hand-derived ones, the two models after the step) on the same rows."""
    by_autograd = StackedMlp(config)
    by_hand = copy.deepcopy(by_autograd)
    replicas = len(config.seeds)
    rows = torch.randperm(ROWS, generator=torch.Generator().manual_seed(seed))[: replicas * batch]
    images = as_images(PIXELS.index_select(0, rows)).view(replicas, batch, -1)
    expected = autograd_gradients(by_autograd, images, LABELS.index_select(0, rows), torch.ones(()) / batch)
    got = Backprop(by_hand.layers, replicas, batch, PIXELS, LABELS).gradients(rows)
    return expected, got, by_autograd, by_hand


def assert_same_step(expected, got, by_autograd, by_hand) -> None:
    assert len(got) == len(expected) == len(list(by_hand.parameters()))
    for name, a, b in zip(dict(by_hand.named_parameters()), got, expected, strict=True):
        assert a.shape == b.shape and torch.equal(a, b), name
        assert a.abs().sum() > 0, name
    for (name, a), b in zip(by_hand.named_buffers(), by_autograd.buffers(), strict=True):
        assert torch.equal(a, b), name  # running statistics, updated as F.batch_norm does


CASES = [(norm, activation, replicas, False) for norm, activation, replicas in
         itertools.product(["batch", "layer", "none"], ["relu", "tanh", "sigmoid", "gelu"], [1, 3])]
CASES += [("batch", activation, replicas, True) for activation, replicas in itertools.product(["relu", "gelu"], [1, 3])]


@pytest.mark.parametrize(("norm", "activation", "replicas", "bias_before_bn"), CASES)
def test_gradients_and_running_statistics_are_autograds(norm, activation, replicas, bias_before_bn):
    config = config_of(norm, activation, replicas, bias_before_bn)
    assert_same_step(*both_ways(config, batch=32))


@pytest.mark.parametrize("hidden_sizes", [(5,), (7, 1, 9, 3), (64,) * 6])
@pytest.mark.parametrize("batch", [2, 7])
def test_any_depth_width_and_batch(hidden_sizes, batch):
    assert_same_step(*both_ways(config_of(hidden_sizes=hidden_sizes, replicas=2), batch))


def test_running_statistics_move_as_batch_norms():
    _, _, by_autograd, by_hand = both_ways(config_of(replicas=1), batch=32)
    fresh = StackedMlp(config_of(replicas=1))
    assert not torch.equal(by_hand.layers[1].running_mean, fresh.layers[1].running_mean)
    assert not torch.equal(by_hand.layers[1].running_var, fresh.layers[1].running_var)


def test_buffers_carry_nothing_from_one_step_to_the_next():
    config = config_of(replicas=2)
    model = StackedMlp(config)
    step = Backprop(model.layers, 2, 8, PIXELS, LABELS)
    first, other = torch.arange(16), torch.arange(16, 32)
    before = [grad.clone() for grad in step.gradients(first)]
    step.gradients(other)
    after = step.gradients(first)  # batch statistics: the running ones do not enter
    assert all(map(torch.equal, before, after))


def test_self_check_passes_on_this_torch():
    assert backprop.differs_from_autograd(torch.device("cpu")) is None


def test_self_check_sees_a_backward_kernel_that_changed(monkeypatch):
    monkeypatch.setitem(backprop.Activation.KERNELS, nn.ReLU, (torch.relu_, lambda grad, y: grad))  # no mask
    assert backprop.differs_from_autograd(torch.device("cpu")) == "the hand-derived backward differs from autograd's"


def test_batch_norm_through_the_dispatching_call_as_off_the_cpu(monkeypatch):
    """Where F.batch_norm may pick another kernel (CUDA), the step calls the dispatching one."""
    monkeypatch.setattr(backprop.BatchNorm, "NATIVE", ())
    for replicas in (1, 3):
        expected, got, by_autograd, by_hand = both_ways(config_of(replicas=replicas), batch=32)
        assert_same_step(expected, got, by_autograd, by_hand)


@pytest.mark.parametrize("classes_first", [True, False])
def test_either_layout_of_the_logits_is_autograds(monkeypatch, classes_first):
    """The log-softmax laid out classes first where this machine's kernels agree, by rows otherwise."""
    if classes_first and not backprop.classes_first_agrees("cpu", 3 * 32, 10):
        pytest.skip("this CPU's two log-softmax kernels round differently at 96 rows")
    monkeypatch.setattr(backprop, "classes_first_agrees", lambda device_type, rows, classes: classes_first)
    expected, got, by_autograd, by_hand = both_ways(config_of(replicas=3), batch=32)
    assert_same_step(expected, got, by_autograd, by_hand)


def test_the_layout_is_what_the_kernels_comparison_says():
    step = Backprop(StackedMlp(config_of(replicas=2)).layers, 2, 8, PIXELS, LABELS)
    assert step.classes_first == backprop.classes_first_agrees("cpu", 16, 10)
    assert not backprop.classes_first_agrees("cpu", 4, 10)  # a scalar exp for rows short of a vector
