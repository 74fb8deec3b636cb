"""The MLflow record (pipeline/tracking/record.py): one idempotent mirror of a variant's outputs,
live while its train stage trains; a store that cannot take it costs no training, and `publish`
completes it once the store is back."""

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.reports import METRICS
from pipeline.tracking.record import (SEED_TAG, VariantOutputs, close_runs, flatten, log_new_epochs, mirror_variant,
                                     variant_runs)
from pipeline.tracking.store import INPUTS_TAG, PARENT_TAG, connect
from tests.conftest import run, stage_env, tiny_mnist_arrays, tiny_params, variant_run_ids, write_mirror
from tests.faults import full_disk, read_only
from tests.mlflow_server import free_port, start_server, stop
from tests.test_train import TRAIN, make_prepared, paths

CONFIG = tiny_params().variant("batchnorm")  # seeds 0 and 1
RUN = {"variant": "batchnorm", "inputs_digest": "inputs-1", "config": CONFIG.model_dump(exclude={"name"}),
       "seeds": [0, 1], "dataset": {"digest": "d1g3st", "sizes": {"train": 500, "val": 100, "test": 200}}}
ENVIRONMENT = {"python": "3.12.1", "packages": {"torch": "2.9.0"}}
PUBLISH = [sys.executable, "-m", "pipeline.commands.publish"]


def live(epochs: int) -> VariantOutputs:
    """A training variant's state after `epochs`: epoch e, seed s holds e + s / 10."""
    history = {name: [[e + s / 10 for s in (0, 1)] for e in range(1, epochs + 1)] for name in METRICS}
    return VariantOutputs(RUN, ENVIRONMENT, history)


def test_flatten_gives_mlflows_dotted_keys():
    assert flatten("", {"a": 1, "b": {"c": [2, 3], "d": {"e": None}}}) == {"a": "1", "b.c": "[2, 3]", "b.d.e": "None"}


def test_the_mirror_adds_only_what_the_store_lacks(local_tracking):
    client, experiment = connect(local_tracking)
    ids = mirror_variant(client, experiment, live(2))
    variant = client.get_run(ids["variant"])
    assert variant.info.run_name == "batchnorm" and variant.data.tags[INPUTS_TAG] == "inputs-1"
    assert variant.data.params["norm"] == "batch" and variant.data.params["replicas"] == "2"
    assert variant.data.params["env.torch"] == "2.9.0" and "name" not in variant.data.params
    children = [client.get_run(run_id) for run_id in ids["seeds"]]
    assert [(c.info.run_name, c.data.params["seed"], c.data.tags[SEED_TAG]) for c in children] == [
        ("batchnorm-seed0", "0", "0"), ("batchnorm-seed1", "1", "1")]
    assert all(c.data.tags[PARENT_TAG] == ids["variant"] for c in children)
    for run_id in (ids["variant"], *ids["seeds"]):
        assert [d.dataset.digest for d in client.get_run(run_id).inputs.dataset_inputs] == ["d1g3st"]

    # A fresh process (no memory of what it logged) over a longer history: epoch 3 only, once.
    assert mirror_variant(client, experiment, live(3)) == ids
    assert mirror_variant(client, experiment, live(3)) == ids
    for run_id in (ids["variant"], *ids["seeds"]):
        for name in METRICS:
            assert [m.step for m in client.get_metric_history(run_id, name)] == [1, 2, 3], (run_id, name)
    means = client.get_metric_history(ids["variant"], "val_acc")
    assert [(m.step, m.value) for m in means] == [(e, pytest.approx(e + 0.05)) for e in (1, 2, 3)]
    assert [m.value for m in client.get_metric_history(ids["seeds"][1], "val_acc")] == [1.1, 2.1, 3.1]
    assert {client.get_run(r).info.status for r in (ids["variant"], *ids["seeds"])} == {"RUNNING"}
    assert len(client.search_runs([experiment])) == 3  # no second set of runs


