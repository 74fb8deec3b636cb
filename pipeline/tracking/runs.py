"""The runs of one variant in MLflow: started, resumed, fed each epoch's metrics, closed; the
trained model logged; found again by their inputs, or rebuilt from DVC outputs for a store that
never saw them.

A variant's run is named after it and holds the mean over seeds of every metric; each seed has a
nested child run with its own curves. Runs are addressed by id through `MlflowClient`, so a
resumed stage continues the very runs its checkpoint names. The stages call these functions
through their tracking process (pipeline/tracking/process.py), which supplies the client.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from pipeline.reports import METRICS
from pipeline.stats import summarize
from pipeline.tracking.store import EXP_NAME_TAG, INPUTS_TAG, PARENT_TAG, RESTORED_TAG, experiment_id


def flatten(prefix: str, value: object) -> dict[str, str]:
    """Nested params as MLflow's flat `a.b.c` keys."""
    if isinstance(value, dict):
        flat = {}
        for key, item in value.items():
            flat |= flatten(f"{prefix}.{key}" if prefix else str(key), item)
        return flat
    return {prefix: str(value)}


def log_metrics(client, run_id: str, metrics: dict[str, float], step: int) -> None:
    """All of one epoch's metrics in a single call: the store costs ms per call, not per value."""
    log_epochs(client, run_id, [(step, int(time.time() * 1000), metrics)])


def log_epochs(client, run_id: str, epochs: list[tuple[int, int, dict[str, float]]]) -> None:
    """Epochs of one run, each (epoch, time in ms, {metric: value}), in as few calls as MLflow's
    limit of 1000 metrics a call allows. No epoch is split between two calls: a call cut short
    leaves each epoch logged whole or not at all, which is what backfill counts on."""
    from mlflow.entities import Metric

    per_call = max(1, 1000 // max((len(metrics) for _, _, metrics in epochs), default=1))
    for start in range(0, len(epochs), per_call):
        client.log_batch(run_id, metrics=[Metric(name, float(value), timestamp, epoch)
                                          for epoch, timestamp, metrics in epochs[start : start + per_call]
                                          for name, value in metrics.items()])


def log_tags(client, run_id: str, tags: dict[str, str]) -> None:
    """A run's tags in one call, not one call each."""
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])


def log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow's per-call limit on params
        client.log_batch(run_id, params=items[start : start + 100])


def close_dangling(client, run_ids: dict) -> None:
    """Mark FAILED the runs a crash left RUNNING (and that this store still has)."""
    from mlflow.exceptions import MlflowException

    for run_id in all_run_ids(run_ids):
        try:
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, status="FAILED")
        except MlflowException:  # gone, or recorded in another store
            pass


def close_abandoned(client, experiment: str, digest: str, dvc_exp_name: str | None) -> None:
    """Mark FAILED the runs of these inputs that an attempt now gone left RUNNING: a worker lost
    mid-task whose task Dask runs again elsewhere, a machine that died (its scratch state with it).
    Only those of the same DVC experiment (`dvc_exp_name`, or none): queued experiments that share
    a variant train it at the same time, each its own runs, and one's start closed the other's,
    which could land after that one had finished them (a FAILED run of a finished stage)."""
    for found in client.search_runs([experiment], f"tags.{INPUTS_TAG} = '{digest}' AND attributes.status = 'RUNNING'"):
        if found.data.tags.get(EXP_NAME_TAG) == dvc_exp_name:
            client.set_terminated(found.info.run_id, status="FAILED")


def start_variant_runs(client, experiment_name: str, config, tags: dict[str, str], dataset: dict,
                       environment: dict, replaces: dict | None = None) -> dict:
    """The variant's run and one nested child run per seed; returns their ids.

    Params: the variant's config and the environment it ran in (`env.python`, `env.<package>`).
    `replaces`: the runs of a checkpoint this training does not resume (marked FAILED).
    """
    if replaces is not None:
        close_dangling(client, replaces)
    experiment = experiment_id(client, experiment_name)
    close_abandoned(client, experiment, tags[INPUTS_TAG], tags.get(EXP_NAME_TAG))
    params = flatten("", config.model_dump(exclude={"name"})) | flatten("env", {
        "python": environment["python"], **environment["packages"]})
    variant = client.create_run(experiment, run_name=config.name, tags={**tags, "variant": config.name})
    log_params(client, variant.info.run_id, params | {"replicas": str(len(config.seeds))})
    seed_run_ids = []
    for seed in config.seeds:
        child = client.create_run(
            experiment,
            run_name=f"{config.name}-seed{seed}",
            tags={**tags, "variant": config.name, PARENT_TAG: variant.info.run_id},
        )
        log_params(client, child.info.run_id, params | {"seed": str(seed)})
        seed_run_ids.append(child.info.run_id)
    run_ids = {"variant": variant.info.run_id, "seeds": seed_run_ids}
    log_dataset(client, run_ids, dataset)
    return run_ids


