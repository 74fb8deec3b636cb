"""MNIST on disk: IDX decoding and the prepared splits the training loop reads whole.

A prepared split is a folder of `images.npy` (uint8 [N, 28, 28]) and `labels.npy` (int64 [N]):
numpy reads them without torch (which the evaluate stage never imports: pipeline/nn/inference.py),
torch takes them without a copy, and the bytes depend on the arrays alone.
"""

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import PipelineError
from pipeline.fsio import atomic_write

if TYPE_CHECKING:  # annotations only: the evaluate stage reads splits without torch
    import torch

RAW_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_raw_split(raw_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The split's images and labels from their IDX files (of unsigned bytes, type 0x08, as MNIST's are)."""
    arrays = []
    for name in RAW_FILES[split]:
        path = raw_dir / f"{name}.gz"
        try:
            content = gzip.decompress(path.read_bytes())
        except (OSError, EOFError, zlib.error) as error:  # missing, not gzip, cut short, damaged inside
            raise PipelineError(f"{path}: cannot read ({error}); run the download stage") from None
        if len(content) < 4 or content[:3] != b"\0\0\x08":
            raise PipelineError(f"{path}: not an IDX file of unsigned bytes")
        header = 4 + 4 * content[3]
        shape = tuple(int.from_bytes(content[i : i + 4], "big") for i in range(4, header, 4))
        if len(content) != header + int(np.prod(shape)):
            raise PipelineError(f"{path}: size does not match its IDX header {shape}")
        arrays.append(np.frombuffer(content, dtype=np.uint8, offset=header).reshape(shape).copy())  # writable
    images, labels = arrays
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise PipelineError(f"{raw_dir}: {split} images {tuple(images.shape)} and labels "
                            f"{tuple(labels.shape)} do not match")
    return images, labels.astype(np.int64)


@dataclass(frozen=True)
class Split:
    """Pixels as stored, uint8 [N, 784], and labels as int64 [N]: as bytes the train split is
    43 MB instead of 172 MB, so most rows a step gathers come from the CPU's cache, not memory;
    `as_images` turns the rows a computation takes into what the lab fed its network."""

    pixels: "torch.Tensor"
    labels: "torch.Tensor"

    def __len__(self) -> int:
        return len(self.labels)


def write_split(prepared_dir: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    for name, array in (("images", images), ("labels", labels)):
        atomic_write(prepared_dir / split / f"{name}.npy",
                     lambda handle, array=array: np.save(handle, array, allow_pickle=False),
                     array.nbytes)  # and .npy's header, 128 bytes


def read_split(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """A prepared split's folder as numpy arrays: pixels uint8 [N, 784], labels int64 [N]."""
    try:
        images, labels = (np.load(folder / f"{name}.npy", allow_pickle=False) for name in ("images", "labels"))
    except FileNotFoundError as error:
        raise PipelineError(f"{error.filename}: not found; run the prepare stage") from None
    except (OSError, ValueError, EOFError) as error:  # a truncated or foreign file
        raise PipelineError(f"{folder}: unreadable ({type(error).__name__}); rerun prepare") from None
    if images.dtype != np.uint8 or labels.dtype != np.int64 or images.ndim != 3 or len(images) != len(labels):
        raise PipelineError(f"{folder}: not a prepared split (images {images.dtype} {images.shape}, "
                            f"labels {labels.dtype} {labels.shape}); rerun prepare")
    return images.reshape(len(images), -1), labels


def load_split(prepared_dir: Path, split: str, device: "torch.device") -> Split:
    """The split as torch tensors on `device` (on the CPU they share the arrays' memory)."""
    import torch

    pixels, labels = read_split(prepared_dir / split)
    return Split(pixels=torch.from_numpy(pixels).to(device), labels=torch.from_numpy(labels).to(device))


def as_images(pixels: "torch.Tensor", out: "torch.Tensor | None" = None) -> "torch.Tensor":
    """uint8 pixels as float images in [0, 1], x / 255 correctly rounded, into `out` where given.

    TF1's reader multiplied by float32(1/255), one bit off for 126 of the 256 byte values: each
    seed's run re-drawn, no mean moved (no_norm over 20 seeds: 95.42% ± 0.40 against 95.28% ±
    0.52; benchmarks/fidelity/README.md)."""
    return (pixels.float() if out is None else out.copy_(pixels)).div_(255)