def test_log_models_warm_up_is_paid_only_where_the_run_has_no_model_yet(local_tracking):
    """The train stage's tracking process pays log_model's one-off costs early (the flavor's
    import, MLflow's map of installed modules) only where the run will log a model: a rerun of
    the same inputs logs none."""
    import mlflow.pytorch
    import torch

    from pipeline.tracking.record import MODEL_NAME

    client, experiment = connect(local_tracking)
    run_id = client.create_run(experiment).info.run_id
    warmed = ("import sys; from pathlib import Path; from pipeline.tracking.store import Tracking, connect; "
              "from pipeline.tracking.record import warm_model_logging; "
              f"tracking = Tracking({local_tracking.uri!r}, Path({str(local_tracking.root)!r}), 'lab'); "
              f"warm_model_logging(*connect(tracking), {run_id!r}); print('mlflow.pytorch' in sys.modules)")
    env = stage_env()
    assert run([sys.executable, "-c", warmed], local_tracking.root, env).stdout.split() == ["True"]
    with mlflow.start_run(run_id=run_id):
        mlflow.pytorch.log_model(torch.nn.Linear(1, 1), name=MODEL_NAME, serialization_format="pickle",
                                 pip_requirements=[])
    assert run([sys.executable, "-c", warmed], local_tracking.root, env).stdout.split() == ["False"]


def test_a_stopped_stage_closes_its_runs_and_a_live_mirror_does_not_reopen_them(local_tracking):
    client, experiment = connect(local_tracking)
    ids = mirror_variant(client, experiment, live(1))
    other = mirror_variant(client, experiment, VariantOutputs(RUN | {"inputs_digest": "inputs-2"}, ENVIRONMENT,
                                                              live(1).history))
    close_runs(client, experiment, "inputs-1", "KILLED")
    mirror_variant(client, experiment, live(2))
    assert {client.get_run(r).info.status for r in (ids["variant"], *ids["seeds"])} == {"KILLED"}
    assert {client.get_run(r).info.status for r in (other["variant"], *other["seeds"])} == {"RUNNING"}


def test_of_two_runs_made_at_once_the_later_is_deleted_by_its_own_stage_at_its_end(local_tracking):
    client, experiment = connect(local_tracking)
    ours = mirror_variant(client, experiment, live(1))  # this stage's runs
    # Another stage's run of seed 0, made at the same moment and earlier by its clock, which
    # neither stage's search had seen (record.variant_runs kept both).
    start = client.get_run(ours["seeds"][0]).info.start_time - 1
    theirs = client.create_run(experiment, run_name="batchnorm-seed0", start_time=start, tags={
        INPUTS_TAG: "inputs-1", "variant": "batchnorm", SEED_TAG: "0", PARENT_TAG: ours["variant"]}).info.run_id
    settled = variant_runs(client, experiment, live(2), ours)
    assert settled == {"variant": ours["variant"], "seeds": [theirs, ours["seeds"][1]]}
    assert client.get_run(ours["seeds"][0]).info.lifecycle_stage == "deleted"
    assert client.get_run(theirs).data.params["seed"] == "0"  # completed where the other stage had not yet
    assert sorted(r.info.run_name for r in client.search_runs([experiment])) == [
        "batchnorm", "batchnorm-seed0", "batchnorm-seed1"]


class CountingClient:
    """The real client, counting its log_batch calls and the epochs each carried."""

    def __init__(self, client) -> None:
        self.client, self.batches = client, []

    def get_metric_history(self, run_id, key):
        return self.client.get_metric_history(run_id, key)

    def log_batch(self, run_id, metrics=(), **kwargs):
        self.batches.append(sorted({m.step for m in metrics}))
        return self.client.log_batch(run_id, metrics=metrics, **kwargs)


def test_epochs_are_never_split_between_two_calls(local_tracking):
    client, experiment = connect(local_tracking)
    run_id = client.create_run(experiment).info.run_id
    counting = CountingClient(client)
    epochs = [{"val_acc": e / 1000, **{f"m{i}": e + i / 10 for i in range(6)}} for e in range(1, 301)]
    log_new_epochs(counting, run_id, epochs, {})  # 2,100 metrics: over MLflow's limit of 1,000 a call
    assert [len(steps) for steps in counting.batches] == [142, 142, 16]  # 994 metrics at most a call
    assert [m.step for m in client.get_metric_history(run_id, "m5")] == list(range(1, 301))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("record_mirror")
    write_mirror(folder, tiny_mnist_arrays(train=4200, test=200))  # ~0.2 s an epoch (batch 4)
    return folder


def one_variant(path: Path) -> Path:
    """The project's params with batchnorm alone, so that `publish` finds every variant trained."""
    raw = yaml.safe_load((path / "params.yaml").read_text())
    raw["variants"] = {"batchnorm": raw["variants"]["batchnorm"]}
    raw["compare"]["reference"] = "batchnorm"
    (path / "params.yaml").write_text(yaml.safe_dump(raw))
    return path


