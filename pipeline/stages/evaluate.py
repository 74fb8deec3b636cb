"""Stage `evaluate@<variant>`: the final weights of every seed on the test split.

Writes to --out `metrics.json` (test_loss and test_acc, mean over seeds, and their std: what `dvc metrics
show` lists), `per_seed.json`, `per_class.json` and a confusion matrix PNG, with neither torch nor
matplotlib (pipeline/nn/inference.py, reports.confusion_plot): 0.13-0.15x the stage's time with them
(benchmarks/bench_startup.py). The compare stage, which opens MLflow anyway, logs the results into the
variant's runs: opening MLflow here would triple this stage's time (~3 s of imports and store start-up).
"""

from pathlib import Path

from threadpoolctl import threadpool_limits

from pipeline import cli
from pipeline.nn import inference
from pipeline.data import read_split
from pipeline.errors import PipelineError
from pipeline.fsio import atomic_write_json
from pipeline.config.params import Params, load_params
from pipeline.reports import confusion_plot
from pipeline.stats import diverged, summarize


def with_spread(summary: dict[str, float], name: str, seeds: int) -> str:
    """`name=mean±std`, or the mean alone where a single seed has no spread."""
    spread = f"±{summary[f'{name}_std']:.4f}" if seeds > 1 else ""
    return f"{name}={summary[name]:.4f}{spread}"


def evaluate(params: Params, variant: str, weights_path: Path, test_dir: Path, out: Path) -> dict:
    config, weights = inference.load_weights(weights_path)
    if config.name != variant:
        raise PipelineError(f"{weights_path}: the weights of variant {config.name!r}, not {variant!r}")
    pixels, labels = read_split(test_dir)
    with threadpool_limits(params.train.threads, user_api="blas"):  # the same count, the same bits
        scored = inference.evaluate(config, weights, pixels, labels, params.train.eval_batch_size)
    confusion = scored.confusion
    per_class = confusion.diagonal(axis1=1, axis2=2) / confusion.sum(axis=2).clip(min=1)  # [K, classes]
    per_seed = {"test_loss": scored.loss.tolist(), "test_acc": scored.acc.tolist()}
    metrics = summarize(per_seed) | {"diverged_seeds": diverged(per_seed["test_loss"])}
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_json(out / "per_seed.json", {"seeds": config.seeds, **per_seed})
    atomic_write_json(out / "per_class.json", {"classes": list(range(confusion.shape[1])),
                                               "test_acc_mean": per_class.mean(0).round(6).tolist(),
                                               "test_acc_per_seed": per_class.round(6).tolist()})
    seeds = len(config.seeds)
    title = f"{variant}: test confusion (mean over {seeds} seeds)" if seeds > 1 else f"{variant}: test confusion"
    confusion_plot(confusion.sum(0) / seeds, title, out / "confusion.png")
    print(f"evaluate@{variant}: {with_spread(metrics, 'test_loss', seeds)} {with_spread(metrics, 'test_acc', seeds)}")
    return metrics


if __name__ == "__main__":
    args = cli.arguments(__doc__, "weights", "test", "out", variant=str)  # --weights: train@variant's weights.npz
    with cli.one_line_errors():
        evaluate(load_params(), args.variant, args.weights, args.test, args.out)
