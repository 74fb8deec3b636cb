"""The lab's own code, as it ran in TensorFlow 1, for the fidelity benchmark's reference figures.

TensorFlow 1 graph code run under tensorflow 2.15 with `disable_v2_behavior()`, changed only
where TF2 forces it: `tf.contrib.layers.flatten` is `tf.compat.v1.layers.flatten`, and the
removed `tensorflow.examples.tutorials.mnist` reader is rewritten below in numpy with its
semantics (validation = the first 5,000 training images, pixels `x * (1.0 / 255.0)` in float32,
one-hot labels, `next_batch` as in TF 1.x `contrib/learn/python/learn/datasets/mnist.py`).
Each run has its own graph, graph seed and numpy seed, and one intra-op and one inter-op thread:
one variant per run, so that seeds and variants can be run and resumed one at a time. The lab
itself built both nets in one graph and trained them on the same batches: that layout, for
timing the lab, is `lab_tf1.py`, which builds its nets with `network` below.

Runs in its own environment (requirements.txt next to this file), not the project's:

    python3 -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install -r benchmarks/fidelity/requirements.txt
    /tmp/tfenv/bin/python benchmarks/fidelity/reference.py --mnist ../shared/data/mnist \
        --out benchmarks/fidelity/reference.json

Writes the per-seed test loss and accuracy (and each epoch's train/validation figures) of every
variant and seed, with the command, versions, date and runtime; finished runs already in `--out`
are kept, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf1 = tf.compat.v1
tf1.disable_v2_behavior()

VALIDATION_SIZE = 5000
BATCH_SIZE = 32
EPOCHS = 10
HIDDEN = [32, 32]
LEARNING_RATE = 0.01


def read_idx(path: Path) -> np.ndarray:
    content = gzip.decompress(path.read_bytes())
    ndim = content[3]
    shape = tuple(int.from_bytes(content[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(content, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


class DataSet:
    """TF 1.x `mnist.DataSet`: float32 images x * (1/255) and `next_batch` with its carry-over."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        images = images.reshape(images.shape[0], -1).astype(np.float32)
        self._images = np.multiply(images, 1.0 / 255.0)  # float32, as the reader did
        self._labels = np.eye(10, dtype=np.float32)[labels]  # one_hot=True
        self._num_examples = images.shape[0]
        self._epochs_completed = 0
        self._index_in_epoch = 0

    @property
    def images(self) -> np.ndarray:
        return self._images

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    @property
    def num_examples(self) -> int:
        return self._num_examples

    def next_batch(self, batch_size: int, shuffle: bool = True) -> tuple[np.ndarray, np.ndarray]:
        start = self._index_in_epoch
        if self._epochs_completed == 0 and start == 0 and shuffle:  # shuffle for the first epoch
            perm0 = np.arange(self._num_examples)
            np.random.shuffle(perm0)
            self._images = self.images[perm0]
            self._labels = self.labels[perm0]
        if start + batch_size > self._num_examples:  # finished the epoch: the rest, then a new one
            self._epochs_completed += 1
            rest_num_examples = self._num_examples - start
            images_rest_part = self._images[start : self._num_examples]
            labels_rest_part = self._labels[start : self._num_examples]
            if shuffle:
                perm = np.arange(self._num_examples)
                np.random.shuffle(perm)
                self._images = self.images[perm]
                self._labels = self.labels[perm]
            start = 0
            self._index_in_epoch = batch_size - rest_num_examples
            end = self._index_in_epoch
            return (np.concatenate((images_rest_part, self._images[start:end]), axis=0),
                    np.concatenate((labels_rest_part, self._labels[start:end]), axis=0))
        self._index_in_epoch += batch_size
        end = self._index_in_epoch
        return self._images[start:end], self._labels[start:end]


def read_data_sets(folder: Path) -> dict[str, DataSet]:
    train_images = read_idx(folder / "train-images-idx3-ubyte.gz")
    train_labels = read_idx(folder / "train-labels-idx1-ubyte.gz")
    return {
        "train": DataSet(train_images[VALIDATION_SIZE:], train_labels[VALIDATION_SIZE:]),
        "validation": DataSet(train_images[:VALIDATION_SIZE], train_labels[:VALIDATION_SIZE]),
        "test": DataSet(read_idx(folder / "t10k-images-idx3-ubyte.gz"),
                        read_idx(folder / "t10k-labels-idx1-ubyte.gz")),
    }


def inputs():
    """The lab's placeholders: images, one-hot labels, and whether batch norm is training."""
    return (tf1.placeholder(tf.float32, [None, 784]), tf1.placeholder(tf.float32, [None, 10]),
            tf1.placeholder(tf.bool))


