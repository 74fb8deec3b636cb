"""Parallel experiments: three `dvc exp run --queue` runs executed two at a time.

Each queued experiment runs in its own copy under `.dvc/tmp/exps/`, but every stage tracks
into the one SQLite store at the project root (`mlflow.db`); an experiment's runs are found by
what they computed (their params, their inputs digest), as the record finds them. Slow for a unit test (about 1.5 minutes on 2 cores after the shared
tiny repro): each experiment changes one variant's lr, so it reruns 3 of the 7 stages.
"""

import json
import time

import pytest

from tests.conftest import project_client, run
from tests.dvc_queue import run_queues
from tests.shared_project import reproduced_project

pytestmark = pytest.mark.timeout(900)  # the shared repro (when first) and the queue, bounded

# name -> (the variant it retrains, with this lr); two retrain the same variant at once.
EXPERIMENTS = {"q-nonorm-lr": ("no_norm", 0.005), "q-bn-lr": ("batchnorm", 0.005), "q-nonorm-lr2": ("no_norm", 0.002)}
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def queued(tmp_path_factory, tiny_mirror):
    path, env = reproduced_project(tmp_path_factory, tiny_mirror[0])
    # `+`: the variant sets no lr of its own in params.yaml, so the key is added.
    queued = {name: ["-S", f"+variants.{variant}.lr={lr}"] for name, (variant, lr) in EXPERIMENTS.items()}
    started = time.monotonic()
    statuses = run_queues({path: queued}, env, jobs=2, timeout_s=600)
    print(f"3 queued experiments ran in {time.monotonic() - started:.0f}s")
    return path, env, statuses


def test_every_queued_experiment_succeeded(queued):
    path, env, statuses = queued
    assert statuses == dict.fromkeys(EXPERIMENTS, "Success")
    for name in EXPERIMENTS:
        logs = run(["dvc", "queue", "logs", name], path, env, timeout=60).stdout
        assert "database is locked" not in logs and "Traceback" not in logs, logs


def test_exp_show_lists_each_with_params_and_metrics(queued):
    path, env, _ = queued
    shown = json.loads(run(["dvc", "exp", "show", "--json"], path, env, timeout=120).stdout)
    baseline = next(entry for entry in shown if entry["rev"] != "workspace")
    experiments = {exp["name"]: exp["revs"][0] for exp in baseline["experiments"] or []}
    assert set(EXPERIMENTS) <= set(experiments)
    for name, (retrained, lr) in EXPERIMENTS.items():
        rev = experiments[name]
        assert rev.get("error") is None, rev["error"]
        params = rev["data"]["params"]["params.yaml"]["data"]
        assert tuple(params["seeds"]) == SEEDS
        lrs = {v: params["variants"][v].get("lr") for v in ("batchnorm", "no_norm")}
        assert lrs == {v: lr if v == retrained else None for v in lrs}
        for variant in ("batchnorm", "no_norm"):
            metrics = rev["data"]["metrics"]["data/metrics.json"]["data"][variant]
            assert 0.1 < metrics["acc"] <= 1.0


def test_mlflow_recorded_every_run_of_every_experiment_at_the_project_root(queued):
    path, _, _ = queued
    assert sorted(path.rglob("mlflow.db")) == [path / "mlflow.db"], "one store, at the project root"
    client = project_client(path)
    experiment = client.get_experiment_by_name("tiny")
    for name, (variant, lr) in EXPERIMENTS.items():
        [variant_run] = client.search_runs([experiment.experiment_id],
                                           f"attributes.run_name = '{variant}' AND params.lr = '{lr}'")
        children = client.search_runs([experiment.experiment_id],
                                      f"tags.`mlflow.parentRunId` = '{variant_run.info.run_id}'")
        by_name = {r.info.run_name: r for r in [variant_run, *children]}
        by_name["compare"] = client.get_run(variant_run.data.tags["mlflow.parentRunId"])
        assert sorted(by_name) == sorted(["compare", variant, *(f"{variant}-seed{seed}" for seed in SEEDS)]), name
        assert all(r.info.status == "FINISHED" for r in by_name.values())
        assert [m.step for m in client.get_metric_history(variant_run.info.run_id, "val_acc")] == [1, 2]
        assert "test_acc" in variant_run.data.metrics
        assert {a.path for a in client.list_artifacts(variant_run.info.run_id, "checkpoints")} == {
            "checkpoints/last.pt", "checkpoints/best.pt"}
        for seed in SEEDS:
            assert len(client.get_metric_history(by_name[f"{variant}-seed{seed}"].info.run_id, "val_acc")) == 2
        # Every queued compare registered its pick.
        assert by_name["compare"].data.tags["registered_model"].startswith("mnist-mlp/")
