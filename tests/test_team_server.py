"""The pipeline against a team's server: MLflow on PostgreSQL, artifacts in S3, basic-auth logins."""

import os
import subprocess
import time

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tests.conftest import make_project, run, stage_command, variant_run_ids
from tests.team_server import ADMIN, create_user, login

pytestmark = pytest.mark.timeout(900)
VARIANTS = ("batchnorm", "no_norm")


@pytest.fixture(scope="module")
def team(team_server, alice_password):
    """(server uri, admin password, its S3, alice's password) of the session's stack."""
    return team_server.uri, team_server.admin_password, team_server.s3, alice_password


def client_as(uri: str, user: str, password: str) -> MlflowClient:
    os.environ |= login(user, password)  # MlflowClient reads the login from the environment
    return MlflowClient(uri)


@pytest.fixture(scope="module")
def reproduced(team, tmp_path_factory, tiny_mirror):
    uri, _, _, alice = team
    path, env = make_project(tmp_path_factory.mktemp("team_repro") / "project", tiny_mirror[0])
    env = env | {"MLFLOW_TRACKING_URI": uri} | login("alice", alice)
    result = run(["dvc", "repro"], path, env, timeout=600)
    yield path, env, result
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        os.environ.pop(key, None)


def test_everything_is_recorded_in_postgres_and_s3(team, reproduced):
    uri, _, s3, alice = team
    path, _, _ = reproduced
    client = client_as(uri, "alice", alice)
    experiment = client.get_experiment_by_name("tiny")
    assert experiment.artifact_location.startswith("mlflow-artifacts:"), "artifacts go through the server"
    for variant in VARIANTS:
        ids = variant_run_ids(client, path, variant)
        run_info = client.get_run(ids["variant"])
        assert run_info.info.status == "FINISHED" and run_info.data.params["env.torch"]
        assert [m.step for m in client.get_metric_history(ids["variant"], "val_acc")] == [1, 2]
        assert "test_acc" in run_info.data.metrics
        assert {a.path for a in client.list_artifacts(ids["variant"], "checkpoints")} == {
            "checkpoints/last.pt", "checkpoints/best.pt"}
    keys = s3.keys(f"artifacts/{experiment.experiment_id}/")  # this experiment's, not the session's others
    assert any(key.endswith("checkpoints/last.pt") for key in keys)
    assert any(key.endswith("comparison/summary.md") for key in keys)
    assert any(key.endswith("MLmodel") for key in keys), "the logged models are in S3"
    champion = client.get_model_version_by_alias("mnist-mlp", "champion")
    assert champion.tags["data_digest"]


def test_a_read_only_user_cannot_log_or_delete(team, reproduced):
    uri, admin_password, _, alice = team
    path, _, _ = reproduced
    bob = create_user(uri, admin_password, "bob")  # default permission: READ
    client = client_as(uri, "bob", bob)
    experiment = client.get_experiment_by_name("tiny")
    run_id = variant_run_ids(client, path, "batchnorm")["variant"]
    assert client.get_run(run_id).data.metrics  # reading is allowed
    for attempt in (lambda: client.log_metric(run_id, "val_acc", 0.0),
                    lambda: client.delete_run(run_id),
                    lambda: client.create_run(experiment.experiment_id)):
        with pytest.raises(MlflowException) as refused:
            attempt()
        assert refused.value.error_code == "PERMISSION_DENIED"
    assert client_as(uri, "alice", alice).get_run(run_id).info.lifecycle_stage == "active"


@pytest.mark.parametrize("stage", [("compare",), ("train", "batchnorm")], ids=["compare", "train"])
def test_a_read_only_user_running_the_stage_gets_one_line(team, reproduced, stage):
    uri, admin_password, _, _ = team
    path, env, _ = reproduced
    carol = create_user(uri, admin_password, f"carol-{stage[0]}")
    result = subprocess.run(stage_command(*stage), cwd=path, capture_output=True, text=True,
                            env=env | login(f"carol-{stage[0]}", carol), timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: MLflow refused user 'carol-{stage[0]}': PERMISSION_DENIED")
    assert "Traceback" not in result.stderr
    assert "epoch" not in result.stdout  # a refused train stage trains nothing


@pytest.mark.parametrize("credentials, message", [
    ({"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "wrong"},
     "error: MLFLOW_TRACKING_USERNAME: {uri} refused the credentials of user 'alice' (HTTP 401)"),
    ({}, "error: MLFLOW_TRACKING_URI: {uri} requires a login; set MLFLOW_TRACKING_USERNAME and "
         "MLFLOW_TRACKING_PASSWORD"),
], ids=["wrong-password", "no-login"])
def test_bad_credentials_fail_the_stage_in_seconds_before_training(team, reproduced, credentials, message):
    uri, _, _, _ = team
    path, env, _ = reproduced
    env = {k: v for k, v in env.items() if not k.startswith("MLFLOW_TRACKING_") or k == "MLFLOW_TRACKING_URI"}
    started = time.monotonic()
    result = subprocess.run(stage_command("train", "batchnorm"), cwd=path,
                            capture_output=True, text=True, env=env | credentials, timeout=120)
    seconds = time.monotonic() - started
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [message.format(uri=uri)]
    assert "epoch" not in result.stdout  # nothing trained
    print(f"refused in {seconds:.1f} s")


def test_no_secret_lands_in_outputs_params_or_logs(team, reproduced):
    uri, admin_password, _, alice = team
    path, _, result = reproduced
    secrets = [alice, admin_password]
    logs = result.stdout + result.stderr
    assert not any(secret in logs for secret in secrets)
    for file in [*path.rglob("*")]:
        if file.is_file() and ".git" not in file.parts and file.stat().st_size < 50_000_000:
            content = file.read_bytes()
            assert not any(secret.encode() in content for secret in secrets), file
    client = client_as(uri, ADMIN, admin_password)
    experiment = client.get_experiment_by_name("tiny")
    for found in client.search_runs([experiment.experiment_id]):
        recorded = " ".join([*found.data.params.values(), *found.data.tags.values()])
        assert not any(secret in recorded for secret in secrets), found.info.run_name
