"""The train stage and the whole lab: what it costs beyond the training loop itself.

    python benchmarks/bench_stage.py [--parts overhead,pipeline] [--no-pipeline] [--keep-temp] [--out FILE]

Parts (each in its own child process; `python benchmarks/bench_train.py` runs them all with
bench_step.py's and prints the table):
  overhead    pipeline.stages.train.train in-process (MLflow to a temp sqlite, checkpoints to a temp
              dir) against the same epochs bare; where the non-epoch time goes
  pipeline    `dvc repro` of the whole lab in a temp copy (prepared data given), then a no-op one
See benchmarks/README.md for what each figure means and the targets.
"""

from __future__ import annotations

import inspect
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, VARIANT, children_cpu_s, peak_rss_mb, run_alone, setup


def part_overhead(args) -> dict:
    """The train stage in-process vs its bare epochs; every non-epoch cost timed by name."""
    started = time.perf_counter()
    import pipeline.stages.train as stage  # torch and the pipeline, as the stage process imports them

    import_s = time.perf_counter() - started
    import torch

    from pipeline.nn import checkpoint

    from pipeline.tracking import store as tracking
    from pipeline.data import load_split

    params, config = setup(args.threads)
    spent: dict[str, float] = {}

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

    with tempfile.TemporaryDirectory(prefix="bench-stage-") as tmp:
        tmp = Path(tmp)
        shutil.copytree(ROOT / "data" / "prepared", tmp / "data" / "prepared")
        shutil.copy(ROOT / "environment.json", tmp / "environment.json")  # the check stage's record
        store = tracking.Tracking(f"sqlite:///{tmp / 'mlflow.db'}", tmp, "bench-overhead")
        # train(params, variant, root, paths, tracking), paths as dvc.yaml names them; or the older
        # train(params, variant, root, tracking), which made them itself
        where = [tmp]
        if "paths" in inspect.signature(stage.train).parameters:
            data = tmp / "data"
            where.append(stage.Paths.of(tmp, VARIANT, data / "prepared", data / "checkpoints" / VARIANT,
                                        data / "train" / VARIANT))
        cwd = os.getcwd()
        os.chdir(tmp)  # run tags look for git here: none
        try:
            t0 = time.perf_counter()
            stage.train(params, VARIANT, *where, store)
            stage_s = time.perf_counter() - t0
        finally:
            os.chdir(cwd)

    # The same epochs bare: no tracking, no checkpoints (same process, data already loaded).
    from pipeline.nn.model import StackedMlp
    from pipeline.nn.training import (
        TrainingStep,
        epoch_metrics,
        make_optimizer,
        train_epoch,
    )

    prepared = ROOT / "data" / "prepared"
    train, val = load_split(prepared, "train", torch.device("cpu")), load_split(prepared, "val", torch.device("cpu"))
    model = StackedMlp(config)
    step = TrainingStep(model, make_optimizer(model, config), train, config)
    t0 = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        train_epoch(step, epoch)
        epoch_metrics(model, train, val, config.eval_batch_size)
    bare_s = time.perf_counter() - t0

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


def lab_env(tmp: Path) -> dict[str, str]:
    """The environment `dvc repro` runs with in a copy: this venv's dvc, MLflow to a sqlite db in it.
    DVC's analytics as the project's .dvc/config sets them (off), as a user's `dvc repro` runs."""
    env = {k: v for k, v in os.environ.items() if k not in ("DVC_EXP_NAME", "MLFLOW_TRACKING_URI")}
    return env | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
                  "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
                  "MNIST_MIRROR": str(ROOT.parent / "shared" / "data" / "mnist"),
                  "PYTHONUNBUFFERED": "1"}


def sh(tmp: Path, env: dict[str, str], *cmd: str) -> None:
    subprocess.run(cmd, cwd=tmp, env=env, check=True, capture_output=True, text=True)


