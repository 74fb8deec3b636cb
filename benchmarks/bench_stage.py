"""The train stage and the whole lab: what it costs beyond the training loop itself.

    python -m benchmarks.bench_stage [--parts overhead,pipeline] [--no-pipeline] [--keep-temp] [--out FILE]

Parts (each in its own child process; `python -m benchmarks.bench_train` runs them all with
bench_step's and prints the table):
  overhead    pipeline.stages.train.train in-process (MLflow to a temp sqlite, checkpoints to a temp
              dir) against the same epochs bare; where the non-epoch time goes
  pipeline    `dvc repro` of the whole lab in a temp copy (prepared data given), then a no-op one
See benchmarks/README.md for what each figure means and the targets.
"""

import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, VARIANT, peak_rss_mb, run_alone, setup
from benchmarks.projects import lab_copy, lab_env, set_param, timed_command


def itemise(stage, spent: dict[str, float]) -> None:
    """Every non-epoch cost of the train stage module `stage` added to `spent` by name, as it runs."""
    from pipeline.nn import checkpoint

    def wrap(owner, name: str, label: str) -> None:
        inner = getattr(owner, name, None)
        if inner is None:  # the stage changed shape: that cost is simply not itemised
            return

        def timed_call(*a, **kw):
            t0 = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - t0

        setattr(owner, name, timed_call)

    # MLflow itself runs in the stage's tracking process (pipeline/tracking/process.py) and
    # cannot be timed from here; what the stage waits for is `TrackingProcess.call`.
    for owner, name, label in [
        (stage, "configure_runtime", "configure_runtime (threads; deterministic mode on CUDA only)"),
        (stage.TrackingProcess, "__init__", "start the tracking process (fork)"),
        (stage, "load_split", "load prepared splits"),
        (stage, "train_epoch", "epochs: train_epoch"),
        (stage, "epoch_metrics", "epochs: epoch_metrics (train+val eval)"),
        (checkpoint, "save", "per epoch: checkpoint save (best.pt, last.pt)"),
        (stage.TrackingProcess, "call", "waiting on MLflow (final model and status)"),
        (stage, "finish", "finish (outputs, then logging the model)"),
    ]:
        wrap(owner, name, label)


def stage_seconds(stage, params) -> float:
    """The train stage's `train` in-process on a temp copy of the prepared data (MLflow to a
    temp sqlite store, checkpoints beside it), paths as dvc.yaml names them."""
    from pipeline.tracking.store import Tracking

    with tempfile.TemporaryDirectory(prefix="bench-stage-") as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        shutil.copytree(ROOT / "data" / "prepared", data / "prepared")
        shutil.copy(ROOT / "environment.json", tmp / "environment.json")  # the check stage's record
        store = Tracking(f"sqlite:///{tmp / 'mlflow.db'}", tmp, "bench-overhead")
        paths = stage.Paths.of(tmp, VARIANT, data / "prepared", data / "checkpoints" / VARIANT,
                               data / "train" / VARIANT)
        cwd = os.getcwd()
        os.chdir(tmp)  # run tags look for git here: none
        try:
            t0 = time.perf_counter()
            stage.train(params, VARIANT, tmp, paths, store)
            return time.perf_counter() - t0
        finally:
            os.chdir(cwd)


def bare_seconds(config) -> float:
    """The stage's epochs bare: no tracking, no checkpoints, the data already loaded."""
    import torch

    from pipeline.data import load_split
    from pipeline.nn.model import StackedMlp
    from pipeline.nn.training import TrainingStep, epoch_metrics, make_optimizer, train_epoch

    prepared = ROOT / "data" / "prepared"
    train, val = load_split(prepared, "train", torch.device("cpu")), load_split(prepared, "val", torch.device("cpu"))
    model = StackedMlp(config)
    step = TrainingStep(model, make_optimizer(model, config), train, config)
    t0 = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        train_epoch(step, epoch)
        epoch_metrics(model, train, val, config.eval_batch_size)
    return time.perf_counter() - t0


def part_overhead(args) -> dict:
    """The train stage in-process vs its bare epochs; every non-epoch cost timed by name."""
    started = time.perf_counter()
    import pipeline.stages.train as stage  # torch and the pipeline, as the stage process imports them

    import_s = time.perf_counter() - started
    params, config = setup(args.threads)
    spent: dict[str, float] = {}
    itemise(stage, spent)
    stage_s = stage_seconds(stage, params)
    bare_s = bare_seconds(config)
    epochs_in_stage = sum(v for k, v in spent.items() if k.startswith("epochs:"))
    per_epoch = sum(v for k, v in spent.items() if k.startswith("per epoch:"))
    return {"epochs": config.epochs, "replicas": len(config.seeds),
            "import_pipeline_train_s": import_s,
            "stage_in_process_s": stage_s, "bare_epochs_s": bare_s,
            "epochs_inside_stage_s": epochs_in_stage,
            # The epochs' evaluation runs on a second thread beside the next epoch's training,
            # so the itemised epoch times overlap: the stage is measured against a bare run.
            "overhead_fraction": (stage_s - bare_s) / stage_s,
            "per_epoch_logging_checkpoint_fraction": per_epoch / stage_s,
            "stage_process_estimate_s": import_s + stage_s,
            "breakdown_s": spent}


def part_pipeline(args) -> dict:
    """`dvc repro` of the lab in a temp copy that already holds raw and prepared data."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-lab-"))
    env = lab_env(tmp)
    try:
        lab_copy(tmp, env)
        full = timed_command(tmp, env, "repro_full.log", ["dvc", "repro"])
        noop = timed_command(tmp, env, "repro_noop.log", ["dvc", "repro"])
        set_param(tmp, "seeds", [0])  # the lab as published: one run per variant
        one_seed = timed_command(tmp, env, "repro_one_seed.log", ["dvc", "repro"])
    finally:
        if not args.keep_temp:
            shutil.rmtree(tmp, ignore_errors=True)
    return {"full": full, "noop": noop, "one_seed": one_seed, "temp_dir": str(tmp) if args.keep_temp else None,
            "peak_rss_largest_stage_mb": peak_rss_mb(resource.RUSAGE_CHILDREN)}


PARTS = {"overhead": part_overhead, "pipeline": part_pipeline}


if __name__ == "__main__":
    run_alone(__doc__, PARTS)
