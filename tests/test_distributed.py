"""A sweep (a 4-point grid) on a real Dask cluster (a scheduler and two worker processes on 127.0.0.1) with the
team's stack: MLflow on PostgreSQL, artifacts and the DVC remote in S3 (moto). Each variant's
stages run as a task in a worker's own clone; the coordinator's `dvc repro` then restores every
one from the run-cache and trains nothing. A worker killed mid-training: the sweep completes all the
same, with exactly one finished MLflow run per variant and seed, none left RUNNING: the retry
continues the runs of the killed attempt (found by their inputs digest) and finishes them."""

import json
import os
import subprocess
import sys
import time

import psutil
import pytest
import yaml
from mlflow import MlflowClient

from pipeline.commands.distributed import committed_head, run_sweep
from pipeline.errors import PipelineError
from tests.conftest import make_project, run, stage_env
from tests.dask_cluster import Cluster
from tests.team_server import S3_CREDENTIALS, login

pytestmark = pytest.mark.timeout(1200)
GRID = {"lr": [0.01, 1.0e30], "norm": ["batch", "none"]}  # four grid points; the two at lr 1e30 diverge
EXPERIMENT, MODEL = "sweep", "sweep-mlp"  # of this module's own on the session's server


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_mirror, team_server, alice_password):
    """(project, env for its commands, cluster, server, alice's login, variants) with a 4-point grid committed."""
    folder = tmp_path_factory.mktemp("distributed")
    (folder / "cluster").mkdir()
    server, alice = team_server, login("alice", alice_password)
    path, env = make_project(folder / "project", tiny_mirror[0])
    env = env | {"MLFLOW_TRACKING_URI": server.uri} | alice | {
        "AWS_ACCESS_KEY_ID": S3_CREDENTIALS["aws_access_key_id"],
        "AWS_SECRET_ACCESS_KEY": S3_CREDENTIALS["aws_secret_access_key"],
        "AWS_DEFAULT_REGION": S3_CREDENTIALS["region_name"]}
    params = yaml.safe_load((path / "params.yaml").read_text())
    params |= {"sweep": {"axes": GRID}, "variants": {}}
    params["compare"] |= {"reference": "sweep-none-lr0p01", "registered_model": MODEL}
    params["mlflow"]["experiment_name"] = EXPERIMENT
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run([sys.executable, "-m", "pipeline.commands.sweep"], path, env)
    variants = list(yaml.safe_load((path / "params.yaml").read_text())["variants"])
    assert len(variants) == 4 and "sweep-none-lr0p01" in variants, variants
    run(["dvc", "remote", "add", "-d", "team", f"s3://{server.s3.bucket}/dvc"], path, env)
    run(["dvc", "remote", "modify", "team", "endpointurl", server.s3.endpoint], path, env)
    run(["git", "commit", "-qam", "a 4-point grid on the team's remote"], path, env)
    cluster = Cluster(folder / "cluster", env)
    try:
        cluster.start(workers=2)
        yield path, env | {"DASK_SCHEDULER_ADDRESS": cluster.address}, cluster, server, alice, variants
    finally:
        cluster.stop()


def test_a_local_store_or_an_uncommitted_change_is_refused_before_the_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://127.0.0.1:1")  # nothing listens: never reached
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(PipelineError, match=r"^MLFLOW_TRACKING_URI: the workers need a tracking server they all "):
        run_sweep(tmp_path, str(tmp_path))
    env = stage_env()
    run(["git", "init", "-q", "-b", "main"], tmp_path, env)
    for name in ("params.yaml", "dvc.lock"):
        (tmp_path / name).write_text("a: 1\n")
    run(["git", "add", "-A"], tmp_path, env)
    run(["git", "commit", "-qm", "init"], tmp_path, env)
    (tmp_path / "dvc.lock").write_text("a: 2\n")  # the coordinator's own repro rewrites it
    assert committed_head(tmp_path) == run(["git", "rev-parse", "HEAD"], tmp_path, env).stdout.strip()
    (tmp_path / "params.yaml").write_text("a: 2\n")
    with pytest.raises(PipelineError, match=r"^params.yaml: uncommitted change; the workers run the committed code"):
        committed_head(tmp_path)


