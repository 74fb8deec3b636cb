"""The workspace's results, as DVC's outputs hold them, mirrored into a tracking store (what
`make publish` and the compare stage write): every variant's runs (record.py), the comparison's
run, and the best variant's model in the Model Registry: one version per distinct trained model
(its inputs digest), so a rerun that writes the same bytes adds none and moves no alias.
"""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Self

from pipeline.config.params import Params
from pipeline.errors import PipelineError
from pipeline.stats import mean_std
from pipeline.tracking import record
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
    def of(cls, root: Path) -> Self:
        data = root / "data"
        return cls(root, data / "train", data / "checkpoints", data / "evaluate", data / "compare",
                   data / "metrics.json")

    def variant(self, name: str) -> record.VariantOutputs:
        return record.read_variant(self.root, self.train / name, self.checkpoints / name, self.evaluate / name)

    def trained(self, params: Params) -> list[str]:
        """The variants whose train stage has written its outputs (a workspace part-way through)."""
        return [v for v in params.variants if (self.train / v / "run.json").exists()]


class Choice(NamedTuple):
    variant: str
    metric: str
    score: float  # mean over seeds


def mirror_workspace(client, experiment: str, params: Params, workspace: Workspace) -> dict | None:
    """Every variant's runs, then the comparison's and the registry (once compare has written its
    outputs); returns what was registered (None: nothing comparable, or no comparison yet)."""
    outputs = {v: workspace.variant(v) for v in workspace.trained(params)}
    ids = {v: record.mirror_variant(client, experiment, out) for v, out in outputs.items()}
    if (len(outputs) < len(params.variants) or not (workspace.compare / "summary.json").exists()
            or any(o.evaluation is None for o in outputs.values())):
        return None
    digests = {v: out.run["inputs_digest"] for v, out in outputs.items()}
    digest = record.comparison_digest(digests, workspace.compare)
    group = record.mirror_comparison(client, experiment, workspace.compare, ids, digest)
    test_acc = {v: record.read_json(out.evaluation / "per_seed.json")["test_acc"] for v, out in outputs.items()}
    choice = select_best(params, {v: out.history for v, out in outputs.items()}, test_acc)
    registered = None
    if choice is not None:
        registered = register(client, experiment, params, choice, ids[choice.variant]["variant"], group,
                              outputs[choice.variant].run)
        client.set_tag(group, "registered_model", f"{registered['name']}/{registered['version']}")
    record.close_runs(client, experiment, digest, "FINISHED")
    return registered


def missing(client, experiment: str, params: Params, workspace: Workspace) -> list[str]:
    """What `mirror_workspace` would add, a line each: runs, epochs, the comparison."""
    trained = workspace.trained(params)
    lines = [f"{v}: not trained here yet, skipped" for v in params.variants if v not in trained]
    digests = {}
    for variant in trained:
        out = workspace.variant(variant)
        digests[variant] = out.run["inputs_digest"]
        epochs, runs = len(out.history["val_acc"]), len(out.run["seeds"]) + 1
        found = client.search_runs([experiment], f"tags.{INPUTS_TAG} = '{digests[variant]}'")
        main = [r for r in found if record.SEED_TAG not in r.data.tags and r.info.run_name == variant]
        if not main or len(found) < runs:
            lines.append(f"{variant}: would add its {runs} runs, {epochs} epochs each")
            continue
        logged = len(client.get_metric_history(main[0].info.run_id, "val_acc"))
        if logged < epochs or main[0].info.status != "FINISHED":
            lines.append(f"{variant}: would add {epochs - logged} of {epochs} epochs and close its runs FINISHED")
    if len(digests) == len(params.variants) and (workspace.compare / "summary.json").exists():
        digest = record.comparison_digest(digests, workspace.compare)
        if not client.search_runs([experiment], f"tags.{INPUTS_TAG} = '{digest}'", max_results=1):
            lines.append("compare: would add its run, figures and tables, and register the best model")
    return lines


def selection_scores(params: Params, histories: dict[str, dict], test_acc: dict[str, list[float]]) -> dict:
    """Each variant's mean over seeds of `val_acc` at the last epoch, or of `test_acc`
    (`compare.select_by`): what the registry picks by and the comparison ranks by."""
    metric = params.compare.select_by
    return {v: mean_std(histories[v]["val_acc"][-1] if metric == "val_acc" else test_acc[v])[0]
            for v in params.variants}


