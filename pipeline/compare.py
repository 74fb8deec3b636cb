"""Stage `compare`: the variants against each other, with error bars over seeds.

Writes to `data/compare/`: the lab's four plots (mean curve per variant with a ±1 std band),
`test_acc_seeds.png`, and `summary.md` (mean, std and 95% CI of the test metrics per variant;
each variant's difference from the reference with its 95% CI and Welch's t-test, said in one
sentence). Its MLflow run groups this execution's variant runs as its children, and it logs
the evaluate stage's test metrics and files into the variant runs (once per result).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import special  # scipy.stats would add ~0.5 s of imports for two formulas

from pipeline import cli, registry, tracking
from pipeline.errors import PipelineError
from pipeline.fsio import atomic_write_bytes, atomic_write_json
from pipeline.params import Params
from pipeline.reports import comparison_plots, markdown_table, seed_dots_plot
from pipeline.tracking_process import TrackingProcess

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float


def mean_interval(values: list[float]) -> Interval:
    """Student-t confidence interval of the mean (a point when there is one seed)."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return Interval(mean, math.nan, math.nan)
    sem = float(np.std(values, ddof=1)) / math.sqrt(len(values))
    half = t_quantile(len(values) - 1) * sem
    return Interval(mean, mean - half, mean + half)


def t_quantile(dof: float) -> float:
    """The two-sided CONFIDENCE quantile of Student's t (scipy.stats.t.ppf)."""
    return float(special.stdtrit(dof, (1 + CONFIDENCE) / 2))


@dataclass(frozen=True)
class Difference:
    delta: Interval
    p_value: float

    @property
    def significant(self) -> bool:
        return self.p_value < 1 - CONFIDENCE


def welch_difference(values: list[float], reference: list[float]) -> Difference:
    """mean(values) - mean(reference), Welch's CI and two-sided Welch t-test."""
    a, b = np.asarray(values), np.asarray(reference)
    delta = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return Difference(Interval(delta, math.nan, math.nan), math.nan)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return Difference(Interval(delta, delta, delta), 0.0 if delta else 1.0)
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = t_quantile(dof) * se
    p_value = float(2 * special.stdtr(dof, -abs(delta) / se))  # scipy.stats.ttest_ind(equal_var=False)
    return Difference(Interval(delta, delta - half, delta + half), p_value)


def pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.2f}%"


def summary_markdown(test_acc: dict, test_loss: dict, reference: str) -> tuple[str, dict]:
    rows, table = [], {}
    for variant in test_acc:
        acc, loss = mean_interval(test_acc[variant]), mean_interval(test_loss[variant])
        std = tracking.summarize({"test_acc": test_acc[variant]})["test_acc_std"]
        rows.append([variant, str(len(test_acc[variant])), pct(acc.mean), pct(std),
                     f"[{pct(acc.low)}, {pct(acc.high)}]", f"{loss.mean:.4f}"])
        table[variant] = {"test_acc_mean": acc.mean, "test_acc_std": std, "test_acc_ci95": [acc.low, acc.high],
                          "test_loss_mean": loss.mean}
    text = "# Test results\n\n" + markdown_table(
        ["variant", "seeds", "test_acc mean", "std", "95% CI", "test_loss mean"], rows)
    sentences = []
    for variant in test_acc:
        if variant == reference:
            continue
        diff = welch_difference(test_acc[variant], test_acc[reference])
        verdict = ("significant at 95%" if diff.significant else "not significant at 95%") \
            if not math.isnan(diff.p_value) else "untestable with one seed"
        sentences.append(
            f"- {variant} vs {reference}: test accuracy differs by {100 * diff.delta.mean:+.2f} points "
            f"(95% CI [{100 * diff.delta.low:+.2f}, {100 * diff.delta.high:+.2f}]; Welch's t-test "
            f"p = {diff.p_value:.2g}): {verdict}."
        )
        table[variant] |= {"diff_vs_reference": diff.delta.mean, "diff_ci95": [diff.delta.low, diff.delta.high],
                           "p_value": diff.p_value, "significant": diff.significant}
    if sentences:
        text += f"\n## Against the reference ({reference})\n\n" + "\n".join(sentences) + "\n"
    return text, table


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise PipelineError(f"{path}: unreadable ({error}); rerun its stage") from None


