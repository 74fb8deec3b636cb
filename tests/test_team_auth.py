"""The team server's logins with the credential cache on (deploy/basic_auth.ini): a changed
password or a deleted user refused by every worker within the cache's TTL, a wrong password
never let in, the start script's one-line refusals, and no secret in its command lines, its log
or its state folder."""

import base64
import configparser
import importlib.util
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.team_server import AUTH_CONFIG, START_SCRIPT, auth_config_with, create_user, postgres_bin, team_stack

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(postgres_bin("initdb") is None, reason="needs Debian's postgresql (initdb, pg_ctl)"),
]
TTL_S = 3  # the test's TTL: the shipped one (60 s) works the same, only slower to wait out
REQUESTS = 24  # new connections each: spread over the server's workers, each with its own cache


def test_the_shipped_config_turns_the_cache_on_with_the_ttl_the_docs_state(monkeypatch):
    from mlflow.server.auth.config import read_auth_config

    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(AUTH_CONFIG))
    assert read_auth_config().auth_cache_ttl_seconds == 60  # as MLflow reads it
    settings = configparser.ConfigParser()
    settings.read(AUTH_CONFIG)
    assert "admin_password" not in settings["mlflow"]  # the first password comes from the environment


def test_the_server_sends_no_telemetry_unless_its_environment_says_so(tmp_path):
    spec = importlib.util.spec_from_file_location("start_server", START_SCRIPT)
    start_server = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(start_server)
    env = {"MLFLOW_BACKEND_STORE_URI": "sqlite:///x.db", "MLFLOW_ARTIFACTS_DESTINATION": "s3://bucket/artifacts",
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "k", "MLFLOW_AUTH_ADMIN_PASSWORD": "p"}
    assert start_server.server_environment(env, tmp_path)["MLFLOW_DISABLE_TELEMETRY"] == "true"
    chosen = env | {"MLFLOW_DISABLE_TELEMETRY": "false"}
    assert start_server.server_environment(chosen, tmp_path)["MLFLOW_DISABLE_TELEMETRY"] == "false"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("auth")
    config = auth_config_with(tmp_path_factory.mktemp("auth_config"), auth_cache_ttl_seconds=TTL_S)
    with team_stack(folder, auth_config=config) as server:
        yield server


def statuses(server, user: str, password: str) -> set[int]:
    """The HTTP statuses of REQUESTS requests as `user`, each on a connection of its own."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    found = set()
    for _ in range(REQUESTS):
        request = urllib.request.Request(f"{server.uri}/api/2.0/mlflow/experiments/search?max_results=1",
                                         headers={"Authorization": f"Basic {token}"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                found.add(response.status)
        except urllib.error.HTTPError as error:
            found.add(error.code)
    return found


def as_admin(server, monkeypatch):
    from mlflow.server.auth.client import AuthServiceClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", server.admin_password)
    return AuthServiceClient(server.uri)


def test_a_changed_password_is_refused_within_the_ttl(server, monkeypatch):
    old = create_user(server.uri, server.admin_password, "dave")
    assert statuses(server, "dave", old) == {200}  # cached by the workers that answered
    as_admin(server, monkeypatch).update_user_password("dave", new := "another-Passw0rd-for-dave")
    time.sleep(TTL_S + 1)
    assert statuses(server, "dave", old) == {401}
    assert statuses(server, "dave", new) == {200}


def test_a_deleted_user_is_refused_within_the_ttl(server, monkeypatch):
    password = create_user(server.uri, server.admin_password, "erin")
    assert statuses(server, "erin", password) == {200}
    as_admin(server, monkeypatch).delete_user("erin")
    time.sleep(TTL_S + 1)
    assert statuses(server, "erin", password) == {401}


def test_a_wrong_password_is_refused_next_to_a_cached_right_one(server):
    password = create_user(server.uri, server.admin_password, "frank")
    assert statuses(server, "frank", password) == {200}
    assert statuses(server, "frank", password + "x") == {401}


def test_no_secret_in_the_servers_command_lines_log_or_state_folder(server):
    secrets = [server.admin_password, server.secret_key, server.postgres.password,
               create_user(server.uri, server.admin_password, "grace")]
    assert statuses(server, "grace", secrets[-1]) == {200}
    processes = subprocess.run(["ps", "-o", "args=", "--sid", str(server.process.pid)], capture_output=True,
                               text=True, check=True, timeout=30).stdout.splitlines()  # the server, uvicorn and its workers
    assert len(processes) >= 3 and not [line for line in processes if any(secret in line for secret in secrets)]
    for file in server.folder.rglob("*"):  # the user store holds hashes, the log no password
        if file.is_file():
            assert not any(secret.encode() in file.read_bytes() for secret in secrets), file


@pytest.mark.parametrize("missing, message", [
    ("MLFLOW_BACKEND_STORE_URI", "error: MLFLOW_BACKEND_STORE_URI is not set: the runs' database, e.g. "
                                 "postgresql+psycopg2://user:password@host:5432/mlflow"),
    ("MLFLOW_AUTH_ADMIN_PASSWORD", "error: MLFLOW_AUTH_ADMIN_PASSWORD is not set: {state} has no user store yet, "
                                   "and its first start creates the admin with that password"),
])
def test_the_start_script_names_what_is_missing_in_one_line(tmp_path, missing, message):
    env = {"MLFLOW_BACKEND_STORE_URI": "postgresql+psycopg2://mlflow:x@127.0.0.1:1/mlflow",
           "MLFLOW_ARTIFACTS_DESTINATION": "s3://bucket/artifacts", "MLFLOW_FLASK_SERVER_SECRET_KEY": "k",
           "MLFLOW_AUTH_ADMIN_PASSWORD": "p"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | env
    del env[missing]
    result = subprocess.run([sys.executable, str(START_SCRIPT), "--state-dir", str(tmp_path / "state")],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [message.format(state=tmp_path / "state")]
