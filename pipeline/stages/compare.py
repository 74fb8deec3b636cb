"""Stage `compare`: the variants against each other, with error bars over seeds.

Writes to --out the lab's four plots (mean curve per variant, ±1 std band), `test_acc_seeds.png` and
`summary.md` (the variants ranked by `compare.select_by`'s mean; each one against the reference: Welch
and bootstrap CIs, P(beats), Welch's and Holm's p) with its numbers in `summary.json`; the headline
numbers to --metrics (`make exp`'s columns); the same bytes for the same inputs. It ends by mirroring the
workspace into MLflow (pipeline/tracking/workspace.py, as `make publish` does): every variant's runs,
the comparison's run grouping them, the registered model.
"""

import math
from pathlib import Path

from pipeline import cli
from pipeline.fsio import atomic_write_bytes, atomic_write_json
from pipeline.config.params import Params, load_params
from pipeline.reports import comparison_plots, markdown_table, seed_dots_plot
from pipeline.stats import (BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CONFIDENCE, bootstrap_difference, diverged, finite,
                            holm, mean_interval, mean_std, ranking, superiority, welch_difference)
from pipeline.tracking.record import read_json
from pipeline.tracking.process import RecordProcess, opened
from pipeline.tracking.store import Tracking, check_store, runs_page
from pipeline.tracking.workspace import Workspace, mirror_workspace, selection_scores


def shown(value: float, spec: str = ".2%") -> str:
    """`value` in the format `spec` (`%`: times 100, as a percentage), n/a for NaN (one seed, say)."""
    return "n/a" if math.isnan(value) else format(value, spec)


def points(value: float) -> str:
    """A difference of two accuracies in percentage points."""
    return shown(100 * value, "+.2f")


def summary_markdown(test_acc: dict, test_loss: dict, reference: str, *, seeds: list[int], split_seed: int,
                     rank_by: tuple[str, dict[str, float]] | None = None) -> tuple[str, dict]:
    """summary.md's text and summary.json's table. `rank_by` is (metric, mean per variant), the
    compare.select_by score; without it the variants are ranked by their test_acc mean."""
    metric, scores = rank_by or ("test_acc", {v: mean_std(test_acc[v])[0] for v in test_acc})
    order = ranking(scores)
    text, table = ranking_section(test_acc, test_loss, metric, scores, order)
    text = (f"# Test results\n\nEvery variant was trained once per seed, {len(seeds)} seed{'s' * (len(seeds) != 1)} "
            f"({', '.join(map(str, seeds))}): a seed sets the initial weights and the order of the training batches; "
            f"the train/validation split is fixed (`data.split_seed` {split_seed}), the same for every seed and "
            f"variant.\n\n{text}")
    others = [v for v in order if v != reference]
    if others:
        section, differences = reference_section(test_acc, reference, others)
        text += section
        for variant, row in differences.items():
            table[variant] |= row
    return text, table


def ranking_section(test_acc: dict, test_loss: dict, metric: str, scores: dict[str, float],
                    order: list[str]) -> tuple[str, dict]:
    """The variants in rank order with their test accuracy (mean, std, 95% CI) and loss."""
    rows, table, notes = [], {}, []
    for rank, variant in enumerate(order, start=1):
        acc, loss = mean_interval(test_acc[variant]), mean_interval(test_loss[variant])
        std = mean_std(test_acc[variant])[1] if len(finite(test_acc[variant])) > 1 else math.nan  # n/a: one seed
        count = diverged(test_loss[variant])
        if count:
            notes.append(f"- {variant}: {count} of {len(test_loss[variant])} seeds diverged (non-finite loss); "
                         "their losses are left out of the means, their accuracies count.")
        score = [shown(scores[variant])] if metric != "test_acc" else []
        rows.append([str(rank), variant, str(len(test_acc[variant])), *score, shown(acc.mean), shown(std),
                     f"[{shown(acc.low)}, {shown(acc.high)}]", f"{loss.mean:.4f}"])
        table[variant] = {"rank": rank, "rank_by": metric, "rank_score": scores[variant],
                          "test_acc_mean": acc.mean, "test_acc_std": std, "test_acc_ci95": [acc.low, acc.high],
                          "test_loss_mean": loss.mean, "diverged_seeds": count}
    by = "test_acc" if metric == "test_acc" else f"last-epoch {metric}"
    text = f"Ranked by mean {by} over seeds (`compare.select_by`), equal means by name.\n\n"
    text += markdown_table(["rank", "variant", "seeds", *([f"{metric} mean"] if metric != "test_acc" else []),
                            "test_acc mean", "std", "95% CI", "test_loss mean"], rows)
    if notes:
        text += "\n" + "\n".join(notes) + "\n"
    return text, table


