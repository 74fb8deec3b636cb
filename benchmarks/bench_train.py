"""Training throughput and pipeline overhead of the batch-norm MNIST lab, in one run.

    python benchmarks/bench_train.py [--out benchmarks/results.json] [--steps N] [--no-pipeline]

Parts (each measured in its own child process, so each has its own peak RSS):
  baseline    torchvision MNIST + DataLoader(batch 32, shuffle) + plain nn.Sequential + Adam
  project     pipeline.training.train_epoch on a StackedMlp with K=1
  stacked     K=5 stacked vs 5 sequential K=1 runs (and bit-identical repeats)
  threads     a K=5 step and one evaluation at 1 and at 2 torch threads
  overhead    pipeline.train.train in-process (MLflow to a temp sqlite, checkpoints to a temp
              dir) against the same epochs bare; where the non-epoch time goes
  pipeline    `dvc repro` of the whole lab in a temp copy (prepared data given), then a no-op one
See benchmarks/README.md for what each figure means and the targets.
"""

from __future__ import annotations

import argparse
import gzip
import inspect
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANT = "batchnorm"  # the lab's configuration: 784-32-32-10 with batch norm, Adam lr 0.01
PARTS = ("baseline", "project", "stacked", "threads", "overhead", "pipeline")


class _Enough(Exception):
    """Raised from on_step once the wanted number of steps has run."""


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


def setup(threads: int):
    import torch

    from pipeline.params import load_params

    torch.set_num_threads(threads)
    params = load_params(ROOT / "params.yaml")
    return params, params.variant(VARIANT)


def timed(fn, repeats: int) -> dict:
    """Wall seconds of `fn()` over repeats: best and median (the machine is shared)."""
    walls = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - started)
    return {"best_s": min(walls), "median_s": statistics.median(walls), "all_s": walls}


def project_steps(seeds: list[int], config, train, steps: int):
    """A fresh stack trained for exactly `steps` steps with the project's loop; returns it."""
    from pipeline.model import StackedMlp
    from pipeline.training import TrainingStep, make_optimizer, train_epoch

    model = StackedMlp(config, seeds)
    step = TrainingStep(model, make_optimizer(model, config), train, seeds, config.batch_size)
    done = 0

    def count():
        nonlocal done
        done += 1
        if done == steps:
            raise _Enough

    try:
        for epoch in range(1, steps + 1):
            train_epoch(step, epoch, on_step=count)
    except _Enough:
        pass
    return model


def same_weights(a, b) -> bool:
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------- parts


def part_baseline(args) -> dict:
    """The obvious loop: torchvision dataset, DataLoader, nn.Sequential, default Adam."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    from pipeline.model import plain_mlp
    from pipeline.prepare import split_indices

    params, config = setup(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-mnist-") as tmp:
        raw = Path(tmp) / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for gz in sorted((ROOT / "data" / "raw").glob("*-ubyte.gz")):
            (raw / gz.stem).write_bytes(gzip.decompress(gz.read_bytes()))
        mnist = datasets.MNIST(tmp, train=True, download=False, transform=transforms.ToTensor())
        train_idx, _ = split_indices(len(mnist), params.data.val_size, params.data.split_seed)
        prepared = torch.load(ROOT / "data" / "prepared" / "train.pt", weights_only=True)
        same_split = torch.equal(mnist.targets[train_idx], prepared["labels"])
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


def lab_splits(args):
    """The lab's params, batchnorm config and prepared train/val splits, as the stage loads them."""
    import torch

    from pipeline.data import load_split

    params, config = setup(args.threads)
    prepared = ROOT / "data" / "prepared"
    train = load_split(prepared, "train", torch.device("cpu"))
    val = load_split(prepared, "val", torch.device("cpu"))
    return params, config, train, val


def part_project(args) -> dict:
    from pipeline.training import epoch_metrics

    params, config, train, val = lab_splits(args)
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
    from pipeline.training import epoch_metrics

    params, config, train, val = lab_splits(args)
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

    from pipeline.training import epoch_metrics

    params, config, train, val = lab_splits(argparse.Namespace(threads=1))
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


