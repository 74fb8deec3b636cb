"""The MLflow record: a view of DVC's outputs, written by one idempotent function.

A variant's outputs (data/train/<variant>/run.json and history.json, data/checkpoints/<variant>/,
data/evaluate/<variant>/ once evaluated, environment.json) hold everything its runs show, the
same bytes for the same inputs. `mirror_variant` finds the variant's run and a child run per
seed by their inputs digest (run.json's), makes what is missing and adds only what the store
lacks: an epoch already logged is not logged again, an artifact or model already there is not
uploaded again; complete outputs close the runs FINISHED. The train stage calls it each epoch
with its scratch state (live curves), compare and `publish` with the outputs on disk: a
workspace filled by `dvc pull` or DVC's run-cache publishes the same runs as the one that trained.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline import fsio, provenance
from pipeline.reports import METRICS
from pipeline.stats import summarize
from pipeline.tracking.model import log_model, logged_model_ids
from pipeline.tracking.store import INPUTS_TAG, PARENT_TAG

SEED_TAG = "seed"  # on a seed's child run: how the record tells them apart
CHECKPOINTS = ("last.pt", "best.pt")
EVALUATION = ("confusion.png", "per_class.json", "per_seed.json")
TEST_METRICS = ("test_loss", "test_acc")


@dataclass(frozen=True)
class VariantOutputs:
    """What a variant's record is made of; `checkpoints` is None while the stage still trains."""

    run: dict  # run.json: variant, inputs_digest, config, seeds, dataset
    environment: dict  # environment.json
    history: dict  # history.json: per metric, per epoch, each seed's value (+ best and diverged epochs)
    checkpoints: Path | None = None  # data/checkpoints/<variant>, once written
    evaluation: Path | None = None  # data/evaluate/<variant>, once evaluated


def read_json(path: Path) -> dict:
    return fsio.read_json(path, "rerun its stage")


def read_variant(root: Path, train: Path, checkpoints: Path, evaluate: Path | None) -> VariantOutputs:
    """A variant's finished outputs, as its stages wrote them (`evaluate`: None or not there yet)."""
    evaluated = evaluate is not None and (evaluate / "per_seed.json").exists()
    return VariantOutputs(read_json(train / "run.json"), provenance.read_environment(root),
                          read_json(train / "history.json"), checkpoints, evaluate if evaluated else None)


def mirror_variant(client, experiment: str, outputs: VariantOutputs, seen: dict | None = None) -> dict:
    """The variant's runs brought up to `outputs`; returns {"variant": id, "seeds": [ids]}.
    `seen`: what earlier calls of this process found and logged (the train stage's epochs), so
    that an epoch costs one request a run; without it everything is read from the store."""
    seen = {} if seen is None else seen
    key = outputs.run["inputs_digest"]
    if key not in seen:
        seen[key] = variant_runs(client, experiment, outputs)
    elif outputs.checkpoints is not None:  # the train stage's last call
        seen[key] = settle(client, experiment, outputs, seen[key])
    ids = seen[key]
    epochs = [{name: values[epoch] for name, values in outputs.history.items() if name in METRICS}
              for epoch in range(len(outputs.history["val_acc"]))]
    for replica, run_id in enumerate(ids["seeds"]):
        log_new_epochs(client, run_id, [{k: v[replica] for k, v in metrics.items()} for metrics in epochs], seen)
    log_new_epochs(client, ids["variant"], [summarize(metrics) for metrics in epochs], seen)
    if outputs.evaluation is not None:
        log_evaluation(client, ids, outputs.evaluation, len(epochs))
    if outputs.checkpoints is not None:
        finish(client, experiment, ids, outputs)
    return ids


def variant_runs(client, experiment: str, outputs: VariantOutputs) -> dict:
    """The oldest runs of these inputs (the variant's and each seed's), made where missing, with
    their params and dataset."""
    found = sorted(client.search_runs([experiment], f"tags.{INPUTS_TAG} = '{outputs.run['inputs_digest']}'"),
                   key=lambda r: (r.info.start_time, r.info.run_id))  # as first_made orders them
    name = outputs.run["variant"]
    variant = next((r for r in found if SEED_TAG not in r.data.tags and r.info.run_name == name), None)
    variant = complete_run(client, experiment, variant, outputs, name, {})
    children = {}
    for run in found:
        if run.data.tags.get(PARENT_TAG) == variant.info.run_id:
            children.setdefault(run.data.tags.get(SEED_TAG), run)
    seeds = [complete_run(client, experiment, children.get(str(seed)), outputs, f"{name}-seed{seed}",
                          {SEED_TAG: str(seed), PARENT_TAG: variant.info.run_id}).info.run_id
             for seed in outputs.run["seeds"]]
    return {"variant": variant.info.run_id, "seeds": seeds}


