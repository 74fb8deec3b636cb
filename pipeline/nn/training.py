"""The training loop over whole tensors: one epoch of a replica stack, and its evaluation.

No Dataset or DataLoader in the hot path: the split lives on the device as one tensor, each
replica draws its own seeded permutation per epoch and batches are slices of it. The
permutation of epoch e is derived from (seed, e) alone, so resuming at any epoch boundary
needs no saved RNG state and replays exactly the batches an uninterrupted run would see.
"""

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.nn.backprop import Backprop, autograd_gradients
from pipeline.nn.checkpoint import copied
from pipeline.data import Split, as_images
from pipeline.errors import PipelineError
from pipeline.nn.model import StackedMlp
from pipeline.nn.optimizer import FusedOptimizer
from pipeline.config.variant import VariantConfig


def configure_runtime(threads: int, device: str) -> torch.device:
    """Pinned threads and deterministic kernels: same inputs, same bits (on one device)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise PipelineError("train.device: 'cuda' requested but no CUDA device is available")
    torch.set_num_threads(threads)
    # Floats below 2^-126 as zero (FTZ/DAZ) on the CPU, in this thread and those it starts later (the
    # stage's evaluation thread). Without a norm, gradients and Adam's moments of units that barely
    # fire decay into denormals, a slow path for the CPU: a no-norm epoch of the lab's 5 seeds took
    # 2.62 s, 1.00 s flushed (batch norm 1.36 s either way; Intel Xeon, AVX-512). The lab's TF1 code
    # ran flushed too: TensorFlow sets FTZ/DAZ in the threads that run its kernels.
    torch.set_flush_denormal(True)
    if device == "cuda":
        # On the CPU every kernel this model uses is deterministic for a fixed thread count
        # (tests check bit-identical reruns); the switch would only cost a second of imports.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Deterministic mode also fills every new tensor with NaN, a kernel per allocation;
        # no kernel here reads memory it has not written.
        torch.utils.deterministic.fill_uninitialized_memory = False
    return torch.device(device)


def epoch_permutations(seeds: list[int], epoch: int, size: int) -> torch.Tensor:
    """[K, N]: the order replica k visits the train split in `epoch` (1-based)."""
    return torch.stack([torch.randperm(size, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
                        for seed in seeds])


def make_optimizer(model: nn.Module, config: VariantConfig, private: bool | None = None) -> FusedOptimizer:
    return FusedOptimizer(list(model.parameters()), config, private)


def trained_state(model: nn.Module, optimizer: FusedOptimizer) -> dict:
    """A copy of the weights and optimizer state, which training goes on changing."""
    return copied({"model": model.state_dict(), "optimizer": optimizer.state_dict()})


def step_rows(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Each step's train rows, [K * B] (replica-major), from the [K, N] permutations: one copy lays
    the full batches out step-major so every step's index is contiguous; the partial last batch
    comes last, unless it is a single image (batch statistics of one sample are undefined)."""
    replicas, size = order.shape
    full = size // batch_size
    head = order[:, : full * batch_size].reshape(replicas, full, batch_size).transpose(0, 1)
    steps = list(head.reshape(full, replicas * batch_size).unbind(0))
    if size - full * batch_size > 1:
        steps.append(order[:, full * batch_size :].reshape(-1))
    return steps


