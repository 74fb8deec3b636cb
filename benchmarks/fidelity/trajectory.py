"""Same start, same batches: does the port's step compute TF1's step? (initialisation and rounding)

    /tmp/tfenv/bin/python benchmarks/fidelity/trajectory.py tf --mnist ../shared/data/mnist --out /tmp/trace.npz
    python -m benchmarks.fidelity.trajectory port --mnist ../shared/data/mnist --trace /tmp/trace.npz

`tf` (the reference's environment, run as a script: reference.py is beside it) runs reference.py's
no-norm graph for one seed and saves its initial weights, the rows `next_batch` fed it at every step and its weights after chosen
steps. `port` (the project's environment) loads those initial weights into a one-replica
`StackedMlp`, feeds the same rows (scaled as TF1's reader did) through the port's own training
step and prints, after each saved step, the largest weight difference and both models' test
accuracy: with TF1's Adam epsilon and with the port's.
"""

import argparse
from pathlib import Path

import numpy as np

SAVED_STEPS = (1, 10, 100, 1_000, 3_000, 10_000, 17_180)


def trace_tf(mnist: Path, out: Path, seed: int) -> None:
    import reference  # beside this script, which `tf` runs as (the first entry of sys.path)
    import tensorflow as tf

    tf1 = tf.compat.v1
    data = reference.read_data_sets(mnist)
    train = data["train"]
    np.random.seed(seed)
    # The reader's own next_batch over row numbers: the same shuffles, the rows it fed.
    numbers = reference.DataSet.__new__(reference.DataSet)
    numbers.__dict__.update(train.__dict__, _images=np.arange(train.num_examples),
                            _labels=np.arange(train.num_examples))
    saved, rows = {}, []
    graph = tf1.Graph()
    with graph.as_default():
        tf1.set_random_seed(seed)
        x, y, training, loss, accuracy, train_op = reference.build(batch_norm=False)
        weights = tf1.trainable_variables()
        with tf1.Session(graph=graph, config=reference.one_thread()) as sess:
            sess.run(tf1.global_variables_initializer())
            saved["init"] = sess.run(weights)
            for step in range(1, SAVED_STEPS[-1] + 1):
                batch, _ = numbers.next_batch(reference.BATCH_SIZE)
                rows.append(batch)
                sess.run(train_op, {x: train.images[batch], y: train.labels[batch], training: True})
                if step in SAVED_STEPS:
                    saved[step] = sess.run(weights)
                    saved[f"acc{step}"] = sess.run(accuracy, {x: data["test"].images, y: data["test"].labels,
                                                              training: False})
    arrays = {f"w{key}_{i}": w for key, ws in saved.items() if not str(key).startswith("acc")
              for i, w in enumerate(ws)}
    arrays |= {key: np.array(value) for key, value in saved.items() if str(key).startswith("acc")}
    np.savez(out, rows=np.stack(rows), **arrays)


def replay_port(mnist: Path, trace: Path) -> None:
    import torch

    from benchmarks.fidelity import ablate
    from pipeline.config.params import load_params
    from pipeline.data import Split, read_raw_split
    from pipeline.nn.model import StackedMlp
    from pipeline.nn.training import TrainingStep, make_optimizer, score
    from tests.support import ROOT

    torch.set_num_threads(1)
    saved = np.load(trace)
    images, labels = read_raw_split(mnist, "train")
    train = Split(images[5000:].flatten(1), labels[5000:])
    test_images, test_labels = read_raw_split(mnist, "test")
    test = Split(test_images.flatten(1), test_labels)
    ablate.multiply_scale()  # the reader's scaling, in training and in scoring
    config = load_params(ROOT / "params.yaml").variant("no_norm")
    config = config.model_copy(update={"seeds": [0]})  # the trace's one seed
    for epsilon in ("torch", "tf1"):
        if epsilon == "tf1":
            ablate.tf1_adam_eps()
        model = StackedMlp(config)
        with torch.no_grad():
            for param, name in zip(model.parameters(), sorted(k for k in saved if k.startswith("winit_")),
                                   strict=True):
                param.copy_(torch.from_numpy(saved[name]).view_as(param))
        step = TrainingStep(model, make_optimizer(model, config), train, config)
        for number, rows in enumerate(torch.from_numpy(saved["rows"]), start=1):
            step.eager(rows)
            if number in SAVED_STEPS:
                tf_weights = [saved[f"w{number}_{i}"] for i in range(len(list(model.parameters())))]
                difference = max(float((p.detach().flatten() - torch.from_numpy(w).flatten()).abs().max())
                                 for p, w in zip(model.parameters(), tf_weights, strict=True))
                port_acc = float(score(model, test, 2000).acc[0])
                print(f"epsilon {epsilon:5} step {number:6}: max |port - TF1| weight {difference:.2e}, "
                      f"test_acc port {port_acc:.4f} TF1 {float(saved[f'acc{number}']):.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("side", choices=["tf", "port"])
    parser.add_argument("--mnist", type=Path, required=True)
    parser.add_argument("--out", type=Path, help="tf: where to save the trace")
    parser.add_argument("--trace", type=Path, help="port: the trace to replay")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.side == "tf":
        trace_tf(args.mnist, args.out, args.seed)
    else:
        replay_port(args.mnist, args.trace)


if __name__ == "__main__":
    main()
