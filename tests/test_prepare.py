"""Stage `prepare`: a seeded train/validation split of the raw training images, test kept whole,
and bad params or a bad raw folder refused in one line before any data is written."""

import gzip
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.data import load_split
from pipeline.config.params import DataParams
from pipeline.errors import PipelineError
from pipeline.stages.prepare import prepare, split_indices, torch_randperm
from pipeline.config.variant import MAX_SEED
from tests.conftest import TINY_PARAMS, stage_env, with_value

PREPARE = [sys.executable, "-m", "pipeline.stages.prepare", "--raw", "data/raw", "--out", "data/prepared"]


def run_prepare(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(PREPARE, cwd=cwd, env=stage_env(), capture_output=True, text=True, timeout=120)


def assert_one_error_line(result: subprocess.CompletedProcess, first_words: str) -> None:
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(first_words), result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_split_indices_cover_every_image_once_with_the_asked_validation_size():
    train, val = split_indices(50, 12, seed=3)
    assert (len(train), len(val)) == (38, 12)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(50))  # disjoint, nothing dropped


def test_split_indices_depend_only_on_the_seed():
    first, again, other = split_indices(100, 20, seed=7), split_indices(100, 20, seed=7), split_indices(100, 20, seed=8)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[1], other[1])


@pytest.mark.parametrize("n, seed", [(60_000, 0), (60_000, 42), (60_000, MAX_SEED), (600, 2**32 + 5), (2, 7), (1, 0)])
def test_the_split_is_torchs_seeded_permutation_drawn_in_numpy(n, seed):
    """prepare draws torch.randperm's permutation without importing torch: the same rows, so the
    same split as every result computed before (MNIST's 60,000 training images, any seed)."""
    expected = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    assert np.array_equal(torch_randperm(n, seed), expected)


def test_the_prepare_stage_does_not_import_torch(tmp_path):
    code = "import sys, pipeline.stages.prepare; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], env=stage_env(), capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["False"], result.stderr


@pytest.mark.parametrize("val_size", [0, 50, 60])
def test_split_indices_refuse_a_validation_size_outside_the_images(val_size):
    with pytest.raises(PipelineError, match=rf"^data\.val_size: {val_size} must be between 0 and 50 "):
        split_indices(50, val_size, seed=0)


def prepared_tensors(prepared_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    stored = load_split(prepared_dir, split, torch.device("cpu"))
    return stored.pixels, stored.labels


def test_prepare_writes_disjoint_splits_and_their_manifest(tiny_mirror, tmp_path):
    raw_dir, _ = tiny_mirror  # the mirror's four .gz files are what download leaves in data/raw
    manifest = prepare(DataParams(val_size=100, split_seed=0), raw_dir, tmp_path)
    assert manifest["sizes"] == {"train": 500, "val": 100, "test": 200}
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    assert (manifest["val_size"], manifest["split_seed"]) == (100, 0)
    (train_pixels, train_labels), (val_pixels, _) = (prepared_tensors(tmp_path, s) for s in ("train", "val"))
    assert train_pixels.dtype == torch.uint8 and train_labels.dtype == torch.int64
    # Noisy tiny images are all distinct, so a row in both splits would be an image used twice.
    train_rows = {bytes(row.tolist()) for row in train_pixels}
    assert len(train_rows) == 500 and not train_rows & {bytes(row.tolist()) for row in val_pixels}


def test_prepare_is_deterministic_given_the_split_seed(tiny_mirror, tmp_path):
    raw_dir, _ = tiny_mirror
    digests = [prepare(DataParams(val_size=100, split_seed=seed), raw_dir, tmp_path / name)["digest"]
               for name, seed in (("a", 1), ("b", 1), ("c", 2))]
    assert digests[0] == digests[1] != digests[2]
    files = [hashlib.sha256((tmp_path / name / "val" / "images.npy").read_bytes()).digest() for name in ("a", "b")]
    assert files[0] == files[1]  # the same bytes on disk, not only the same digest


def test_prepare_stage_refuses_a_raw_folder_without_mnist_in_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    (tmp_path / "data" / "raw").mkdir(parents=True)
    result = run_prepare(tmp_path)
    assert result.returncode != 0
    assert_one_error_line(result, "error: data/raw/train-images-idx3-ubyte.gz: cannot read (")
    assert "run the download stage" in result.stderr
    assert not (tmp_path / "data" / "prepared").exists()


def test_prepare_stage_refuses_a_raw_file_that_is_not_idx(tmp_path, tiny_mirror):
    raw_dir = tmp_path / "data" / "raw"
    raw_dir.mkdir(parents=True)
    for gz in tiny_mirror[0].glob("*.gz"):
        (raw_dir / gz.name).write_bytes(gz.read_bytes())
    (raw_dir / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"<html>not found</html>"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    result = run_prepare(tmp_path)
    assert result.returncode != 0
    assert_one_error_line(result, "error: data/raw/t10k-labels-idx1-ubyte.gz: not an IDX file of unsigned bytes")


@pytest.fixture
def stage_dir(tmp_path) -> Path:
    """A project folder whose data/ tree already holds raw and prepared files."""
    for name, content in {
        "data/raw/train-images-idx3-ubyte.gz": b"raw bytes",
        "data/prepared/train/images.npy": b"old prepared split",
        "data/prepared/manifest.json": b'{"digest": "old"}\n',
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    return tmp_path


def tree_digests(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


BAD_PARAMS = {  # params.yaml text (None: no file), what stderr's one line starts with
    "unknown-key": (yaml.safe_dump(with_value("variants.batchnorm.learning_rate", 0.1)),
                    "error: params.yaml: variants.batchnorm.learning_rate: unknown key"),
    "malformed-yaml": ("train: [1\n", "error: params.yaml: malformed YAML at line 2"),
    "missing-file": (None, "error: params.yaml: file not found"),
}


@pytest.mark.parametrize("text, first_words", BAD_PARAMS.values(), ids=BAD_PARAMS)
def test_prepare_stage_rejects_bad_params_before_touching_data(stage_dir, text, first_words):
    if text is not None:
        (stage_dir / "params.yaml").write_text(text)
    before = tree_digests(stage_dir / "data")
    result = run_prepare(stage_dir)
    assert result.returncode == 2
    assert_one_error_line(result, first_words)
    assert tree_digests(stage_dir / "data") == before