def resume_variant_runs(client, run_ids: dict, history: dict[str, list[list[float]]]) -> dict:
    """The runs a checkpoint names, RUNNING again, with the epochs a crash kept from them."""
    set_status(client, run_ids, "RUNNING")
    backfill_metrics(client, run_ids, history)
    return run_ids


def log_dataset(client, run_ids: dict, dataset: dict) -> None:
    """Dataset lineage: the prepared splits' digest and where they are, on every run of the variant.

    Through the client, not `mlflow.start_run`: leaving that context would end the run.
    """
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.exceptions import MlflowException

    entity = Dataset(name=f"mnist-{dataset['digest']}", digest=dataset["digest"], source_type="local",
                     source=json.dumps({"uri": dataset["uri"]}), profile=json.dumps(dataset["sizes"]))
    lineage = DatasetInput(entity, [InputTag("mlflow.data.context", "training")])
    for run_id in all_run_ids(run_ids):
        try:
            client.log_inputs(run_id, datasets=[lineage])
        except MlflowException as error:
            # MLflow's store looks the dataset up, then inserts it: two stages logging the same
            # dataset at once (train stages side by side, queued experiments) race, and the loser's
            # insert breaks the unique key (seen in CI: PostgreSQL's UniqueViolation). Once the
            # winner's row is there, the same call finds it.
            if "unique" not in str(error).lower():
                raise
            client.log_inputs(run_id, datasets=[lineage])


def prepare_model_logging(client) -> None:
    """Pay `log_model`'s one-off costs early: the flavor's import, and MLflow's map of modules to
    the distributions that install them, seeded (`model_requirement_modules`)."""
    import mlflow.pytorch
    from mlflow.utils import requirements_utils

    # Private: if MLflow drops or renames the map, log_model builds it in full as before.
    if getattr(requirements_utils, "_MODULES_TO_PACKAGES", "gone") is None:
        requirements_utils._MODULES_TO_PACKAGES = model_requirement_modules(
            mlflow.pytorch.get_default_pip_requirements())


def model_requirement_modules(requirements: list[str]) -> dict[str, list[str]]:
    """{top-level module: [distribution]} of the served model's requirements, as MLflow's map has them.

    log_model checks each requirement against the installed version, and builds its map of every
    installed distribution's modules (`packages_distributions()`, torch's 14,700-file record
    included) for that: 0.87 s of CPU in each train stage's tracking process, on the core the
    other train stage needs. It reads the map only to find a requirement's module where pip's
    metadata lacks its version; these requirements' own entries do (held equal to the full map's:
    tests/test_variant_runs.py)."""
    from packaging.requirements import Requirement

    names = [Requirement(requirement).name for requirement in requirements]
    return {name.replace("-", "_"): [name] for name in names}


