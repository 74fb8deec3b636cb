"""The whole pipeline under real DVC and real MLflow, on tiny MNIST served over loopback."""

import gzip
import hashlib
import json
import statistics
import sys
import time
from importlib import metadata

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

from pipeline.commands.dvcs import PUSH_HINT
from pipeline.nn import checkpoint
from pipeline.nn.model import StackedMlp, unstack
from pipeline.tracking.store import INPUTS_TAG
from pipeline.config.variant import VariantConfig
from tests.conftest import make_project, project_client, repro_pipeline, run, variant_run_ids
from tests.faults import wait_until_none_left

VARIANTS = ("batchnorm", "no_norm")


def outputs_digest(path) -> dict[str, str]:
    """Every file under data/ that DVC tracks, by content."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((path / "data").rglob("*")) if p.is_file() and p.name != ".gitignore"}


def stages_run(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


def accuracy_recomputed(path, variant: str) -> list[float]:
    """Each seed's test accuracy, recomputed apart from prepare and evaluate: the downloaded test
    IDX files decoded with numpy, each replica of the final checkpoint as a plain module."""
    raw = path / "data" / "raw"
    images = np.frombuffer(gzip.decompress((raw / "t10k-images-idx3-ubyte.gz").read_bytes()), np.uint8, offset=16)
    labels = np.frombuffer(gzip.decompress((raw / "t10k-labels-idx1-ubyte.gz").read_bytes()), np.uint8, offset=8)
    inputs = torch.from_numpy(images.reshape(len(labels), 784).astype(np.float32) / 255)
    state = checkpoint.load(path / "data" / "checkpoints" / variant / "last.pt")
    config = VariantConfig(**state["config"])
    stacked = StackedMlp(config)
    stacked.load_state_dict(state["model"])
    with torch.no_grad():
        return [(unstack(stacked, config, k)(inputs).argmax(1).numpy() == labels).mean()
                for k in range(len(config.seeds))]


def variant_run(client: MlflowClient, path, variant: str):
    return client.get_run(variant_run_ids(client, path, variant)["variant"])


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory, tiny_mirror, http_mirror):
    """One `dvc repro` shared by this module's tests, which run in order: later ones edit it."""
    path, env = make_project(tmp_path_factory.mktemp("repro") / "project", tiny_mirror[0])
    env = env | {"MNIST_MIRROR": http_mirror}
    result = repro_pipeline(path, env)
    return path, env, result


def test_repro_runs_every_stage_and_records_metrics(reproduced):
    path, env, result = reproduced
    assert stages_run(result.stdout) == [
        "check", "download", "prepare", "train@batchnorm", "train@no_norm", "curves",
        "evaluate@batchnorm", "evaluate@no_norm", "compare",
    ]
    assert f"runs: `mlflow ui --backend-store-uri sqlite:///{path / 'mlflow.db'}`, then " \
           "http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning" in result.stdout
    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], path, env).stdout)
    files = next(iter(metrics.values()))["data"]
    for variant in VARIANTS:
        values = files["data/metrics.json"]["data"][variant]
        recomputed = accuracy_recomputed(path, variant)
        assert values["acc"] == pytest.approx(statistics.fmean(recomputed), abs=1e-12)
        assert 0.3 < values["acc"]  # tiny MNIST is learnable: far above chance (0.1)
        assert values["loss"] > 0
    for name in ("train_loss.png", "train_acc.png", "val_loss.png", "val_acc.png", "summary.md"):
        assert (path / "data" / "compare" / name).stat().st_size > 0


def test_mlflow_holds_variant_runs_grouped_under_compare(reproduced):
    path, _, _ = reproduced
    client = project_client(path)
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
        assert run_info.data.params["env.torch"] == metadata.version("torch")  # the environment it ran in
        assert run_info.data.params["env.numpy"] == metadata.version("numpy")
        assert run_info.data.tags[INPUTS_TAG] == variant_run(client, path, variant).data.tags[INPUTS_TAG]
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
        assert run_info.data.tags["variant"] == variant
        assert run_info.data.tags["mlflow.source.name"] == f"dvc stage train@{variant}"
        assert run_info.inputs.dataset_inputs, "dataset lineage is recorded"
    assert (path / "mlartifacts").is_dir(), "artifacts live beside the database, at the project root"


