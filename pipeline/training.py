"""The training loop over whole tensors: one epoch of a replica stack, and its evaluation.

No Dataset or DataLoader in the hot path: the split lives on the device as one tensor, each
replica draws its own seeded permutation per epoch and batches are slices of it. The
permutation of epoch e is derived from (seed, e) alone, so resuming at any epoch boundary
needs no saved RNG state and replays exactly the batches an uninterrupted run would see.

At batch 32 a step costs well under a millisecond, so per-step overhead is what counts
(benchmarks/README.md): each step's rows of every replica are one contiguous index vector,
gathered with a single `index_select`; the 1/B of the mean loss is the gradient seeded
into `autograd.grad` rather than a division node (the same bits as the plain form), and the
gradients go straight to the fused optimizer (pipeline/optimizer.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data import Split
from pipeline.model import StackedMlp
from pipeline.optimizer import FusedOptimizer
from pipeline.params import VariantConfig


def epoch_permutations(seeds: list[int], epoch: int, size: int) -> torch.Tensor:
    """[K, N]: the order replica k visits the train split in `epoch` (1-based)."""
    return torch.stack([
        torch.randperm(size, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for seed in seeds
    ])


def make_optimizer(model: nn.Module, config: VariantConfig) -> FusedOptimizer:
    return FusedOptimizer(list(model.parameters()), config)


def step_rows(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Each step's train rows, [K * B] (replica-major), from the [K, N] permutations.

    One copy lays the full batches out step-major so every step's index is contiguous;
    the partial last batch, if any, comes last, unless it is a single image: batch
    statistics of one sample are undefined, so that image waits for the next epoch.
    """
    replicas, size = order.shape
    full = size // batch_size
    head = order[:, : full * batch_size].reshape(replicas, full, batch_size).transpose(0, 1)
    steps = list(head.reshape(full, replicas * batch_size).unbind(0))
    if size - full * batch_size > 1:
        steps.append(order[:, full * batch_size :].reshape(-1))
    return steps


def train_epoch(
    model: StackedMlp,
    optimizer: FusedOptimizer,
    train: Split,
    seeds: list[int],
    epoch: int,
    batch_size: int,
    on_step=None,
) -> None:
    model.train()
    order = epoch_permutations(seeds, epoch, len(train)).to(train.labels.device)
    replicas = len(seeds)
    one = torch.ones((), dtype=train.images.dtype, device=train.images.device)
    for rows in step_rows(order, batch_size):
        batch = rows.shape[0] // replicas
        logits = model(train.images.index_select(0, rows).view(replicas, batch, -1))  # [K, B, 10]
        # Sum over replicas of each replica's mean loss: gradients stay independent.
        loss = F.cross_entropy(logits.flatten(0, 1), train.labels.index_select(0, rows), reduction="sum")
        # The gradient of loss / B, seeded as (loss / B).backward() would; no .grad to zero.
        optimizer.step(torch.autograd.grad(loss, optimizer.params, one / batch))
        if on_step is not None:
            on_step()


@dataclass(frozen=True)
class Scores:
    """Per-replica loss and accuracy, each a [K] tensor."""

    loss: torch.Tensor
    acc: torch.Tensor


@torch.inference_mode()
def score(model: nn.Module, split: Split, batch_size: int) -> Scores:
    """Mean loss and accuracy of every replica on a whole split (eval mode, large batches)."""
    model.eval()
    loss_sum = correct = 0
    for start in range(0, len(split), batch_size):
        images = split.images[start : start + batch_size]
        labels = split.labels[start : start + batch_size]
        logits = model(images)  # [K, n, 10]
        targets = labels.expand(logits.shape[0], -1)
        loss_sum = loss_sum + F.cross_entropy(
            logits.transpose(1, 2), targets, reduction="none"
        ).double().sum(1)
        correct = correct + (logits.argmax(-1) == targets).sum(1)
    return Scores(loss=(loss_sum / len(split)).cpu(), acc=(correct.double() / len(split)).cpu())


def epoch_metrics(model: StackedMlp, train: Split, val: Split, batch_size: int) -> dict[str, list[float]]:
    """The lab's per-epoch measurements, a list of K values per metric name."""
    on_train, on_val = score(model, train, batch_size), score(model, val, batch_size)
    return {
        "train_loss": on_train.loss.tolist(),
        "train_acc": on_train.acc.tolist(),
        "val_loss": on_val.loss.tolist(),
        "val_acc": on_val.acc.tolist(),
    }
