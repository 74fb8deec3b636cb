"""Stage `evaluate`: each seed's final weights scored on the test split, in numpy, as the torch
model scores them; the same bytes on a rerun; no torch or matplotlib imported; one clear line
for a missing input."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.data import load_split
from pipeline.nn.inference import WEIGHTS_FILE, save_weights
from pipeline.nn.model import StackedMlp
from pipeline.stages.evaluate import evaluate
from pipeline.stages.prepare import prepare
from pipeline.stats import summarize
from pipeline.nn.training import TrainingStep, make_optimizer, score, train_epoch
from tests.conftest import TINY_PARAMS, stage_command, stage_env, tiny_params

FILES = ("metrics.json", "per_seed.json", "per_class.json", "confusion.png")


def trained_weights(path: Path, seeds: list[int], norm: str = "batch") -> StackedMlp:
    """A stack trained two epochs on the project's train split, its weights written as the train stage does."""
    params = tiny_params(seeds=seeds)
    config = params.variant("batchnorm").model_copy(update={"norm": norm})
    model = StackedMlp(config)
    step = TrainingStep(model, make_optimizer(model, config), load_split(path / "data" / "prepared", "train",
                                                                         torch.device("cpu")), config)
    for epoch in (1, 2):
        train_epoch(step, epoch)
    save_weights(path / "data" / "checkpoints" / "batchnorm" / WEIGHTS_FILE, config.model_dump(),
                 {name: tensor.numpy() for name, tensor in model.state_dict().items()})
    return model.eval()


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_mirror) -> tuple[Path, StackedMlp]:
    """A project as DVC runs the stage in: params, the prepared splits, a trained stack's weights."""
    path = tmp_path_factory.mktemp("evaluate")
    (path / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    prepare(tiny_params().data, tiny_mirror[0], path / "data" / "prepared")
    return path, trained_weights(path, seeds=[0, 1])


def run_evaluate(path: Path, out: Path) -> dict:
    weights = path / "data" / "checkpoints" / "batchnorm" / WEIGHTS_FILE
    return evaluate(tiny_params(), "batchnorm", weights, path / "data" / "prepared" / "test", out)


def test_each_seeds_test_scores_are_the_torch_models(project, tmp_path, capsys):
    path, model = project
    metrics = run_evaluate(path, tmp_path)
    expected = score(model, load_split(path / "data" / "prepared", "test", torch.device("cpu")), batch_size=256)
    per_seed = json.loads((tmp_path / "per_seed.json").read_text())
    assert per_seed["seeds"] == [0, 1]
    assert per_seed["test_acc"] == expected.acc.tolist()  # the same predictions, image for image
    assert per_seed["test_loss"] == pytest.approx(expected.loss.tolist(), rel=1e-6)  # to float rounding
    assert metrics == json.loads((tmp_path / "metrics.json").read_text())
    assert metrics == summarize({name: per_seed[name] for name in ("test_loss", "test_acc")}) | {"diverged_seeds": 0}
    per_class = json.loads((tmp_path / "per_class.json").read_text())
    assert per_class["classes"] == list(range(10)) and len(per_class["test_acc_per_seed"]) == 2
    # tiny MNIST's test split has 20 images of each class: the per-class accuracies average to the accuracy
    assert np.mean(per_class["test_acc_per_seed"], axis=1) == pytest.approx(per_seed["test_acc"], abs=1e-6)
    assert (tmp_path / "confusion.png").read_bytes().startswith(b"\x89PNG")
    line = capsys.readouterr().out.strip()
    assert line == (f"evaluate@batchnorm: test_loss={metrics['test_loss']:.4f}±{metrics['test_loss_std']:.4f} "
                    f"test_acc={metrics['test_acc']:.4f}±{metrics['test_acc_std']:.4f}")


def test_a_rerun_writes_the_same_bytes(project, tmp_path):
    path, _ = project
    for attempt in ("first", "second"):
        run_evaluate(path, tmp_path / attempt)
    assert all((tmp_path / "first" / name).read_bytes() == (tmp_path / "second" / name).read_bytes() for name in FILES)


def test_one_seed_shows_no_spread(tmp_path, tiny_mirror, capsys):
    prepare(tiny_params().data, tiny_mirror[0], tmp_path / "data" / "prepared")
    trained_weights(tmp_path, seeds=[0], norm="none")
    metrics = run_evaluate(tmp_path, tmp_path / "out")
    assert capsys.readouterr().out.splitlines()[-1] == (f"evaluate@batchnorm: test_loss={metrics['test_loss']:.4f} "
                                                        f"test_acc={metrics['test_acc']:.4f}")


def test_the_dvc_yaml_command_runs_without_torch_or_matplotlib(project):
    """The stage's own command, as DVC runs it; what it imported is checked when it is done."""
    path, _ = project
    command = stage_command("evaluate", "batchnorm")
    probe = ("import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_module('pipeline.stages.evaluate', "
             "run_name='__main__'); print(sorted({'torch', 'matplotlib'} & set(sys.modules)))")
    result = subprocess.run([command[0], "-c", probe, *command[2:]], cwd=path, env=stage_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"
    assert all((path / "data" / "evaluate" / "batchnorm" / name).is_file() for name in FILES)


@pytest.mark.parametrize("missing", ["weights", "test"])
def test_a_missing_input_is_one_line_and_writes_nothing(tmp_path, project, missing):
    path, _ = project
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    (tmp_path / "data").mkdir()
    present = "prepared" if missing == "weights" else "checkpoints"
    (tmp_path / "data" / present).symlink_to(path / "data" / present)
    result = subprocess.run(stage_command("evaluate", "batchnorm"), cwd=tmp_path, env=stage_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    absent = {"weights": f"data/checkpoints/batchnorm/{WEIGHTS_FILE}: not found; run the train stage",
              "test": "data/prepared/test/images.npy: not found; run the prepare stage"}[missing]
    assert result.stderr.splitlines() == [f"error: {absent}"]
    assert not (tmp_path / "data" / "evaluate").exists()