def test_second_repro_runs_nothing(reproduced):
    path, env, _ = reproduced
    assert stages_run(run(["dvc", "repro"], path, env).stdout) == []


def test_forced_repro_leaves_every_output_and_dvc_lock_byte_identical(reproduced):
    """Forced by `make repro`'s command, its variants' chains as `dvc repro` processes side by side:
    the bytes of the plain `dvc repro` that made the project, one stage after another, and no
    process of its own left behind."""
    path, env, _ = reproduced
    lock, before = (path / "dvc.lock").read_bytes(), outputs_digest(path)
    result = run([sys.executable, "-m", "pipeline.commands.repro", "--force", "--jobs", "2"], path, env)
    stages = ["check", "download", "prepare", "curves", "compare",
              *(f"{s}@{v}" for s in ("train", "evaluate") for v in VARIANTS)]
    assert sorted(stages_run(result.stdout)) == sorted(stages)
    assert result.stdout.count(PUSH_HINT) == 1, result.stdout  # DVC's hint once, not once a `dvc repro`
    assert wait_until_none_left(path) == []
    assert (path / "dvc.lock").read_bytes() == lock
    assert outputs_digest(path) == before
    again = run([sys.executable, "-m", "pipeline.commands.repro"], path, env)
    assert stages_run(again.stdout) == [] and "Data and pipelines are up to date." in again.stdout


def test_editing_one_variant_reruns_only_that_variant(reproduced):
    path, env, _ = reproduced
    params = yaml.safe_load((path / "params.yaml").read_text())
    params["variants"]["no_norm"]["lr"] = 0.005
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert stages_run(run(["dvc", "repro"], path, env).stdout) == [
        "check", "train@no_norm", "curves", "evaluate@no_norm", "compare"]
    client = project_client(path)
    experiment = client.get_experiment_by_name("tiny")
    groups = client.search_runs([experiment.experiment_id], "attributes.run_name = 'compare'",
                                order_by=["attributes.start_time DESC"])
    newest = groups[0].info.run_id
    # the cached batchnorm run (train@batchnorm did not rerun) is grouped under it too
    cached = variant_run(client, path, "batchnorm").info.run_id
    assert client.get_run(cached).data.tags["mlflow.parentRunId"] == newest
    # ... and its unchanged test metrics are not logged a second time
    assert len(client.get_metric_history(cached, "test_acc")) == 1


def test_reverting_a_param_restores_every_stage_from_the_run_cache(reproduced):
    path, env, _ = reproduced
    edited = outputs_digest(path)
    run(["git", "checkout", "params.yaml"], path, env)  # as committed by make_project
    started = time.monotonic()
    result = run(["dvc", "repro"], path, env)
    seconds = time.monotonic() - started
    assert stages_run(result.stdout) == [], result.stdout  # no stage command ran
    for stage in ("check", "train@no_norm", "curves", "evaluate@no_norm", "compare"):
        assert f"Stage '{stage}' is cached - skipping run, checking out outputs" in result.stdout
    assert outputs_digest(path) != edited
    client = project_client(path)
    original = variant_run(client, path, "no_norm")  # the run that computed the restored outputs
    assert original.info.status == "FINISHED"
    print(f"revert restored from the run-cache in {seconds:.1f} s")


def test_a_store_that_never_saw_the_runs_gets_them_from_compare(reproduced, tmp_path):
    path, env, _ = reproduced
    uri = f"sqlite:///{tmp_path / 'other.db'}"
    run(["dvc", "repro", "--force", "--single-item", "compare"], path, env | {"MLFLOW_TRACKING_URI": uri})
    client = MlflowClient(uri)
    for variant in VARIANTS:
        rebuilt = variant_run(client, path, variant)
        assert rebuilt.info.status == "FINISHED"
        history = json.loads((path / "data" / "train" / variant / "history.json").read_text())
        assert [m.value for m in client.get_metric_history(rebuilt.info.run_id, "val_acc")] == pytest.approx(
            [sum(epoch) / len(epoch) for epoch in history["val_acc"]])
        assert "test_acc" in rebuilt.data.metrics
        assert rebuilt.data.tags["mlflow.parentRunId"]  # grouped under this compare
    assert client.get_model_version_by_alias("mnist-mlp", "champion").run_id in {
        variant_run(client, path, v).info.run_id for v in VARIANTS}
