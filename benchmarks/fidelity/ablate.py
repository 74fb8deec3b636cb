"""One TF1 detail at a time in the port, over many seeds, against the reference's figures.

    python -m benchmarks.fidelity.ablate --mnist ../shared/data/mnist --variant no_norm \
        [--change first_val] [--change ...] [--first-seed 0] [--seeds 20]

The candidates the fidelity issue named, each switched here by replacing one function of the
pipeline for this process only (none changed the numbers, so none is a param; see README.md):

  tf1_adam_eps     epsilon added to Adam's uncorrected sqrt(v), as TF1's AdamOptimizer does:
                   PyTorch's form with eps / sqrt(1 - beta2^t)
  carry            `next_batch`: every step takes 32 images, a pass's rest is carried into the
                   next (reshuffled) pass, 55,000 // 32 = 1,718 steps an epoch
  first_val        validation = the first 5,000 training images, not a seeded random 5,000
  multiply_scale   pixels x * float32(1/255), as TF1's reader scaled them, not x / 255

Appends the per-seed test figures to `--out` (JSON lines) and prints mean ± sample sd with
Welch's p against every seed of the variant in the reference files. `--table` prints instead
the markdown table of everything in `--out`, each row against the reference's same seeds.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from scipy import stats

import pipeline.nn.fastpath
import pipeline.nn.optimizer
import pipeline.nn.training
import pipeline.stages.prepare
from benchmarks.fidelity import bench_fidelity
from pipeline.config.params import load_params
from pipeline.nn.training import configure_runtime
from pipeline.stages.prepare import prepare
from tests.support import ROOT


def tf1_adam_eps() -> None:
    def step(self, grads):
        t = float(self.steps[0]) + 1  # the step about to be taken
        eps = self.eps / (1 - pipeline.nn.fastpath.BETAS[1] ** t) ** 0.5
        pipeline.nn.fastpath.update(self.kind, list(self.params), list(grads), self.exp_avg, self.exp_avg_sq,
                                    self.steps, lr=self.lr, weight_decay=0.0, eps=eps, private=self.private,
                                    counts=self.counts)
    pipeline.nn.optimizer.FusedOptimizer.step = step


def carry() -> None:
    permutations = pipeline.nn.training.epoch_permutations

    def train_epoch(step, epoch, on_step=None):
        """Epoch e is steps (e-1)*S .. e*S-1 of one stream of shuffled passes, S = N // B."""
        step.model.train()
        size, batch = len(step.train), step.config.batch_size
        start, end = (epoch - 1) * (size // batch) * batch, epoch * (size // batch) * batch
        passes = range(start // size + 1, (end - 1) // size + 2)
        stream = torch.cat([permutations(step.config.seeds, p, size) for p in passes], 1)
        offset = (passes[0] - 1) * size
        for rows in pipeline.nn.training.step_rows(stream[:, start - offset : end - offset], batch):
            step(rows)
    bench_fidelity.train_epoch = train_epoch


def first_val() -> None:
    def split_indices(total, val_size, seed):
        return torch.arange(val_size, total), torch.arange(val_size)
    pipeline.stages.prepare.split_indices = split_indices


def multiply_scale() -> None:
    scale = torch.tensor(1.0 / 255.0, dtype=torch.float32)
    pipeline.nn.training.as_images = lambda pixels, out=None: (
        pixels.float() if out is None else out.copy_(pixels)).mul_(scale)


CHANGES = {change.__name__: change for change in (tf1_adam_eps, carry, first_val, multiply_scale)}
REFERENCES = [bench_fidelity.HERE / "reference.json", bench_fidelity.HERE / "reference_no_norm_seeds20-199.json"]


def print_table(results: Path, references: list[Path]) -> None:
    """A row per run, then each pooled where one change was run on several seed ranges.

    Each row is tested against the reference's runs of the same seeds.
    """
    reference: dict[str, dict] = {}
    for path in references:
        for variant, runs in json.loads(path.read_text())["variants"].items():
            reference.setdefault(variant, {}).update(runs)
    rows, pooled = [], {}
    for line in results.read_text().splitlines():
        run = json.loads(line)
        key = (run["variant"], " + ".join(run["changes"] + run["overrides"]) or "port as is")
        rows.append((key, run))
        pooled.setdefault(key, []).append(run)
    rows += [(key, {name: sum((run[name] for run in runs), []) for name in ("seeds", "test_acc", "test_loss")})
             for key, runs in pooled.items() if len(runs) > 1]
    print("| variant | port with | seeds | port test_acc | port test_loss | reference test_acc | Welch p |")
    print("|---|---|---|---|---|---|---|")
    for (variant, label), run in rows:
        ref = [reference[variant][str(seed)]["test_acc"] for seed in run["seeds"]]
        p = stats.ttest_ind(run["test_acc"], ref, equal_var=False).pvalue
        acc, loss = run["test_acc"], run["test_loss"]
        print(f"| {variant} | {label} | {min(run['seeds'])}-{max(run['seeds'])} | {100 * statistics.mean(acc):.2f} ± "
              f"{100 * statistics.stdev(acc):.2f} | {statistics.mean(loss):.3f} | {100 * statistics.mean(ref):.2f} ± "
              f"{100 * statistics.stdev(ref):.2f} | {p:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mnist", type=Path)
    parser.add_argument("--variant", default="no_norm")
    parser.add_argument("--change", action="append", default=[], choices=sorted(CHANGES))
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--reference", type=Path, nargs="+", default=REFERENCES)
    parser.add_argument("--out", type=Path, default=bench_fidelity.HERE / "ablation.jsonl")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    if args.table:
        print_table(args.out, args.reference)
        return
    if args.mnist is None:
        parser.error("--mnist is required to train")

    for change in args.change:
        CHANGES[change]()
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    params = load_params(ROOT / "params.yaml").model_copy(update={"seeds": seeds})
    device = configure_runtime(params.train.threads, "cpu")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as temp:
        prepare(params.data, args.mnist, Path(temp))
        port = bench_fidelity.train_and_test(params, args.variant, Path(temp), device)
    reference = {}
    for path in args.reference:
        reference |= json.loads(path.read_text())["variants"].get(args.variant, {})
    ref = [run["test_acc"] for run in reference.values()]
    p = stats.ttest_ind(port["test_acc"], ref, equal_var=False).pvalue
    with args.out.open("a") as out:
        out.write(json.dumps({"variant": args.variant, "changes": sorted(args.change), "overrides": [],
                                "seeds": seeds, **port}) + "\n")
    acc, loss = port["test_acc"], port["test_loss"]
    print(f"{args.variant} {'+'.join(sorted(args.change)) or 'port as is'}: test_acc "
          f"{100 * statistics.mean(acc):.2f} ± {100 * statistics.stdev(acc):.2f} (n={len(acc)}), "
          f"test_loss {statistics.mean(loss):.3f}; reference {100 * statistics.mean(ref):.2f} ± "
          f"{100 * statistics.stdev(ref):.2f} (n={len(ref)}); Welch p = {p:.3f} "
          f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
