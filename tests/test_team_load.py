"""Load on a team's tracking server: four pipeline executions at once (two clones, each running
two queued DVC experiments with `-j 2`), through a recording proxy. Everything the pipelines sent
(runs, metric points, artifacts) is counted against what PostgreSQL and S3 hold afterwards; the
proxy's timings give the server's throughput and latency under that load."""

import statistics
import time

import pytest
import yaml
from mlflow import MlflowClient
from mlflow.entities import ViewType

from tests.conftest import make_project, run
from tests.dvc_queue import run_queues
from tests.recording_proxy import RecordingProxy
from tests.team_server import login

pytestmark = pytest.mark.timeout(1200)
LRS = {"a": (0.005, 0.002), "b": (0.02, 0.001)}  # clone -> its two experiments' no_norm lr
EXPERIMENT, MODEL = "load", "load-mlp"  # of this module's own on the session's server


@pytest.fixture(scope="module")
def load(tmp_path_factory, tiny_mirror, team_server, alice_password):
    """(proxy, server, alice's password, {experiment: status}, seconds) after four executions at once."""
    folder = tmp_path_factory.mktemp("load")
    proxy = RecordingProxy(team_server.port)
    first, env = make_project(folder / "a", tiny_mirror[0])
    env = env | {"MLFLOW_TRACKING_URI": proxy.uri} | login("alice", alice_password)
    params = yaml.safe_load((first / "params.yaml").read_text())
    params["mlflow"]["experiment_name"], params["compare"]["registered_model"] = EXPERIMENT, MODEL
    (first / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "commit", "-qam", f"experiment {EXPERIMENT}, model {MODEL}"], first, env)
    clones = {"a": first, "b": folder / "b"}
    run(["git", "clone", "-q", str(first), str(clones["b"])], folder, env)
    experiments = {path: {f"load-{name}-{lr}": ["-S", f"+variants.no_norm.lr={lr}"] for lr in LRS[name]}
                   for name, path in clones.items()}
    started = time.monotonic()
    statuses = run_queues(experiments, env, jobs=2)  # four executions at once
    seconds = time.monotonic() - started
    yield proxy, team_server, alice_password, statuses, seconds
    proxy.close()


def test_four_executions_at_once_all_succeed(load):
    _, _, _, statuses, _ = load
    assert statuses == {f"load-{clone}-{lr}": "Success" for clone, lrs in LRS.items() for lr in lrs}


def test_every_run_metric_point_and_artifact_sent_is_recorded(load, monkeypatch):
    proxy, server, alice, _, _ = load
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", alice)
    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    made = client.search_runs([experiment], max_results=1000, run_view_type=ViewType.ALL)
    assert len(made) == len(proxy.acknowledged("POST", "/runs/create"))
    # Each execution: its compare run and its no_norm's three (variant + 2 seeds). The four train
    # batch norm from the same inputs, so they share its three runs (found by the inputs digest); a
    # stage that made one at the same moment as another deletes its own (record.variant_runs as it makes it, or
    # again at the stage's end, where neither had seen the other's yet).
    runs = client.search_runs([experiment], max_results=1000)
    assert len(runs) == 4 * (1 + 3) + 3, sorted(r.info.run_name for r in runs)
    unfinished = {r.info.run_name: r.info.status for r in runs if r.info.status != "FINISHED"}
    assert not unfinished, unfinished
    # Every point of every metric's history, counted in PostgreSQL itself: one query, where reading
    # each run's and key's history through the basic-auth server takes about 90 s.
    stored_points = server.postgres.scalar("SELECT count(*) FROM metrics WHERE run_uuid IN "
                                           f"(SELECT run_uuid FROM runs WHERE experiment_id = {int(experiment)})")
    sent_points = sum(e.metric_points for e in proxy.exchanges)
    assert stored_points == sent_points > 0
    uploaded = {e.path.split("/mlflow-artifacts/artifacts/", 1)[1].split("?")[0]
                for e in proxy.acknowledged("PUT", "/mlflow-artifacts/artifacts/")}
    stored = {key.removeprefix("artifacts/") for key in server.s3.keys(f"artifacts/{experiment}/")}
    assert uploaded == stored and len(uploaded) > 0, uploaded ^ stored
    assert not [e for e in proxy.exchanges if e.status >= 500], "no server error under load"
    versions = client.search_model_versions(f"name = '{MODEL}'")
    # A version per distinct trained model registered: the same batch-norm model from each execution
    # is one version, a no_norm that wins is one of its own.
    assert len({v.tags["inputs_digest"] for v in versions}) == len(versions) >= 1
    assert client.get_model_version_by_alias(MODEL, "champion")
    print(f"load: {len(runs)} runs, {sent_points} metric points, {len(uploaded)} artifacts sent and stored "
          f"(bucket {server.s3.bucket})")


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
