"""What people read: per-epoch curves (CSV for `dvc plots`), figures, Markdown tables,
and a train stage's epoch lines and progress bar.

Figures are matplotlib `Figure`s drawn by Agg without pyplot: no backend, window or figure manager
to set up (pyplot's import is ~0.25 s of a stage's start-up).
"""

import contextlib
import io
import sys
from pathlib import Path

import numpy as np

from pipeline.fsio import atomic_write_bytes
from pipeline.stats import diverged, mean_std, summarize

# The lab's per-epoch measurements, in the order they are plotted and written.
METRICS = ("train_loss", "train_acc", "val_loss", "val_acc")

TITLES = dict(zip(METRICS, ("Training loss", "Training accuracy", "Validation loss", "Validation accuracy")))
DPI = 110


def write_curves(path: Path, history: dict[str, list[list[float]]]) -> None:
    """One row per epoch with the mean over seeds of each metric."""
    lines = [",".join(["epoch", *METRICS])]
    for epoch, row in enumerate(zip(*(history[name] for name in METRICS)), start=1):
        lines.append(",".join([str(epoch), *(f"{mean_std(values)[0]:.6f}" for values in row)]))
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


# tab10 (matplotlib's default cycle); past ten variants the line style and marker change too:
# forty variants look different, and more still have their own label.
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
    """Mean over seeds per variant in `order` (their rank), a band of ±1 std where several seeds."""
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


def comparison_figures(histories: dict[str, dict], order: list[str]) -> dict[str, object]:
    """{file stem: Figure}: the lab's four plots, then the four together as `curves`."""
    from matplotlib.figure import Figure

    figures = {}
    for metric in METRICS:
        figures[metric] = Figure(figsize=(6, 4))
        plot_metric(figures[metric].subplots(), metric, histories, order)
    fig = figures["curves"] = Figure(figsize=(12, 8), layout="constrained")
    axes = fig.subplots(2, 2)
    fig.suptitle("Mean over seeds, band: ±1 std")
    shared = len(order) > LEGEND_INSIDE  # then one legend for the four, beside them
    for ax, metric in zip(axes.flat, METRICS):
        plot_metric(ax, metric, histories, order, legend=not shared)
    if shared:
        fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="outside right upper", fontsize="small",
                   title="by rank", ncols=1 + len(order) // 25)
    return figures


def comparison_plots(histories: dict[str, dict], out_dir: Path, order: list[str]) -> list[Path]:
    figures = comparison_figures(histories, order)
    for stem, fig in figures.items():
        atomic_write_bytes(out_dir / f"{stem}.png", png(fig))
    return [out_dir / f"{stem}.png" for stem in figures]


def seed_dots_plot(test_acc: dict[str, list[float]], path: Path, order: list[str]) -> Path:
    """Test accuracy of every seed as a dot, per variant in `order` (their rank), with the mean as a bar."""
    from matplotlib.figure import Figure

    styles = variant_styles(list(test_acc))
    fig = Figure(figsize=(max(6.0, 0.5 * len(order)), 4))
    ax = fig.subplots()
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
    atomic_write_bytes(path, png(fig))
    return path


# matplotlib's "Blues" (ColorBrewer's nine blues, from light to dark), for the confusion matrix.
BLUES = ("#f7fbff", "#deebf7", "#c6dbef", "#9ecae1", "#6baed6", "#4292c6", "#2171b5", "#08519c", "#08306b")
CELL, LEFT, TOP, BAR = 44, 56, 44, 16  # the confusion figure's layout, in pixels: a cell, the margins, the bar


def blues_lut() -> np.ndarray:
    """[256, 3] uint8: `colormaps["Blues"](i, bytes=True)`, linear between the anchors in
    matplotlib's arithmetic (np.interp's rounds one byte differently), scaled by 255 and truncated."""
    anchors = np.array([[int(color[i : i + 2], 16) / 255 for i in (1, 3, 5)] for color in BLUES])
    x, xind = np.linspace(0, 1, len(BLUES)) * 255, 255 * np.linspace(0, 1, 256)
    ind = np.searchsorted(x, xind)[1:-1]
    distance = ((xind[1:-1] - x[ind - 1]) / (x[ind] - x[ind - 1]))[:, None]
    lut = np.concatenate([anchors[:1], distance * (anchors[ind] - anchors[ind - 1]) + anchors[ind - 1], anchors[-1:]])
    return (lut * 255).astype(np.uint8)


