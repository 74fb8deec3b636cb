"""The CUDA path on a GPU (CI has none; run where one is): sync-free steps, determinism, the lab.

    python -m benchmarks.check_cuda [--raw data/raw] [--out benchmarks/cuda.json]

On the prepared split (made from `--raw` if `data/prepared` is missing), with `train.device:
cuda`: (1) the synchronizing CUDA calls of an epoch, counted by `torch.cuda.set_sync_debug_mode`;
(2) fresh runs, a run resumed from its state after epoch 1, a run without the CUDA graph and
runs on pipeline/nn/fastpath.py's private and public calls all end with equal weights; (3)
replica k of a stack against the same seed trained alone as a plain module with torch.optim;
(4) the lab (params.yaml, every variant, all seeds) for its epochs: ms/step, evaluation seconds
per epoch and test accuracy per variant.
"""

import argparse
import json
import statistics
import time
import warnings
from functools import partial
from pathlib import Path

import torch

from pipeline.nn import fastpath
from pipeline.data import Split, load_split
from pipeline.nn.model import StackedMlp, unstack
from pipeline.config.params import load_params
from pipeline.stages.prepare import prepare
from pipeline.nn.training import (
    TrainingStep,
    configure_runtime,
    epoch_metrics,
    epoch_permutations,
    make_optimizer,
    score,
    step_rows,
    train_epoch,
    trained_state,
)

from tests.reference import train_alone  # the CPU equivalence test's reference loop
from tests.support import ROOT


def timed(fn) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - started


def syncs_in_an_epoch(config, train: Split) -> dict:
    """Synchronizing CUDA calls during the second epoch (the first captures the graph)."""
    model = StackedMlp(config).cuda()
    step = TrainingStep(model, make_optimizer(model, config), train, config)
    train_epoch(step, 1)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_epoch(step, 2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchronizing CUDA operation" in str(w.message)]
    return {"steps": len(step_rows(torch.zeros(1, len(train)), config.batch_size)), "synchronizing_calls": len(syncs)}


def eager_epoch(step: TrainingStep, epoch: int) -> None:
    """train_epoch without the CUDA graph: every step launched op by op."""
    step.model.train()
    order = epoch_permutations(step.config.seeds, epoch, len(step.train)).cuda()
    for rows in step_rows(order, step.config.batch_size):
        step.eager(rows)


def final_weights(config, train: Split, epochs: int, graphed: bool = True, resume_after: int | None = None,
                  private: bool | None = None) -> dict:
    """`private`: pipeline/nn/fastpath.py's path, kept across the resume (default: the stage's)."""
    model = StackedMlp(config).cuda()
    step = TrainingStep(model, make_optimizer(model, config, private), train, config)
    for epoch in range(1, epochs + 1):
        if epoch - 1 == resume_after:  # as a rerun after a kill: fresh objects from the saved state
            saved = trained_state(model, step.optimizer)
            model = StackedMlp(config).cuda()
            model.load_state_dict(saved["model"])
            optimizer = make_optimizer(model, config, private)
            optimizer.load_state_dict(saved["optimizer"])
            step = TrainingStep(model, optimizer, train, config)
        (train_epoch if graphed else eager_epoch)(step, epoch)
    return model.state_dict()


def equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a[key], b[key]) for key in a)


def stack_matches_alone(config, train: Split, steps: int) -> dict:
    """Replica 1 of a stack of 3 against its seed alone (plain module, torch.optim's fused Adam)."""
    config = config.model_copy(update={"seeds": config.seeds[:3]})
    part = Split(train.pixels[: steps * config.batch_size], train.labels[: steps * config.batch_size])
    stack = StackedMlp(config).cuda()
    train_epoch(TrainingStep(stack, make_optimizer(stack, config), part, config), 1)
    alone, _ = train_alone(config, config.seeds[1], part, part, epochs=1)
    extracted = unstack(stack.cpu(), config, 1).state_dict()
    close, worst = True, 0.0
    for name, expected in alone.cpu().state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        difference = (extracted[name] - expected).abs()
        close &= bool((difference <= 1e-5 + 1e-4 * expected.abs()).all())  # the CPU test's tolerance
        worst = max(worst, float((difference / expected.abs().clamp(min=1e-3)).max()))
    return {"steps": steps, "rtol_1e-4_atol_1e-5": close, "max_relative_difference": worst}


def lab(params, train: Split, val: Split, test: Split) -> dict:
    results = {}
    for variant in params.variants:
        config = params.variant(variant)
        model = StackedMlp(config).cuda()
        optimizer = make_optimizer(model, config)
        step = TrainingStep(model, optimizer, train, config)
        steps = -(-len(train) // config.batch_size) * config.epochs
        train_s = eval_s = 0.0
        for epoch in range(1, config.epochs + 1):
            train_s += timed(partial(train_epoch, step, epoch))
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
    report["sync"] = syncs_in_an_epoch(config, train)
    first = final_weights(config, train, 3)
    report["bit_identical_reruns"] = equal(first, final_weights(config, train, 3))
    report["resumed_after_epoch_1_bit_identical"] = equal(first, final_weights(config, train, 3, resume_after=1))
    started = time.perf_counter()
    eager = final_weights(config, train, 3, graphed=False)
    report["eager_s_for_3_epochs"] = time.perf_counter() - started
    report["graph_equals_eager"] = equal(first, eager)
    report["fastpath_private"] = fastpath.private_path("cuda")
    report["public_path_equals_private"] = equal(final_weights(config, train, 3, private=True),
                                                 final_weights(config, train, 3, private=False))
    report["stack_vs_alone"] = stack_matches_alone(config, train, steps=208)
    report["lab"] = lab(params, train, val, test)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
