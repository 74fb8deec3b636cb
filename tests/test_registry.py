"""The compare stage registers the best variant's model; `models:/mnist-mlp@champion` serves it."""

import json
import statistics

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from pipeline.nn import checkpoint
from pipeline.data import as_images, load_split
from pipeline.errors import ParamsError
from pipeline.nn.model import StackedMlp
from pipeline.tracking.workspace import select_best, settle_aliases
from pipeline.config.variant import VariantConfig
from tests.conftest import project_client, run, tiny_params, variant_run_ids
from tests.shared_project import reproduced_project

NAME, ALIAS = "mnist-mlp", "champion"

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_mirror):
    path, env = reproduced_project(tmp_path_factory, tiny_mirror[0])
    return path, env, project_client(path)


@pytest.fixture(scope="module")
def reforced(project):
    """The registry and the runs before and after a forced `dvc repro` of the (reproduced)
    workspace: every stage runs again and writes the same bytes."""
    path, env, client = project

    def state():
        versions = {v.version: (v.tags, sorted(client.get_model_version(NAME, v.version).aliases))
                    for v in client.search_model_versions(f"name = '{NAME}'")}
        return versions, sorted(r.info.run_id for r in client.search_runs(
            [client.get_experiment_by_name("tiny").experiment_id]))

    before = state()
    run(["dvc", "repro", "--force"], path, env, timeout=480)
    assert run(["git", "status", "--porcelain", "dvc.lock"], path, env).stdout == "", "the same bytes"
    return before, state()


def test_a_forced_repro_that_writes_the_same_bytes_adds_no_version_run_or_alias(project, reforced):
    (versions_before, runs_before), (versions_after, runs_after) = reforced
    assert versions_before, "the first dvc repro registered the model"
    assert versions_after == versions_before  # no version added, no alias moved, no tag changed
    assert runs_after == runs_before  # the same runs, found by their inputs, not new ones


def test_champion_is_the_best_variant_and_predicts_like_its_stacked_replica(project, reforced):
    path, _, client = project
    champion = client.get_model_version_by_alias(NAME, ALIAS)

    histories = {v: json.loads((path / "data" / "train" / v / "history.json").read_text())
                 for v in ("batchnorm", "no_norm")}
    best = max(histories, key=lambda v: statistics.fmean(histories[v]["val_acc"][-1]))
    assert champion.tags["variant"] == best
    assert champion.tags["select_by"] == "val_acc"
    assert float(champion.tags["val_acc"]) == pytest.approx(statistics.fmean(histories[best]["val_acc"][-1]))
    assert champion.run_id == variant_run_ids(client, path, best)["variant"]

    mlflow.set_tracking_uri(f"sqlite:///{path / 'mlflow.db'}")
    try:
        served = mlflow.pyfunc.load_model(f"models:/{NAME}@{ALIAS}")
    finally:
        mlflow.set_tracking_uri(None)
    test = load_split(path / "data" / "prepared", "test", torch.device("cpu"))
    images = as_images(test.pixels)
    logits = np.asarray(served.predict(images.numpy()))
    assert logits.shape == (len(test), 10)
    predicted = logits.argmax(1)
    assert (predicted == test.labels.numpy()).mean() > 0.3  # chance is 0.1

    state = checkpoint.load(path / "data" / "checkpoints" / best / "last.pt")
    config = VariantConfig(**state["config"])
    stacked = StackedMlp(config)
    stacked.load_state_dict(state["model"])
    stacked.eval()
    replica = config.seeds.index(int(client.get_run(champion.run_id).data.tags["served_seed"]))
    with torch.no_grad():
        expected = stacked(images)[replica].numpy()
    np.testing.assert_array_equal(predicted, expected.argmax(1))
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_select_by_test_acc_picks_the_best_test_accuracy():
    histories = {"batchnorm": {"val_acc": [[0.1, 0.1], [0.9, 0.8]], "diverged_epoch": [None, None]},
                 "no_norm": {"val_acc": [[0.1, 0.1], [0.5, 0.6]], "diverged_epoch": [None, None]}}
    test_acc = {"batchnorm": [0.5, 0.6], "no_norm": [0.7, 0.7]}
    by_val = select_best(tiny_params(), histories, test_acc)
    assert (by_val.variant, by_val.metric, by_val.score) == ("batchnorm", "val_acc", pytest.approx(0.85))
    by_test = select_best(tiny_params(compare={"select_by": "test_acc"}), histories, test_acc)
    assert (by_test.variant, by_test.metric, by_test.score) == ("no_norm", "test_acc", pytest.approx(0.7))


def test_a_variant_whose_every_seed_diverged_is_never_picked():
    histories = {"batchnorm": {"val_acc": [[0.1, 0.1], [0.98, 0.98]], "diverged_epoch": [1, 2]},
                 "no_norm": {"val_acc": [[0.1, 0.1], [0.5, 0.6]], "diverged_epoch": [None, 1]}}
    assert select_best(tiny_params(), histories, {"batchnorm": [0.1, 0.1], "no_norm": [0.5, 0.1]}).variant == "no_norm"
    histories["no_norm"]["diverged_epoch"] = [1, 1]
    assert select_best(tiny_params(), histories, {}) is None


def test_unknown_select_by_is_refused():
    with pytest.raises(ParamsError, match="compare.select_by"):
        tiny_params(compare={"select_by": "train_acc"})


@pytest.fixture
def registry_client(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'registry.db'}")
    client.create_registered_model("m")
    return client


def add_version(client, score: float, data: str = "d1", metric: str = "val_acc") -> str:
    source = "file:///nowhere/model"
    tags = {"score": repr(score), "select_by": metric, "data_digest": data}
    return client.create_model_version("m", source=source, tags=tags).version


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 2, 0), (2, 0, 1)])
def test_champion_ends_on_the_best_whatever_the_order(registry_client, order):
    scores = [0.95, 0.97, 0.96]
    given = {}
    for index in order:
        version = add_version(registry_client, scores[index])
        given[index] = settle_aliases(registry_client, "m", "champion", "challenger", version)
    champion = registry_client.get_model_version_by_alias("m", "champion")
    assert float(champion.tags["score"]) == 0.97
    best_so_far = float("-inf")
    for index in order:  # each new version is champion exactly when it beats every earlier one
        assert given[index] == ("champion" if scores[index] > best_so_far else "challenger")
        best_so_far = max(best_so_far, scores[index])


def test_only_a_better_score_on_the_same_data_and_metric_takes_the_alias(registry_client):
    settle_aliases(registry_client, "m", "champion", "challenger", add_version(registry_client, 0.95))
    for other in (add_version(registry_client, 0.99, data="d2"), add_version(registry_client, 0.99, metric="test_acc"),
                  add_version(registry_client, 0.95), add_version(registry_client, float("nan"))):
        assert settle_aliases(registry_client, "m", "champion", "challenger", other) == "challenger"
        assert str(registry_client.get_model_version_by_alias("m", "champion").version) == "1"
    better = add_version(registry_client, 0.96)
    assert settle_aliases(registry_client, "m", "champion", "challenger", better) == "champion"
