"""The textbook loop the replica stack is checked against: one seed, an ordinary nn.Module,
torch.optim. Test support, not the product: tests/test_model.py (on the CPU) and
benchmarks/check_cuda.py (on a GPU) compare the stack's replica k with seed k trained here."""

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data import Split, as_images
from pipeline.nn.model import StackedMlp, unstack
from pipeline.nn.training import epoch_metrics, epoch_permutations
from pipeline.config.variant import VariantConfig


def plain_mlp(config: VariantConfig, seed: int) -> nn.Sequential:
    """The same network for one seed as an ordinary module: flattens [B, 28, 28] or [B, 784]."""
    return unstack(StackedMlp(config.model_copy(update={"seeds": [seed]})), config, 0).train()


def torch_optimizer(params, config: VariantConfig) -> torch.optim.Optimizer:
    """torch.optim's fused optimizer for a variant: the reference pipeline.nn.optimizer must match."""
    decay = {} if config.weight_decay is None else {"weight_decay": config.weight_decay}
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, fused=True, **decay)
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=config.lr, eps=config.adam_eps, fused=True, **decay)


def train_alone(config: VariantConfig, seed: int, train: Split, val: Split, epochs: int):
    """(model, per-epoch metrics) of one seed trained the textbook way (on train's device)."""
    model = plain_mlp(config, seed).to(train.pixels.device)
    optimizer = torch_optimizer(model.parameters(), config)
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        [order] = epoch_permutations([seed], epoch, len(train)).to(train.pixels.device)
        for start in range(0, len(train), config.batch_size):
            batch = order[start : start + config.batch_size]
            loss = F.cross_entropy(model(as_images(train.pixels[batch])), train.labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        history.append({name: value[0] for name, value in epoch_metrics(
            _as_stack(model), train, val, batch_size=256).items()})
    return model, history


def _as_stack(model):
    """A plain model's outputs with a leading replica dimension of 1, for `score`."""
    return torch.nn.Sequential(model, torch.nn.Unflatten(0, (1, -1)))
