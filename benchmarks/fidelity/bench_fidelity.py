"""Fidelity: the port's test accuracy over 20 seeds next to the lab's own TF1 code's (reference.json).

    python -m benchmarks.fidelity.bench_fidelity --mnist ../shared/data/mnist [-S key=value ...]

Trains seeds 0-19 of each variant of `params.yaml` as the train stage does, as one stacked
model on the CPU with `train.threads`, without MLflow or checkpoints, and scores the final
weights on the test split as the evaluate stage does. Prints, per variant, mean ± sample sd
of test accuracy and loss for both, the difference and Welch's t-test p (scipy), and writes
every per-seed figure to `--out`. `-S train.bias_before_bn=true` and the like change a param
(dotted path, YAML value), as `dvc exp run -S` would. About 45 s a variant on one core.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml
from scipy import stats

from pipeline.config.params import parse_params
from pipeline.data import load_split
from pipeline.nn.model import StackedMlp
from pipeline.nn.training import TrainingStep, configure_runtime, make_optimizer, score, train_epoch
from pipeline.stages.prepare import prepare
from tests.support import ROOT

HERE = Path(__file__).resolve().parent
METRICS = ("test_acc", "test_loss")


def with_overrides(raw: dict, assignments: list[str]) -> dict:
    for assignment in assignments:
        path, _, value = assignment.partition("=")
        *parents, key = path.split(".")
        node = raw
        for parent in parents:
            node = node.setdefault(parent, {})
        node[key] = yaml.safe_load(value)
    return raw


def train_and_test(params, variant: str, prepared: Path, device: torch.device) -> dict[str, list[float]]:
    config = params.variant(variant)
    train = load_split(prepared, "train", device)
    model = StackedMlp(config).to(device)
    step = TrainingStep(model, make_optimizer(model, config), train, config)
    for epoch in range(1, config.epochs + 1):
        train_epoch(step, epoch)
    scores = score(model, load_split(prepared, "test", device), config.eval_batch_size)
    return {"test_acc": scores.acc.tolist(), "test_loss": scores.loss.tolist()}


def summary(values: list[float], scale: float, digits: int) -> str:
    return f"{scale * statistics.mean(values):.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mnist", type=Path, required=True, help="folder with MNIST's four .gz files")
    parser.add_argument("--reference", type=Path, default=HERE / "reference.json")
    parser.add_argument("--out", type=Path, default=HERE / "port.json")
    parser.add_argument("-S", "--set", dest="assignments", action="append", default=[],
                        help="override a param, e.g. -S train.bias_before_bn=true")
    parser.add_argument("--variants", nargs="+", default=None, help="default: every variant of params.yaml")
    args = parser.parse_args()

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = parse_params(with_overrides(raw | {"seeds": list(range(20))}, args.assignments))
    reference = json.loads(args.reference.read_text())["variants"]
    device = configure_runtime(params.train.threads, "cpu")
    results = {}
    print("| variant | reference (TF1) test_acc | port test_acc | difference | Welch p | test_loss ref / port |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as temp:
        prepared = Path(temp)
        prepare(params.data, args.mnist, prepared)
        for variant in args.variants or list(params.variants):
            started = time.perf_counter()
            port = train_and_test(params, variant, prepared, device)
            ref = {name: [run[name] for run in reference[variant].values()] for name in METRICS}
            p = stats.ttest_ind(port["test_acc"], ref["test_acc"], equal_var=False).pvalue
            difference = 100 * (statistics.mean(port["test_acc"]) - statistics.mean(ref["test_acc"]))
            results[variant] = {"seeds": params.seeds, **port, "welch_p": p, "difference_points": difference,
                                "seconds": round(time.perf_counter() - started, 1)}
            print(f"| {variant} | {summary(ref['test_acc'], 100, 2)}% (n={len(ref['test_acc'])}) "
                  f"| {summary(port['test_acc'], 100, 2)}% (n={len(port['test_acc'])}) | {difference:+.2f} points "
                  f"| {p:.3f} | {summary(ref['test_loss'], 1, 3)} / {summary(port['test_loss'], 1, 3)} |", flush=True)
    args.out.write_text(json.dumps({"overrides": args.assignments, "variants": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
