"""The stacked model is an optimisation, not a different algorithm: replica k == seed k alone."""

import pytest
import torch

from pipeline.data import Split, as_images
from pipeline.nn.model import StackedLinear, StackedMlp, unstack
from tests.reference import train_alone
from pipeline.nn.training import TrainingStep, epoch_metrics, make_optimizer, score, train_epoch
from tests.conftest import tiny_mnist_arrays, tiny_params

SEEDS = [3, 7, 11]


@pytest.fixture(scope="module")
def splits() -> tuple[Split, Split]:
    arrays = tiny_mnist_arrays(train=640, test=160)
    pixels = torch.from_numpy(arrays["train-images-idx3-ubyte"]).flatten(1)
    labels = torch.from_numpy(arrays["train-labels-idx1-ubyte"]).long()
    return Split(pixels[:512], labels[:512]), Split(pixels[512:], labels[512:])


@pytest.mark.parametrize(("norm", "optimizer"), [("batch", "adam"), ("layer", "sgd"), ("none", "adamw")])
def test_replica_in_a_stack_trains_like_the_seed_alone(splits, norm, optimizer):
    train, val = splits
    config = tiny_params(seeds=SEEDS, train={"norm": norm, "optimizer": optimizer, "epochs": 13}).variant("batchnorm")
    config = config.model_copy(update={"norm": norm})
    stack = StackedMlp(config)
    step = TrainingStep(stack, make_optimizer(stack, config), train, config)
    stack_history = []
    for epoch in range(1, config.epochs + 1):  # 13 epochs x 16 steps = 208 steps
        train_epoch(step, epoch)
        stack_history.append(epoch_metrics(stack, train, val, batch_size=256))

    replica = 1
    alone, alone_history = train_alone(config, SEEDS[replica], train, val, config.epochs)
    extracted = unstack(stack, config, replica)
    extracted_state = extracted.state_dict()
    for name, expected in alone.state_dict().items():
        if name.endswith("num_batches_tracked"):  # a counter the stack has no use for
            continue
        torch.testing.assert_close(extracted_state[name], expected, rtol=1e-4, atol=1e-5, msg=name)
    for epoch, (stacked, single) in enumerate(zip(stack_history, alone_history), start=1):
        for name, value in single.items():
            assert stacked[name][replica] == pytest.approx(value, rel=1e-4, abs=1e-5), (epoch, name)


@pytest.mark.parametrize("norm", ["batch", "layer", "none"])
def test_unstacked_replica_predicts_like_the_stack(splits, norm):
    _, val = splits
    config = tiny_params(seeds=SEEDS).variant("batchnorm").model_copy(update={"norm": norm})
    stack = StackedMlp(config).eval()
    with torch.no_grad():
        images = as_images(val.pixels)
        stacked_logits = stack(images)
        for replica in range(len(SEEDS)):
            plain_logits = unstack(stack, config, replica)(images.view(-1, 28, 28))
            torch.testing.assert_close(plain_logits, stacked_logits[replica])


@pytest.mark.parametrize("bias_before_bn", [False, True])
def test_bias_before_batch_norm_only_on_request(splits, bias_before_bn):
    """The port drops the Linear bias that batch norm cancels; `bias_before_bn` keeps TF1's."""
    train, val = splits
    config = tiny_params(seeds=SEEDS, train={"norm": "batch", "bias_before_bn": bias_before_bn}).variant("batchnorm")
    stack = StackedMlp(config)
    train_epoch(TrainingStep(stack, make_optimizer(stack, config), train, config), epoch=1)
    linears = [layer for layer in stack.layers if isinstance(layer, StackedLinear)]
    assert [layer.bias is not None for layer in linears] == [bias_before_bn, bias_before_bn, True]
    if bias_before_bn:  # its gradient is rounding noise, which Adam still turns into steps
        assert linears[0].bias.abs().max() > 0
    images = as_images(val.pixels)
    with torch.no_grad():
        torch.testing.assert_close(unstack(stack, config, 1)(images.view(-1, 28, 28)), stack.eval()(images)[1])


def test_replicas_differ_by_seed_and_score_per_replica(splits):
    _, val = splits
    config = tiny_params(seeds=SEEDS).variant("batchnorm")
    stack = StackedMlp(config)
    weights = stack.layers[0].weight
    assert not torch.equal(weights[0], weights[1])
    assert score(stack, val, batch_size=50).acc.shape == (len(SEEDS),)


def test_a_trailing_batch_of_one_image_is_skipped_not_a_crash(splits):
    train, _ = splits
    config = tiny_params(seeds=SEEDS, train={"norm": "batch", "batch_size": 3}).variant("batchnorm")
    stack = StackedMlp(config)
    before = stack.layers[0].weight.detach().clone()
    seven = Split(train.pixels[:7], train.labels[:7])
    train_epoch(TrainingStep(stack, make_optimizer(stack, config), seven, config), epoch=1)
    assert not torch.equal(stack.layers[0].weight, before)  # the two full batches trained
