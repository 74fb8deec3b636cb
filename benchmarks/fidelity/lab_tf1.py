"""The lab's own TF1 code in the lab's own layout, one seed: what `bench_lab_vs_tf1.py` times.

Both nets (batch norm, then no norm) in one graph and one session, each drawing its own initial
weights from the graph seed; every step runs both train ops on the same batch from one
`next_batch(32)`; after each epoch the whole training split is measured in batches of 32 (as
the lab did: 1,719 more runs of both nets) and the validation split at once; the test split
at the end. The graph code is `reference.py`'s (`network`), one intra-op and one inter-op
thread. Runs in the reference's environment (requirements.txt next to this file):

    .venv-tf/bin/python benchmarks/fidelity/lab_tf1.py --mnist ../shared/data/mnist --seed 0 [--out FILE]

Writes each net's test loss and accuracy and per-epoch curves, and the process's time by part
(importing TensorFlow, reading MNIST, training, measuring), as JSON.
"""

from __future__ import annotations

import argparse
import json
import time

STARTED = time.perf_counter()

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import reference  # noqa: E402  (imports TensorFlow)
from reference import BATCH_SIZE, tf, tf1  # noqa: E402

IMPORTED = time.perf_counter()
VARIANTS = ("batchnorm", "no_norm")  # built in this order, as the lab did
LAYOUT = ("lab: both nets in one graph and one session, trained on the same batches, "
          "the training split measured each epoch in batches of 32")


def measure(sess, nets: dict, x, y, training, images: np.ndarray, labels: np.ndarray, batch: int) -> dict:
    """Each net's loss and accuracy over a split, fed in batches of `batch` (weighted by their size)."""
    fetches = {name: (net[0], net[1]) for name, net in nets.items()}
    sums = {name: np.zeros(2) for name in nets}
    for start in range(0, len(images), batch):
        feed = {x: images[start : start + batch], y: labels[start : start + batch], training: False}
        for name, (loss, accuracy) in sess.run(fetches, feed).items():
            sums[name] += len(feed[x]) * np.array([loss, accuracy])
    return {name: (total / len(images)).tolist() for name, total in sums.items()}


def run(mnist: dict, seed: int, epochs: int) -> tuple[dict, dict]:
    """Both nets trained for `epochs` from `seed`; their results, and seconds training and measuring."""
    np.random.seed(seed)
    train = reference.fresh_reader(mnist["train"])
    train_split, val, test = mnist["train"], mnist["validation"], mnist["test"]
    spent = {"train_s": 0.0, "measure_s": 0.0}
    graph = tf1.Graph()
    with graph.as_default():
        tf1.set_random_seed(seed)
        x, y, training = reference.inputs()
        nets = {}
        for name in VARIANTS:
            with tf1.variable_scope(name):
                nets[name] = reference.network(x, y, training, name == "batchnorm", scope=name)
        train_ops = [net[2] for net in nets.values()]
        results = {name: {key: [] for key in ("train_loss", "train_acc", "val_loss", "val_acc")} for name in nets}
        with tf1.Session(graph=graph, config=reference.one_thread()) as sess:
            sess.run(tf1.global_variables_initializer())
            for _ in range(epochs):
                t0 = time.perf_counter()
                for _ in range(train.num_examples // BATCH_SIZE):
                    batch_x, batch_y = train.next_batch(BATCH_SIZE)
                    sess.run(train_ops, {x: batch_x, y: batch_y, training: True})
                t1 = time.perf_counter()
                measured = {"train": measure(sess, nets, x, y, training, train_split.images, train_split.labels,
                                             BATCH_SIZE),
                            "val": measure(sess, nets, x, y, training, val.images, val.labels, len(val.images))}
                spent["train_s"] += t1 - t0
                spent["measure_s"] += time.perf_counter() - t1
                for split, by_net in measured.items():
                    for name, (loss, accuracy) in by_net.items():
                        results[name][f"{split}_loss"].append(loss)
                        results[name][f"{split}_acc"].append(accuracy)
            tested = measure(sess, nets, x, y, training, test.images, test.labels, len(test.images))
    for name, (loss, accuracy) in tested.items():
        results[name] |= {"test_loss": loss, "test_acc": accuracy}
    return results, spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mnist", type=Path, required=True, help="folder with MNIST's four .gz files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=reference.EPOCHS)
    parser.add_argument("--out", type=Path, help="write the JSON here (default: stdout)")
    args = parser.parse_args()

    t0 = time.perf_counter()
    mnist = reference.read_data_sets(args.mnist)
    read_s = time.perf_counter() - t0
    results, spent = run(mnist, args.seed, args.epochs)
    seconds = {"import_tensorflow_s": IMPORTED - STARTED, "read_mnist_s": read_s, **spent,
               "total_s": time.perf_counter() - STARTED}
    report = {"layout": LAYOUT, "seed": args.seed, "epochs": args.epochs, "tensorflow": tf.__version__,
              "variants": results, "seconds": seconds}
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
