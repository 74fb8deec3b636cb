"""The MLflow record: a view of DVC's outputs (`VariantOutputs`), written by one idempotent function.

`mirror_variant` finds the variant's run and a child run per seed by their inputs digest, makes
what is missing and adds only what the store lacks; complete outputs close the runs FINISHED. The
train stage calls it each epoch with its scratch state (live curves), compare and `publish`
(workspace.py) with the outputs on disk.
"""

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline import fsio, provenance
from pipeline.reports import METRICS
from pipeline.stats import summarize
from pipeline.tracking.store import INPUTS_TAG, PARENT_TAG

SEED_TAG = "seed"  # on a seed's child run: how the record tells them apart
MODEL_NAME = "model"  # the logged model of a variant's run, registered by compare


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
    if key not in seen or outputs.checkpoints is not None:  # the first call, or the train stage's last
        seen[key] = variant_runs(client, experiment, outputs, seen.get(key))
    ids = seen[key]
    epochs = [{name: values[epoch] for name, values in outputs.history.items() if name in METRICS}
              for epoch in range(len(outputs.history["val_acc"]))]
    for replica, run_id in enumerate(ids["seeds"]):
        log_new_epochs(client, run_id, [{k: v[replica] for k, v in metrics.items()} for metrics in epochs], seen)
    log_new_epochs(client, ids["variant"], [summarize(metrics) for metrics in epochs], seen)
    if outputs.evaluation is not None:  # the test metrics at the last epoch's step
        per_seed = read_json(outputs.evaluation / "per_seed.json")
        values = {name: per_seed[name] for name in ("test_loss", "test_acc")}
        for i, run_id in enumerate(ids["seeds"]):
            log_new_epochs(client, run_id, [{k: v[i] for k, v in values.items()}], {}, "test_acc", len(epochs))
        log_new_epochs(client, ids["variant"], [summarize(values)], {}, "test_acc", len(epochs))
        log_missing_artifacts(client, ids["variant"], "evaluation", [
            outputs.evaluation / name for name in ("confusion.png", "per_class.json", "per_seed.json")])
    if outputs.checkpoints is not None:
        finish(client, experiment, ids, outputs)
    return ids


def variant_runs(client, experiment: str, outputs: VariantOutputs, mine: dict | None = None) -> dict:
    """The oldest runs of these inputs (the variant's, and each seed's under it), made where
    missing, with their params and dataset. Stages mirroring the same inputs at once (queued
    experiments that share a variant) may each make a run before seeing the other's: a run just
    made, or one of `mine` (this stage's, at its end, when both are visible), that is not the
    oldest is deleted by its own stage (a load test's four executions made a seed's run twice)."""
    found = client.search_runs([experiment], f"tags.{INPUTS_TAG} = '{outputs.run['inputs_digest']}'")
    name = outputs.run["variant"]
    variant = _oldest_or_made(client, experiment, found, outputs, name, {SEED_TAG: None})
    seeds = [_oldest_or_made(client, experiment, found, outputs, f"{name}-seed{seed}",
                             {SEED_TAG: str(seed), PARENT_TAG: variant}) for seed in outputs.run["seeds"]]
    # Its key set again, a write even where every run exists: a user who may read but not write is
    # refused here, by the train stage's first call, before it trains.
    client.set_tag(variant, INPUTS_TAG, outputs.run["inputs_digest"])
    if mine:
        for lost in {mine["variant"], *mine["seeds"]} - {variant, *seeds}:
            client.delete_run(lost)
    return {"variant": variant, "seeds": seeds}