def part_overhead(args) -> dict:
    """The train stage in-process vs its bare epochs; every non-epoch cost timed by name."""
    started = time.perf_counter()
    import pipeline.train as stage  # torch and the pipeline, as the stage process imports them

    import_s = time.perf_counter() - started
    import torch

    from pipeline import checkpoint, tracking
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

    # MLflow itself runs in the stage's tracking process (pipeline/tracking_process.py) and
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
        runs = tracking.Tracking(f"sqlite:///{tmp / 'mlflow.db'}", tmp, "bench-overhead")
        # train(params, variant, root, runs), or the older train(params, variant, paths, runs)
        where = tmp if "root" in inspect.signature(stage.train).parameters else stage.Paths.for_variant(tmp, VARIANT)
        cwd = os.getcwd()
        os.chdir(tmp)  # run tags look for git here: none
        try:
            t0 = time.perf_counter()
            stage.train(params, VARIANT, where, runs)
            stage_s = time.perf_counter() - t0
        finally:
            os.chdir(cwd)

    # The same epochs bare: no tracking, no checkpoints (same process, data already loaded).
    from pipeline.model import StackedMlp
    from pipeline.training import (
        TrainingStep,
        epoch_metrics,
        make_optimizer,
        train_epoch,
    )

    prepared = ROOT / "data" / "prepared"
    train, val = load_split(prepared, "train", torch.device("cpu")), load_split(prepared, "val", torch.device("cpu"))
    model = StackedMlp(config, config.seeds)
    step = TrainingStep(model, make_optimizer(model, config), train, config.seeds, config.batch_size)
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


