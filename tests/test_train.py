"""The train stage: determinism, kill-and-resume, SIGTERM, stale and damaged checkpoints."""

import json
import math
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.nn import checkpoint
from pipeline.config.params import load_params
from pipeline.reports import METRICS
from pipeline.stages.prepare import prepare
from pipeline.stages.train import Paths, train
from pipeline.tracking.store import Tracking
from tests.conftest import (
    TINY_PARAMS,
    project_client,
    stage_command,
    stage_env,
    tiny_mnist_arrays,
    variant_run_ids,
    write_environment,
    write_mirror,
)

EPOCHS = 30  # ~0.2 s each here: the record's process opens the store (~3 s) well before the end


@pytest.fixture(scope="module")
def slow_mirror(tmp_path_factory):
    """Enough steps per epoch (batch 4) that a kill lands mid-run, not after it."""
    folder = tmp_path_factory.mktemp("slow_mirror")
    write_mirror(folder, tiny_mnist_arrays(train=4200, test=200))
    return folder


def make_prepared(path: Path, mirror: Path, **overrides) -> Path:
    """A project folder with params.yaml and prepared data, ready for the train stage."""
    from pipeline.stages.download import download, read_checksums

    raw = yaml.safe_load(yaml.safe_dump(TINY_PARAMS))
    raw["train"] |= {"epochs": EPOCHS, "batch_size": 4} | overrides
    (path / "data").mkdir(parents=True)
    (path / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(path / "params.yaml")
    download(path / "data" / "raw", [str(mirror)], read_checksums(mirror / "SHA256SUMS.decompressed"))
    prepare(params.data, path / "data" / "raw", path / "data" / "prepared")
    write_environment(path)
    return path


TRAIN = stage_command("train", "batchnorm")


def paths(path: Path) -> Paths:
    """train@batchnorm's paths in the project at `path`: those its dvc.yaml command names."""
    args = dict(zip(TRAIN[3::2], TRAIN[4::2]))  # --prepared data/prepared --checkpoints ...
    return Paths.of(path, "batchnorm", *(path / args[f"--{name}"] for name in ("prepared", "checkpoints", "out")))


def start_train(path: Path) -> subprocess.Popen:
    return subprocess.Popen(TRAIN, cwd=path, env=stage_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run_train(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(TRAIN, cwd=path, env=stage_env(), capture_output=True, text=True, timeout=300)


def wait_for_epoch(process: subprocess.Popen, epoch: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if f"epoch {epoch}/" in line:
            return
        if not line and process.poll() is not None:
            raise AssertionError(f"train exited {process.returncode}: {process.stderr.read()}")
    raise AssertionError(f"no epoch {epoch} line within {timeout_s} s")


def final_state(path: Path) -> dict:
    """The stage's final checkpoint with its history (outputs of a finished run)."""
    history = json.loads((paths(path).out / "history.json").read_text())
    return checkpoint.load(paths(path).checkpoints / "last.pt") | {"history": history}


def scratch_state(path: Path) -> dict:
    """What a killed run left to resume from."""
    return checkpoint.load(paths(path).scratch / "last.pt")


def variant_runs(path: Path) -> list:
    client = project_client(path)
    experiment = client.get_experiment_by_name("tiny")
    return [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == "batchnorm"] \
        if experiment else []


def assert_no_process_left_in(path: Path, timeout_s: float = 10) -> None:
    def working_there() -> list[int]:
        pids = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if proc.joinpath("cwd").resolve() == path.resolve():
                    pids.append(int(proc.name))
            except OSError:  # gone meanwhile, or not ours to look at
                pass
        return pids

    deadline = time.monotonic() + timeout_s
    while working_there() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not working_there(), f"still running in {path}: {working_there()}"


def assert_same_result(a: dict, b: dict) -> None:
    assert a["history"] == b["history"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, slow_mirror):
    path = make_prepared(tmp_path_factory.mktemp("uninterrupted"), slow_mirror)
    assert run_train(path).returncode == 0
    return final_state(path)


def test_rerun_is_bit_identical(tmp_path, slow_mirror, uninterrupted):
    path = make_prepared(tmp_path, slow_mirror)
    train(load_params(path / "params.yaml"), "batchnorm", path, paths(path),
          Tracking(f"sqlite:///{path / 'mlflow.db'}", path, "tiny"))
    assert_same_result(final_state(path), uninterrupted)


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, slow_mirror, uninterrupted):
    path = make_prepared(tmp_path, slow_mirror)
    project_client(path).search_experiments()  # the store made here: its ~50 migrations take seconds
    process = start_train(path)
    wait_for_epoch(process, 1)
    deadline = time.monotonic() + 60
    while not variant_runs(path) and time.monotonic() < deadline:  # the record trails the training
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert_no_process_left_in(path)  # the stage's MLflow process goes with it
    killed_at = scratch_state(path)["epoch"]
    assert 1 <= killed_at < EPOCHS
    assert not paths(path).checkpoints.exists(), "outputs are written at the end only"
    [crashed] = variant_runs(path)
    assert crashed.info.status == "RUNNING"

    resumed = run_train(path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after epoch {killed_at}" in resumed.stdout
    assert_same_result(final_state(path), uninterrupted)
    assert not paths(path).scratch.exists(), "a finished run leaves no scratch state"
    [run] = variant_runs(path)  # the same run continued, not a second one
    assert run.info.run_id == crashed.info.run_id and run.info.status == "FINISHED"
    client = project_client(path)
    ids = variant_run_ids(client, path, "batchnorm")  # the seed runs too
    for run_id in [ids["variant"], *ids["seeds"]]:
        for metric in METRICS:
            steps = sorted(m.step for m in client.get_metric_history(run_id, metric))
            assert steps == list(range(1, EPOCHS + 1)), (run_id, metric, steps)  # every epoch, once


def test_sigterm_ends_run_killed_and_params_change_starts_fresh(tmp_path, slow_mirror):
    path = make_prepared(tmp_path, slow_mirror)
    process = start_train(path)
    wait_for_epoch(process, 1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode != 0
    assert stderr.strip().splitlines()[-1].startswith("error: train@batchnorm: interrupted")
    assert "Traceback" not in stderr
    [killed] = variant_runs(path)
    assert killed.info.status == "KILLED"

    raw = yaml.safe_load((path / "params.yaml").read_text())
    raw["train"]["lr"] = 0.005
    (path / "params.yaml").write_text(yaml.safe_dump(raw))
    fresh = run_train(path)
    assert fresh.returncode == 0, fresh.stderr
    assert "params, data, code or environment changed since this checkpoint; starting fresh" in fresh.stderr
    statuses = sorted(r.info.status for r in variant_runs(path))
    assert statuses == ["FINISHED", "KILLED"]  # a new run; the interrupted one stays closed


def test_damaged_checkpoint_is_skipped_with_a_warning(tmp_path, slow_mirror):
    path = make_prepared(tmp_path, slow_mirror, epochs=1)
    last = paths(path).scratch / "last.pt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"\x50\x4b\x03\x04 truncated")
    result = run_train(path)
    assert result.returncode == 0, result.stderr
    assert f"warning: {last}: corrupt or truncated checkpoint" in result.stderr
    assert final_state(path)["epoch"] == 1


def test_a_diverging_seed_is_recorded_and_the_stage_succeeds(tmp_path, slow_mirror):
    path = make_prepared(tmp_path, slow_mirror, epochs=1, lr=1e30)
    summary = train(load_params(path / "params.yaml"), "batchnorm", path, paths(path),
                    Tracking(f"sqlite:///{path / 'mlflow.db'}", path, "tiny"))
    history = final_state(path)["history"]
    assert history["diverged_epoch"] == [1, 1]
    assert all(math.isnan(loss) for loss in summary["final"]["train_loss"])
    [run] = variant_runs(path)
    assert run.info.status == "FINISHED" and run.data.tags["diverged_seeds"] == "2 of 2"
    assert "served_seed" not in run.data.tags  # no model is served from a diverged seed
