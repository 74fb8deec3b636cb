"""Step rates of the lab's training loop: what a step costs, and what each shortcut saves.

    python -m benchmarks.bench_step [--parts baseline,project,stacked,threads,fastpath,floor] [--steps N] [--out FILE]

Parts (each in its own child process; `python -m benchmarks.bench_train` runs them all with
bench_stage's and prints the table):
  baseline    torchvision MNIST + DataLoader(batch 32, shuffle) + plain nn.Sequential + Adam
  project     pipeline.training.train_epoch on a StackedMlp with K=1
  stacked     K=5 stacked vs 5 sequential K=1 runs (and bit-identical repeats)
  threads     a K=5 step and one evaluation at 1 and at 2 torch threads
  fastpath    ms/step of the step by hand (pipeline/nn/backprop.py, fastpath's private calls) against
              autograd's (the public calls): K=1 with and without batch norm, K=5
  floor       ms/step of the step by hand against the fewest tensor calls a step needs (torch's kernels,
              no autograd: issue 19's floor): K=1 with and without batch norm, K=5 and K=20 with it
See benchmarks/README.md for what each figure means and the targets.
"""

import gzip
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, lab_splits, project_steps, run_alone, same_weights, setup, timed


def part_baseline(args) -> dict:
    """The obvious loop: torchvision dataset, DataLoader, nn.Sequential, default Adam."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    from pipeline.data import read_split
    from pipeline.stages.prepare import split_indices
    from tests.reference import plain_mlp

    params, config = setup(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-mnist-") as tmp:
        raw = Path(tmp) / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for gz in sorted((ROOT / "data" / "raw").glob("*-ubyte.gz")):
            (raw / gz.stem).write_bytes(gzip.decompress(gz.read_bytes()))
        mnist = datasets.MNIST(tmp, train=True, download=False, transform=transforms.ToTensor())
        train_idx, _ = split_indices(len(mnist), params.data.val_size, params.data.split_seed)
        _, prepared_labels = read_split(ROOT / "data" / "prepared" / "train")
        same_split = torch.equal(mnist.targets[train_idx], torch.from_numpy(prepared_labels))
        loader = DataLoader(Subset(mnist, train_idx.tolist()), batch_size=config.batch_size,
                            shuffle=True, generator=torch.Generator().manual_seed(0))

        def run(steps: int) -> float:
            torch.manual_seed(0)
            model = plain_mlp(config, seed=0)
            optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
            model.train()
            done, total = 0, 0.0
            while done < steps:
                for images, labels in loader:
                    loss = F.cross_entropy(model(images), labels)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    total += loss.item()
                    done += 1
                    if done == steps:
                        break
            return total / steps

        run(50)  # warm-up
        timing = timed(lambda: run(args.steps), repeats=2)
    return {"steps": args.steps, "same_split_as_prepared": same_split,
            "steps_per_s": args.steps / timing["best_s"],
            "ms_per_step": 1e3 * timing["best_s"] / args.steps,
            "median_steps_per_s": args.steps / timing["median_s"], "timing": timing}


def part_project(args) -> dict:
    from pipeline.nn.training import epoch_metrics

    params, config, train, val = lab_splits(args.threads)
    seeds = params.seeds[:1]
    project_steps(seeds, config, train, 50)  # warm-up
    models = []
    timing = timed(lambda: models.append(project_steps(seeds, config, train, args.steps)), repeats=3)
    evaluation = timed(lambda: epoch_metrics(models[0], train, val, config.eval_batch_size), repeats=3)
    return {"replicas": 1, "steps": args.steps,
            "steps_per_s": args.steps / timing["best_s"],
            "ms_per_step": 1e3 * timing["best_s"] / args.steps,
            "median_steps_per_s": args.steps / timing["median_s"],
            "eval_s_per_epoch": evaluation["best_s"],
            "bit_identical_repeats": all(same_weights(models[0], m) for m in models[1:]),
            "timing": timing}


def part_stacked(args) -> dict:
    from pipeline.nn.training import epoch_metrics

    params, config, train, val = lab_splits(args.threads)
    seeds = params.seeds
    project_steps(seeds, config, train, 50)  # warm-up
    stacked, sequential, models = [], [], []
    for _ in range(2):  # alternated, so both see the same machine load
        stacked.append(timed(lambda: models.append(project_steps(seeds, config, train, args.steps)), 1)["best_s"])
        sequential.append(timed(lambda: [project_steps([s], config, train, args.steps) for s in seeds], 1)["best_s"])
    evaluation = timed(lambda: epoch_metrics(models[0], train, val, config.eval_batch_size), repeats=3)
    k, best_stacked, best_sequential = len(seeds), min(stacked), min(sequential)
    return {"replicas": k, "steps": args.steps,
            "stacked_ms_per_step": 1e3 * best_stacked / args.steps,
            "stacked_replica_steps_per_s": k * args.steps / best_stacked,
            "sequential_replica_steps_per_s": k * args.steps / best_sequential,
            "ratio": best_sequential / best_stacked,
            "median_ratio": statistics.median(sequential) / statistics.median(stacked),
            "eval_s_per_epoch": evaluation["best_s"],
            "bit_identical_repeats": all(same_weights(models[0], m) for m in models[1:]),
            "stacked_s": stacked, "sequential_s": sequential}


def part_threads(args) -> dict:
    import torch

    from pipeline.nn.training import epoch_metrics

    params, config, train, val = lab_splits(1)
    steps, result = min(args.steps, 500), {}
    for threads in (1, 2, 1, 2):
        torch.set_num_threads(threads)
        model = project_steps(params.seeds, config, train, 20)
        step = timed(lambda: project_steps(params.seeds, config, train, steps), 1)["best_s"]
        evaluation = timed(lambda m=model: epoch_metrics(m, train, val, config.eval_batch_size), 1)["best_s"]
        entry = result.setdefault(f"threads_{threads}", {"ms_per_step": [], "eval_s": []})
        entry["ms_per_step"].append(1e3 * step / steps)
        entry["eval_s"].append(evaluation)
    for entry in result.values():
        entry["best_ms_per_step"] = min(entry["ms_per_step"])
        entry["best_eval_s"] = min(entry["eval_s"])
    return {"replicas": len(params.seeds), "steps": steps, **result}


def part_fastpath(args) -> dict:
    """ms per step on the private path (pipeline/nn/backprop.py's step by hand, torch's fused kernels)
    and on the public one (autograd, torch.optim's functional update), alternated 3 times, medians:
    K=1 with batch norm (`k1`), K=1 without (`k1_no_norm`), the lab's K=5 with batch norm (`k5`).
    Both paths run the same kernels, so they end with equal weights (`same_weights`)."""
    params, config, train, _ = lab_splits(args.threads)
    result = {}
    for key, seeds, norm in (("k1", params.seeds[:1], "batch"), ("k1_no_norm", params.seeds[:1], "none"),
                             ("k5", params.seeds, "batch")):
        variant = config.model_copy(update={"norm": norm})
        for private in (True, False):  # warm-up: each path's first-use costs stay out of the timings
            project_steps(seeds, variant, train, 50, private=private)
        walls, models = {True: [], False: []}, {}
        for _ in range(3):  # alternated, so both see the same machine load
            for private in (True, False):
                started = time.perf_counter()
                models[private] = project_steps(seeds, variant, train, args.steps, private=private)
                walls[private].append(time.perf_counter() - started)
        median = {private: statistics.median(w) for private, w in walls.items()}
        result[key] = {
            "replicas": len(seeds), "norm": norm,
            "private_median_ms_per_step": 1e3 * median[True] / args.steps,
            "public_median_ms_per_step": 1e3 * median[False] / args.steps,
            "private_median_steps_per_s": args.steps / median[True],
            "public_median_steps_per_s": args.steps / median[False],
            "private_vs_public": median[False] / median[True],
            "same_weights": same_weights(models[True], models[False]),
            "private_s": walls[True], "public_s": walls[False],
        }
    return {"steps": args.steps, **result}


class FloorStep:
    """The fewest tensor calls a step of K stacked replicas of the lab's MLP needs with torch's
    kernels, no autograd: the rows' float images gathered; per layer one bmm (baddbmm with a bias),
    batch norm's kernel on the [B, K * F] channels (one layout copy there and back, as the stack's
    own module), relu in place; the softmax-cross-entropy gradient (softmax / B minus the rows'
    one-hot / B, gathered); per layer back one bmm for the weights, a sum for the bias, one bmm and
    relu's mask (and batch norm's backward kernel); one fused Adam. No preallocated layer outputs,
    no uint8 pixels: what it leaves out is what the step by hand adds to the arithmetic."""

    def __init__(self, train, config, replicas: int) -> None:
        import torch

        generator = torch.Generator().manual_seed(0)
        batch = config.batch_size
        self.images = train.pixels.float().div_(255)
        self.one_hot = torch.zeros(len(train), 10).scatter_(1, train.labels[:, None], 1 / batch)
        self.shape, self.norm, self.lr, self.eps = (replicas, batch), config.norm == "batch", config.lr, config.adam_eps
        sizes = [train.pixels.shape[1], *config.hidden_sizes, 10]
        self.weights = [torch.randn(replicas, a, b, generator=generator) * 0.05 for a, b in zip(sizes, sizes[1:])]
        hidden = len(sizes) - 2
        self.biases = [None if self.norm and i < hidden else torch.zeros(replicas, 1, b)
                       for i, b in enumerate(sizes[1:])]
        self.gammas = [torch.ones(replicas * b) for b in sizes[1:-1]] if self.norm else []
        self.betas = [torch.zeros(replicas * b) for b in sizes[1:-1]] if self.norm else []
        self.running = [(torch.zeros(replicas * b), torch.ones(replicas * b)) for b in sizes[1:-1]] if self.norm else []
        self.params = [*self.weights, *(b for b in self.biases if b is not None), *self.gammas, *self.betas]
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.counts = torch.zeros(len(self.params))
        self.steps = list(self.counts.unbind())

    def channels(self, h):
        """[K, B, F] as batch norm's [B, K * F], and back (`stacked`). Written here, not taken from
        pipeline/nn/backprop.py's BatchNorm: the floor must not share code with what it measures."""
        return h.transpose(0, 1).reshape(self.shape[1], -1)

    def stacked(self, c):
        return c.view(self.shape[1], self.shape[0], -1).transpose(0, 1)

    def __call__(self, rows) -> None:
        import torch

        from pipeline.nn import fastpath

        aten = torch.ops.aten
        replicas, batch = self.shape
        h, inputs, normed = self.images.index_select(0, rows).view(replicas, batch, -1), [], []
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            inputs.append(h)
            h = torch.bmm(h, weight) if bias is None else torch.baddbmm(bias, h, weight)
            if i < len(self.weights) - 1:
                if self.norm:
                    c = self.channels(h)
                    normed.append((c, *torch.native_batch_norm(c, self.gammas[i], self.betas[i], *self.running[i],
                                                               True, 0.01, 1e-3)))
                    h = self.stacked(normed[-1][1])
                h = h.relu_()
        grad = torch.softmax(h.view(-1, 10), 1).div_(batch).sub_(self.one_hot.index_select(0, rows)).view_as(h)
        weight_grads, bias_grads, gamma_grads, beta_grads = [], [], [], []
        for i in reversed(range(len(self.weights))):
            weight_grads.append(torch.bmm(inputs[i].transpose(1, 2), grad))
            if self.biases[i] is not None:
                bias_grads.append(grad.sum(1, keepdim=True))
            if i == 0:
                break
            grad = aten.threshold_backward.default(torch.bmm(grad, self.weights[i].transpose(1, 2)), inputs[i], 0)
            if self.norm:
                pre, _, mean, invstd = normed[i - 1]
                grad_c, gamma, beta = aten.native_batch_norm_backward.default(
                    self.channels(grad), pre, self.gammas[i - 1], *self.running[i - 1], mean, invstd, True, 1e-3,
                    [True] * 3)
                grad = self.stacked(grad_c)
                gamma_grads.append(gamma)
                beta_grads.append(beta)
        grads = [*weight_grads[::-1], *bias_grads[::-1], *gamma_grads[::-1], *beta_grads[::-1]]
        fastpath.update("adam", self.params, grads, self.exp_avg, self.exp_avg_sq, self.steps, lr=self.lr,
                        weight_decay=0.0, eps=self.eps, private=True, counts=self.counts)