def test_the_metric_history_grows_while_the_stage_trains(tmp_path, tiny):
    from mlflow import MlflowClient

    path = make_prepared(tmp_path / "project", tiny, epochs=30)  # past the record's start (~4 s)
    server, uri = start_server(tmp_path, f"sqlite:///{tmp_path / 'server.db'}")
    client, seen = MlflowClient(uri), set()
    stage = subprocess.Popen(TRAIN, cwd=path, env=stage_env(MLFLOW_TRACKING_URI=uri), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while stage.poll() is None and time.monotonic() < deadline:
            experiment = client.get_experiment_by_name("tiny")
            runs = client.search_runs([experiment.experiment_id], "attributes.run_name = 'batchnorm'") if experiment else []
            if runs:
                seen.add(len(client.get_metric_history(runs[0].info.run_id, "val_acc")))
            time.sleep(0.2)
        assert stage.wait(timeout=60) == 0, stage.stderr.read()
    finally:
        stage.kill()
        stop(server)
    assert len(seen & set(range(1, 30))) >= 2, f"epochs logged, as seen while it trained: {sorted(seen)}"


def store_fault(kind: str, folder: Path):
    """(MLFLOW_TRACKING_URI, the fault as a context manager, what the line names)."""
    database = folder / "mlflow.db"
    if kind == "down":
        uri = f"http://127.0.0.1:{free_port()}"
        return uri, None, f"MLFLOW_TRACKING_URI: cannot reach {uri} ("
    if kind == "corrupted":
        folder.mkdir()
        database.write_bytes(os.urandom(64 << 10))
        return f"sqlite:///{database}", None, (f"MLflow store {database} is corrupted (file is not a database); move "
                                               "it aside: `make publish` rebuilds every run from the outputs")
    fault, said = {"read-only": (read_only, f"MLflow store {database}: {folder} is not writable"),
                   "full": (full_disk, f"MLflow store {database}: no space left on its disk")}[kind]
    return f"sqlite:///{database}", fault, said


def restore(kind: str, uri: str, folder: Path):
    """The store back: a server where none answered, the corrupted file moved aside."""
    if kind == "down":
        folder.mkdir(exist_ok=True)
        return start_server(folder, f"sqlite:///{folder / 'server.db'}", port=int(uri.rsplit(":", 1)[1]))[0]
    if kind == "corrupted":
        (folder / "mlflow.db").rename(folder / "mlflow.db.corrupt")
    return None


@pytest.mark.faults
@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", ["down", "read-only", "full", "corrupted"])
def test_a_broken_store_costs_no_training_and_publish_completes_the_record(tmp_path, tiny, kind):
    path = one_variant(make_prepared(tmp_path / "project", tiny, epochs=2))
    uri, fault, said = store_fault(kind, tmp_path / "store")
    env = stage_env(MLFLOW_TRACKING_URI=uri)
    with fault(tmp_path / "store") if fault else contextlib.nullcontext():
        started = time.monotonic()
        trained = run(TRAIN, path, env, check=False, timeout=300)
        print(f"{kind}: the stage ended in {time.monotonic() - started:.1f} s")
        refused = run(PUBLISH, path, env, check=False, timeout=120)
    assert trained.returncode == 0, trained.stderr
    assert (paths(path).out / "run.json").exists() and (paths(path).checkpoints / "last.pt").exists()
    assert "epoch 2/2" in trained.stdout
    [line] = trained.stderr.strip().splitlines()
    assert line.startswith(f"warning: the MLflow record waits: {said}") and line.endswith(
        "the next `dvc repro` or `make publish` completes it from the outputs"), line
    [line] = refused.stderr.strip().splitlines()  # compare and publish end with the same line
    assert refused.returncode == 1 and line.startswith(f"error: {said}"), refused.stderr

    server = restore(kind, uri, tmp_path / "store")
    try:
        run(PUBLISH, path, env, timeout=300)
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        ids = variant_run_ids(client, path, "batchnorm")
        for run_id in (ids["variant"], *ids["seeds"]):
            assert [m.step for m in client.get_metric_history(run_id, "val_acc")] == [1, 2]
        experiment = client.get_experiment_by_name("tiny").experiment_id
        assert not client.search_runs([experiment], "attributes.status = 'RUNNING'")
    finally:
        stop(server)
