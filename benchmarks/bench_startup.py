"""Each stage's start-up as a whole process: this tree against a baseline commit, alternating.

    python -m benchmarks.bench_startup [--baseline REV] [--repeats 5] [--epochs 1] [--out FILE]

Builds two project copies in a temp folder (tests/support.py's), `baseline` (`git archive REV`,
default `main`) and `current` (this working tree's), prepares MNIST in each from
../shared/data/mnist, trains both variants once in `current` (`--epochs`: the start-up does not
depend on them) and gives `baseline` the same checkpoints, train outputs and MLflow store. Then,
`--repeats` times, alternating the two copies, it times each stage's command exactly as that
copy's dvc.yaml writes it (evaluate@<variant>, compare) and `python -c "import
pipeline.stages.train"`, and prints the medians, their ratio and the current evaluate's largest
imports (`python -X importtime`). The machine's load is recorded beside them: on a shared
machine, compare ratios, not seconds.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.projects import set_param
from tests.support import SHARED_MNIST, copy_project, revision_tree, run, stage_command, stage_env


def commands(copy: Path, variants: list[str]) -> dict[str, list[str]]:
    """Stage name -> its command as this copy's dvc.yaml writes it, run by this interpreter."""
    found = {f"evaluate@{v}": stage_command("evaluate", v, copy) for v in variants}
    found["compare"] = stage_command("compare", project=copy)
    return found | {"import train": [sys.executable, "-c", "import pipeline.stages.train"]}


def make_copies(tmp: Path, baseline: str, epochs: int, env: dict) -> tuple[Path, Path]:
    """Both copies with the upstream stages run, the current one's variants trained, and its train
    outputs and MLflow store given to the baseline (compare finds the runs it publishes into)."""
    current = copy_project(tmp / "current", env)
    base = copy_project(tmp / "baseline", env, revision_tree(baseline, tmp / "baseline-tree"))
    for copy in (current, base):
        set_param(copy, "  epochs", epochs)
        for stage in ("check", "download", "prepare"):
            run(stage_command(stage, project=copy), copy, env)
    variants = list(yaml.safe_load((current / "params.yaml").read_text())["variants"])
    for variant in variants:  # whatever command line the current train stage takes
        run(stage_command("train", variant, current), current, env)
    for name in ("data/checkpoints", "data/train"):
        shutil.copytree(current / name, base / name)
    shutil.copy(current / "mlflow.db", base / "mlflow.db")
    return current, base


def largest_imports(copy: Path, command: list[str], env: dict, count: int = 8) -> list[str]:
    """The top-level imports of `command` that cost the most, cumulative (python -X importtime)."""
    result = run([command[0], "-X", "importtime", *command[1:]], copy, env)
    rows = [line.split("|") for line in result.stderr.splitlines() if line.startswith("import time:")]
    top = [(int(row[1]), row[2].strip()) for row in rows[1:]  # after the header line
           if len(row) == 3 and row[2].startswith(" ") and not row[2].startswith("  ")]
    return [f"{name} {micros / 1e6:.3f} s" for micros, name in sorted(top, reverse=True)[:count]]


def measure(copies: dict[str, Path], repeats: int, env: dict) -> dict:
    variants = list(yaml.safe_load((copies["current"] / "params.yaml").read_text())["variants"])
    runs = {name: commands(copy, variants) for name, copy in copies.items()}
    walls: dict[str, dict[str, list[float]]] = {stage: {name: [] for name in copies} for stage in runs["current"]}
    for _ in range(repeats):
        for stage in walls:
            for name, copy in copies.items():  # baseline, then current: alternating within each stage
                started = time.perf_counter()
                run(runs[name][stage], copy, env)
                walls[stage][name].append(time.perf_counter() - started)
                print(f"{stage} {name} {walls[stage][name][-1]:.2f} s", file=sys.stderr, flush=True)
    medians = {stage: {name: statistics.median(values) for name, values in by.items()} for stage, by in walls.items()}
    return {"median_s": medians, "all_s": walls,
            "current_over_baseline": {stage: m["current"] / m["baseline"] for stage, m in medians.items()},
            "current_evaluate_imports": largest_imports(copies["current"], runs["current"][f"evaluate@{variants[0]}"],
                                                        env)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default="main", help="the git revision to compare with (default: main)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=1, help="train.epochs of the checkpoints evaluated")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    env = stage_env(SHARED_MNIST)
    env.pop("PYTHONPATH")  # each copy's own pipeline/: `python -m` and `-c` put the cwd first
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        current, base = make_copies(Path(tmp), args.baseline, args.epochs, env)
        load_before = os.getloadavg()[0]
        result = {"baseline": args.baseline, "repeats": args.repeats, "loadavg_1min_before_after":
                  [load_before, None], **measure({"baseline": base, "current": current}, args.repeats, env)}
        result["loadavg_1min_before_after"][1] = os.getloadavg()[0]
    for stage, ratio in result["current_over_baseline"].items():
        medians = result["median_s"][stage]
        print(f"{stage:22s} baseline {medians['baseline']:6.2f} s  current {medians['current']:6.2f} s  "
              f"ratio {ratio:.2f}")
    print("current evaluate's largest imports:", ", ".join(result["current_evaluate_imports"]))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
