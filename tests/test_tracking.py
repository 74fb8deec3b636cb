"""MLflow plumbing (pipeline/tracking/store.py): where the store is, a server checked in seconds with its
failures as one line (a refusal or a store that is down), the experiment made once with its tags."""

import functools
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import PERMISSION_DENIED

from pipeline.tracking.store import (
    EXPERIMENT_TAGS,
    Tracking,
    TrackingError,
    check_server,
    connect,
    StoreDown,
    check_sqlite,
    one_line,
    project_root,
    runs_page,
)
from tests.conftest import project_client, run, stage_env
from tests.mlflow_server import free_port


def test_project_root_is_the_repository_also_from_a_dvc_experiment_copy(tmp_path):
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpab12" / "data"
    copy.mkdir(parents=True)
    assert project_root(copy) == tmp_path.resolve()
    assert project_root(tmp_path / "data") == (tmp_path / "data").resolve()


def test_from_environment_defaults_to_the_sqlite_store_at_the_project_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    local = Tracking.from_environment("lab", tmp_path / ".dvc" / "tmp" / "exps" / "x")
    assert (local.uri, local.root) == (f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}", tmp_path.resolve())
    assert local.is_local
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    shared = Tracking.from_environment("lab", tmp_path)
    assert shared.uri == "http://127.0.0.1:5000" and not shared.is_local


def test_runs_page_says_how_to_open_a_local_store_and_links_a_server(tmp_path):
    local = runs_page(Tracking(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path, "lab"), "3")
    assert local == (f"`mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}`, then "
                     "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning")
    served = runs_page(Tracking("http://mlflow.example:5000/", tmp_path, "lab"), "3")
    assert served == "http://mlflow.example:5000/#/experiments/3/runs?workflowType=machine_learning"


def test_check_server_fails_in_seconds_on_a_port_nobody_listens_on():
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(StoreDown) as caught:  # an outage: the train stage trains on, the record waits
        check_server(uri)
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert message.startswith(f"MLFLOW_TRACKING_URI: cannot reach {uri} (") and "\n" not in message


@pytest.fixture
def web_server_without_mlflow(tmp_path):
    """A plain HTTP server on loopback (an empty folder): what a mistyped port may point at."""
    quiet = type("Quiet", (SimpleHTTPRequestHandler,), {"log_message": lambda *args: None})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(quiet, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_check_server_names_the_status_of_a_server_that_is_not_mlflow(web_server_without_mlflow):
    with pytest.raises(TrackingError, match=r"^MLFLOW_TRACKING_URI: http://127\.0\.0\.1:\d+ answered HTTP 404 "
                                            r"on /health$"):
        check_server(web_server_without_mlflow)


def test_connect_makes_the_experiment_once_with_its_tags_and_artifacts_at_the_root(local_tracking):
    client, experiment = connect(local_tracking)
    assert connect(local_tracking)[1] == experiment  # found again, not made twice
    made = project_client(local_tracking.root).get_experiment(experiment)
    assert made.name == "lab" and EXPERIMENT_TAGS.items() <= made.tags.items()
    assert made.artifact_location == (local_tracking.root / "mlartifacts").as_uri()
    assert mlflow.get_tracking_uri() == local_tracking.uri


def test_connect_opens_mlflow_with_its_telemetry_off_unless_the_user_chose(tmp_path):
    """In a user's shell a stage's MLflow would phone its makers. Nothing is sent here either way:
    the check is that MLflow started no telemetry client, and that a user's own value stays."""
    script = ("import os; from pathlib import Path; from pipeline.tracking.store import Tracking, connect; "
              f"connect(Tracking('sqlite:///{tmp_path / 'mlflow.db'}', Path('{tmp_path}'), 'lab')); "
              "from mlflow.telemetry.client import get_telemetry_client; "
              "from mlflow.telemetry.utils import _is_ci_env_or_testing; "
              "print(_is_ci_env_or_testing(), get_telemetry_client() is None, os.environ['MLFLOW_DISABLE_TELEMETRY'])")
    # A user's shell: none of the variables by which MLflow takes a process for CI or a test.
    env = {k: v for k, v in stage_env().items() if k in ("PATH", "PYTHONPATH", "HOME", "LANG")}
    assert run([sys.executable, "-c", script], tmp_path, env).stdout.split() == ["False", "True", "true"]
    kept = run([sys.executable, "-c", script], tmp_path, env | {"MLFLOW_DISABLE_TELEMETRY": "1"})
    assert kept.stdout.split() == ["False", "True", "1"]


def test_connect_tags_an_experiment_made_before_the_tags_existed(local_tracking):
    older = project_client(local_tracking.root).create_experiment("lab")
    _, experiment = connect(local_tracking)
    assert experiment == older
    assert EXPERIMENT_TAGS.items() <= project_client(local_tracking.root).get_experiment(older).tags.items()


def test_check_sqlite_names_a_corrupted_file_and_the_way_out(tmp_path):
    database = tmp_path / "mlflow.db"
    check_sqlite(database)  # none yet: MLflow makes it
    database.write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 16)
    with pytest.raises(StoreDown) as caught:
        check_sqlite(database)
    assert str(caught.value).startswith(f"MLflow store {database} is corrupted (")
    assert str(caught.value).endswith("move it aside: `make publish` rebuilds every run from the outputs, nothing "
                                      "is lost")


def test_one_line_names_the_refused_user_and_takes_other_errors_for_an_outage(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "carol")
    with pytest.raises(TrackingError) as caught, one_line("uri"):
        raise MlflowException("Permission denied for experiment 1.\nmore detail", error_code=PERMISSION_DENIED)
    assert type(caught.value) is TrackingError  # a refusal, not an outage
    assert str(caught.value) == "MLflow refused user 'carol': PERMISSION_DENIED (Permission denied for experiment 1.)"
    with pytest.raises(StoreDown), one_line("uri"):
        project_client(tmp_path).get_run("0" * 32)  # not a refusal
    with pytest.raises(KeyError), one_line("uri"):
        raise KeyError("a bug")  # as it is


def test_one_line_turns_an_exhausted_request_into_one_line(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StoreDown) as caught, one_line(uri):
        MlflowClient(uri).get_experiment_by_name("lab")
    message = str(caught.value)
    assert message.startswith(f"MLflow store {uri}: API request to {uri}/api/") and "\n" not in message
