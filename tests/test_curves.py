"""The curves stage: every variant's curves in one file with a variant column, refused in one line."""

import subprocess

import pytest
import yaml

from pipeline.errors import PipelineError
from pipeline.reports import write_curves
from pipeline.stages.curves import curves
from tests.conftest import TINY_PARAMS, stage_command, stage_env


def history(loss: float) -> dict[str, list[list[float]]]:
    """Two epochs of two seeds."""
    return {name: [[loss, loss + 0.5], [loss / 2, loss]] for name in ("train_loss", "train_acc", "val_loss", "val_acc")}


def test_rows_of_each_variant_in_params_order_led_by_its_name(tmp_path):
    for variant, loss in (("sweep-lr0p1", 1.0), ("b", 2.0)):
        (tmp_path / variant).mkdir()
        write_curves(tmp_path / variant / "curves.csv", history(loss))
    curves(["sweep-lr0p1", "b"], tmp_path, tmp_path / "curves.csv")
    assert (tmp_path / "curves.csv").read_text() == (
        "variant,epoch,train_loss,train_acc,val_loss,val_acc\n"
        "sweep-lr0p1,1,1.250000,1.250000,1.250000,1.250000\n"
        "sweep-lr0p1,2,0.750000,0.750000,0.750000,0.750000\n"
        "b,1,2.250000,2.250000,2.250000,2.250000\n"
        "b,2,1.500000,1.500000,1.500000,1.500000\n"
    )


def test_a_missing_or_different_curves_file_is_one_line_naming_it(tmp_path):
    (tmp_path / "a").mkdir()
    write_curves(tmp_path / "a" / "curves.csv", history(1.0))
    with pytest.raises(PipelineError, match=rf"^{tmp_path}/b/curves.csv: cannot read it \(No such file or directory\); "
                                            r"train@b writes it$"):
        curves(["a", "b"], tmp_path, tmp_path / "curves.csv")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "curves.csv").write_text("epoch,loss\n1,0.5\n")
    with pytest.raises(PipelineError, match=r"b/curves.csv: columns 'epoch,loss', not 'epoch,train_loss,"):
        curves(["a", "b"], tmp_path, tmp_path / "curves.csv")
    assert not (tmp_path / "curves.csv").exists()


def test_the_stage_command_reads_the_variants_from_params_and_fails_in_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS, sort_keys=False))
    result = subprocess.run(stage_command("curves"), cwd=tmp_path, env=stage_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "error: data/train/batchnorm/curves.csv: cannot read it (No such file or directory); train@batchnorm writes it"]
    (tmp_path / "data" / "train" / "batchnorm").mkdir(parents=True)
    write_curves(tmp_path / "data" / "train" / "batchnorm" / "curves.csv", history(1.0))
    assert "train@no_norm writes it" in subprocess.run(stage_command("curves"), cwd=tmp_path, env=stage_env(),
                                                       capture_output=True, text=True, timeout=120).stderr
