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
from pipeline.tracking.store import INPUTS_TAG, Tracking, connect, one_line, runs_page


@dataclass(frozen=True)
class Workspace:
    """Where the outputs are: the folders dvc.yaml names (compare's command line passes them)."""

    root: Path
    train: Path  # a folder per variant: run.json, history.json, curves.csv
    checkpoints: Path  # a folder per variant
    evaluate: Path  # a folder per variant
    compare: Path  # the comparison's figures and tables
    metrics: Path  # the comparison in a few numbers, for `dvc exp show` (pipeline/headline.py)

    @classmethod
    def of(cls, root: Path) -> Workspace:
        data = root / "data"
        return cls(root, data / "train", data / "checkpoints", data / "evaluate", data / "compare",
                   data / "metrics.json")

    def variant(self, name: str) -> record.VariantOutputs:
        return record.read_variant(self.root, self.train / name, self.checkpoints / name, self.evaluate / name)


def mirror_workspace(client, experiment: str, params: Params, workspace: Workspace) -> dict | None:
    """Every variant's runs, then the comparison's and the registry (once compare has written its
    outputs); returns what was registered (None: nothing comparable, or no comparison yet)."""
    outputs = {v: workspace.variant(v) for v in trained(params, workspace)}
    ids = {v: record.mirror_variant(client, experiment, out) for v, out in outputs.items()}
    if (len(outputs) < len(params.variants) or not (workspace.compare / "summary.json").exists()
            or any(o.evaluation is None for o in outputs.values())):
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


def trained(params: Params, workspace: Workspace) -> list[str]:
    """The variants whose train stage has written its outputs (a workspace part-way through)."""
    return [v for v in params.variants if (workspace.train / v / "run.json").exists()]


def missing(client, experiment: str, params: Params, workspace: Workspace) -> list[str]:
    """What `mirror_workspace` would add, a line each: runs, epochs, the comparison."""
    lines = [f"{v}: not trained here yet, skipped" for v in params.variants if v not in trained(params, workspace)]
    digests = {}
    for variant in trained(params, workspace):
        out = workspace.variant(variant)
        digests[variant] = out.run["inputs_digest"]
        runs = client.search_runs([experiment], f"tags.{INPUTS_TAG} = '{digests[variant]}'")
        main = [r for r in runs if record.SEED_TAG not in r.data.tags and r.info.run_name == variant]
        epochs = len(out.history["val_acc"])
        if not main or len(runs) < 1 + len(out.run["seeds"]):
            lines.append(f"{variant}: would add its {1 + len(out.run['seeds'])} runs, {epochs} epochs each")
            continue
        logged = len(client.get_metric_history(main[0].info.run_id, "val_acc"))
        if logged < epochs or main[0].info.status != "FINISHED":
            lines.append(f"{variant}: would add {epochs - logged} of {epochs} epochs and close its runs FINISHED")
    if len(digests) == len(params.variants) and (workspace.compare / "summary.json").exists():
        digest = record.comparison_digest(digests, workspace.compare)
        if not client.search_runs([experiment], f"tags.{INPUTS_TAG} = '{digest}'", max_results=1):
            lines.append("compare: would add its run, figures and tables, and register the best model")
    return lines


def publish(params: Params, workspace: Workspace, tracking: Tracking, dry_run: bool) -> None:
    with one_line(tracking.uri):
        client, experiment = connect(tracking)
        if dry_run:
            lines = missing(client, experiment, params, workspace)
            print("\n".join(lines) or f"{tracking.uri} holds every result of this workspace already")
            return
        registered = mirror_workspace(client, experiment, params, workspace)
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
