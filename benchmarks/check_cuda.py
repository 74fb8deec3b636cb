"""The CUDA path on a GPU (CI has none; run where one is): sync-free steps, determinism, the lab.

    python benchmarks/check_cuda.py [--raw data/raw] [--out benchmarks/cuda.json]

On the prepared split (made from `--raw` if `data/prepared` is missing), with `train.device:
cuda`: (1) a training epoch runs under `torch.cuda.set_sync_debug_mode("error")`, so any host
sync inside the step fails it; (2) two fresh runs of the same config end with equal weights;
(3) replica k of a stack matches the same seed trained alone as a plain module with
torch.optim; (4) the lab (params.yaml, every variant, all seeds) trains for its epochs, with
ms/step, evaluation time per epoch and test accuracy per variant.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.data import Split, load_split
from pipeline.model import StackedMlp, plain_mlp, unstack
from pipeline.params import load_params
from pipeline.prepare import prepare
from pipeline.train import configure_runtime
from pipeline.training import (
    epoch_metrics,
    epoch_permutations,
    make_optimizer,
    score,
    train_epoch,
)

ROOT = Path(__file__).resolve().parents[1]


def timed(fn) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - started


def sync_free_epoch(config, train: Split) -> dict:
    model = StackedMlp(config, config.seeds).cuda()
    optimizer = make_optimizer(model, config)
    torch.cuda.set_sync_debug_mode("error")
    try:
        train_epoch(model, optimizer, train, config.seeds, 1, config.batch_size)
        error = None
    except RuntimeError as caught:
        error = str(caught).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return {"sync_free": error is None, "error": error}


def final_weights(config, train: Split, epochs: int) -> dict:
    model = StackedMlp(config, config.seeds).cuda()
    optimizer = make_optimizer(model, config)
    for epoch in range(1, epochs + 1):
        train_epoch(model, optimizer, train, config.seeds, epoch, config.batch_size)
    return model.state_dict()


def stack_matches_alone(config, train: Split, steps: int) -> dict:
    """Replica 1 of a stack of 3 against its seed alone (plain module, torch.optim, fused)."""
    seeds = config.seeds[:3]
    part = Split(train.images[: steps * config.batch_size], train.labels[: steps * config.batch_size])
    stack = StackedMlp(config, seeds).cuda()
    train_epoch(stack, make_optimizer(stack, config), part, seeds, 1, config.batch_size)
    alone = plain_mlp(config, seeds[1]).cuda()
    reference = torch.optim.Adam(alone.parameters(), lr=config.lr, eps=config.adam_eps, fused=True)
    [order] = epoch_permutations([seeds[1]], 1, len(part))
    order = order.cuda()
    for start in range(0, len(part), config.batch_size):
        rows = order[start : start + config.batch_size]
        loss = F.cross_entropy(alone(part.images[rows]), part.labels[rows])
        reference.zero_grad()
        loss.backward()
        reference.step()
    extracted = unstack(stack.cpu(), config, 1).state_dict()
    worst = 0.0
    for name, expected in alone.cpu().state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        scale = expected.abs().max().clamp(min=1e-6)
        worst = max(worst, float((extracted[name] - expected).abs().max() / scale))
    return {"steps": steps, "max_relative_difference": worst, "within_1e-4": worst <= 1e-4}


def lab(params, train: Split, val: Split, test: Split) -> dict:
    results = {}
    for variant in params.variants:
        config = params.variant(variant)
        model = StackedMlp(config, config.seeds).cuda()
        optimizer = make_optimizer(model, config)
        steps = -(-len(train) // config.batch_size) * config.epochs
        train_s = eval_s = 0.0
        for epoch in range(1, config.epochs + 1):
            train_s += timed(partial(train_epoch, model, optimizer, train, config.seeds, epoch, config.batch_size))
            eval_s += timed(partial(epoch_metrics, model, train, val, config.eval_batch_size))
        test_acc = score(model, test, config.eval_batch_size).acc.tolist()
        results[variant] = {"seeds": len(config.seeds), "ms_per_step": 1000 * train_s / steps,
                            "eval_s_per_epoch": eval_s / config.epochs, "train_s": train_s,
                            "test_acc_mean": statistics.fmean(test_acc), "test_acc": test_acc}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--raw", type=Path, default=ROOT / "data" / "raw")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "cuda.json")
    args = parser.parse_args()
    params = load_params(ROOT / "params.yaml")
    prepared = ROOT / "data" / "prepared"
    if not (prepared / "manifest.json").exists():
        prepare(params.data, args.raw, prepared)
    device = configure_runtime(params.train.threads, "cuda")
    train, val, test = (load_split(prepared, split, device) for split in ("train", "val", "test"))
    config = params.variant("batchnorm")

    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}
    report["sync"] = sync_free_epoch(config, train)
    first, second = final_weights(config, train, 2), final_weights(config, train, 2)
    report["bit_identical_reruns"] = all(torch.equal(first[k], second[k]) for k in first)
    report["stack_vs_alone"] = stack_matches_alone(config, train, steps=208)
    report["lab"] = lab(params, train, val, test)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
