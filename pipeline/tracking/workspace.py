"""The workspace's results, as DVC's outputs hold them, mirrored into a tracking store: every
variant's runs, the comparison's run and the registered model (what `make publish` and the compare
stage write; pipeline/tracking/record.py mirrors one variant)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.config.params import Params
from pipeline.tracking import record, registry
from pipeline.tracking.store import INPUTS_TAG


@dataclass(frozen=True)
class Workspace:
    """Where the outputs are: the folders dvc.yaml names (compare's command line passes them)."""

    root: Path
    train: Path  # a folder per variant: run.json, history.json, curves.csv
    checkpoints: Path  # a folder per variant
    evaluate: Path  # a folder per variant
    compare: Path  # the comparison's figures and tables
    metrics: Path  # the comparison in a few numbers, for `dvc exp show` (pipeline/reports.py)

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
