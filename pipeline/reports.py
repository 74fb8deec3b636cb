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


# Ten colours (tab10, matplotlib's default cycle); past ten variants the line style and marker
# change too, so up to forty variants look different and more still have their own label.
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
          "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D")
LEGEND_INSIDE = 5  # at most this many variants share the axes with their legend; more go beside


def variant_styles(variants: list[str]) -> dict[str, dict]:
    """A colour, line style and marker per variant, from its position in params (stable across plots)."""
    return {variant: {"color": COLORS[i % len(COLORS)], "linestyle": LINESTYLES[i // len(COLORS) % len(LINESTYLES)],
                      "marker": MARKERS[i // len(COLORS) % len(MARKERS)]}
            for i, variant in enumerate(variants)}


def plot_metric(ax, metric: str, histories: dict[str, dict], order: list[str], legend: bool = True) -> None:
    """Mean over seeds per variant, with a band of ±1 std where there are several seeds; the
    legend lists the variants in `order` (their rank)."""
    styles = variant_styles(list(histories))
    for variant in order:
        history = histories[variant]
        mean, std = np.array([mean_std(values) for values in history[metric]]).T  # per epoch, over seeds
        epochs = np.arange(1, len(mean) + 1)
        ax.plot(epochs, mean, markersize=3, label=variant, **styles[variant])
        if len(history[metric][0]) > 1:
            ax.fill_between(epochs, mean - std, mean + std, color=styles[variant]["color"],
                            alpha=0.2 if len(order) <= LEGEND_INSIDE else 0.08)
    ax.set_title(TITLES[metric])
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)  # whole epochs
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if legend and len(order) <= LEGEND_INSIDE:
        ax.legend()
    elif legend:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize="small", title="by rank",
                  ncols=1 + len(order) // 25)


def comparison_plots(histories: dict[str, dict], out_dir: Path, order: list[str]) -> list[Path]:
    """The lab's four plots, one file each, plus the four together in `curves.png`; legends list
    the variants in `order` (their rank)."""
    plt = _figure()
    paths = []
    for metric in METRICS:
        fig, ax = plt.subplots(figsize=(6, 4))
        plot_metric(ax, metric, histories, order)
        paths.append(out_dir / f"{metric}.png")
        _save(fig, paths[-1])
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), layout="constrained")
    fig.suptitle("Mean over seeds, band: ±1 std")
    shared = len(order) > LEGEND_INSIDE  # then one legend for the four, beside them
    for ax, metric in zip(axes.flat, METRICS):
        plot_metric(ax, metric, histories, order, legend=not shared)
    if shared:
        fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="outside right upper", fontsize="small",
                   title="by rank", ncols=1 + len(order) // 25)
    paths.append(out_dir / "curves.png")
    _save(fig, paths[-1])
    return paths


def seed_dots_plot(test_acc: dict[str, list[float]], path: Path, order: list[str]) -> Path:
    """Test accuracy of every seed as a dot, per variant in `order` (their rank), with the mean as a bar."""
    plt = _figure()
    styles = variant_styles(list(test_acc))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(order)), 4))
    for position, variant in enumerate(order):
        values = test_acc[variant]
        jitter = np.linspace(-0.08, 0.08, len(values)) if len(values) > 1 else [0.0]
        ax.scatter(position + np.asarray(jitter), values, zorder=3, color=styles[variant]["color"],
                   marker=styles[variant]["marker"])
        ax.hlines(mean_std(values)[0], position - 0.25, position + 0.25, color="black")
    many = len(order) > LEGEND_INSIDE
    ax.set_xticks(range(len(order)), order, rotation=45 if many else 0, ha="right" if many else "center")
    ax.set_ylabel("test_acc")
    ax.set_title("Test accuracy per seed (bar: mean), variants by rank")
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