def complete_run(client, experiment: str, run, outputs: VariantOutputs, name: str, tags: dict):
    """`run`, or a new one named `name`, with every param and the dataset that `outputs` give it."""
    from mlflow.entities import Dataset, DatasetInput, InputTag, Param

    if run is None:
        run = client.create_run(experiment, run_name=name, tags={
            INPUTS_TAG: outputs.run["inputs_digest"], "variant": outputs.run["variant"],
            "mlflow.source.name": f"dvc stage train@{outputs.run['variant']}", "mlflow.source.type": "LOCAL", **tags})
        run = first_made(client, experiment, run, tags)
    run_params = params(outputs) | ({"seed": tags[SEED_TAG]} if SEED_TAG in tags else
                                    {"replicas": str(len(outputs.run["seeds"]))})
    missing = [Param(key, value) for key, value in run_params.items() if key not in run.data.params]
    for start in range(0, len(missing), 100):  # MLflow's per-call limit on params
        client.log_batch(run.info.run_id, params=missing[start : start + 100])
    if not run.inputs.dataset_inputs:
        dataset = outputs.run["dataset"]
        entity = Dataset(name=f"mnist-{dataset['digest']}", digest=dataset["digest"], source_type="local",
                         source=json.dumps({"uri": "data/prepared"}), profile=json.dumps(dataset["sizes"]))
        client.log_inputs(run.info.run_id, datasets=[DatasetInput(entity, [InputTag("mlflow.data.context",
                                                                                    "training")])])
    return run


def first_made(client, experiment: str, made, tags: dict):
    """The first run made for the same inputs, name and seed: stages mirroring the same inputs at
    once (queued experiments that share a variant) may each have made one before seeing the
    other's; each keeps the first (by start time, then id) and deletes its own where it is not."""
    same = [r for r in client.search_runs([experiment], f"tags.{INPUTS_TAG} = '{made.data.tags[INPUTS_TAG]}' AND "
                                          f"attributes.run_name = '{made.info.run_name}'")
            if r.data.tags.get(SEED_TAG) == tags.get(SEED_TAG)
            and (SEED_TAG not in tags or r.data.tags.get(PARENT_TAG) == tags[PARENT_TAG])]
    first = min(same, key=lambda r: (r.info.start_time, r.info.run_id), default=made)
    if first.info.run_id != made.info.run_id:
        client.delete_run(made.info.run_id)
    return first


def settle(client, experiment: str, outputs: VariantOutputs, ids: dict) -> dict:
    """The first runs of these inputs (variant_runs), where `ids` (this stage's) lost to them:
    two stages that made a run at once may each have searched before the other's was stored, and
    each kept its own (first_made); by the stage's end both are visible, so the later is deleted
    by its own stage, which goes on in the first (a load test's four executions made a seed's run
    twice)."""
    first = variant_runs(client, experiment, outputs)
    for mine, kept in zip([ids["variant"], *ids["seeds"]], [first["variant"], *first["seeds"]], strict=True):
        if mine != kept:
            client.delete_run(mine)
    return first


def params(outputs: VariantOutputs) -> dict[str, str]:
    """The variant's config and the environment it ran in (`env.python`, `env.<package>`)."""
    environment = outputs.environment
    return flatten("", outputs.run["config"]) | flatten("env", {"python": environment["python"],
                                                                 **environment["packages"]})


def flatten(prefix: str, value: object) -> dict[str, str]:
    """Nested params as MLflow's flat `a.b.c` keys."""
    if isinstance(value, dict):
        flat = {}
        for key, item in value.items():
            flat |= flatten(f"{prefix}.{key}" if prefix else str(key), item)
        return flat
    return {prefix: str(value)}