def reference_section(test_acc: dict, reference: str, others: list[str]) -> tuple[str, dict]:
    """Each other variant's test accuracy against the reference's: Welch, Holm, bootstrap, P(beats);
    (the section's text, each variant's numbers for summary.json)."""
    welch = {v: welch_difference(test_acc[v], test_acc[reference]) for v in others}
    adjusted = dict(zip(others, holm([welch[v].p_value for v in others])))
    family = sum(not math.isnan(p) for p in adjusted.values())
    rows, sentences, differences = [], [], {}
    for variant in others:
        diff, p_holm = welch[variant], adjusted[variant]
        boot = bootstrap_difference(test_acc[variant], test_acc[reference])
        beats = superiority(test_acc[variant], test_acc[reference])
        significant = p_holm < 1 - CONFIDENCE  # False for NaN
        verdict = ("significant at 95%" if significant else "not significant at 95%") \
            if not math.isnan(p_holm) else "untestable with one seed"
        delta, welch_ci = points(diff.delta.mean), f"[{points(diff.delta.low)}, {points(diff.delta.high)}]"
        boot_ci, p_beats = f"[{points(boot.low)}, {points(boot.high)}]", shown(beats, ".1%")
        p_welch, p_adjusted = shown(diff.p_value, ".2g"), shown(p_holm, ".2g")
        rows.append([variant, delta, welch_ci, boot_ci, p_beats, p_welch, p_adjusted, verdict])
        sentences.append(
            f"- {variant} vs {reference}: test accuracy differs by {delta} points (95% CI {welch_ci} by Welch's t, "
            f"{boot_ci} by bootstrap); a random {variant} seed beats a random {reference} seed {p_beats} of the "
            f"time; Welch's t-test p = {p_welch}, Holm-adjusted p = {p_adjusted}: {verdict}.")
        differences[variant] = {"diff_vs_reference": diff.delta.mean, "diff_ci95": [diff.delta.low, diff.delta.high],
                                "diff_ci95_bootstrap": [boot.low, boot.high], "p_superiority": beats,
                                "p_value": diff.p_value, "p_holm": p_holm, "significant": significant}
    text = (f"\n## Against the reference ({reference})\n\n"
            f"Differences in test accuracy, in percentage points, with 95% intervals by Welch's t and by a "
            f"percentile bootstrap ({BOOTSTRAP_RESAMPLES:,} resamples of the seeds, numpy seed {BOOTSTRAP_SEED}). "
            f"P(beats) is the chance that a random seed of the variant scores higher than a random seed of "
            f"{reference}, ties counting half (Mann-Whitney U / nm). Holm p adjusts Welch's p over the "
            f"{family} testable comparison{'s' * (family != 1)} with {reference}; the verdict uses it.\n\n")
    text += markdown_table(["variant", "difference", "95% CI (Welch)", "95% CI (bootstrap)",
                            f"P(beats {reference})", "Welch p", "Holm p", "verdict"], rows)
    return text + "\n" + "\n".join(sentences) + "\n", differences


def headline(table: dict[str, dict]) -> dict[str, dict]:
    """The compare stage's `--metrics` file (dvc.yaml's `metrics:`) from summary.json's table: what a row of
    `make exp` and `dvc metrics diff` need, under keys short enough for two variants and a changed param to
    fit 120 columns (means over seeds; `diff` in points; `verdict`: Holm-adjusted Welch at 95%, as in summary.md)."""
    numbers = {}
    for variant, row in table.items():
        numbers[variant] = {"acc": row["test_acc_mean"], "loss": row["test_loss_mean"]}
        if "diff_vs_reference" in row:
            verdict = "untestable" if math.isnan(row["p_holm"]) else (  # one seed: no variance to test with
                "significant" if row["significant"] else "not significant")
            numbers[variant] |= {"diff": 100 * row["diff_vs_reference"], "verdict": verdict}
    return numbers


def compare(params: Params, paths: Workspace, tracking: Tracking | None = None) -> dict:
    """`paths`: the folders dvc.yaml passes on the command line (`paths.compare`: where it writes)."""
    tracking = tracking or Tracking.from_environment(params.mlflow.experiment_name, paths.root)
    histories = {v: read_json(paths.train / v / "history.json") for v in params.variants}
    per_seed = {v: read_json(paths.evaluate / v / "per_seed.json") for v in params.variants}
    test_acc = {v: per_seed[v]["test_acc"] for v in per_seed}
    test_loss = {v: per_seed[v]["test_loss"] for v in per_seed}
    check_store(tracking)  # in seconds, before any work: a store that cannot take the record is one line
    with RecordProcess(tracking) as record:
        opening = record.submit(opened)  # MLflow imported and the store opened while the figures are drawn
        table, text = compare_outputs(params, paths, histories, test_acc, test_loss)
        registered = record.submit(mirror_workspace, params, paths).result()  # the record of every variant
        experiment = opening.result()  # completed, the comparison's, the registry
    print(text)
    if registered is None:
        print("registered nothing: no variant has a seed that trained without diverging")
    else:
        print(f"registered {registered['variant']} ({registered['select_by']} {registered['score']:.4f}) as "
              f"{registered['name']} version {registered['version']}, alias @{registered['alias'] or '(none)'}")
    print(f"runs: {runs_page(tracking, experiment)}")
    return table


def compare_outputs(params: Params, paths: Workspace, histories: dict, test_acc: dict, test_loss: dict
                    ) -> tuple[dict, str]:
    """The figures, summary.md, summary.json and the headline metrics; (the table, the summary's text)."""
    out, metric = paths.compare, params.compare.select_by
    scores = selection_scores(params, histories, test_acc)  # the registry's score (workspace.select_best), ranked
    order = ranking(scores)
    comparison_plots(histories, out, order)
    seed_dots_plot(test_acc, out / "test_acc_seeds.png", order)
    text, table = summary_markdown(test_acc, test_loss, params.compare.reference, seeds=params.seeds,
                                   split_seed=params.data.split_seed, rank_by=(metric, scores))
    atomic_write_bytes(out / "summary.md", text.encode())
    atomic_write_json(out / "summary.json", table)
    atomic_write_json(paths.metrics, headline(table))
    return table, text


if __name__ == "__main__":
    args = cli.arguments(__doc__, "train", "evaluate", "checkpoints", "out", "metrics")
    with cli.one_line_errors():
        compare(load_params(), Workspace(Path.cwd(), args.train, args.checkpoints, args.evaluate, args.out,
                                         args.metrics))
