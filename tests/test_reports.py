"""Comparison plots stay readable and byte-identical with many variants, and are matplotlib's own."""

import numpy as np

from pipeline.reports import METRICS, comparison_figures, comparison_plots, png, seed_dots_plot, variant_styles
from pipeline.stats import mean_std, ranking

VARIANTS = [f"variant_{index:02d}" for index in range(12)]


def many_variants(epochs: int = 4, seeds: int = 3, variants: list[str] = VARIANTS) -> tuple[dict, dict]:
    rng = np.random.default_rng(0)
    histories = {v: {metric: (0.9 + 0.1 * rng.random((epochs, seeds))).tolist() for metric in METRICS}
                 for v in variants}
    test_acc = {v: (0.95 + 0.02 * rng.random(seeds)).tolist() for v in variants}
    return histories, test_acc


def test_twelve_variants_each_get_their_own_look():
    styles = variant_styles(VARIANTS)
    assert len({tuple(style.values()) for style in styles.values()}) == 12
    assert variant_styles(VARIANTS[:2]) == {v: styles[v] for v in VARIANTS[:2]}  # a variant keeps its look


def test_twelve_variant_plots_render_identically_twice(tmp_path):
    histories, test_acc = many_variants()
    order = ranking({v: mean_std(test_acc[v])[0] for v in VARIANTS})
    outputs = []
    for attempt in ("first", "second"):
        out = tmp_path / attempt
        paths = [*comparison_plots(histories, out, order), seed_dots_plot(test_acc, out / "test_acc_seeds.png", order)]
        outputs.append({path.name: path.read_bytes() for path in paths})
    assert sorted(outputs[0]) == sorted([f"{metric}.png" for metric in METRICS] + ["curves.png", "test_acc_seeds.png"])
    assert all(content.startswith(b"\x89PNG") for content in outputs[0].values())
    assert outputs[0] == outputs[1]


def test_the_files_written_hold_each_figures_png(tmp_path):
    """comparison_plots writes each of comparison_figures as savefig(bbox_inches="tight") draws it, in their order."""
    histories, test_acc = many_variants(variants=VARIANTS[:2])
    order = ranking({v: mean_std(test_acc[v])[0] for v in VARIANTS[:2]})
    written = [(path.stem, path.read_bytes()) for path in comparison_plots(histories, tmp_path, order)]
    assert written == [(stem, png(fig)) for stem, fig in comparison_figures(histories, order).items()]


def test_legends_list_the_variants_by_rank_beside_the_axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.reports import plot_metric

    histories, test_acc = many_variants()
    order = ranking({v: mean_std(test_acc[v])[0] for v in VARIANTS})
    fig, ax = plt.subplots()
    plot_metric(ax, "val_acc", histories, order)
    legend = ax.get_legend()
    assert [text.get_text() for text in legend.get_texts()] == order
    fig.canvas.draw()
    assert legend.get_window_extent().x0 > ax.get_window_extent().x1  # outside, not over the curves
    plt.close(fig)


def test_confusion_colors_are_matplotlibs_imshow_blues(tmp_path):
    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    from PIL import Image

    from pipeline.reports import CELL, LEFT, TOP, blues_lut, cell_colors, confusion_plot

    assert np.array_equal(blues_lut(), colormaps["Blues"](np.arange(256), bytes=True)[:, :3])
    matrix = np.random.default_rng(0).integers(0, 40, (10, 10)).astype(float)
    matrix[np.diag_indices(10)] = np.linspace(900, 1130, 10)
    matrix[3, 4] = 0.4  # a mean over seeds: fractional, written as 0
    expected = colormaps["Blues"](Normalize()(matrix), bytes=True)[..., :3]  # what imshow draws
    assert np.array_equal(cell_colors(matrix), expected)
    assert np.array_equal(cell_colors(np.full((3, 3), 7.0)), colormaps["Blues"](np.zeros((3, 3)), bytes=True)[..., :3])
    path = confusion_plot(matrix, "test confusion", tmp_path / "confusion.png")
    pixels = np.asarray(Image.open(path).convert("RGB"))
    corners = pixels[TOP + 2 : TOP + 10 * CELL : CELL, LEFT + 2 : LEFT + 10 * CELL : CELL]  # beside each count
    assert np.array_equal(corners, expected)
    assert path.read_bytes() == confusion_plot(matrix, "test confusion", tmp_path / "again.png").read_bytes()