def log_new_epochs(client, run_id: str, metrics_by_epoch: list[dict[str, float]], seen: dict) -> None:
    """The epochs (numbered from 1) whose step the run's history lacks, in as few calls as MLflow's
    limit of 1000 metrics a call allows; an epoch is never split between calls, so a call cut
    short leaves each epoch logged whole or not at all, and `val_acc`'s steps say which are."""
    from mlflow.entities import Metric

    if run_id not in seen:
        seen[run_id] = {m.step for m in client.get_metric_history(run_id, "val_acc")}
    now = int(time.time() * 1000)
    new = [(epoch, metrics) for epoch, metrics in enumerate(metrics_by_epoch, start=1) if epoch not in seen[run_id]]
    per_call = max(1, 1000 // max((len(metrics) for _, metrics in new), default=1))
    for start in range(0, len(new), per_call):
        client.log_batch(run_id, metrics=[Metric(name, float(value), now, epoch) for epoch, metrics in
                                          new[start : start + per_call] for name, value in metrics.items()])
        seen[run_id] |= {epoch for epoch, _ in new[start : start + per_call]}


def log_evaluation(client, ids: dict, folder: Path, epochs: int) -> None:
    """The evaluate stage's test metrics (at the last epoch's step) and files, where missing."""
    from mlflow.entities import Metric

    per_seed = read_json(folder / "per_seed.json")
    values = {name: per_seed[name] for name in TEST_METRICS}
    now = int(time.time() * 1000)
    for run_id, metrics in [*((run_id, {k: v[i] for k, v in values.items()}) for i, run_id in enumerate(ids["seeds"])),
                            (ids["variant"], summarize(values))]:
        if not any(m.step == epochs for m in client.get_metric_history(run_id, "test_acc")):
            client.log_batch(run_id, metrics=[Metric(k, float(v), now, epochs) for k, v in metrics.items()])
    log_missing_artifacts(client, ids["variant"], "evaluation", [folder / name for name in EVALUATION])


def log_missing_artifacts(client, run_id: str, folder: str, files: list[Path]) -> None:
    there = {Path(artifact.path).name for artifact in client.list_artifacts(run_id, folder)}
    for path in files:
        if path.name not in there:
            client.log_artifact(run_id, str(path), folder)


def finish(client, experiment: str, ids: dict, outputs: VariantOutputs) -> None:
    """Complete outputs: each seed's best epoch and divergence, the checkpoints, the served model,
    every run FINISHED (a run a dead stage left RUNNING is closed so)."""
    from mlflow.entities import RunTag

    history = outputs.history
    for run_id, best, diverged in zip(ids["seeds"], history["best_epoch"], history["diverged_epoch"], strict=True):
        client.log_batch(run_id, tags=[RunTag("best_epoch", str(best)), RunTag(
            "diverged", "false" if diverged is None else f"true (epoch {diverged})")])
    count = sum(epoch is not None for epoch in history["diverged_epoch"])
    client.set_tag(ids["variant"], "diverged_seeds", f"{count} of {len(history['diverged_epoch'])}")
    log_missing_artifacts(client, ids["variant"], "checkpoints", [outputs.checkpoints / n for n in CHECKPOINTS])
    if not logged_model_ids(client, experiment, ids["variant"]):
        log_model(client, ids["variant"], outputs)
    for run_id in [ids["variant"], *ids["seeds"]]:
        if client.get_run(run_id).info.status != "FINISHED":
            client.set_terminated(run_id, status="FINISHED")


def close_runs(client, experiment: str, digest: str, status: str) -> None:
    """The runs of these inputs still RUNNING ended `status` (KILLED, FAILED): a stage that stops."""
    for run in client.search_runs([experiment], f"tags.{INPUTS_TAG} = '{digest}' AND attributes.status = 'RUNNING'"):
        client.set_terminated(run.info.run_id, status=status)


def comparison_digest(variant_digests: dict[str, str], folder: Path) -> str:
    """What a comparison was computed from: its variants' inputs and its summary (the evaluation)."""
    blob = json.dumps(variant_digests, sort_keys=True).encode() + (folder / "summary.json").read_bytes()
    return hashlib.sha256(blob).hexdigest()[:32]


def mirror_comparison(client, experiment: str, folder: Path, variant_ids: dict[str, dict], digest: str) -> str:
    """The compare run of these inputs (made where missing) with the comparison's files and each
    variant's mean test accuracy, grouping the variant runs; returns its id."""
    from mlflow.entities import Metric

    found = client.search_runs([experiment], f"tags.{INPUTS_TAG} = '{digest}' AND attributes.run_name = 'compare'",
                               order_by=["attributes.start_time ASC"], max_results=1)
    run_id = found[0].info.run_id if found else client.create_run(experiment, run_name="compare", tags={
        INPUTS_TAG: digest, "mlflow.source.name": "dvc stage compare", "mlflow.source.type": "LOCAL"}).info.run_id
    for ids in variant_ids.values():
        client.set_tag(ids["variant"], PARENT_TAG, run_id)  # the UI shows the comparison as a group
    summary = read_json(folder / "summary.json")
    if not client.get_run(run_id).data.metrics:
        client.log_batch(run_id, metrics=[Metric(f"{v}.test_acc_mean", float(row["test_acc_mean"]), 0, 0)
                                          for v, row in summary.items()])
    log_missing_artifacts(client, run_id, "comparison", sorted(p for p in folder.iterdir() if p.is_file()))
    return run_id