def _oldest_or_made(client, experiment: str, found: list, outputs: VariantOutputs, name: str, tags: dict) -> str:
    """The id of the oldest run of `found` named `name` with `tags` (None: not set), made where
    there is none, its params and dataset completed."""
    from mlflow.entities import Dataset, DatasetInput, InputTag, Param

    def oldest(runs: list):
        same = [r for r in runs if (tags[SEED_TAG] or r.info.run_name == name)  # a seed's run: by its tags
                and all(r.data.tags.get(k) == v for k, v in tags.items())]
        return min(same, key=lambda r: (r.info.start_time, r.info.run_id), default=None)

    digest, run = outputs.run["inputs_digest"], oldest(found)
    if run is None:
        made = client.create_run(experiment, run_name=name, tags={
            INPUTS_TAG: digest, "variant": outputs.run["variant"], "mlflow.source.type": "LOCAL",
            "mlflow.source.name": f"dvc stage train@{outputs.run['variant']}", **{k: v for k, v in tags.items() if v}})
        run = oldest([made, *client.search_runs([experiment], f"tags.{INPUTS_TAG} = '{digest}' AND "
                                                              f"attributes.run_name = '{name}'")])
        if run.info.run_id != made.info.run_id:
            client.delete_run(made.info.run_id)
    env = outputs.environment
    params = flatten("", outputs.run["config"]) | flatten("env", {"python": env["python"], **env["packages"]})
    params |= {"seed": tags[SEED_TAG]} if tags[SEED_TAG] else {"replicas": str(len(outputs.run["seeds"]))}
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items() if k not in run.data.params])
    if not run.inputs.dataset_inputs:
        dataset = outputs.run["dataset"]
        entity = Dataset(name=f"mnist-{dataset['digest']}", digest=dataset["digest"], source_type="local",
                         source=json.dumps({"uri": "data/prepared"}), profile=json.dumps(dataset["sizes"]))
        client.log_inputs(run.info.run_id, datasets=[DatasetInput(entity, [InputTag("mlflow.data.context",
                                                                                    "training")])])
    return run.info.run_id


def flatten(prefix: str, value: object) -> dict[str, str]:
    """Nested params as MLflow's flat `a.b.c` keys."""
    if not isinstance(value, dict):
        return {prefix: str(value)}
    return {k: v for key, item in value.items() for k, v in flatten(f"{prefix}.{key}" if prefix else str(key),
                                                                    item).items()}


def log_new_epochs(client, run_id: str, metrics_by_epoch: list[dict[str, float]], seen: dict, key: str = "val_acc",
                   first: int = 1) -> None:
    """The epochs (numbered from `first`) whose step the run's history of `key` lacks, in as few
    calls as MLflow's limit of 1000 metrics a call allows; an epoch is never split between calls,
    so a call cut short leaves each epoch logged whole or not at all, and `key`'s steps say which."""
    from mlflow.entities import Metric

    if (run_id, key) not in seen:
        seen[run_id, key] = {m.step for m in client.get_metric_history(run_id, key)}
    now = int(time.time() * 1000)
    new = [(epoch, metrics) for epoch, metrics in enumerate(metrics_by_epoch, first) if epoch not in seen[run_id, key]]
    per_call = max(1, 1000 // max((len(metrics) for _, metrics in new), default=1))
    for start in range(0, len(new), per_call):
        client.log_batch(run_id, metrics=[Metric(name, float(value), now, epoch) for epoch, metrics in
                                          new[start : start + per_call] for name, value in metrics.items()])
        seen[run_id, key] |= {epoch for epoch, _ in new[start : start + per_call]}


def log_missing_artifacts(client, run_id: str, folder: str, files: list[Path]) -> None:
    there = {Path(artifact.path).name for artifact in client.list_artifacts(run_id, folder)}
    for path in files:
        if path.name not in there:
            client.log_artifact(run_id, str(path), folder)


def finish(client, experiment: str, ids: dict, outputs: VariantOutputs) -> None:
    """Complete outputs: each seed's best epoch and divergence, the checkpoints, the served model,
    every run FINISHED."""
    from mlflow.entities import RunTag

    history = outputs.history
    for run_id, best, diverged in zip(ids["seeds"], history["best_epoch"], history["diverged_epoch"], strict=True):
        client.log_batch(run_id, tags=[RunTag("best_epoch", str(best)), RunTag(
            "diverged", "false" if diverged is None else f"true (epoch {diverged})")])
    count = sum(epoch is not None for epoch in history["diverged_epoch"])
    client.set_tag(ids["variant"], "diverged_seeds", f"{count} of {len(history['diverged_epoch'])}")
    log_missing_artifacts(client, ids["variant"], "checkpoints", [outputs.checkpoints / "last.pt",
                                                                  outputs.checkpoints / "best.pt"])
    if not logged_model_ids(client, experiment, ids["variant"]):
        log_model(client, ids["variant"], outputs)
    close_runs(client, experiment, outputs.run["inputs_digest"], "FINISHED")


def close_runs(client, experiment: str, digest: str, status: str) -> None:
    """The runs of these inputs not FINISHED ended `status`: KILLED or FAILED where a stage stops,
    FINISHED where the outputs are complete (a run a dead stage left RUNNING is closed so)."""
    for run in client.search_runs([experiment], f"tags.{INPUTS_TAG} = '{digest}' AND attributes.status != 'FINISHED'"):
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
    if not client.get_run(run_id).data.metrics:
        client.log_batch(run_id, metrics=[Metric(f"{v}.test_acc_mean", float(row["test_acc_mean"]), 0, 0)
                                          for v, row in read_json(folder / "summary.json").items()])
    log_missing_artifacts(client, run_id, "comparison", sorted(p for p in folder.iterdir() if p.is_file()))
    return run_id


def logged_model_ids(client, experiment: str, run_id: str) -> list[str]:
    """The ids of the models logged (READY) in `run_id`, the newest first."""
    from mlflow.entities import LoggedModelStatus

    models = client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}' AND "
                                                                     f"name = '{MODEL_NAME}'")
    ready = sorted((m for m in models if m.status == LoggedModelStatus.READY), key=lambda m: -m.creation_timestamp)
    return [m.model_id for m in ready]


