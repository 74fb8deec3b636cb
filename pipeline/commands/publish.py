"""`python -m pipeline.commands.publish [--dry-run]` (`make publish`): the workspace's results into
the tracking store that MLFLOW_TRACKING_URI names (default: mlflow.db at the repository root),
without training.

Every variant's run and per-seed runs with every epoch, their evaluation, checkpoints and model,
the comparison's run with its figures and tables, and the registered model with its aliases, all
read from DVC's outputs (pipeline/tracking/record.py): a workspace that trained, one filled by
`dvc pull`, or one DVC restored from its run-cache publishes the same runs. Run again, it adds
nothing; over a partial record (a store that was down while a stage trained), it completes it.
The compare stage ends with the same call. `--dry-run` says what it would add, and adds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline import cli
from pipeline.config.params import Params, load_params
from pipeline.tracking import record, registry
from pipeline.tracking.store import INPUTS_TAG, Tracking, connect, experiment_id, one_line, runs_page


@dataclass(frozen=True)
class Workspace:
    """Where the outputs are: the folders dvc.yaml names (compare's command line passes them)."""

    root: Path
    train: Path  # a folder per variant: run.json, history.json, curves.csv
    checkpoints: Path  # a folder per variant
    evaluate: Path  # a folder per variant
    compare: Path  # the comparison's figures and tables

    @classmethod
    def of(cls, root: Path) -> Workspace:
        data = root / "data"
        return cls(root, data / "train", data / "checkpoints", data / "evaluate", data / "compare")

    def variant(self, name: str) -> record.VariantOutputs:
        return record.read_variant(self.root, self.train / name, self.checkpoints / name, self.evaluate / name)


def mirror_workspace(client, params: Params, workspace: Workspace) -> dict | None:
    """Every variant's runs, then the comparison's and the registry (once compare has written its
    outputs); returns what was registered (None: nothing comparable, or no comparison yet)."""
    experiment = experiment_id(client, params.mlflow.experiment_name)
    outputs = {v: workspace.variant(v) for v in params.variants}
    ids = {v: record.mirror_variant(client, experiment, out) for v, out in outputs.items()}
    if not (workspace.compare / "summary.json").exists() or any(o.evaluation is None for o in outputs.values()):
        return None
    digests = {v: out.run["inputs_digest"] for v, out in outputs.items()}
    group = record.mirror_comparison(client, experiment, workspace.compare, ids,
                                     record.comparison_digest(digests, workspace.compare))
    test_acc = {v: record.read_json(out.evaluation / "per_seed.json")["test_acc"] for v, out in outputs.items()}
    choice = registry.select_best(params, {v: out.history for v, out in outputs.items()}, test_acc)
    registered = None
    if choice is not None:
        registered = registry.register(client, experiment, params, choice, ids[choice.variant]["variant"], group,
                                       outputs[choice.variant].run["dataset"]["digest"], digests[choice.variant])
        client.set_tag(group, "registered_model", f"{registered['name']}/{registered['version']}")
    if client.get_run(group).info.status != "FINISHED":
        client.set_terminated(group, "FINISHED")
    return registered


def missing(client, experiment: str, params: Params, workspace: Workspace) -> list[str]:
    """What `mirror_workspace` would add, a line each: runs, epochs, the comparison, a model version."""
    lines = []
    for variant in params.variants:
        out = workspace.variant(variant)
        runs = client.search_runs([experiment], f"tags.{INPUTS_TAG} = '{out.run['inputs_digest']}'")
        main = [r for r in runs if record.SEED_TAG not in r.data.tags and r.info.run_name == variant]
        epochs = len(out.history["val_acc"])
        if not main or len(runs) < 1 + len(out.run["seeds"]):
            lines.append(f"{variant}: its runs ({1 + len(out.run['seeds'])}) with {epochs} epochs each")
            continue
        logged = {m.step for m in client.get_metric_history(main[0].info.run_id, "val_acc")}
        if len(logged) < epochs or main[0].info.status != "FINISHED":
            lines.append(f"{variant}: {epochs - len(logged)} of {epochs} epochs, then FINISHED")
    if (workspace.compare / "summary.json").exists() and not client.search_runs(
            [experiment], "attributes.run_name = 'compare'", max_results=1):
        lines.append("compare: its run, figures and tables, and the registered model")
    return lines


def publish(params: Params, workspace: Workspace, tracking: Tracking, dry_run: bool) -> None:
    with one_line(tracking.uri):
        client, experiment = connect(tracking)
        if dry_run:
            lines = missing(client, experiment, params, workspace)
            print("\n".join(f"would add {line}" for line in lines) or f"{tracking.uri} holds every result already")
            return
        registered = mirror_workspace(client, params, workspace)
    if registered is not None:
        print(f"registered: {registered['name']} version {registered['version']} ({registered['variant']})")
    print(f"published to {tracking.uri}; runs: {runs_page(tracking, experiment)}")


if __name__ == "__main__":
    parser = cli.parser(__doc__)
    parser.add_argument("--dry-run", action="store_true", help="say what it would add, add nothing")
    arguments = parser.parse_args()
    with cli.one_line_errors():
        params = load_params()
        publish(params, Workspace.of(Path.cwd()), Tracking.from_environment(params.mlflow.experiment_name),
                arguments.dry_run)