def distributed(path, env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.commands.distributed"], cwd=path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(process: subprocess.Popen) -> tuple[str, str]:
    out, err = process.communicate(timeout=900)
    assert process.returncode == 0, out + err
    return out, err


def assert_one_finished_run_per_variant_and_seed(server, path, alice, variants) -> None:
    os.environ |= alice
    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    assert not client.search_runs([experiment], "attributes.status = 'RUNNING'"), "no run left RUNNING"
    for variant in variants:
        digest = json.loads((path / "data" / "train" / variant / "run.json").read_text())["inputs_digest"]
        finished = client.search_runs([experiment], f"tags.inputs_digest = '{digest}' AND "
                                                    "attributes.status = 'FINISHED'")
        names = sorted(r.info.run_name for r in finished)
        assert names == sorted([variant, f"{variant}-seed0", f"{variant}-seed1"]), (variant, names)


def test_a_sweep_on_the_cluster_trains_on_the_workers_and_the_coordinator_restores(sweep):
    path, env, _, server, alice, variants = sweep
    out, err = finish(distributed(path, env))
    assert "4 variants on 2 workers" in out
    for variant in variants:
        assert any(line.startswith(f"{variant}: clone ") for line in out.splitlines()), out
    restored = out.split("restoring them here from the run-cache", 1)[1]
    assert "Running stage 'train@" not in restored and "Running stage 'evaluate@" not in restored, restored
    for variant in variants:
        assert f"Stage 'train@{variant}' is cached - skipping run" in restored, restored
    assert "Running stage 'compare'" in restored
    summary = (path / "data" / "compare" / "summary.md").read_text()
    diverging = [v for v in variants if "lr1e" in v]
    assert len(diverging) == 2 and all(f"{v}: 2 of 2 seeds diverged" in summary for v in diverging), summary
    assert_one_finished_run_per_variant_and_seed(server, path, alice, variants)
    status = run(["dvc", "status"], path, env).stdout
    assert "Data and pipelines are up to date" in status, status


def kill_a_worker_mid_training(cluster, server, alice, coordinator) -> str:
    """Kill the worker whose train stage has its MLflow runs open; the variant it was training."""
    os.environ |= alice
    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    deadline = time.monotonic() + 300
    while True:
        assert time.monotonic() < deadline and coordinator.poll() is None, "no train stage seen with open runs"
        open_runs = {r.info.run_name for r in client.search_runs([experiment], "attributes.status = 'RUNNING'")}
        for process in psutil.process_iter(["cmdline"]):
            cmdline = process.info["cmdline"] or []
            if "pipeline.stages.train" not in cmdline or cmdline[-1] not in open_runs:
                continue
            try:
                group = os.getpgid(process.pid)
            except ProcessLookupError:
                continue
            worker = next((w for w in cluster.workers if w.pid == group and w.poll() is None), None)
            if worker is not None:
                cluster.kill(worker)
                return cmdline[-1]
        time.sleep(0.2)


def test_a_worker_killed_mid_training_is_retried_and_leaves_no_run_behind(sweep):
    path, env, cluster, server, alice, variants = sweep
    params = yaml.safe_load((path / "params.yaml").read_text())
    params["train"]["epochs"] = 8  # every variant trains again, its runs open for a few seconds
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "commit", "-qam", "8 epochs"], path, env)
    coordinator = distributed(path, env)
    killed = kill_a_worker_mid_training(cluster, server, alice, coordinator)
    out, _ = finish(coordinator)
    assert "Running stage 'compare'" in out.split("restoring them here from the run-cache", 1)[1]
    assert_one_finished_run_per_variant_and_seed(server, path, alice, variants)
    # The retry continued the runs the killed attempt left RUNNING (found by their inputs) and
    # finished them: no run of the variant is left in any other state.
    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    assert not client.search_runs([experiment], f"attributes.run_name = '{killed}' AND attributes.status != 'FINISHED'")