def lab_copy(tmp: Path, env: dict[str, str]) -> None:
    """A copy of the project in `tmp` (git and DVC initialised) whose data/raw and data/prepared
    are given: the check stage run, then `dvc commit download prepare`, so `dvc repro` starts
    from the prepared data."""
    shutil.copytree(ROOT / "pipeline", tmp / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml", "dvc.lock", ".gitignore", "requirements.lock"):
        if (ROOT / name).exists():  # requirements.lock: the check stage's dependency
            shutil.copy(ROOT / name, tmp / name)
    sh(tmp, env, "git", "init", "-q")
    sh(tmp, env, "dvc", "init", "-q")
    shutil.copy(ROOT / ".dvc" / "config", tmp / ".dvc" / "config")
    for sub in ("raw", "prepared"):
        shutil.copytree(ROOT / "data" / sub, tmp / "data" / sub)
    sh(tmp, env, "dvc", "repro", "-q", "check")  # environment.json, which prepare depends on
    sh(tmp, env, "dvc", "commit", "-f", "-q", "download", "prepare")  # data given: download excluded


def set_param(tmp: Path, key: str, value) -> None:
    """One line of the copy's params.yaml, `key: value`; `key` with its indent ("seeds", "  epochs")."""
    params_file = tmp / "params.yaml"
    text, found = re.subn(rf"(?m)^{key}: .*$", f"{key}: {value}", params_file.read_text())
    if found != 1:
        raise ValueError(f"params.yaml: {found} lines for {key.strip()!r}, expected 1")
    params_file.write_text(text)


MARK = "MARK "  # a line a `repro` command prints: what came before it is one stage


def repro(tmp: Path, env: dict[str, str], log_name: str, *options: str, command: list[str] | None = None) -> dict:
    """Wall and CPU seconds of `dvc repro [options]`, and each stage's seconds: `stages_s` from
    when dvc announces it to the next announcement, `commands_s` from its command's start (dvc's
    `> cmd` line) to dvc's `Updating lock file` after it (the command, then saving its outputs);
    `dvc_s` is the rest of the wall time (dvc's start, its checks between stages). `command`: run
    instead of `dvc repro`; what it prints before a line `MARK <name>` is timed as one stage, <name>.
    """
    stages = []  # [name, announced, command started, lock updated]
    marked = {}  # name: seconds
    cpu0, t0 = children_cpu_s(), time.perf_counter()
    with open(tmp / log_name, "w") as log:
        proc = subprocess.Popen(command or ["dvc", "repro", *options], cwd=tmp, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            now = time.perf_counter()
            if line.startswith(MARK):
                marked[line.removeprefix(MARK).strip()] = now - t0
                stages = []
            elif line.startswith("Running stage '"):
                stages.append([line.split("'")[1], now, None, None])
            elif stages and stages[-1][2] is None and line.startswith("> "):
                stages[-1][2] = now
            elif stages and stages[-1][3] is None and line.startswith("Updating lock file"):
                stages[-1][3] = now
        code = proc.wait()
    wall, cpu = time.perf_counter() - t0, children_cpu_s() - cpu0
    ends = [stage[1] for stage in stages[1:]] + [t0 + wall]
    commands = marked | {name: (updated or end) - (started or announced)
                         for (name, announced, started, updated), end in zip(stages, ends)}
    tail = (tmp / log_name).read_text().splitlines()[-15:]
    return {"wall_s": wall, "cpu_s": cpu, "returncode": code,
            "stages_s": {stage[0]: end - stage[1] for stage, end in zip(stages, ends)},
            "commands_s": commands, "dvc_s": wall - sum(commands.values()),
            **({"log_tail": tail} if code else {})}



def part_pipeline(args) -> dict:
    """`dvc repro` of the lab in a temp copy that already holds raw and prepared data."""
    keep = args.keep_temp
    tmp = Path(tempfile.mkdtemp(prefix="bench-lab-"))
    env = lab_env(tmp)
    try:
        lab_copy(tmp, env)
        full = repro(tmp, env, "repro_full.log")
        noop = repro(tmp, env, "repro_noop.log")
        set_param(tmp, "seeds", [0])  # the lab as published: one run per variant
        one_seed = repro(tmp, env, "repro_one_seed.log")
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return {"full": full, "noop": noop, "one_seed": one_seed, "temp_dir": str(tmp) if keep else None,
            "peak_rss_largest_stage_mb": peak_rss_mb(resource.RUSAGE_CHILDREN)}


PARTS = {"overhead": part_overhead, "pipeline": part_pipeline}


if __name__ == "__main__":
    run_alone(__doc__, PARTS)
