"""Prepared splits: kept as bytes, readable with and without torch, turned into the lab's float
images exactly; a damaged split refused in one line."""

import numpy as np
import pytest
import torch

from pipeline.data import as_images, load_split, read_split, write_split
from pipeline.errors import PipelineError


def test_split_keeps_bytes_and_as_images_divides_by_255_exactly(tmp_path):
    pixels = np.tile(np.arange(256, dtype=np.uint8), 4).reshape(2, 16, 32)  # every byte value, twice
    write_split(tmp_path, "val", pixels, np.array([3, 7]))
    split = load_split(tmp_path, "val", torch.device("cpu"))
    assert split.pixels.dtype == torch.uint8 and split.pixels.shape == (2, 512)
    assert split.labels.dtype == torch.int64 and split.labels.tolist() == [3, 7]
    images = as_images(split.pixels)
    assert images.dtype == torch.float32
    expected = torch.from_numpy(pixels).flatten(1).double().div(255).float()  # correctly rounded x / 255
    assert torch.equal(images, expected)
    assert images.min() == 0 and images.max() == 1
    buffer = torch.full((2, 512), float("nan"))
    assert as_images(split.pixels, out=buffer) is buffer and torch.equal(buffer, expected)  # an evaluation's reused buffer
    numpy_pixels, numpy_labels = read_split(tmp_path / "val")  # what evaluate reads, without torch
    assert np.array_equal(numpy_pixels, pixels.reshape(2, 512)) and numpy_labels.tolist() == [3, 7]
    assert torch.equal(torch.from_numpy(numpy_pixels.astype(np.float32) / np.float32(255)), expected)


def test_a_missing_or_damaged_split_is_one_clear_error(tmp_path):
    with pytest.raises(PipelineError, match=rf"^{tmp_path}/test/images.npy: not found; run the prepare stage$"):
        read_split(tmp_path / "test")
    write_split(tmp_path, "test", np.zeros((3, 28, 28), np.uint8), np.arange(3))
    images = tmp_path / "test" / "images.npy"
    images.write_bytes(images.read_bytes()[:200])
    with pytest.raises(PipelineError, match=rf"^{tmp_path}/test: unreadable \(ValueError\); rerun prepare$"):
        read_split(tmp_path / "test")
    write_split(tmp_path, "test", np.zeros((3, 28, 28), np.float32), np.arange(3))
    with pytest.raises(PipelineError, match=r"not a prepared split \(images float32 \(3, 28, 28\)"):
        read_split(tmp_path / "test")
