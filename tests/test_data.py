"""Prepared splits: kept as bytes, turned into the lab's float images exactly."""

from __future__ import annotations

import torch

from pipeline.data import as_images, load_split, split_path


def test_split_keeps_bytes_and_as_images_divides_by_255_exactly(tmp_path):
    pixels = torch.arange(256, dtype=torch.uint8).repeat(4).view(2, 16, 32)  # every byte value, twice
    torch.save({"images": pixels, "labels": torch.tensor([3, 7])}, split_path(tmp_path, "val"))
    split = load_split(tmp_path, "val", torch.device("cpu"))
    assert split.pixels.dtype == torch.uint8 and split.pixels.shape == (2, 512)
    images = as_images(split.pixels)
    assert images.dtype == torch.float32
    assert torch.equal(images, pixels.flatten(1).double().div(255).float())  # correctly rounded x / 255
    assert images.min() == 0 and images.max() == 1