def log_trained_model(client, run_ids: dict, served: tuple | None, best_epochs: list[int],
                      diverged_epochs: list[int | None], checkpoints: list[Path]) -> None:
    """A finished variant: each seed's best epoch and divergence, the checkpoints, and the
    served model (`served`: a plain nn.Module, an input example, its seed; None when every
    seed diverged) with its signature, in the variant's run."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    for run_id, best_epoch, diverged in zip(run_ids["seeds"], best_epochs, diverged_epochs, strict=True):
        log_tags(client, run_id, {"best_epoch": str(best_epoch),
                                  "diverged": "false" if diverged is None else f"true (epoch {diverged})"})
    count = sum(epoch is not None for epoch in diverged_epochs)
    log_tags(client, run_ids["variant"], {"diverged_seeds": f"{count} of {len(diverged_epochs)}"}
             | ({} if served is None else {"served_seed": str(served[2])}))
    for path in checkpoints:  # the run's artifact store is looked up once, then cached by MLflow
        client.log_artifact(run_ids["variant"], str(path), "checkpoints")
    if served is None:
        return
    model, example, _ = served
    with torch.no_grad():
        signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
    # Pickle, not MLflow's default pt2: torch.export costs ~2.3 s here (importing torch._dynamo,
    # tracing), and the model is a plain nn.Sequential of torch.nn layers. MLflow warns about
    # pickle on every train stage; the warning is for whoever loads the model, so it is said
    # once, in the registered model's description (pipeline/tracking/registry.py), not here.
    pickle_warning = logging.getLogger("mlflow.pytorch")
    pickle_warning.addFilter(_not_the_pickle_warning)
    try:
        with mlflow.start_run(run_id=run_ids["variant"]):  # in the run's experiment: so is its logged model
            # Explicit requirements: inferring them imports the model in a subprocess (~6 s).
            mlflow.pytorch.log_model(model, name="model", signature=signature, input_example=example,
                                     serialization_format="pickle",
                                     pip_requirements=mlflow.pytorch.get_default_pip_requirements())
    finally:
        pickle_warning.removeFilter(_not_the_pickle_warning)


def _not_the_pickle_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Saving pytorch model by Pickle")


def find_variant_runs(client, experiment_name: str, digests: dict[str, str], seeds: list[int]) -> dict:
    """{variant: run ids} of the newest finished run of each variant computed from these inputs
    (its `inputs_digest` tag), with a child run for every seed; None where the store has none."""
    experiment = experiment_id(client, experiment_name)
    found = {}
    for variant, digest in digests.items():
        runs = client.search_runs([experiment], f"tags.{INPUTS_TAG} = '{digest}' AND attributes.run_name = "
                                  f"'{variant}' AND attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        children = client.search_runs([experiment], f"tags.`{PARENT_TAG}` = '{runs[0].info.run_id}'") if runs else []
        by_seed = {child.data.params.get("seed"): child.info.run_id for child in children}
        complete = runs and all(str(seed) in by_seed for seed in seeds)
        found[variant] = {"variant": runs[0].info.run_id, "seeds": [by_seed[str(s)] for s in seeds]} if complete else None
    return found


def restore_variant_runs(client, experiment_name: str, config, tags: dict[str, str], dataset: dict,
                         environment: dict, history: dict, served: tuple | None, checkpoints: list[Path]) -> dict:
    """A variant's runs rebuilt from its train stage's outputs, for a store that never saw the runs
    that made them (DVC restored the outputs from another machine's run-cache): params, per-epoch
    metrics, checkpoints and model, tagged `restored_from`. Returns their ids."""
    import numpy as np

    run_ids = start_variant_runs(client, experiment_name, config, tags | {RESTORED_TAG: "dvc-outputs"}, dataset,
                                 environment)
    backfill_metrics(client, run_ids, {name: history[name] for name in METRICS})
    if served is not None:  # the images are not an input of compare: two blank ones as the example
        model, seed = served
        served = (model, np.zeros((2, model[1].in_features), dtype=np.float32), seed)
    log_trained_model(client, run_ids, served, history["best_epoch"], history["diverged_epoch"], checkpoints)
    set_status(client, run_ids, "FINISHED")
    return run_ids


def all_run_ids(run_ids: dict) -> list[str]:
    return [run_ids["variant"], *run_ids["seeds"]]


def set_status(client, run_ids: dict, status: str) -> None:
    """RUNNING again on resume; FINISHED, FAILED or KILLED at the end."""
    for run_id in all_run_ids(run_ids):
        if status == "RUNNING":
            client.update_run(run_id, status="RUNNING")
        else:
            client.set_terminated(run_id, status=status)


def log_replica_metrics(client, run_ids: dict, metrics: dict[str, list[float]], step: int) -> None:
    """Each seed's values into its child run; their mean (and spread) into the variant run."""
    epoch = (step, int(time.time() * 1000), metrics)
    log_epoch(client, run_ids, epoch, [epoch])


# The variant's run gets each epoch's mean and spread over seeds as the epoch ends: one request.
# The seed runs get their epochs every 30 s and after the last one, a request a seed for all of
# them: a variant costs its server about one request an epoch instead of 1 + seeds (6 with the
# lab's 5), and a seed's curve is at most 30 s behind. A crash between two sends loses nothing:
# the epochs are in the checkpoint, and the resumed stage backfills what the runs miss.
SEED_RUNS_EVERY_S = 30.0


def log_epoch(client, run_ids: dict, epoch: tuple[int, int, dict[str, list[float]]],
              seed_epochs: list[tuple[int, int, dict[str, list[float]]]]) -> None:
    """An epoch's mean and spread over seeds into the variant run (epoch, time in ms, {metric:
    per-seed values}), and the seed runs' `seed_epochs` (those not yet sent), one call a run."""
    if seed_epochs:
        for replica, run_id in enumerate(run_ids["seeds"]):
            log_epochs(client, run_id, [(step, timestamp, {name: values[replica] for name, values in metrics.items()})
                                        for step, timestamp, metrics in seed_epochs])
    step, timestamp, metrics = epoch
    log_epochs(client, run_ids["variant"], [(step, timestamp, summarize(metrics))])


def backfill_metrics(client, run_ids: dict, history: dict[str, list[list[float]]]) -> None:
    """Log the checkpointed epochs that a crash or an outage kept from reaching MLflow, run by run:
    a call cut short may have reached some seeds' runs and not the others."""
    epochs = [{name: values[epoch] for name, values in history.items()} for epoch in range(len(history["val_acc"]))]
    for replica, run_id in enumerate(run_ids["seeds"]):
        _backfill(client, run_id, [{name: values[replica] for name, values in metrics.items()} for metrics in epochs])
    _backfill(client, run_ids["variant"], [summarize(metrics) for metrics in epochs])


def _backfill(client, run_id: str, metrics_by_epoch: list[dict[str, float]]) -> None:
    logged = {m.step for m in client.get_metric_history(run_id, "val_acc")}  # an epoch is logged whole or not at all
    now = int(time.time() * 1000)
    log_epochs(client, run_id, [(epoch, now, metrics) for epoch, metrics in enumerate(metrics_by_epoch, start=1)
                                if epoch not in logged])