class TrainingStep:
    """One optimizer step of every replica on its rows ([K * B], replica-major).

    On CUDA a full batch's step (forward, backward, the fused update) is captured once as a CUDA
    graph and replayed: at batch 32 an eager step is ~2 ms of kernel launches for ~0.2 ms of GPU
    work. The capture's warm-up runs on the real tensors and is then undone, so every full batch,
    first or resumed, goes through the same graph; the partial last batch and the CPU's steps run
    eagerly. The step by hand makes its buffers in that warm-up and no host sync (it branches on shapes).
    """

    def __init__(self, model: StackedMlp, optimizer: FusedOptimizer, train: Split, config: VariantConfig) -> None:
        self.model, self.optimizer, self.train, self.config = model, optimizer, train, config
        self.one = torch.ones((), device=train.labels.device)
        self.graphed_rows = len(config.seeds) * config.batch_size if train.labels.is_cuda else None  # full batches
        self.graph = self.static_rows = None
        self.backprops: dict[int, Backprop] = {}  # rows per replica -> its buffers
        # The step by hand records nothing for autograd: in inference mode its calls skip autograd's
        # dispatch (and a view's tracking), the same kernels: a K=1 step with batch norm 0.31 -> 0.23 ms
        # (0.41 -> 0.33 ms in the machine's slow hour), without a norm within noise (AMD EPYC, one
        # thread, alternated in one process). A CUDA graph has nothing to save, and stays as checked.
        self.inference = optimizer.private and not train.labels.is_cuda

    def gradients(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """d(loss / B)/d(parameters), the loss summed over replicas (their gradients stay apart)."""
        replicas = len(self.config.seeds)
        batch = rows.shape[0] // replicas
        if not self.optimizer.private:
            images = as_images(self.train.pixels.index_select(0, rows)).view(replicas, batch, -1)
            return autograd_gradients(self.model, images, self.train.labels.index_select(0, rows), self.one / batch)
        if batch not in self.backprops:  # the full batches' buffers, and the partial last batch's
            self.backprops[batch] = Backprop(self.model.layers, replicas, batch, self.train.pixels, self.train.labels)
        return self.backprops[batch].gradients(rows)

    def eager(self, rows: torch.Tensor) -> None:
        self.optimizer.step(self.gradients(rows))

    def __call__(self, rows: torch.Tensor) -> None:
        if rows.shape[0] != self.graphed_rows:
            self.eager(rows)
            return
        if self.graph is None:
            self.capture(rows)
        self.static_rows.copy_(rows)
        self.graph.replay()

    def capture(self, rows: torch.Tensor) -> None:
        saved = trained_state(self.model, self.optimizer)
        self.static_rows = rows.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # cuBLAS handles and workspaces are made outside the capture
                self.eager(self.static_rows)
        torch.cuda.current_stream().wait_stream(side)
        self.model.load_state_dict(saved["model"])  # copies in place: the graph's tensors stay
        self.optimizer.load_state_dict(saved["optimizer"])
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.eager(self.static_rows)


def train_epoch(step: TrainingStep, epoch: int, on_step=None) -> None:
    step.model.train()
    order = epoch_permutations(step.config.seeds, epoch, len(step.train)).to(step.train.labels.device)
    with torch.inference_mode(step.inference):
        for rows in step_rows(order, step.config.batch_size):
            step(rows)
            if on_step is not None:
                on_step()


class Scores(NamedTuple):
    """Per-replica loss and accuracy, each a [K] tensor."""

    loss: torch.Tensor
    acc: torch.Tensor


@torch.inference_mode()
def score(model: nn.Module, split: Split, batch_size: int) -> Scores:
    """Mean loss and accuracy of every replica on a whole split (eval mode, large batches).

    Each batch's images are written into one buffer: a new one each batch was page-faulted in
    anew every time (freed memory goes back to the system), a third of a K=1 evaluation (125 ->
    83 ms an epoch at 1,000 images a batch; AMD EPYC, one thread)."""
    model.eval()
    loss_sum = correct = 0
    buffer = torch.empty(min(batch_size, len(split)), split.pixels.shape[1], device=split.pixels.device)
    for start in range(0, len(split), batch_size):
        pixels, labels = split.pixels[start : start + batch_size], split.labels[start : start + batch_size]
        logits = model(as_images(pixels, out=buffer[: len(pixels)]))  # [K, n, 10]
        targets = labels.expand(logits.shape[0], -1)
        loss_sum = loss_sum + F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").double().sum(1)
        correct = correct + (logits.argmax(-1) == targets).sum(1)
    return Scores(loss=(loss_sum / len(split)).cpu(), acc=(correct.double() / len(split)).cpu())


def epoch_metrics(model: StackedMlp, train: Split, val: Split, batch_size: int) -> dict[str, list[float]]:
    """The lab's per-epoch measurements, a list of K values per metric name."""
    scores = {"train": score(model, train, batch_size), "val": score(model, val, batch_size)}
    return {f"{split}_{name}": getattr(scores[split], name).tolist() for split in scores for name in ("loss", "acc")}
