"""The training loop over whole tensors: the batches of an epoch, a step on either path, scoring."""

import pytest
import torch
import torch.nn.functional as F

from pipeline.data import Split, as_images
from pipeline.nn.model import StackedMlp
from pipeline.nn.training import (
    TrainingStep,
    configure_runtime,
    epoch_permutations,
    make_optimizer,
    score,
    step_rows,
    train_epoch,
)
from tests.conftest import tiny_params

GENERATOR = torch.Generator().manual_seed(0)
SPLIT = Split(torch.randint(0, 256, (101, 784), dtype=torch.uint8, generator=GENERATOR),
              torch.randint(0, 10, (101,), generator=GENERATOR))


def test_epoch_permutations_depend_on_seed_and_epoch_alone():
    first = epoch_permutations([3, 7], epoch=1, size=50)
    assert first.shape == (2, 50)
    assert all(torch.equal(row.sort().values, torch.arange(50)) for row in first)
    assert torch.equal(first, epoch_permutations([3, 7], epoch=1, size=50))
    assert torch.equal(first[1], epoch_permutations([7], epoch=1, size=50)[0])  # a replica's order is its own
    assert not torch.equal(first, epoch_permutations([3, 7], epoch=2, size=50))
    assert not torch.equal(first[0], first[1])


@pytest.mark.parametrize(("size", "batch", "steps", "last"), [(12, 4, 3, 4), (14, 4, 4, 2), (13, 4, 3, 4)])
def test_step_rows_are_replica_major_batches_and_a_lone_last_image_waits(size, batch, steps, last):
    order = torch.stack([torch.arange(size), torch.arange(size) + 100])
    rows = step_rows(order, batch)
    assert len(rows) == steps and rows[-1].shape == (2 * last,)
    for index, step in enumerate(rows):
        per_replica = step.view(2, -1)
        expected = torch.arange(index * batch, min((index + 1) * batch, size))
        assert torch.equal(per_replica[0], expected) and torch.equal(per_replica[1], expected + 100)
        assert step.is_contiguous()


def test_score_is_each_replicas_mean_loss_and_accuracy_in_any_batch_size():
    config = tiny_params(seeds=[0, 1]).variant("batchnorm")
    model = StackedMlp(config)
    scores = score(model, SPLIT, batch_size=7)
    with torch.no_grad():
        logits = model.eval()(as_images(SPLIT.pixels))  # [K, N, 10]
    for replica in range(2):
        loss = F.cross_entropy(logits[replica].double(), SPLIT.labels)
        acc = (logits[replica].argmax(-1) == SPLIT.labels).double().mean()
        assert scores.loss[replica].item() == pytest.approx(loss.item(), rel=1e-6)
        assert scores.acc[replica].item() == acc.item()
    torch.testing.assert_close(score(model, SPLIT, batch_size=1000).loss, scores.loss, rtol=1e-6, atol=0)


def trained(config, private: bool, epochs: int = 2) -> tuple[StackedMlp, TrainingStep, int]:
    model = StackedMlp(config)
    step = TrainingStep(model, make_optimizer(model, config, private), SPLIT, config)
    calls = 0

    def count() -> None:
        nonlocal calls
        calls += 1

    for epoch in range(1, epochs + 1):
        train_epoch(step, epoch, on_step=count)
    return model, step, calls


@pytest.mark.parametrize(("norm", "optimizer"), [("batch", "adam"), ("layer", "sgd"), ("none", "adamw")])
def test_the_step_by_hand_trains_as_autograd_does_bit_for_bit(norm, optimizer):
    """101 rows in batches of 8: 12 full steps and a partial one of 5 an epoch, on each path."""
    config = tiny_params(seeds=[0, 1], train={"batch_size": 8, "optimizer": optimizer}).variant("batchnorm")
    config = config.model_copy(update={"norm": norm})
    by_hand, step, calls = trained(config, private=True)
    by_autograd, _, _ = trained(config, private=False)
    assert calls == 2 * 13
    assert sorted(step.backprops) == [5, 8]  # the full batches' buffers and the last one's
    hand, auto = by_hand.state_dict(), by_autograd.state_dict()
    assert all(torch.equal(hand[name], auto[name]) for name in auto)
    assert not torch.equal(hand["layers.0.weight"], StackedMlp(config).state_dict()["layers.0.weight"])


def test_the_runtime_flushes_denormals_to_zero_in_the_training_thread_and_those_it_starts():
    import threading

    threads, tiny = torch.get_num_threads(), torch.tensor([1e-40])  # 1e-40: a float32 denormal
    assert (tiny * 1.0).item() != 0.0
    try:
        configure_runtime(threads, "cpu")
        assert (tiny * 1.0).item() == 0.0
        other = []
        thread = threading.Thread(target=lambda: other.append((tiny * 1.0).item()))
        thread.start()
        thread.join()
        assert other[0] == 0.0  # inherited: the train stage's evaluation thread starts after it
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)