def part_pipeline(args) -> dict:
    """`dvc repro` of the lab in a temp copy that already holds raw and prepared data."""
    keep = args.keep_temp
    tmp = Path(tempfile.mkdtemp(prefix="bench-lab-"))
    env = {k: v for k, v in os.environ.items() if k not in ("DVC_EXP_NAME", "MLFLOW_TRACKING_URI")}
    env |= {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
            "MNIST_MIRROR": str(ROOT.parent / "shared" / "data" / "mnist"), "DVC_NO_ANALYTICS": "1",
            "PYTHONUNBUFFERED": "1"}

    def sh(*cmd: str) -> None:
        subprocess.run(cmd, cwd=tmp, env=env, check=True, capture_output=True, text=True)

    def repro(log_name: str) -> dict:
        """Wall time of `dvc repro`, and of each stage (from when dvc announces it)."""
        stages, marks = [], []
        t0 = time.perf_counter()
        with open(tmp / log_name, "w") as log:
            proc = subprocess.Popen(["dvc", "repro"], cwd=tmp, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            for line in proc.stdout:
                log.write(line)
                if line.startswith("Running stage '"):
                    stages.append(line.split("'")[1])
                    marks.append(time.perf_counter())
            code = proc.wait()
        wall = time.perf_counter() - t0
        marks.append(t0 + wall)
        tail = (tmp / log_name).read_text().splitlines()[-15:]
        return {"wall_s": wall, "returncode": code,
                "stages_s": {s: marks[i + 1] - marks[i] for i, s in enumerate(stages)},
                **({"log_tail": tail} if code else {})}

    try:
        shutil.copytree(ROOT / "pipeline", tmp / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
        for name in ("dvc.yaml", "params.yaml", "dvc.lock", ".gitignore"):
            if (ROOT / name).exists():
                shutil.copy(ROOT / name, tmp / name)
        sh("git", "init", "-q")
        sh("dvc", "init", "-q")
        shutil.copy(ROOT / ".dvc" / "config", tmp / ".dvc" / "config")
        for sub in ("raw", "prepared"):
            shutil.copytree(ROOT / "data" / sub, tmp / "data" / sub)
        sh("dvc", "commit", "-f", "-q", "download", "prepare")  # data given: download excluded
        full = repro("repro_full.log")
        noop = repro("repro_noop.log")
        # The lab as published: one run per variant (params.yaml's default is 5 seeds).
        params_file = tmp / "params.yaml"
        params_file.write_text(re.sub(r"(?m)^seeds: .*$", "seeds: [0]", params_file.read_text()))
        one_seed = repro("repro_one_seed.log")
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return {"full": full, "noop": noop, "one_seed": one_seed, "temp_dir": str(tmp) if keep else None,
            "peak_rss_largest_stage_mb": peak_rss_mb(resource.RUSAGE_CHILDREN)}


# ------------------------------------------------------------------------------- driver


def run_part(name: str, args) -> dict:
    """One part in a child process: its own imports, allocator and peak RSS."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = Path(handle.name)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--part-out", str(out),
           "--steps", str(args.steps), "--threads", str(args.threads)]
    if args.keep_temp:
        cmd.append("--keep-temp")
    t0, load = time.perf_counter(), os.getloadavg()[0]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    ran = {"part_wall_s": time.perf_counter() - t0, "loadavg_1min_before_after": [load, os.getloadavg()[0]]}
    try:
        if proc.returncode != 0:
            return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-5:], **ran}
        return json.loads(out.read_text()) | ran
    finally:
        out.unlink(missing_ok=True)


def child(args) -> None:
    result = globals()[f"part_{args.part}"](args)
    result["peak_rss_mb"] = peak_rss_mb()
    Path(args.part_out).write_text(json.dumps(result, default=str))


def summary(results: dict) -> dict:
    base, proj, stack = results.get("baseline", {}), results.get("project", {}), results.get("stacked", {})
    over, pipe = results.get("overhead", {}), results.get("pipeline", {})
    figures = {
        "baseline_steps_per_s": base.get("steps_per_s"),
        "project_steps_per_s": proj.get("steps_per_s"),
        "project_vs_baseline": (proj["steps_per_s"] / base["steps_per_s"]
                                if "steps_per_s" in proj and "steps_per_s" in base else None),
        "stacked_replica_steps_per_s": stack.get("stacked_replica_steps_per_s"),
        "sequential_replica_steps_per_s": stack.get("sequential_replica_steps_per_s"),
        "stacked_vs_sequential": stack.get("ratio"),
        "full_lab_repro_s": repro_s(pipe, "full"),
        "one_seed_lab_repro_s": repro_s(pipe, "one_seed"),
        "noop_repro_s": repro_s(pipe, "noop"),
        "overhead_fraction": over.get("overhead_fraction"),
        "per_epoch_logging_checkpoint_fraction": over.get("per_epoch_logging_checkpoint_fraction"),
        "project_ms_per_step_k1": proj.get("ms_per_step"),
        "stacked_ms_per_step_k5": stack.get("stacked_ms_per_step"),
        "peak_rss_mb": {name: part.get("peak_rss_largest_stage_mb", part.get("peak_rss_mb"))
                        for name, part in results.items() if name in PARTS},
    }
    at_least = {"project_vs_baseline": 3.0, "stacked_vs_sequential": 2.5}
    at_most = {"overhead_fraction": 0.05, "per_epoch_logging_checkpoint_fraction": 0.05,
               "full_lab_repro_s": 60.0, "one_seed_lab_repro_s": 30.0, "noop_repro_s": 3.0}
    figures["targets_met"] = {
        **{k: figures[k] is not None and figures[k] >= v for k, v in at_least.items()},
        **{k: figures[k] is not None and figures[k] <= v for k, v in at_most.items()},
    }
    return figures


def repro_s(pipe: dict, name: str) -> float | None:
    """A `dvc repro` wall time, or None where it failed (its log tail is in the JSON)."""
    run = pipe.get(name, {})
    return run.get("wall_s") if run.get("returncode") == 0 else None


def fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: dict, figures: dict) -> None:
    base, proj, stack = results.get("baseline", {}), results.get("project", {}), results.get("stacked", {})
    thr, over, pipe = results.get("threads", {}), results.get("overhead", {}), results.get("pipeline", {})
    rows = [
        ("(a) baseline: torchvision+DataLoader, K=1", fmt(base.get("steps_per_s")) + " steps/s",
         fmt(base.get("ms_per_step"), ".3f") + " ms/step", fmt(base.get("peak_rss_mb"), ".0f")),
        ("(b) project train_epoch, K=1", fmt(proj.get("steps_per_s")) + " steps/s",
         fmt(proj.get("ms_per_step"), ".3f") + " ms/step", fmt(proj.get("peak_rss_mb"), ".0f")),
        ("    ratio (b)/(a)  [target >= 3]", fmt(figures["project_vs_baseline"], ".2f") + "x", "", ""),
        ("(c) K=5 stacked", fmt(stack.get("stacked_replica_steps_per_s")) + " replica-steps/s",
         fmt(stack.get("stacked_ms_per_step"), ".3f") + " ms/step", fmt(stack.get("peak_rss_mb"), ".0f")),
        ("    5 x K=1 sequential", fmt(stack.get("sequential_replica_steps_per_s")) + " replica-steps/s", "", ""),
        ("    ratio stacked/sequential  [target >= 2.5]", fmt(figures["stacked_vs_sequential"], ".2f") + "x", "", ""),
        ("evaluation per epoch (train+val), K=1 / K=5",
         f"{fmt(proj.get('eval_s_per_epoch'), '.3f')} / {fmt(stack.get('eval_s_per_epoch'), '.3f')} s", "", ""),
    ]
    for threads in (1, 2):
        t = thr.get(f"threads_{threads}", {})
        rows.append((f"K=5 at {threads} torch thread(s)", fmt(t.get("best_ms_per_step"), ".3f") + " ms/step",
                     "eval " + fmt(t.get("best_eval_s"), ".3f") + " s", fmt(thr.get("peak_rss_mb"), ".0f")))
    rows += [
        ("train stage in-process / its epochs", f"{fmt(over.get('stage_in_process_s'))} / "
         + f"{fmt(over.get('epochs_inside_stage_s'))} s", "", fmt(over.get("peak_rss_mb"), ".0f")),
        ("    overhead vs bare epochs  [target <= 0.05]", fmt(over.get("overhead_fraction"), ".3f"),
         "in-loop " + fmt(over.get("per_epoch_logging_checkpoint_fraction"), ".3f"), ""),
        ("    import pipeline.train", fmt(over.get("import_pipeline_train_s"), ".2f") + " s", "", ""),
        ("dvc repro, full lab, 5 seeds  [target <= 60 s]", fmt(figures["full_lab_repro_s"]) + " s", "",
         fmt(pipe.get("peak_rss_largest_stage_mb"), ".0f")),
        ("dvc repro, full lab, 1 seed  [target <= 30 s]", fmt(figures["one_seed_lab_repro_s"]) + " s", "", ""),
        ("dvc repro, no-op", fmt(figures["noop_repro_s"], ".2f") + " s", "", ""),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'':{width}}  {'throughput':>28}  {'':>18}  peak RSS MB")
    for label, a, b, c in rows:
        print(f"{label:{width}}  {a:>28}  {b:>18}  {c:>6}")
    for label, seconds in sorted(over.get("breakdown_s", {}).items(), key=lambda kv: -kv[1]):
        print(f"    {label:70} {seconds:7.2f} s")
    for name in ("full", "noop", "one_seed"):
        for stage_name, seconds in pipe.get(name, {}).get("stages_s", {}).items():
            print(f"    dvc {name}: {stage_name:30} {seconds:7.2f} s")
    for name, part in results.items():
        if "error" in part:
            print(f"!! part {name} failed: {' | '.join(part['error'])}")
    for name in ("full", "noop", "one_seed"):
        if pipe.get(name, {}).get("returncode"):
            print(f"!! dvc repro ({name}) failed: {pipe[name]['log_tail'][-2].strip()}")


def code_state() -> dict:
    """Which code was measured: the commit, and the files changed since it."""
    def git(*cmd: str) -> str:
        result = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=False)
        return result.stdout.rstrip()  # not strip(): porcelain lines may start with a space

    changed = [line[3:] for line in git("status", "--porcelain", "--", "pipeline", "dvc.yaml",
                                        "params.yaml").splitlines()]
    return {"commit": git("rev-parse", "HEAD").strip() or None, "uncommitted": changed}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.json")
    parser.add_argument("--steps", type=int, default=2000, help="timed steps per measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (params.yaml train.threads)")
    parser.add_argument("--pipeline", action=argparse.BooleanOptionalAction, default=True,
                        help="also time `dvc repro` of the lab in a temp copy (default: on)")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of: " + ", ".join(PARTS))
    parser.add_argument("--keep-temp", action="store_true", help="keep the pipeline's temp copy")
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    parser.add_argument("--part-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.part:
        child(args)
        return

    import torch

    parts = [p for p in args.parts.split(",") if p and (p != "pipeline" or args.pipeline)]
    results = {"machine": {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                           "torch": torch.__version__, "threads": args.threads,
                           "loadavg_start": os.getloadavg()},
               "code": code_state()}
    for name in parts:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = run_part(name, args)
    results["machine"]["loadavg_end"] = os.getloadavg()
    figures = summary(results)
    print_table(results, figures)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": figures, **results}, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