# (key, norm, replicas, what --steps is divided by): the lab's K=1 both ways, its default 5 seeds, 20 seeds.
FLOOR_CASES = (("k1", "batch", 1, 1), ("k1_no_norm", "none", 1, 1), ("k5", "batch", 5, 1), ("k20", "batch", 20, 4))


def part_floor(args) -> dict:
    """ms per step of the step by hand (`project_steps`, the stage's path) and of `FloorStep` on the
    same rows, alternated 5 times, medians: K=1 with batch norm (`k1`) and without (`k1_no_norm`),
    K=5 and K=20 with batch norm (`k20` times a quarter of the steps)."""
    import torch

    from pipeline.nn.training import epoch_permutations, step_rows

    params, config, train, _ = lab_splits(args.threads)
    result = {}
    for key, norm, replicas, divisor in FLOOR_CASES:
        seeds, steps = list(range(replicas)), max(1, args.steps // divisor)
        rows = step_rows(epoch_permutations(seeds, 1, len(train)), config.batch_size)[:-1]
        variant = config.model_copy(update={"norm": norm})
        floor = FloorStep(train, variant, replicas)

        def floor_steps(count: int) -> None:
            with torch.inference_mode():  # as train_epoch runs the step by hand
                for index in range(count):
                    floor(rows[index % len(rows)])

        floor_steps(50)  # warm-up, as the step by hand's below
        project_steps(seeds, variant, train, 50)
        walls = {"by_hand": [], "floor": []}
        for _ in range(5):
            started = time.perf_counter()
            project_steps(seeds, variant, train, steps)
            walls["by_hand"].append(time.perf_counter() - started)
            started = time.perf_counter()
            floor_steps(steps)
            walls["floor"].append(time.perf_counter() - started)
        median = {name: 1e3 * statistics.median(w) / steps for name, w in walls.items()}
        result[key] = {"norm": norm, "replicas": replicas, "steps": steps,
                       "by_hand_median_ms_per_step": median["by_hand"], "floor_median_ms_per_step": median["floor"],
                       "by_hand_vs_floor": median["by_hand"] / median["floor"], "walls_s": walls}
    return result


PARTS = {"baseline": part_baseline, "project": part_project, "stacked": part_stacked, "threads": part_threads,
         "fastpath": part_fastpath, "floor": part_floor}


if __name__ == "__main__":
    run_alone(__doc__, PARTS)
