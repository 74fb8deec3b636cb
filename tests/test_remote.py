"""Sharing results through a DVC remote: push from one clone, pull into another, nothing to rerun."""

from __future__ import annotations

import pytest

from tests.conftest import run
from tests.shared_project import reproduced_project

VARIANTS = ("batchnorm", "no_norm")

pytestmark = pytest.mark.timeout(600)


def outputs(root) -> list[str]:
    """Every stage output a teammate should get back from the remote."""
    files = [f"data/prepared/{split}.pt" for split in ("train", "val", "test")] + ["data/prepared/manifest.json"]
    for variant in VARIANTS:
        files += [f"data/checkpoints/{variant}/last.pt", f"data/checkpoints/{variant}/best.pt",
                  f"data/train/{variant}/history.json", f"data/train/{variant}/run.json",
                  f"data/train/{variant}/curves.csv", f"data/evaluate/{variant}/metrics.json",
                  f"data/evaluate/{variant}/per_seed.json", f"data/evaluate/{variant}/confusion.png"]
    files += ["data/compare/summary.md", "data/compare/val_acc.png"]
    return files


@pytest.fixture(scope="module")
def pulled(tmp_path_factory, tiny_mirror):
    path, env = reproduced_project(tmp_path_factory, tiny_mirror[0])
    folder = tmp_path_factory.mktemp("remote")
    run(["dvc", "remote", "add", "-d", "local", str(folder / "storage")], path, env, timeout=60)
    run(["dvc", "push"], path, env, timeout=180)
    run(["git", "add", "-A"], path, env)
    run(["git", "commit", "-qm", "DVC remote 'local'"], path, env)
    clone = folder / "clone"
    run(["git", "clone", "-q", str(path), str(clone)], folder, env, timeout=60)
    run(["dvc", "pull"], clone, env, timeout=180)
    return path, clone, env


def test_pull_restores_every_output(pulled):
    original, clone, _ = pulled
    for name in outputs(clone):
        assert (clone / name).is_file(), f"{name} not restored"
        assert (clone / name).read_bytes() == (original / name).read_bytes(), name


def test_nothing_to_rerun_after_pull(pulled):
    _, clone, env = pulled
    assert "Data and pipelines are up to date" in run(["dvc", "status"], clone, env, timeout=120).stdout
    repro = run(["dvc", "repro"], clone, env, timeout=120).stdout
    assert "Running stage" not in repro, repro
    assert not (clone / "mlflow.db").exists(), "no stage ran, so nothing was tracked"