def publish_evaluation(client, run_ids: dict, per_seed: dict, evaluate_dir: Path, step: int) -> None:
    """The evaluate stage's results into the variant's runs, unless they already hold them."""
    metrics = {name: per_seed[name] for name in ("test_loss", "test_acc")}
    logged = client.get_run(run_ids["variant"]).data.metrics
    if all(logged.get(name) == value for name, value in tracking.summarize(metrics).items()):
        return
    tracking.log_replica_metrics(client, run_ids, metrics, step)
    for name in ("confusion.png", "per_class.json", "per_seed.json"):
        client.log_artifact(run_ids["variant"], str(evaluate_dir / name), "evaluation")


def compare(params: Params, root: Path, runs: tracking.Tracking) -> dict:
    data, out = root / "data", root / "data" / "compare"
    variants = list(params.variants)
    histories = {v: read_json(data / "train" / v / "history.json") for v in variants}
    per_seed = {v: read_json(data / "evaluate" / v / "per_seed.json") for v in variants}
    run_ids = {v: read_json(data / "train" / v / "run.json")["run_ids"] for v in variants}
    test_acc = {v: per_seed[v]["test_acc"] for v in variants}
    test_loss = {v: per_seed[v]["test_loss"] for v in variants}

    with TrackingProcess(runs) as tracker:  # opens MLflow there while the plots are drawn here
        plots = comparison_plots(histories, out)
        plots.append(seed_dots_plot(test_acc, out / "test_acc_seeds.png"))
        text, table = summary_markdown(test_acc, test_loss, params.compare.reference)
        atomic_write_bytes(out / "summary.md", text.encode())
        atomic_write_json(out / "summary.json", table)
        choice = registry.select_best(params, histories, test_acc)

        registered = tracker.call(
            publish_comparison, params, tracking.run_tags(runs, root, "compare"), run_ids,
            {v: (per_seed[v], data / "evaluate" / v, len(histories[v]["val_acc"])) for v in variants},
            {f"{v}.test_acc_mean": table[v]["test_acc_mean"] for v in variants},
            [*plots, out / "summary.md", out / "summary.json"], choice,
        )
    print(text)
    print(f"registered {choice.variant} ({choice.metric} {choice.score:.4f}) as {registered['name']} "
          f"version {registered['version']}, alias @{registered['alias']}")
    return table


def publish_comparison(client, params: Params, tags: dict[str, str], run_ids: dict[str, dict],
                       evaluations: dict[str, tuple[dict, Path, int]], metrics: dict[str, float],
                       files: list[Path], choice: registry.Choice) -> dict:
    """The comparison's MLflow run, grouping the variant runs; their evaluation; the registry."""
    experiment_id = tracking.experiment_id(client, params.mlflow.experiment_name)
    group_id = client.create_run(experiment_id, run_name="compare", tags=tags).info.run_id
    for variant, (per_seed, evaluate_dir, epochs) in evaluations.items():
        # Adopting the variant's run (cached or fresh) makes the UI show this execution as a group.
        client.set_tag(run_ids[variant]["variant"], tracking.PARENT_TAG, group_id)
        publish_evaluation(client, run_ids[variant], per_seed, evaluate_dir, step=epochs)
    tracking.log_metrics(client, group_id, metrics, 0)
    for path in files:
        client.log_artifact(group_id, str(path), "comparison")
    registered = registry.register_best(client, experiment_id, params, choice, run_ids[choice.variant]["variant"],
                                        group_id)
    client.set_tag(group_id, "registered_model", f"{registered['name']}/{registered['version']}")
    client.set_terminated(group_id, "FINISHED")
    return registered


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args(argv)

    def stage(params: Params) -> None:
        compare(params, Path.cwd(), tracking.Tracking.from_environment(params.mlflow.experiment_name))

    cli.run_with_params(stage)


if __name__ == "__main__":
    main()
