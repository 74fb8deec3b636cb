"""Files people read: per-epoch curves (CSV for `dvc plots`), figures and Markdown tables."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from pipeline.fsio import atomic_write_bytes
from pipeline.stats import mean_std

# The lab's per-epoch measurements, in the order they are plotted and written.
METRICS = ("train_loss", "train_acc", "val_loss", "val_acc")

TITLES = {
    "train_loss": "Training loss",
    "train_acc": "Training accuracy",
    "val_loss": "Validation loss",
    "val_acc": "Validation accuracy",
}


def write_curves(path: Path, history: dict[str, list[list[float]]]) -> None:
    """One row per epoch with the mean over seeds of each metric."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["epoch", *METRICS])
    for epoch, row in enumerate(zip(*(history[name] for name in METRICS)), start=1):
        writer.writerow([epoch, *(f"{mean_std(values)[0]:.6f}" for values in row)])
    atomic_write_bytes(path, buffer.getvalue().encode())


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _figure().close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def plot_metric(ax, metric: str, histories: dict[str, dict]) -> None:
    """Mean over seeds per variant, with a band of ±1 std where there are several seeds."""
    for variant, history in histories.items():
        mean, std = np.array([mean_std(values) for values in history[metric]]).T  # per epoch, over seeds
        epochs = np.arange(1, len(mean) + 1)
        (line,) = ax.plot(epochs, mean, marker="o", markersize=3, label=variant)
        if len(history[metric][0]) > 1:
            ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_title(TITLES[metric])
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()


def comparison_plots(histories: dict[str, dict], out_dir: Path) -> list[Path]:
    """The lab's four plots, one file each, plus the four together in `curves.png`."""
    plt = _figure()
    paths = []
    for metric in METRICS:
        fig, ax = plt.subplots(figsize=(6, 4))
        plot_metric(ax, metric, histories)
        paths.append(out_dir / f"{metric}.png")
        _save(fig, paths[-1])
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), layout="constrained")
    fig.suptitle("Mean over seeds, band: ±1 std")
    for ax, metric in zip(axes.flat, METRICS):
        plot_metric(ax, metric, histories)
    paths.append(out_dir / "curves.png")
    _save(fig, paths[-1])
    return paths


def seed_dots_plot(test_acc: dict[str, list[float]], path: Path) -> Path:
    """Test accuracy of every seed as a dot, per variant, with the mean as a bar."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 4))
    for position, (variant, values) in enumerate(test_acc.items()):
        jitter = np.linspace(-0.08, 0.08, len(values)) if len(values) > 1 else [0.0]
        ax.scatter(position + np.asarray(jitter), values, zorder=3)
        ax.hlines(np.mean(values), position - 0.25, position + 0.25, color="black")
    ax.set_xticks(range(len(test_acc)), list(test_acc))
    ax.set_ylabel("test_acc")
    ax.set_title("Test accuracy per seed (bar: mean)")
    ax.grid(alpha=0.3, axis="y")
    _save(fig, path)
    return path


def confusion_plot(matrix: np.ndarray, title: str, path: Path) -> Path:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 5.5))
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046)
    classes = range(len(matrix))
    ax.set_xticks(classes)
    ax.set_yticks(classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = matrix.max() / 2
    for i in classes:
        for j in classes:
            if matrix[i, j]:
                ax.text(j, i, f"{matrix[i, j]:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if matrix[i, j] > threshold else "black")
    _save(fig, path)
    return path


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
