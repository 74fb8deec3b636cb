"""Checkpoints: atomic saves, damaged files as one clear PipelineError, the best-replica merge."""

import datetime
import io
import random
from pathlib import Path

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.nn.checkpoint import FORMAT, load, merge_replicas, save, update_best
from pipeline.fsio import atomic_write, atomic_write_bytes

STATE = {"epoch": 3, "model": {"w": torch.arange(6.0).view(3, 2)}, "run_ids": ["a", "b", "c"]}


@pytest.fixture
def saved(tmp_path) -> Path:
    path = tmp_path / "last.pt"
    save(path, STATE)
    return path


def torch_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_save_load_roundtrip_leaves_no_temp_files(saved):
    state = load(saved)
    assert state["epoch"] == 3 and state["run_ids"] == ["a", "b", "c"] and state["format"] == FORMAT
    assert torch.equal(state["model"]["w"], STATE["model"]["w"])
    assert [path.name for path in saved.parent.iterdir()] == ["last.pt"]


DAMAGE = {  # what the file holds instead of a checkpoint, given the good file's bytes
    "empty": lambda good: b"",
    "truncated": lambda good: good[: len(good) // 2],
    "zip-head-only": lambda good: good[:10],
    "text": lambda good: b"hello world\n",
    **{f"random-bytes-{seed}": (lambda good, seed=seed: random.Random(seed).randbytes(3000)) for seed in range(3)},
    "non-tensor-object": lambda good: torch_bytes({"format": 1, "when": datetime.date(2024, 1, 1)}),
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE)
def test_damaged_file_is_a_checkpoint_error_naming_it(saved, damage):
    saved.write_bytes(damage(saved.read_bytes()))
    with pytest.raises(PipelineError) as caught:
        load(saved)
    assert str(caught.value).startswith(f"{saved}: corrupt or truncated checkpoint (")
    assert "\n" not in str(caught.value) and "weights_only" not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # no pickle traceback


@pytest.mark.parametrize("other", [[1, 2, 3], {"w": torch.ones(2)}, {"format": 99}], ids=["list", "no-format", "format-99"])
def test_valid_torch_file_of_something_else_is_rejected(saved, other):
    saved.write_bytes(torch_bytes(other))
    with pytest.raises(PipelineError, match="not a checkpoint of this pipeline"):
        load(saved)


def test_missing_or_unreadable_checkpoint_is_named(tmp_path):
    with pytest.raises(PipelineError, match=f"^{tmp_path}/none.pt: no such checkpoint$"):
        load(tmp_path / "none.pt")
    with pytest.raises(PipelineError, match=f"^{tmp_path}: cannot read "):
        load(tmp_path)


def test_interrupted_atomic_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_bytes(path, b"old")

    def half_then_crash(handle):
        handle.write(b"new but not fin")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_crash)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_atomic_write_creates_folders_and_replaces(tmp_path):
    path = tmp_path / "a" / "b" / "out.bin"
    atomic_write_bytes(path, b"one")
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    assert [p.name for p in path.parent.iterdir()] == ["out.bin"]


def test_merge_replicas_takes_improved_replicas_from_current():
    improved = torch.tensor([True, False, True])
    best = {"model": {"w": torch.zeros(3, 2)},
            "optimizer": {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.zeros(3, 4)}},
                          "param_groups": [{"lr": 0.1}]}}
    current = {"model": {"w": torch.ones(3, 2), "b": torch.ones(3)},
               "optimizer": {"state": {0: {"step": torch.tensor(6.0), "exp_avg": torch.ones(3, 4)}},
                             "param_groups": [{"lr": 0.2}]}}
    merged = merge_replicas(best, current, improved)
    assert merged["model"]["w"][:, 0].tolist() == [1.0, 0.0, 1.0]
    assert merged["optimizer"]["state"][0]["exp_avg"].sum(dim=1).tolist() == [4.0, 0.0, 4.0]
    assert torch.equal(merged["model"]["b"], torch.ones(3))  # absent from best: taken whole
    assert merged["optimizer"]["state"][0]["step"].item() == 6.0  # shared by every replica
    assert merged["optimizer"]["param_groups"] == [{"lr": 0.2}]
    current["model"]["b"].zero_()
    current["optimizer"]["state"][0]["step"].zero_()
    assert merged["model"]["b"].sum() == 3 and merged["optimizer"]["state"][0]["step"] == 6  # copies


def test_update_best_keeps_each_replica_from_the_epoch_of_its_best_val_acc():
    best = {"model": {"w": torch.zeros(2, 3)}, "val_acc": torch.tensor([0.5, 0.9]), "epoch": [1, 1]}
    best = update_best(best, {"model": {"w": torch.ones(2, 3)}}, [0.7, 0.8], epoch=2)
    assert best["epoch"] == [2, 1] and best["val_acc"].tolist() == pytest.approx([0.7, 0.9])
    assert best["model"]["w"].sum(dim=1).tolist() == [3.0, 0.0]
    best = update_best(best, {"model": {"w": torch.full((2, 3), 2.0)}}, [0.7, 0.95], epoch=3)
    assert best["epoch"] == [2, 3]  # a tie is no improvement
    assert best["model"]["w"].sum(dim=1).tolist() == [3.0, 6.0]
