"""A variant's runs in MLflow (pipeline/tracking/runs.py), on a real sqlite store: a run per variant
with a child per seed, epochs logged once (backfilled after a crash), runs a lost attempt left
RUNNING closed, finished runs found again by their inputs, and runs rebuilt from DVC outputs."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
from pathlib import Path

import mlflow.pytorch
import numpy as np
import pytest
import torch

from pipeline.nn.model import plain_mlp
from pipeline.reports import METRICS
from pipeline.tracking.store import EXP_NAME_TAG, INPUTS_TAG, PARENT_TAG, RESTORED_TAG, connect
from pipeline.tracking.runs import (
    backfill_metrics,
    close_abandoned,
    find_variant_runs,
    flatten,
    log_epoch,
    log_epochs,
    log_params,
    log_replica_metrics,
    log_trained_model,
    model_requirement_modules,
    prepare_model_logging,
    restore_variant_runs,
    resume_variant_runs,
    set_status,
    start_variant_runs,
)
from tests.conftest import tiny_params

DATASET = {"digest": "d1g3st", "uri": "data/prepared", "sizes": {"train": 500, "val": 100, "test": 200}}
ENVIRONMENT = {"python": "3.12.1", "packages": {"torch": "2.9.0"}}
CONFIG = tiny_params().variant("batchnorm")  # seeds 0 and 1


@pytest.fixture
def store(local_tracking):
    """(client, experiment id) on a fresh store with the experiment `lab`."""
    return connect(local_tracking)


def start(client, digest: str = "inputs-1", **tags) -> dict:
    return start_variant_runs(client, "lab", CONFIG, {INPUTS_TAG: digest, **tags}, DATASET, ENVIRONMENT)


def epoch_history(epochs: int) -> dict[str, list[list[float]]]:
    """[epoch][seed] values of every metric: epoch e, seed s holds e + s / 10."""
    return {name: [[epoch + seed / 10 for seed in (0, 1)] for epoch in range(1, epochs + 1)] for name in METRICS}


def test_flatten_gives_mlflows_dotted_keys():
    assert flatten("", {"a": 1, "b": {"c": [2, 3], "d": {"e": None}}}) == {"a": "1", "b.c": "[2, 3]", "b.d.e": "None"}
    assert flatten("env", {"torch": "2.9"}) == {"env.torch": "2.9"}


def test_log_params_stores_more_than_one_calls_limit(store):
    client, experiment = store
    run_id = client.create_run(experiment).info.run_id
    log_params(client, run_id, {f"p{i}": str(i) for i in range(250)})
    assert client.get_run(run_id).data.params == {f"p{i}": str(i) for i in range(250)}


def test_start_makes_a_variant_run_and_a_child_per_seed_with_params_and_dataset(store):
    client, _ = store
    run_ids = start(client)
    variant = client.get_run(run_ids["variant"])
    assert variant.info.run_name == "batchnorm" and variant.data.tags[INPUTS_TAG] == "inputs-1"
    assert variant.data.params["norm"] == "batch" and variant.data.params["replicas"] == "2"
    assert variant.data.params["env.torch"] == "2.9.0" and "name" not in variant.data.params
    children = [client.get_run(run_id) for run_id in run_ids["seeds"]]
    assert [c.info.run_name for c in children] == ["batchnorm-seed0", "batchnorm-seed1"]
    assert [c.data.params["seed"] for c in children] == ["0", "1"]
    assert all(c.data.tags[PARENT_TAG] == run_ids["variant"] for c in children)
    for run in (variant, *children):
        assert [d.dataset.digest for d in client.get_run(run.info.run_id).inputs.dataset_inputs] == ["d1g3st"]


def statuses(client, run_ids: dict) -> list[str]:
    return [client.get_run(run_id).info.status for run_id in (run_ids["variant"], *run_ids["seeds"])]


def test_close_abandoned_fails_only_the_running_runs_of_those_inputs_and_that_dvc_experiment(store):
    client, experiment = store
    abandoned, other_inputs, finished = start(client, "same"), start(client, "other"), start(client, "same")
    queued = {name: start(client, "same", **{EXP_NAME_TAG: name}) for name in ("exp-a", "exp-b")}
    set_status(client, finished, "FINISHED")
    close_abandoned(client, experiment, "same", None)
    assert statuses(client, abandoned) == ["FAILED"] * 3
    assert statuses(client, other_inputs) == ["RUNNING"] * 3
    assert statuses(client, finished) == ["FINISHED"] * 3
    # A queued experiment's start leaves another's runs of the same inputs running (`dvc queue start -j 2`).
    close_abandoned(client, experiment, "same", "exp-a")
    assert statuses(client, queued["exp-a"]) == ["FAILED"] * 3
    assert statuses(client, queued["exp-b"]) == ["RUNNING"] * 3


def test_starting_again_closes_a_lost_attempt_and_the_checkpoint_it_replaces(store):
    client, _ = store
    lost, replaced = start(client, "same"), start(client, "older")
    fresh = start_variant_runs(client, "lab", CONFIG, {INPUTS_TAG: "same"}, DATASET, ENVIRONMENT,
                               replaces=replaced | {"seeds": [*replaced["seeds"], "0" * 32]})  # one gone: skipped
    assert statuses(client, lost) == statuses(client, replaced) == ["FAILED"] * 3
    assert statuses(client, fresh) == ["RUNNING"] * 3


def test_backfill_logs_only_the_epochs_mlflow_missed_and_the_mean_over_seeds(store):
    client, _ = store
    run_ids = start(client)
    history = epoch_history(3)
    log_replica_metrics(client, run_ids, {name: values[0] for name, values in history.items()}, step=1)
    resume_variant_runs(client, run_ids, history)  # a crash after epoch 3 reached the checkpoint only
    for replica, run_id in enumerate(run_ids["seeds"]):
        logged = client.get_metric_history(run_id, "val_acc")
        assert [(m.step, m.value) for m in logged] == [(e, e + replica / 10) for e in (1, 2, 3)]
    means = client.get_metric_history(run_ids["variant"], "val_acc")
    assert [(m.step, m.value) for m in means] == [(e, pytest.approx(e + 0.05)) for e in (1, 2, 3)]
    [spread] = {m.value for m in client.get_metric_history(run_ids["variant"], "val_acc_std")}
    assert math.isclose(spread, math.sqrt(0.005))
    backfill_metrics(client, run_ids, history)  # nothing missing: nothing logged twice
    assert len(client.get_metric_history(run_ids["variant"], "val_acc")) == 3


def test_find_returns_the_newest_finished_complete_runs_of_those_inputs(store):
    client, _ = store
    older, newer = start(client), start(client)
    start(client)  # started last, never finished
    for run_ids in (older, newer):
        set_status(client, run_ids, "FINISHED")
    found = find_variant_runs(client, "lab", {"batchnorm": "inputs-1", "no_norm": "inputs-1"}, [0, 1])
    assert found == {"batchnorm": newer, "no_norm": None}  # not the unfinished one, though it started last
    assert find_variant_runs(client, "lab", {"batchnorm": "inputs-2"}, [0, 1]) == {"batchnorm": None}
    assert find_variant_runs(client, "lab", {"batchnorm": "inputs-1"}, [0, 1, 2]) == {"batchnorm": None}


def test_log_trained_model_tags_each_seed_and_keeps_the_checkpoints(store, tmp_path):
    client, _ = store
    run_ids = start(client)
    (tmp_path / "last.pt").write_bytes(b"checkpoint")
    log_trained_model(client, run_ids, None, [2, 1], [None, 2], [tmp_path / "last.pt"])
    seeds = [client.get_run(run_id).data.tags for run_id in run_ids["seeds"]]
    assert [(t["best_epoch"], t["diverged"]) for t in seeds] == [("2", "false"), ("1", "true (epoch 2)")]
    assert client.get_run(run_ids["variant"]).data.tags["diverged_seeds"] == "1 of 2"
    assert [a.path for a in client.list_artifacts(run_ids["variant"], "checkpoints")] == ["checkpoints/last.pt"]


def test_restore_rebuilds_finished_runs_with_every_epoch_and_the_model(store, tmp_path):
    client, experiment = store
    history = epoch_history(2) | {"best_epoch": [2, 2], "diverged_epoch": [None, None]}
    (tmp_path / "best.pt").write_bytes(b"checkpoint")
    run_ids = restore_variant_runs(client, "lab", CONFIG, {INPUTS_TAG: "inputs-1"}, DATASET, ENVIRONMENT, history,
                                   (plain_mlp(CONFIG, 0), 0), [tmp_path / "best.pt"])
    assert statuses(client, run_ids) == ["FINISHED"] * 3
    variant = client.get_run(run_ids["variant"])
    assert variant.data.tags[RESTORED_TAG] == "dvc-outputs" and variant.data.tags["served_seed"] == "0"
    assert [m.step for m in client.get_metric_history(run_ids["variant"], "train_loss")] == [1, 2]
    [model] = client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_ids['variant']}'")
    loaded = mlflow.pytorch.load_model(model.model_uri)
    assert loaded(torch.zeros(1, 784)).shape == (1, 10)
    assert find_variant_runs(client, "lab", {"batchnorm": "inputs-1"}, [0, 1]) == {"batchnorm": run_ids}


class CountingClient:
    """The real client, counting its log_batch calls and the epochs each carried."""

    def __init__(self, client) -> None:
        self.client, self.batches = client, []

    def log_batch(self, run_id, metrics=(), **kwargs):
        self.batches.append((run_id, sorted({m.step for m in metrics})))
        return self.client.log_batch(run_id, metrics=metrics, **kwargs)


def test_log_epochs_never_splits_an_epoch_between_two_calls(store):
    client, experiment = store
    run_id = client.create_run(experiment).info.run_id
    counting = CountingClient(client)
    epochs = [(epoch, 1000 + epoch, {f"m{i}": epoch + i / 10 for i in range(7)}) for epoch in range(1, 301)]
    log_epochs(counting, run_id, epochs)  # 2,100 metrics: over the limit of 1,000 a call
    assert [len(steps) for _, steps in counting.batches] == [142, 142, 16]  # 994 metrics at most a call
    history = client.get_metric_history(run_id, "m6")
    assert [(m.step, m.timestamp, m.value) for m in history] == [(e, 1000 + e, pytest.approx(e + 0.6)) for e in
                                                                  range(1, 301)]


def test_log_epoch_sends_the_seed_runs_only_what_it_is_given(store):
    client, _ = store
    run_ids = start(client)
    history = epoch_history(3)
    epochs = [(e, 1000 * e, {name: values[e - 1] for name, values in history.items()}) for e in (1, 2, 3)]
    counting = CountingClient(client)
    log_epoch(counting, run_ids, epochs[0], [])
    log_epoch(counting, run_ids, epochs[1], [])
    assert [run_id for run_id, _ in counting.batches] == [run_ids["variant"]] * 2  # one request an epoch
    log_epoch(counting, run_ids, epochs[2], epochs)
    assert counting.batches[2:] == [(run_ids["seeds"][0], [1, 2, 3]), (run_ids["seeds"][1], [1, 2, 3]),
                                    (run_ids["variant"], [3])]
    for replica, run_id in enumerate(run_ids["seeds"]):
        logged = client.get_metric_history(run_id, "val_acc")
        assert [(m.step, m.timestamp, m.value) for m in logged] == [(e, 1000 * e, e + replica / 10) for e in (1, 2, 3)]
    assert [m.step for m in client.get_metric_history(run_ids["variant"], "val_acc")] == [1, 2, 3]


def test_mlflows_pickle_warning_is_not_repeated_by_every_train_stage(store, tmp_path):
    client, _ = store
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("mlflow.pytorch")
    logger.addHandler(handler)
    try:
        model = plain_mlp(CONFIG, 0)
        mlflow.pytorch.save_model(model, tmp_path / "saved", serialization_format="pickle")
        assert any(message.startswith("Saving pytorch model by Pickle") for message in seen)  # MLflow says it
        seen.clear()
        log_trained_model(client, start(client), (model, np.zeros((2, 784), dtype=np.float32), 0), [1, 1],
                          [None, None], [])
        assert not any("Pickle" in message for message in seen)
    finally:
        logger.removeHandler(handler)


def test_the_seeded_requirement_modules_are_mlflows_own_entries():
    import importlib_metadata  # what MLflow builds its full map from

    requirements = mlflow.pytorch.get_default_pip_requirements()
    seeded = model_requirement_modules(requirements)
    full = importlib_metadata.packages_distributions()
    assert len(seeded) == len(requirements)
    for module, distributions in seeded.items():
        assert set(distributions) <= set(full[module]), module


def test_a_tracking_process_logs_the_model_without_mapping_every_installed_package(local_tracking):
    """In a fresh process, as a stage's tracking process: prepared, the map is seeded, and the
    logged model's requirements are the ones MLflow writes with the full map."""
    client, _ = connect(local_tracking)
    run_ids = start(client)
    code = f"""
import mlflow, numpy as np
from mlflow.utils import requirements_utils
from pipeline.nn.model import plain_mlp
from pipeline.tracking.runs import log_trained_model, prepare_model_logging
from tests.test_variant_runs import CONFIG
prepare_model_logging(None)
assert set(requirements_utils._MODULES_TO_PACKAGES) == {{"torch", "cloudpickle"}}, "not seeded"
mlflow.set_tracking_uri({local_tracking.uri!r})
log_trained_model(mlflow.MlflowClient(), {run_ids!r}, (plain_mlp(CONFIG, 0), np.zeros((2, 784), np.float32), 0),
                  [1, 1], [None, None], [])
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    [model] = client.search_logged_models(experiment_ids=[client.get_run(run_ids["variant"]).info.experiment_id])
    requirements = Path(mlflow.artifacts.download_artifacts(f"{model.artifact_location}/requirements.txt"))
    assert requirements.read_text().split() == [f"mlflow=={mlflow.__version__}",
                                                *mlflow.pytorch.get_default_pip_requirements()]