def log_model(client, run_id: str, outputs: VariantOutputs) -> None:
    """The served seed (pipeline/nn/model.served_model) as a plain nn.Sequential with its signature;
    none when every seed diverged. The input example is two blank images: the record is a function
    of the outputs, which hold no images."""
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    from pipeline.nn.checkpoint import load
    from pipeline.nn.model import served_model

    served = served_model(load(outputs.checkpoints / "last.pt"), outputs.history)
    if served is None:
        return
    model, seed = served
    client.set_tag(run_id, "served_seed", str(seed))
    example = np.zeros((2, model[1].in_features), dtype=np.float32)
    with torch.no_grad():
        signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
    pytorch, how = _pytorch_flavor()
    with mlflow.start_run(run_id=run_id):  # in the run's experiment: so is its model
        pytorch.log_model(model, name=MODEL_NAME, signature=signature, input_example=example, **how)


def warm_model_logging(client, experiment: str, run_id: str) -> None:
    """log_model's one-off costs paid while the stage trains, where `run_id` has no model yet (a
    rerun of the same inputs logs none; the skip: CPU 6.07 -> 5.86 s, 6 alternating runs): the
    flavor's import, and MLflow's map of every installed distribution's modules (torch's 14,700
    files) to check a requirement, built by saving a one-layer model to a folder thrown away (0.37 s
    of CPU where torch is imported). Train stage, whole process, alternating, medians, 2 busy cores:
    the published lab 0.78x the wall time without it (5.69 s against 7.32 s), tiny data 0.88x."""
    if logged_model_ids(client, experiment, run_id):
        return
    import tempfile

    import torch

    pytorch, how = _pytorch_flavor()
    with tempfile.TemporaryDirectory() as folder:
        pytorch.save_model(torch.nn.Linear(1, 1), Path(folder) / "model", **how)


def _pytorch_flavor():
    """mlflow.pytorch and how the record saves a model: pickled, not pt2 (torch.export costs ~2.3 s,
    and the model is plain torch.nn layers), with explicit requirements (inferring them imports the
    model in a subprocess, ~6 s). Its warning on every pickled save is left out: whoever loads one
    is told once, in the registered model's description (workspace.py)."""
    import mlflow.pytorch

    logging.getLogger("mlflow.pytorch").addFilter(_not_the_pickle_warning)  # once, however often called
    return mlflow.pytorch, {"serialization_format": "pickle",
                            "pip_requirements": mlflow.pytorch.get_default_pip_requirements()}


def _not_the_pickle_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Saving pytorch model by Pickle")
