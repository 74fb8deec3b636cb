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
from pathlib import Path

from pipeline import cli, provenance, registry, tracking
from pipeline.errors import PipelineError
from pipeline.fsio import atomic_write_bytes, atomic_write_json
from pipeline.params import Params
from pipeline.reports import comparison_plots, markdown_table, seed_dots_plot
from pipeline.stats import diverged, mean_interval, mean_std, summarize, welch_difference
from pipeline.tracking_process import TrackingProcess

def pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.2f}%"


def summary_markdown(test_acc: dict, test_loss: dict, reference: str) -> tuple[str, dict]:
    rows, table, notes = [], {}, []
    for variant in test_acc:
        acc, loss = mean_interval(test_acc[variant]), mean_interval(test_loss[variant])
        std = mean_std(test_acc[variant])[1]
        count = diverged(test_loss[variant])
        if count:
            notes.append(f"- {variant}: {count} of {len(test_loss[variant])} seeds diverged (non-finite loss); "
                         "their losses are left out of the means, their accuracies count.")
        rows.append([variant, str(len(test_acc[variant])), pct(acc.mean), pct(std),
                     f"[{pct(acc.low)}, {pct(acc.high)}]", f"{loss.mean:.4f}"])
        table[variant] = {"test_acc_mean": acc.mean, "test_acc_std": std, "test_acc_ci95": [acc.low, acc.high],
                          "test_loss_mean": loss.mean, "diverged_seeds": count}
    text = "# Test results\n\n" + markdown_table(
        ["variant", "seeds", "test_acc mean", "std", "95% CI", "test_loss mean"], rows)
    if notes:
        text += "\n" + "\n".join(notes) + "\n"
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
    if all(logged.get(name) == value or math.isnan(value) and math.isnan(logged.get(name, 0.0))
           for name, value in summarize(metrics).items()):
        return
    tracking.log_replica_metrics(client, run_ids, metrics, step)
    for name in ("confusion.png", "per_class.json", "per_seed.json"):
        client.log_artifact(run_ids["variant"], str(evaluate_dir / name), "evaluation")


def compare(params: Params, root: Path, runs: tracking.Tracking | None = None) -> dict:
    runs = runs or tracking.Tracking.from_environment(params.mlflow.experiment_name, root)
    data, out = root / "data", root / "data" / "compare"
    variants = list(params.variants)
    histories = {v: read_json(data / "train" / v / "history.json") for v in variants}
    per_seed = {v: read_json(data / "evaluate" / v / "per_seed.json") for v in variants}
    lineage = {v: read_json(data / "train" / v / "run.json") for v in variants}
    test_acc = {v: per_seed[v]["test_acc"] for v in variants}
    test_loss = {v: per_seed[v]["test_loss"] for v in variants}

    with TrackingProcess(runs) as tracker:  # opens MLflow there while the plots are drawn here
        found = tracker.submit(tracking.find_variant_runs, params.mlflow.experiment_name,
                               {v: lineage[v]["inputs_digest"] for v in variants}, params.seeds)
        plots = comparison_plots(histories, out)
        plots.append(seed_dots_plot(test_acc, out / "test_acc_seeds.png"))
        text, table = summary_markdown(test_acc, test_loss, params.compare.reference)
        atomic_write_bytes(out / "summary.md", text.encode())
        atomic_write_json(out / "summary.json", table)
        choice = registry.select_best(params, histories, test_acc)
        run_ids = found.result()
        for variant in [v for v in variants if run_ids[v] is None]:
            run_ids[variant] = restore_variant_runs(tracker, params, runs, root, variant, histories[variant],
                                                    lineage[variant])

        registered = tracker.call(
            publish_comparison, params, tracking.run_tags(runs, root, "compare"), run_ids,
            {v: (per_seed[v], data / "evaluate" / v, len(histories[v]["val_acc"])) for v in variants},
            {f"{v}.test_acc_mean": table[v]["test_acc_mean"] for v in variants},
            [*plots, out / "summary.md", out / "summary.json"], choice,
            lineage[choice.variant]["dataset"]["digest"] if choice else None,
        )
    print(text)
    if registered is None:
        print("registered nothing: no variant has a seed that trained without diverging")
    else:
        print(f"registered {choice.variant} ({choice.metric} {choice.score:.4f}) as {registered['name']} "
              f"version {registered['version']}, alias @{registered['alias']}")
    return table


def restore_variant_runs(tracker: TrackingProcess, params: Params, runs: tracking.Tracking, root: Path,
                         variant: str, history: dict, lineage: dict) -> dict:
    """Runs for a variant whose train stage DVC restored from a run-cache this store never saw."""
    from pipeline.checkpoint import load
    from pipeline.model import served_model
    from pipeline.params import VariantConfig

    print(f"{variant}: no run in {runs.uri} computed from inputs {lineage['inputs_digest']}; "
          "rebuilding it from the train stage's outputs")
    checkpoints = root / "data" / "checkpoints" / variant
    state = load(checkpoints / "last.pt")
    served = served_model(state, history)
    tags = tracking.run_tags(runs, root, f"train@{variant}") | {tracking.INPUTS_TAG: lineage["inputs_digest"]}
    dataset = lineage["dataset"] | {"uri": (root / "data" / "prepared").resolve().as_uri()}
    environment = provenance.read_environment(root)
    return tracker.call(tracking.restore_variant_runs, params.mlflow.experiment_name, VariantConfig(**state["config"]),
                        tags, dataset, environment, history, served, [checkpoints / "last.pt", checkpoints / "best.pt"])


def publish_comparison(client, params: Params, tags: dict[str, str], run_ids: dict[str, dict],
                       evaluations: dict[str, tuple[dict, Path, int]], metrics: dict[str, float],
                       files: list[Path], choice: registry.Choice | None, data_digest: str) -> dict | None:
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
    registered = None
    if choice is not None:
        registered = registry.register_best(client, experiment_id, params, choice,
                                            run_ids[choice.variant]["variant"], group_id, data_digest,
                                            tags.get("dvc_exp_name"))
        client.set_tag(group_id, "registered_model", f"{registered['name']}/{registered['version']}")
    client.set_terminated(group_id, "FINISHED")
    return registered


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args(argv)

    cli.run_with_params(lambda params: compare(params, Path.cwd()))


if __name__ == "__main__":
    main()