def cell_colors(matrix: np.ndarray) -> np.ndarray:
    """[n, n, 3] uint8: each cell's colour as imshow(matrix, cmap="Blues") gives it."""
    low, high = float(matrix.min()), float(matrix.max())
    scaled = (matrix - low) / (high - low) if high > low else np.zeros(matrix.shape)
    return blues_lut()[np.clip((scaled * 256).astype(int), 0, 255)]


def confusion_plot(matrix: np.ndarray, title: str, path: Path) -> Path:
    """The matrix as imshow(cmap="Blues") shows it, each non-zero cell's count in it, a colour bar;
    drawn by Pillow in 0.05 s, where matplotlib's import and render were ~0.7 s of the evaluate
    stage's ~1 s (the colours are imshow's: tests/test_reports.py)."""
    from PIL import Image, ImageDraw, ImageFont

    size = len(matrix) * CELL
    image = Image.new("RGB", (LEFT + size + 24 + BAR + 48, TOP + size + 52), "white")
    draw = ImageDraw.Draw(image)
    font, small = ImageFont.load_default(size=13), ImageFont.load_default(size=10)
    image.paste(Image.fromarray(cell_colors(matrix).repeat(CELL, axis=0).repeat(CELL, axis=1)), (LEFT, TOP))
    high = float(matrix.max())
    for i, j in zip(*np.nonzero(matrix)):  # each count in its cell
        draw.text((LEFT + j * CELL + CELL / 2, TOP + i * CELL + CELL / 2), f"{matrix[i, j]:.0f}", anchor="mm",
                  font=small, fill="white" if matrix[i, j] > high / 2 else "black")
    for k in range(len(matrix)):
        draw.text((LEFT + k * CELL + CELL / 2, TOP + size + 4), str(k), anchor="mt", font=font, fill="black")
        draw.text((LEFT - 6, TOP + k * CELL + CELL / 2), str(k), anchor="rm", font=font, fill="black")
    draw.text((LEFT + size / 2, TOP + size + 26), "predicted", anchor="mt", font=font, fill="black")
    draw.text((LEFT - 6, TOP - 6), "true", anchor="rb", font=font, fill="black")
    draw.text((LEFT + size / 2, TOP / 2), title, anchor="mm", font=font, fill="black")
    x = LEFT + size + 24
    gradient = blues_lut()[np.arange(size - 1, -1, -1) * 255 // (size - 1)]  # the colour bar, high at the top
    image.paste(Image.fromarray(np.repeat(gradient[:, None], BAR, axis=1)), (x, TOP))
    draw.rectangle((x, TOP, x + BAR - 1, TOP + size - 1), outline="black")
    for value, y in ((high, TOP), (float(matrix.min()), TOP + size - 1)):
        draw.text((x + BAR + 4, y), f"{value:.0f}", anchor="lm", font=small, fill="black")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def progress_bar(samples: int, batch_size: int, label: str):
    """A tqdm bar per epoch on a terminal; nothing otherwise (the epoch line is printed)."""
    if not sys.stderr.isatty():
        return contextlib.nullcontext()
    from tqdm import tqdm

    return tqdm(total=-(-samples // batch_size), desc=label, unit="step", leave=False)


def epoch_line(variant: str, epoch: int, epochs: int, metrics: dict[str, list[float]], seconds: float) -> str:
    means = summarize(metrics)
    values = " ".join(f"{name}={means[name]:.4f}" for name in METRICS)
    count = diverged(metrics["train_loss"])
    warning = f" {count} of {len(metrics['train_loss'])} seeds diverged (non-finite loss)" if count else ""
    return f"train@{variant} epoch {epoch}/{epochs} {values} ({seconds:.1f}s){warning}"
