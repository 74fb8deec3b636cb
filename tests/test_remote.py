"""Sharing results through a DVC remote: push from one clone, pull into another, nothing to rerun;
`publish` gives any tracking store the same record from either."""

import json
import sys
from pathlib import Path

import pytest

from pipeline.reports import METRICS
from tests.conftest import project_client, run
from tests.mlflow_server import start_server, stop
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


PUBLISH = [sys.executable, "-m", "pipeline.commands.publish"]


@pytest.fixture(scope="module")
def empty_servers(tmp_path_factory):
    """Two real tracking servers, each with an empty store of its own and proxied artifacts."""
    started = []
    try:
        for name in ("a", "b"):
            folder = tmp_path_factory.mktemp(f"publish_{name}")
            started.append(start_server(folder, f"sqlite:///{folder / 'server.db'}", "--serve-artifacts",
                                        "--artifacts-destination", str(folder / "artifacts")))
        yield [uri for _, uri in started]
    finally:
        for process, _ in started:
            stop(process)


def artifacts(client, run_id: str, folder: str = "") -> list[tuple[str, int]]:
    found = []
    for item in client.list_artifacts(run_id, folder or None):
        found += artifacts(client, run_id, item.path) if item.is_dir else [(item.path, item.file_size)]
    return sorted(found)


# Every metric a variant's or a seed's run may hold, read as histories: a run's latest values (the
# names search_runs gives) are a summary the store keeps beside them, and the claim is the histories.
EPOCH_METRICS = {f"{name}{suffix}" for name in (*METRICS, "test_loss", "test_acc") for suffix in ("", "_std")}


# Loading `models:/<name>@<alias>` from a store whose artifacts are local files writes this file into
# the logged model's own folder (MLflow 3.17's ModelsArtifactRepository marks the folder it
# "downloaded", which a local repository gives as the stored one): test_registry and
# test_serving load the champion of the shared project's store, and it appears among its model's files.
LOAD_MARK = "registered_model_meta"


def record_of(client, workspace: Path) -> dict:
    """What a store holds of a workspace's results, without what differs between stores (run ids,
    times): per run (by name), its status, params, tags, every metric's (step, value) history,
    artifacts and logged models; the registered version of its model, with its aliases."""
    from pipeline.tracking.record import comparison_digest

    experiment = client.get_experiment_by_name("tiny").experiment_id
    digests = {v: json.loads((workspace / "data" / "train" / v / "run.json").read_text())["inputs_digest"]
               for v in VARIANTS}
    digests["compare"] = comparison_digest(digests, workspace / "data" / "compare")
    runs = [r for digest in digests.values() for r in client.search_runs([experiment], f"tags.inputs_digest = '{digest}'")]
    held = {}
    for found in runs:
        run_id = found.info.run_id
        # The parent by name: an experiment that retrains one variant groups the other, unchanged
        # variant run under its own compare run (test_queue does so in the shared project), so
        # the trained store's parent may be another comparison's run than the workspace's.
        tags = {k: client.get_run(v).info.run_name if k == "mlflow.parentRunId" else v
                for k, v in found.data.tags.items()
                if not k.startswith("mlflow.") or k in ("mlflow.parentRunId", "mlflow.source.name")}
        models = client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'")
        held[found.info.run_name] = {
            "status": found.info.status, "params": found.data.params, "tags": tags,
            "metrics": {name: history for name in sorted(set(found.data.metrics) | EPOCH_METRICS)
                        if (history := [(m.step, m.value) for m in client.get_metric_history(run_id, name)])},
            "artifacts": artifacts(client, run_id),
            "models": sorted((m.name, sorted(a.path for a in client.list_logged_model_artifacts(m.model_id)
                                             if a.path != LOAD_MARK)) for m in models)}
    assert len(held) == len(runs), "one run of each name"
    versions = [v for v in client.search_model_versions("name = 'mnist-mlp'")
                if v.tags.get("inputs_digest") in digests.values()]
    held["registry"] = sorted(({k: v for k, v in version.tags.items() if k != "compare_run_id"},
                               client.get_run(version.run_id).info.run_name)
                              for version in versions)
    return held


def differences(published: dict, trained: dict) -> list[str]:
    """Where two records differ, a line per run and field: what an assertion's diff cuts short."""
    lines = []
    for name in sorted(published.keys() | trained.keys()):
        ours, theirs = (held if isinstance(held := record.get(name), dict) else {"": held}
                        for record in (published, trained))
        lines += [f"{name}.{field}: published {ours.get(field)!r}, trained {theirs.get(field)!r}"
                  for field in sorted(ours.keys() | theirs.keys()) if ours.get(field) != theirs.get(field)]
    return lines


def store_size(uri: str) -> tuple[int, int, int]:
    """(runs, metric points, model versions) in a store."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    points = sum(len(client.get_metric_history(r.info.run_id, name)) for r in runs for name in r.data.metrics)
    return len(runs), points, len(client.search_model_versions())


def test_publish_gives_an_empty_server_the_record_of_training_from_either_workspace(pulled, empty_servers):
    from mlflow import MlflowClient

    original, clone, env = pulled
    trained = record_of(project_client(original), original)
    assert {"batchnorm", "batchnorm-seed0", "no_norm-seed1", "compare", "registry"} <= set(trained)
    for workspace, uri in zip((original, clone), empty_servers):  # the one that trained; one `dvc pull` filled
        dry = run([*PUBLISH, "--dry-run"], workspace, env | {"MLFLOW_TRACKING_URI": uri}, timeout=120).stdout
        assert "batchnorm: would add its 3 runs, 2 epochs each" in dry and "compare: would add" in dry, dry
        run(PUBLISH, workspace, env | {"MLFLOW_TRACKING_URI": uri}, timeout=300)
        published = record_of(MlflowClient(uri), workspace)
        assert published == trained, (workspace, differences(published, trained))
        champion = MlflowClient(uri).get_model_version_by_alias("mnist-mlp", "champion")
        assert champion.tags["inputs_digest"] in {published[v]["tags"]["inputs_digest"] for v in VARIANTS}

    before = store_size(empty_servers[1])
    again = run(PUBLISH, clone, env | {"MLFLOW_TRACKING_URI": empty_servers[1]}, timeout=300)
    assert store_size(empty_servers[1]) == before, again.stdout  # 0 runs, 0 metric points, 0 versions
    dry = run([*PUBLISH, "--dry-run"], clone, env | {"MLFLOW_TRACKING_URI": empty_servers[1]}, timeout=120).stdout
    assert dry.strip() == f"{empty_servers[1]} holds every result of this workspace already"
