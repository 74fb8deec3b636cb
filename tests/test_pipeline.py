"""The whole pipeline under real DVC and real MLflow, on tiny MNIST served over loopback."""

from __future__ import annotations

import json

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import make_project, run

VARIANTS = ("batchnorm", "no_norm")


def stages_run(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory, tiny_mirror, http_mirror):
    """One `dvc repro` shared by this module's tests, which run in order: later ones edit it."""
    path, env = make_project(tmp_path_factory.mktemp("repro") / "project", tiny_mirror[0])
    env = env | {"MNIST_MIRROR": http_mirror}
    result = run(["dvc", "repro"], path, env)
    return path, env, result


def test_repro_runs_every_stage_and_records_metrics(reproduced):
    path, env, result = reproduced
    assert stages_run(result.stdout) == [
        "download", "prepare", "train@batchnorm", "train@no_norm",
        "evaluate@batchnorm", "evaluate@no_norm", "compare",
    ]
    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], path, env).stdout)
    files = next(iter(metrics.values()))["data"]
    for variant in VARIANTS:
        values = files[f"data/evaluate/{variant}/metrics.json"]["data"]
        assert 0.3 < values["test_acc"] <= 1.0  # tiny MNIST is learnable: far above chance (0.1)
        assert values["test_loss"] > 0
    for name in ("train_loss.png", "train_acc.png", "val_loss.png", "val_acc.png", "summary.md"):
        assert (path / "data" / "compare" / name).stat().st_size > 0


def test_mlflow_holds_variant_runs_grouped_under_compare(reproduced):
    path, _, _ = reproduced
    client = MlflowClient(f"sqlite:///{path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    group = runs["compare"]
    assert {a.path for a in client.list_artifacts(group.info.run_id, "comparison")} >= {
        "comparison/train_loss.png", "comparison/val_acc.png", "comparison/summary.md"}
    for variant in VARIANTS:
        run_info = runs[variant]
        assert run_info.info.status == "FINISHED"
        assert run_info.data.tags["mlflow.parentRunId"] == group.info.run_id
        assert run_info.data.params["norm"] == ("batch" if variant == "batchnorm" else "none")
        for metric in ("train_loss", "train_acc", "val_loss", "val_acc"):
            steps = [m.step for m in client.get_metric_history(run_info.info.run_id, metric)]
            assert steps == [1, 2]
        assert "test_acc" in run_info.data.metrics  # published by compare from evaluate's files
        assert {a.path for a in client.list_artifacts(run_info.info.run_id, "evaluation")} == {
            "evaluation/confusion.png", "evaluation/per_class.json", "evaluation/per_seed.json"}
        artifacts = {a.path for a in client.list_artifacts(run_info.info.run_id, "checkpoints")}
        assert artifacts == {"checkpoints/last.pt", "checkpoints/best.pt"}
        children = [r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") == run_info.info.run_id]
        assert sorted(c.data.params["seed"] for c in children) == ["0", "1"]
        assert all(len(client.get_metric_history(c.info.run_id, "val_acc")) == 2 for c in children)
        assert all("test_acc" in c.data.metrics for c in children)
        assert run_info.data.tags["mlflow.source.git.commit"]
        assert run_info.data.tags["mlflow.source.name"] == f"dvc stage train@{variant}"
        assert run_info.inputs.dataset_inputs, "dataset lineage is recorded"
    assert (path / "mlartifacts").is_dir(), "artifacts live beside the database, at the project root"


def test_second_repro_runs_nothing(reproduced):
    path, env, _ = reproduced
    assert stages_run(run(["dvc", "repro"], path, env).stdout) == []


def test_forced_rerun_gives_bit_identical_outputs(reproduced):
    path, env, _ = reproduced
    outputs = ["data/evaluate/batchnorm/metrics.json", "data/train/batchnorm/history.json",
               "data/train/batchnorm/curves.csv", "data/checkpoints/batchnorm/best.pt"]
    before = {name: (path / name).read_bytes() for name in outputs}
    result = run(["dvc", "repro", "--force", "evaluate@batchnorm"], path, env)
    assert "train@batchnorm" in stages_run(result.stdout)
    assert {name: (path / name).read_bytes() for name in outputs} == before


def test_editing_one_variant_reruns_only_that_variant(reproduced):
    path, env, _ = reproduced
    params = yaml.safe_load((path / "params.yaml").read_text())
    params["variants"]["no_norm"]["lr"] = 0.005
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert stages_run(run(["dvc", "repro"], path, env).stdout) == [
        "train@no_norm", "evaluate@no_norm", "compare"]
    client = MlflowClient(f"sqlite:///{path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    groups = client.search_runs([experiment.experiment_id], "attributes.run_name = 'compare'",
                                order_by=["attributes.start_time DESC"])
    newest = groups[0].info.run_id
    # the cached batchnorm run (train@batchnorm did not rerun) is grouped under it too
    cached = json.loads((path / "data" / "train" / "batchnorm" / "run.json").read_text())["run_ids"]["variant"]
    assert client.get_run(cached).data.tags["mlflow.parentRunId"] == newest
    # ... and its unchanged test metrics are not logged a second time
    assert len(client.get_metric_history(cached, "test_acc")) == 1


def test_misspelled_exp_run_override_is_refused(reproduced):
    """DVC appends an unknown key given as `+key=value` without a word; the pipeline refuses it."""
    path, env, _ = reproduced
    before = (path / "data" / "evaluate" / "batchnorm" / "metrics.json").read_bytes()
    result = run(["dvc", "exp", "run", "-S", "+variants.batchnorm.learning_rate=0.1"], path, env, check=False)
    assert result.returncode != 0
    assert "variants.batchnorm.learning_rate: unknown key" in result.stdout + result.stderr
    assert (path / "data" / "evaluate" / "batchnorm" / "metrics.json").read_bytes() == before