def select_best(params: Params, histories: dict[str, dict], test_acc: dict[str, list[float]]) -> Choice | None:
    """The variant with the best `selection_scores`, ties to the one listed first; only variants
    with a served model (a seed that never diverged) and a finite score; None when there is none."""
    metric, scores = params.compare.select_by, selection_scores(params, histories, test_acc)
    candidates = [v for v in params.variants if math.isfinite(scores[v])
                  and any(epoch is None for epoch in histories[v]["diverged_epoch"])]
    best = max(candidates, key=scores.__getitem__, default=None)
    return None if best is None else Choice(best, metric, scores[best])


def register(client, experiment: str, params: Params, choice: Choice, run_id: str, compare_run_id: str,
             run: dict) -> dict:
    """The version of the registered model that `run_id`'s logged model is (`run`: its run.json):
    the one already made from these inputs (no alias moves), or a new one, champion or challenger."""
    from mlflow.exceptions import MlflowException

    name, inputs_digest = params.compare.registered_model, run["inputs_digest"]

    def these_inputs() -> list:  # the oldest version made from them, if any
        return client.search_model_versions(f"name = '{name}' AND tags.{INPUTS_TAG} = '{inputs_digest}'",
                                            max_results=1, order_by=["version_number ASC"])

    found = these_inputs()
    if not found:
        model_ids = record.logged_model_ids(client, experiment, run_id)
        if not model_ids:
            raise PipelineError(f"run {run_id} has no logged model {record.MODEL_NAME!r}; rerun its train stage "
                                "(dvc repro -f)")
        try:
            client.create_registered_model(name, description=(
                "The best variant of the batch-norm MNIST lab, picked by the compare stage. Its versions are pickled "
                "torch models (MLflow's pickle format, which runs code when loaded): load them only from a tracking "
                "server you trust."))
        except MlflowException as error:
            if error.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        made = client.create_model_version(
            name, source=f"models:/{model_ids[0]}", run_id=run_id, model_id=model_ids[0],
            description=f"{choice.variant}: mean {choice.metric} over seeds {choice.score:.4f}",
            tags={"variant": choice.variant, "select_by": choice.metric, "score": repr(choice.score),
                  choice.metric: f"{choice.score:.6f}", "data_digest": run["dataset"]["digest"],
                  INPUTS_TAG: inputs_digest, "compare_run_id": compare_run_id})
        found = these_inputs()
        if found[0].version != made.version:
            client.delete_model_version(name, made.version)  # a comparison registering it at once made it first
        else:
            settle_aliases(client, name, params.compare.alias, params.compare.challenger_alias, made.version)
    version = client.get_model_version(name, found[0].version)  # its aliases as settled
    # A former challenger that became the champion holds both aliases: it is the champion.
    alias = next((a for a in (params.compare.alias, params.compare.challenger_alias) if a in version.aliases), "")
    return {"name": name, "version": int(version.version), "alias": alias,
            "variant": choice.variant, "select_by": choice.metric, "score": choice.score}


def settle_aliases(client, name: str, champion: str, challenger: str, new_version: str | int) -> str:
    """Put `champion` on the best version comparable with the current champion (scored on the same
    metric over the same data; the new one where there is none); `challenger` on the new version
    where it is not the champion. Returns the alias the new version got. Read, decide, write, then
    read again: a comparison registering at once is seen on the next pass, so concurrent compares
    end on the same, best, champion."""

    def score(version) -> float:
        try:
            return float(version.tags.get("score", "nan"))
        except ValueError:
            return math.nan

    def comparable(version, reference) -> bool:
        return math.isfinite(score(version)) and "data_digest" in version.tags and all(
            version.tags.get(key) == reference.tags.get(key) for key in ("select_by", "data_digest"))

    new_version, seen = str(new_version), set()
    for _ in range(10):
        versions = {str(v.version): v for v in client.search_model_versions(f"name = '{name}'")}
        if set(versions) == seen:
            break
        seen = set(versions)
        current = versions.get(str(client.get_registered_model(name).aliases.get(champion)))  # None: no champion yet
        reference = current if current is not None and comparable(current, current) else versions[new_version]
        candidates = [v for v in versions.values() if comparable(v, reference)] or [versions[new_version]]
        best = max(candidates, key=lambda v: (score(v), -int(v.version)))  # a tie keeps the earlier version
        client.set_registered_model_alias(name, champion, best.version)
    if str(best.version) == new_version:
        return champion
    client.set_registered_model_alias(name, challenger, new_version)
    return challenger
