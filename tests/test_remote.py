"""Sharing results through a DVC remote: push from one clone, pull into another, nothing to rerun."""

from __future__ import annotations

import pytest

from tests.conftest import run
from tests.shared_project import reproduced_project

VARIANTS = ("batchnorm", "no_norm")

pytestmark = pytest.mark.timeout(600)


def outputs(root) -> list[str]:
    """Every stage output a teammate should get back from the remote."""
    files = [f"data/prepared/{split}/{name}.npy" for split in ("train", "val", "test")
             for name in ("images", "labels")] + ["data/prepared/manifest.json"]
    for variant in VARIANTS:
        files += [f"data/checkpoints/{variant}/last.pt", f"data/checkpoints/{variant}/best.pt",
                  f"data/checkpoints/{variant}/weights.npz",
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


@pytest.fixture(scope="module")
def s3_remote(tmp_path_factory, tiny_mirror):
    """The shared project pushed to an S3 remote (moto's server) and a bare git remote, and a
    second clone with a DVC cache of its own, standing in for a teammate's machine."""
    from tests.team_server import S3_CREDENTIALS, start_s3

    path, env = reproduced_project(tmp_path_factory, tiny_mirror[0])
    s3 = start_s3()
    env = env | {"AWS_ACCESS_KEY_ID": S3_CREDENTIALS["aws_access_key_id"],
                 "AWS_SECRET_ACCESS_KEY": S3_CREDENTIALS["aws_secret_access_key"],
                 "AWS_DEFAULT_REGION": S3_CREDENTIALS["region_name"]}
    folder = tmp_path_factory.mktemp("s3_remote")
    run(["dvc", "remote", "add", "team", f"s3://{s3.bucket}/dvc"], path, env, timeout=60)
    run(["dvc", "remote", "modify", "team", "endpointurl", s3.endpoint], path, env, timeout=60)
    run(["git", "add", "-A"], path, env)
    run(["git", "commit", "-qm", "DVC remote 'team' on S3"], path, env)
    run(["git", "init", "-q", "--bare", "-b", "main", str(folder / "origin.git")], folder, env)
    run(["git", "remote", "add", "origin", str(folder / "origin.git")], path, env)
    run(["git", "push", "-q", "origin", "main"], path, env)
    run(["dvc", "push", "-r", "team", "--run-cache"], path, env, timeout=300)
    clone = folder / "teammate"
    run(["git", "clone", "-q", str(folder / "origin.git"), str(clone)], folder, env, timeout=60)
    run(["dvc", "pull", "-r", "team", "--run-cache"], clone, env, timeout=300)
    yield path, clone, env
    s3.stop()


def test_a_teammate_pulls_from_s3_and_has_nothing_to_rerun(s3_remote):
    original, clone, env = s3_remote
    for name in outputs(clone):
        assert (clone / name).read_bytes() == (original / name).read_bytes(), name
    repro = run(["dvc", "repro"], clone, env, timeout=300).stdout
    assert "Running stage" not in repro, repro
    assert "Data and pipelines are up to date" in run(["dvc", "status"], clone, env, timeout=120).stdout


def test_experiments_travel_between_clones(s3_remote):
    original, clone, env = s3_remote
    name = "one-epoch-one-seed"
    try:
        run(["dvc", "exp", "run", "--name", name, "-S", "seeds=[0]", "-S", "train.epochs=1"], original, env,
            timeout=600)
        made = (original / "data" / "evaluate" / "batchnorm" / "metrics.json").read_bytes()
        run(["dvc", "exp", "push", "-r", "team", "origin", name], original, env, timeout=300)
    finally:  # the other modules read the committed repro from this workspace
        run(["git", "checkout", "params.yaml", "dvc.lock"], original, env)
        run(["dvc", "checkout", "--force"], original, env, timeout=300)
    run(["dvc", "exp", "pull", "-r", "team", "origin", name], clone, env, timeout=300)
    assert name in run(["dvc", "exp", "show", "--json"], clone, env, timeout=120).stdout
    run(["dvc", "exp", "apply", name], clone, env, timeout=300)
    assert (clone / "data" / "evaluate" / "batchnorm" / "metrics.json").read_bytes() == made
    repro = run(["dvc", "repro"], clone, env, timeout=300).stdout
    assert "Running stage" not in repro, repro  # the experiment's outputs came with it
