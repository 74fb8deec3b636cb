"""Stage `evaluate@<variant>`: the final weights of every seed on the test split.

Writes `data/evaluate/<variant>/metrics.json` (test_loss and test_acc, mean over seeds, and
their std: what `dvc metrics show` lists), `per_seed.json`, `per_class.json` and a confusion
matrix PNG. The compare stage, which opens MLflow anyway, logs them into the variant's runs:
opening MLflow here would triple this stage's time (~3 s of imports and store start-up).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline import checkpoint, cli
from pipeline.data import Split, load_split
from pipeline.fsio import atomic_write_json
from pipeline.model import NUM_CLASSES, StackedMlp
from pipeline.params import Params, load_params
from pipeline.reports import confusion_plot
from pipeline.stats import diverged, summarize
from pipeline.training import configure_runtime, in_batches, score
from pipeline.variant import VariantConfig


@torch.inference_mode()
def confusion_matrices(model: StackedMlp, split: Split, batch_size: int) -> np.ndarray:
    """[K, 10, 10] counts: true class by row, predicted by column."""
    model.eval()
    counts = torch.zeros(model.replicas, NUM_CLASSES * NUM_CLASSES, dtype=torch.long)
    for images, labels in in_batches(split, batch_size):
        predicted = model(images).argmax(-1).cpu()  # [K, n]
        cells = labels.cpu() * NUM_CLASSES + predicted
        counts += torch.nn.functional.one_hot(cells, NUM_CLASSES * NUM_CLASSES).sum(1)
    return counts.view(-1, NUM_CLASSES, NUM_CLASSES).numpy()


def evaluate(params: Params, variant: str, root: Path) -> dict:
    device = configure_runtime(params.train.threads, params.train.device)
    state = checkpoint.load(root / "data" / "checkpoints" / variant / "last.pt", device)
    config = VariantConfig(**state["config"])
    model = StackedMlp(config).to(device)
    model.load_state_dict(state["model"])
    test = load_split(root / "data" / "prepared", "test", device)

    scores = score(model, test, params.train.eval_batch_size)
    confusion = confusion_matrices(model, test, params.train.eval_batch_size)
    test_loss, test_acc = scores.loss.tolist(), scores.acc.tolist()
    per_class = (confusion.diagonal(axis1=1, axis2=2) / confusion.sum(axis=2).clip(min=1))  # [K, 10]

    out = root / "data" / "evaluate" / variant
    per_seed = {"test_loss": test_loss, "test_acc": test_acc}
    metrics = summarize(per_seed) | {"diverged_seeds": diverged(test_loss)}
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_json(out / "per_seed.json", {"seeds": config.seeds, **per_seed})
    atomic_write_json(out / "per_class.json", {
        "classes": list(range(NUM_CLASSES)),
        "test_acc_mean": per_class.mean(0).round(6).tolist(),
        "test_acc_per_seed": per_class.round(6).tolist(),
    })
    confusion_plot(confusion.sum(0) / len(config.seeds),
                   f"{variant}: test confusion (mean over {len(config.seeds)} seeds)", out / "confusion.png")
    print(f"evaluate@{variant}: test_loss={metrics['test_loss']:.4f}±{metrics['test_loss_std']:.4f} "
          f"test_acc={metrics['test_acc']:.4f}±{metrics['test_acc_std']:.4f}")
    return metrics


if __name__ == "__main__":
    variant = cli.variant_argument(__doc__)
    with cli.one_line_errors():
        evaluate(load_params(), variant, Path.cwd())