def network(x, y, training, batch_norm: bool, scope: str | None = None):
    """The lab's net on the given inputs: dense -> (batch norm) -> relu twice, dense to 10 logits,
    Adam(0.01). `scope`: the variable scope it is built in, where one graph holds both nets (its
    own batch-norm updates and variables only); None: the whole graph is this net."""
    h = tf1.layers.flatten(x)
    for size in HIDDEN:
        h = tf1.layers.dense(h, size)  # Glorot-uniform kernel, zero bias (also before batch norm)
        if batch_norm:
            h = tf1.layers.batch_normalization(h, training=training)  # decay 0.99, epsilon 0.001
        h = tf.nn.relu(h)
    logits = tf1.layers.dense(h, 10)
    loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(labels=y, logits=logits))
    accuracy = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, 1), tf.argmax(y, 1)), tf.float32))
    with tf.control_dependencies(tf1.get_collection(tf1.GraphKeys.UPDATE_OPS, scope)):
        optimizer = tf1.train.AdamOptimizer(LEARNING_RATE)
        train_op = optimizer.minimize(loss, var_list=tf1.trainable_variables(scope))
    return loss, accuracy, train_op


def build(batch_norm: bool):
    """A graph of one net (this runner's layout): its placeholders, loss, accuracy, train op."""
    x, y, training = inputs()
    return (x, y, training, *network(x, y, training, batch_norm))


def one_thread() -> tf1.ConfigProto:
    """A session on 1 intra-op and 1 inter-op thread (the project's `train.threads: 1`)."""
    return tf1.ConfigProto(intra_op_parallelism_threads=1, inter_op_parallelism_threads=1)


def fresh_reader(data: DataSet) -> DataSet:
    """A reader of `data` from its first batch (its own next_batch state), sharing the decoded arrays."""
    reader = DataSet.__new__(DataSet)
    reader.__dict__.update(data.__dict__)
    return reader


def run(mnist: dict[str, DataSet], batch_norm: bool, seed: int) -> dict:
    np.random.seed(seed)
    train = fresh_reader(mnist["train"])
    graph = tf1.Graph()
    with graph.as_default():
        tf1.set_random_seed(seed)
        x, y, training, loss, accuracy, train_op = build(batch_norm)
        with tf1.Session(graph=graph, config=one_thread()) as sess:
            sess.run(tf1.global_variables_initializer())
            curves = {name: [] for name in ("train_loss", "train_acc", "val_loss", "val_acc")}
            for _ in range(EPOCHS):
                for _ in range(train.num_examples // BATCH_SIZE):
                    batch_x, batch_y = train.next_batch(BATCH_SIZE)
                    sess.run(train_op, {x: batch_x, y: batch_y, training: True})
                for split, prefix in ((mnist["train"], "train"), (mnist["validation"], "val")):
                    split_loss, split_acc = sess.run([loss, accuracy], {x: split.images, y: split.labels,
                                                                         training: False})
                    curves[f"{prefix}_loss"].append(float(split_loss))
                    curves[f"{prefix}_acc"].append(float(split_acc))
            test_loss, test_acc = sess.run([loss, accuracy], {x: mnist["test"].images, y: mnist["test"].labels,
                                                              training: False})
    return {"test_loss": float(test_loss), "test_acc": float(test_acc), **curves}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mnist", type=Path, required=True, help="folder with MNIST's four .gz files")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=20, help="how many seeds")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=["batchnorm", "no_norm"])
    args = parser.parse_args()

    mnist = read_data_sets(args.mnist)
    stored = json.loads(args.out.read_text()) if args.out.exists() else {}
    variants = stored.get("variants", {})
    for variant in args.variants:
        runs = variants.setdefault(variant, {})
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            if str(seed) in runs:
                continue
            began = time.perf_counter()
            result = run(mnist, variant == "batchnorm", seed)
            result["seconds"] = round(time.perf_counter() - began, 1)
            runs[str(seed)] = result
            print(f"{variant} seed {seed}: test_acc={result['test_acc']:.4f} test_loss={result['test_loss']:.4f} "
                  f"({result['seconds']:.0f}s)", flush=True)
            write(args.out, variants)


def write(out: Path, variants: dict) -> None:
    runs = [run for by_seed in variants.values() for run in by_seed.values()]
    produced = {
        "command": "python benchmarks/fidelity/reference.py " + " ".join(sys.argv[1:]),
        "tensorflow": tf.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), 1 intra-op and 1 inter-op thread",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "seconds_total": round(sum(run["seconds"] for run in runs), 1),
    }
    out.write_text(json.dumps({"produced": produced, "variants": variants}, indent=1) + "\n")


if __name__ == "__main__":
    main()
