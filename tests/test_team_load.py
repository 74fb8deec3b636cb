"""Load on a team's tracking server: four pipeline executions at once (two clones, each running
two queued DVC experiments with `-j 2`), through a recording proxy. Everything the pipelines sent
(runs, metric points, artifacts) is counted against what PostgreSQL and S3 hold afterwards; the
proxy's timings give the server's throughput and latency under that load."""

from __future__ import annotations

import statistics
import time

import pytest
from mlflow import MlflowClient

from tests.conftest import make_project, run
from tests.dvc_queue import run_queues
from tests.recording_proxy import RecordingProxy
from tests.team_server import BUCKET, create_user, login, postgres_bin, s3_keys, team_stack

pytestmark = [
    pytest.mark.timeout(1200),
    pytest.mark.skipif(postgres_bin("initdb") is None, reason="needs Debian's postgresql (initdb, pg_ctl)"),
]
LRS = {"a": (0.005, 0.002), "b": (0.02, 0.001)}  # clone -> its two experiments' no_norm lr


@pytest.fixture(scope="module")
def load(tmp_path_factory, tiny_mirror):
    """(proxy, server, alice's password, {experiment: status}, seconds) after four executions at once."""
    folder = tmp_path_factory.mktemp("load")
    (folder / "server").mkdir()
    with team_stack(folder / "server") as server:
        alice = create_user(server.uri, server.admin_password, "alice")
        proxy = RecordingProxy(server.port)
        first, env = make_project(folder / "a", tiny_mirror[0])
        env = env | {"MLFLOW_TRACKING_URI": proxy.uri} | login("alice", alice)
        clones = {"a": first, "b": folder / "b"}
        run(["git", "clone", "-q", str(first), str(clones["b"])], folder, env)
        for name, path in clones.items():
            for lr in LRS[name]:
                run(["dvc", "exp", "run", "--queue", "-n", f"load-{name}-{lr}", "-S", f"+variants.no_norm.lr={lr}"],
                    path, env, timeout=60)
        started = time.monotonic()
        names = [f"load-{name}-{lr}" for name, lrs in LRS.items() for lr in lrs]
        statuses = run_queues(clones.values(), env, names, jobs=2)  # four executions at once
        seconds = time.monotonic() - started
        yield proxy, server, alice, statuses, seconds
        proxy.close()


def test_four_executions_at_once_all_succeed(load):
    _, _, _, statuses, _ = load
    assert statuses == {f"load-{clone}-{lr}": "Success" for clone, lrs in LRS.items() for lr in lrs}


def test_every_run_metric_point_and_artifact_sent_is_recorded(load, monkeypatch):
    proxy, server, alice, _, _ = load
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", alice)
    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name("tiny").experiment_id
    runs = client.search_runs([experiment], max_results=1000)
    assert len(runs) == len(proxy.acknowledged("POST", "/runs/create")) == 4 * (1 + 2 * 3)  # compare, 2 x (variant + 2 seeds)
    assert all(r.info.status == "FINISHED" for r in runs)
    # Every point of every metric's history, counted in PostgreSQL itself: one query, where reading
    # each run's and key's history through the basic-auth server takes about 90 s.
    stored_points = server.postgres.scalar("SELECT count(*) FROM metrics")
    sent_points = sum(e.metric_points for e in proxy.exchanges)
    assert stored_points == sent_points > 0
    uploaded = {e.path.split("/mlflow-artifacts/artifacts/", 1)[1].split("?")[0]
                for e in proxy.acknowledged("PUT", "/mlflow-artifacts/artifacts/")}
    stored = {key.removeprefix("artifacts/") for key in s3_keys(server.s3.endpoint)}
    assert uploaded == stored and len(uploaded) > 0, uploaded ^ stored
    assert not [e for e in proxy.exchanges if e.status >= 500], "no server error under load"
    versions = client.search_model_versions("name = 'mnist-mlp'")
    assert len(versions) == 4 and client.get_model_version_by_alias("mnist-mlp", "champion")
    print(f"load: {len(runs)} runs, {sent_points} metric points, {len(uploaded)} artifacts sent and stored "
          f"(bucket {BUCKET})")


def test_throughput_and_latency(load):
    proxy, *_, seconds = load
    latencies = sorted(e.seconds for e in proxy.exchanges)
    p95 = latencies[int(0.95 * (len(latencies) - 1))]
    print(f"load: {len(latencies)} requests in {seconds:.0f} s ({len(latencies) / seconds:.1f} requests/s), "
          f"latency median {statistics.median(latencies) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, "
          f"max {latencies[-1] * 1000:.0f} ms")
    for kind, part in (("log-batch", "/runs/log-batch"), ("artifact upload", "/mlflow-artifacts/artifacts/")):
        times = sorted(e.seconds for e in proxy.exchanges if part in e.path)
        print(f"load: {kind}: {len(times)} requests, p95 {times[int(0.95 * (len(times) - 1))] * 1000:.0f} ms")
    assert len(latencies) > 100
