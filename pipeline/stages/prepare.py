"""Stage `prepare`: a seeded train/validation split of MNIST's training images, test kept whole.

Writes `<out>/{train,val,test}/` (pipeline/data.py's prepared splits) and `manifest.json` with sizes and
a content digest that MLflow records as the runs' dataset lineage.
"""

import hashlib
from pathlib import Path

import numpy as np

from pipeline import cli
from pipeline.data import read_raw_split, write_split
from pipeline.errors import PipelineError
from pipeline.fsio import atomic_write_json
from pipeline.config.params import DataParams, load_params


def split_indices(total: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) rows: `torch_randperm(total, seed)` split, the split every result so
    far was computed on (numpy's own permutation would draw another)."""
    if not 0 < val_size < total:
        raise PipelineError(f"data.val_size: {val_size} must be between 0 and {total} (the number of training images)")
    order = torch_randperm(total, seed)
    return order[val_size:], order[:val_size]


def torch_randperm(n: int, seed: int) -> np.ndarray:
    """`torch.randperm(n, generator=torch.Generator().manual_seed(seed))` in numpy, so that this
    stage does not import torch for it (~1.5 s of its ~2 s): torch's CPU algorithm for n below
    2**32 / 20, a Fisher-Yates shuffle drawing `random() % (n - i)` from a Mersenne twister seeded
    with the seed's low 32 bits, which is numpy's RandomState's (tests/test_prepare.py holds them
    equal). 60,000 rows: ~20 ms. From 2**32 / 20 rows on, torch draws 64-bit numbers: torch itself."""
    if n >= 2**32 // 20:
        import torch

        return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    draws = np.random.RandomState(seed & 0xFFFFFFFF).randint(0, 2**32, size=max(n - 1, 0), dtype=np.uint64)
    swaps = (draws % np.arange(n, 1, -1, dtype=np.uint64)).astype(np.int64) + np.arange(n - 1)
    order = list(range(n))
    for i, j in enumerate(swaps.tolist()):
        order[i], order[j] = order[j], order[i]
    return np.array(order, dtype=np.int64)


def prepare(data_params: DataParams, raw_dir: Path, prepared_dir: Path) -> dict:
    train_images, train_labels = read_raw_split(raw_dir, "train")
    test_images, test_labels = read_raw_split(raw_dir, "test")
    train_idx, val_idx = split_indices(len(train_labels), data_params.val_size, data_params.split_seed)
    splits = {"train": (train_images[train_idx], train_labels[train_idx]),
              "val": (train_images[val_idx], train_labels[val_idx]), "test": (test_images, test_labels)}
    digest = hashlib.sha256()
    for split, (images, labels) in splits.items():
        write_split(prepared_dir, split, images, labels)
        for array in (images, labels):
            digest.update(np.ascontiguousarray(array))
    sizes = {split: len(labels) for split, (_, labels) in splits.items()}
    manifest = {"digest": digest.hexdigest()[:16], "sizes": sizes, "val_size": data_params.val_size,
                "split_seed": data_params.split_seed}
    atomic_write_json(prepared_dir / "manifest.json", manifest)
    print(f"prepared {manifest['sizes']} digest {manifest['digest']}")
    return manifest


if __name__ == "__main__":
    args = cli.arguments(__doc__, "raw", "out")
    with cli.one_line_errors():
        prepare(load_params().data, args.raw, args.out)
