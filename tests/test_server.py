"""The pipeline against a real shared tracking server (`mlflow server` on loopback).

A team points every `dvc repro` at one server with MLFLOW_TRACKING_URI; runs, metrics,
checkpoints, logged models and registry versions all go there (artifacts through the
server's proxy), and nothing is tracked in the project. A server that is not there costs no
training: the stage says in one line that the record waits.
"""

from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import make_project, run, stage_command, variant_run_ids
from tests.mlflow_server import free_port, start_server, stop

VARIANTS = ("batchnorm", "no_norm")

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """A real tracking server with its own SQLite store and proxied artifact store."""
    folder = tmp_path_factory.mktemp("server")
    process, uri = start_server(
        folder, f"sqlite:///{folder / 'server.db'}",
        "--serve-artifacts", "--artifacts-destination", str(folder / "artifacts"),
    )
    yield uri, folder
    stop(process)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_mirror):
    """A tiny project with data prepared (and nothing tracked yet)."""
    path, env = make_project(tmp_path_factory.mktemp("server_project") / "project", tiny_mirror[0])
    env = env | {"DVC_NO_ANALYTICS": "1"}
    run(["dvc", "repro", "prepare"], path, env, timeout=180)
    return path, env


def test_an_unreachable_server_costs_no_training_and_says_so_in_one_line(prepared):
    path, env = prepared
    uri = f"http://127.0.0.1:{free_port()}"  # closed: nothing listens there
    result = run(stage_command("train", "batchnorm"), path, env | {"MLFLOW_TRACKING_URI": uri}, timeout=300)
    assert result.stderr.strip().splitlines() == [
        f"warning: the MLflow record waits: MLFLOW_TRACKING_URI: cannot reach {uri} ([Errno 111] "
        "Connection refused); the next `dvc repro` or `make publish` completes it from the outputs"]
    assert (path / "data" / "checkpoints" / "batchnorm" / "last.pt").exists(), "it trained"
    assert not (path / "mlflow.db").exists()


@pytest.fixture(scope="module")
def reproduced(prepared, tracking_server):
    path, env = prepared
    uri, _ = tracking_server
    run(["dvc", "repro"], path, env | {"MLFLOW_TRACKING_URI": uri}, timeout=480)
    return path, MlflowClient(uri)


def test_repro_tracks_everything_on_the_server(reproduced, tracking_server):
    path, client = reproduced
    _, server_folder = tracking_server
    experiment = client.get_experiment_by_name("tiny")
    assert experiment.artifact_location.startswith("mlflow-artifacts:"), "artifacts go through the server"
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}

    group = runs["compare"]
    assert group.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(group.info.run_id, "comparison")} >= {
        "comparison/train_loss.png", "comparison/val_acc.png", "comparison/summary.md"}
    for variant in VARIANTS:
        variant_run = runs[variant]
        run_id = variant_run.info.run_id
        assert run_id == variant_run_ids(client, path, variant)["variant"]
        assert variant_run.info.status == "FINISHED"
        assert variant_run.data.tags["mlflow.parentRunId"] == group.info.run_id
        for metric in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert [m.step for m in client.get_metric_history(run_id, metric)] == [1, 2]
        assert "test_acc" in variant_run.data.metrics
        assert {a.path for a in client.list_artifacts(run_id, "checkpoints")} == {
            "checkpoints/last.pt", "checkpoints/best.pt"}
        models = client.search_logged_models([experiment.experiment_id],
                                             filter_string=f"source_run_id = '{run_id}' AND name = 'model'")
        assert len(models) == 1
        assert "MLmodel" in {Path(a.path).name for a in client.list_logged_model_artifacts(models[0].model_id)}

    champion = client.get_model_version_by_alias("mnist-mlp", "champion")
    assert champion.tags["variant"] in VARIANTS
    # The artifacts are on the server's disk, not in the project.
    stored = {p.name for p in (server_folder / "artifacts").rglob("*") if p.is_file()}
    assert {"last.pt", "best.pt", "MLmodel", "val_acc.png"} <= stored
    assert not (path / "mlflow.db").exists()
    assert not (path / "mlartifacts").exists()
    assert not (path / "mlruns").exists()
