"""The published lab as `make repro` and as `dvc repro` run it, at this tree against a baseline
revision and against the lab's own TF1 code: whole processes, alternating, medians of ratios.

    python -m benchmarks.bench_lab_vs_tf1 --baseline REV [--repeats 3] [--epochs N] [--jobs N]
        [--no-tf1] [--tf-python .venv-tf/bin/python] [--mnist DIR] [--out FILE] [--keep-temp]

Parts, each in a project copy of its own (tests/support.py's copy: this working tree's, or
`git archive REV`'s for the baseline; the same venv), `seeds: [0]` (the lab as published):
  make@current, make@baseline  `python -m pipeline.commands.repro --force` (`make repro ARGS=--force`)
  dvc@current, dvc@baseline    `dvc repro --force`, one stage after another
  tf1                          the lab's TF1 code for seed 0 in the lab's layout (fidelity/lab_tf1.py),
                               in the reference's own environment (`--tf-python`; `--no-tf1`: left out)
Every stage is forced, check, download (from `--mnist`) and prepare too: the TF1 code reads MNIST's
`.gz` files as well. Each copy runs its command once before the repeats (its MLflow tables made, its
files in the page cache). The repeats run the parts in turn, the order reversed every other repeat;
each ratio is taken within a repeat, then its median over the repeats. `--epochs` (both sides)
checks the benchmark quickly; its figures are not the lab's, and it writes no JSON unless `--out`.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.common import children_cpu_s, code_state, machine_info, write
from benchmarks.projects import lab_copy, lab_env, set_param, timed_command
from tests.support import ROOT, SHARED_MNIST, revision_tree

HERE = Path(__file__).resolve().parent
VARIANTS = ("batchnorm", "no_norm")
TREES = ("baseline", "current")
COMMANDS = ("make", "dvc")
PARTS = ("tf1", *(f"{command}@{tree}" for command in COMMANDS for tree in TREES))
# The targets, (numerator, denominator): at most.
TARGETS = {("make@current", "make@baseline"): 1.3, ("dvc@current", "dvc@baseline"): 1.0}
RATIOS = (*TARGETS, *((f"{command}@{tree}", "tf1") for command in COMMANDS for tree in reversed(TREES)))
PLAUSIBLE_TF1_TEST_ACC = {"batchnorm": (0.96, 0.98), "no_norm": (0.94, 0.965)}  # at 10 epochs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", required=True, help="the git revision to compare with, e.g. a10ac96")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds of every part (default 3)")
    parser.add_argument("--epochs", type=int, help="train.epochs on both sides (default: params.yaml's, the lab's)")
    parser.add_argument("--jobs", type=int, help="`make repro`'s --jobs (default: its own)")
    parser.add_argument("--tf1", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the lab's TF1 code (default: on)")
    parser.add_argument("--tf-python", type=Path, default=ROOT / ".venv-tf" / "bin" / "python",
                        help="the python of the reference's environment (fidelity/requirements.txt)")
    parser.add_argument("--mnist", type=Path, default=SHARED_MNIST, help="MNIST's four .gz files")
    parser.add_argument("--out", type=Path, help="default benchmarks/lab_vs_tf1.json; with --epochs: none")
    parser.add_argument("--keep-temp", action="store_true", help="keep the project copies")
    args = parser.parse_args(argv)
    lab_epochs = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]["epochs"]
    args.quick = args.epochs is not None and args.epochs != lab_epochs
    args.epochs = args.epochs or lab_epochs
    if args.out is None and not args.quick:
        args.out = HERE / "lab_vs_tf1.json"
    args.parts = [part for part in PARTS if args.tf1 or part != "tf1"]
    if message := problem(args):
        parser.exit(2, f"error: {message}\n")
    return args


def problem(args) -> str | None:
    """What stops the run before it starts, in one line; None when nothing does."""
    if args.repeats < 1 or args.epochs < 1:
        return f"--repeats {args.repeats}, --epochs {args.epochs}: expected at least 1 each"
    if args.jobs is not None and args.jobs < 1:
        return f"--jobs: {args.jobs}, expected at least 1"
    if args.tf1 and not args.tf_python.exists():
        return (f"--tf-python: {args.tf_python} missing; make the reference's environment (python3 -m venv "
                ".venv-tf && .venv-tf/bin/pip install -r benchmarks/fidelity/requirements.txt) or pass --no-tf1")
    if not (args.mnist / "train-images-idx3-ubyte.gz").exists():
        return f"--mnist: {args.mnist} has no train-images-idx3-ubyte.gz"
    found = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{args.baseline}^{{commit}}"], cwd=ROOT,
                           capture_output=True, timeout=30)
    return None if found.returncode == 0 else f"--baseline: {args.baseline!r} is no commit of this repository"


def make_copies(folder: Path, args) -> dict[str, tuple[Path, dict, list[str]]]:
    """{part: (copy, env, command)} of every project part, each copy run once (unmeasured)."""
    sources = {"current": ROOT, "baseline": revision_tree(args.baseline, folder / "baseline-tree")}
    jobs = ["--jobs", str(args.jobs)] if args.jobs else []
    make = [sys.executable, "-m", "pipeline.commands.repro", "--force", *jobs]
    commands = {"make": make, "dvc": ["dvc", "repro", "--force"]}
    copies = {}
    for part in args.parts:
        if part == "tf1":
            continue
        command, tree = part.split("@")
        path = folder / part.replace("@", "-")
        env = lab_env(path, args.mnist) | {"PYTHONPATH": str(path)}  # the copy's own pipeline/, whatever runs
        lab_copy(path, env, sources[tree], data=False)
        set_param(path, "seeds", [0])
        set_param(path, "  epochs", args.epochs)
        print(f"{part}: first run ...", file=sys.stderr, flush=True)
        run_project(path, env, commands[command], "first.log")
        copies[part] = (path, env, commands[command])
    return copies


def run_project(path: Path, env: dict, command: list[str], log_name: str) -> dict:
    """`command` timed in the copy at `path`, and the test accuracy it gives each variant."""
    result = timed_command(path, env, log_name, command)
    if result["returncode"]:
        raise SystemExit(f"error: {' '.join(command)} failed in {path}:\n" + "\n".join(result["log_tail"]))
    metrics = {v: json.loads((path / "data" / "evaluate" / v / "metrics.json").read_text()) for v in VARIANTS}
    return result | {"test_acc": {v: m["test_acc"] for v, m in metrics.items()}}


def run_tf1(args, out: Path) -> dict:
    """The TF1 lab as one whole process: its wall and CPU seconds, its own time by part, accuracies."""
    cmd = [str(args.tf_python), str(HERE / "fidelity" / "lab_tf1.py"), "--mnist", str(args.mnist),
           "--seed", "0", "--epochs", str(args.epochs), "--out", str(out)]
    cpu0, t0 = children_cpu_s(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    wall, cpu = time.perf_counter() - t0, children_cpu_s() - cpu0
    if proc.returncode:
        raise SystemExit("error: the TF1 lab failed:\n" + "\n".join(proc.stderr.splitlines()[-10:]))
    report = json.loads(out.read_text())
    return {"wall_s": wall, "cpu_s": cpu, "inside_s": report["seconds"], "tensorflow": report["tensorflow"],
            "test_acc": {v: report["variants"][v]["test_acc"] for v in VARIANTS}}


def repeats(args, copies: dict, folder: Path) -> dict[str, list[dict]]:
    """Every part once a repeat, the order reversed every other repeat."""
    runs = {part: [] for part in args.parts}
    for repeat in range(args.repeats):
        for part in args.parts if repeat % 2 == 0 else reversed(args.parts):
            load = os.getloadavg()[0]
            ran = (run_tf1(args, folder / f"tf1_{repeat}.json") if part == "tf1" else
                   run_project(*copies[part], f"repeat_{repeat}.log"))
            runs[part].append(ran | {"loadavg_1min_before": load})
            print(f"repeat {repeat + 1}/{args.repeats} {part}: {ran['wall_s']:.1f} s wall, {ran['cpu_s']:.1f} s CPU",
                  file=sys.stderr, flush=True)
    return runs


def summarize(runs: dict[str, list[dict]], quick: bool) -> dict:
    """Each part's medians; each ratio's per-repeat values and median, and its target where it has one."""
    parts = {part: {"wall_s": statistics.median(r["wall_s"] for r in results),
                    "cpu_s": statistics.median(r["cpu_s"] for r in results),
                    "walls_s": [r["wall_s"] for r in results], "test_acc": results[0]["test_acc"],
                    "same_test_acc_every_repeat": all(r["test_acc"] == results[0]["test_acc"] for r in results)}
             for part, results in runs.items()}
    if "tf1" in parts:
        parts["tf1"]["test_acc_plausible"] = None if quick else all(
            low <= parts["tf1"]["test_acc"][v] <= high for v, (low, high) in PLAUSIBLE_TF1_TEST_ACC.items())
    ratios = {}
    for top, bottom in RATIOS:
        if top in runs and bottom in runs:
            each = [a["wall_s"] / b["wall_s"] for a, b in zip(runs[top], runs[bottom])]
            entry = {"wall_ratio": statistics.median(each), "wall_ratios": each}
            if (limit := TARGETS.get((top, bottom))) is not None:
                entry["target"] = {"at_most": limit, "met": None if quick else entry["wall_ratio"] <= limit}
            ratios[f"{top} / {bottom}"] = entry
    projects = [part for part in runs if part != "tf1"]
    same = all(parts[p]["test_acc"] == parts[projects[0]]["test_acc"] for p in projects)
    return {"parts": parts, "ratios": ratios, "same_test_acc_all_projects": same}


def table(results: dict) -> str:
    summary, machine = results["summary"], results["machine"]
    lines = [f"the published lab (seed 0), {results['epochs']} epochs, {results['repeats']} alternating repeat(s), "
             f"medians; baseline {results['baseline']}; {machine['cpus']} CPUs ({machine['cpu_model']}), "
             f"load {machine['loadavg_start'][0]:.2f} at start"]
    if results["quick"]:
        lines.append("QUICK: --epochs differs from the lab's; these are not the lab's figures")
    lines.append(f"{'part':<16} {'wall s':>7} {'cpu s':>7}  walls")
    for part, entry in summary["parts"].items():
        walls = ", ".join(f"{w:.1f}" for w in entry["walls_s"])
        lines.append(f"{part:<16} {entry['wall_s']:7.1f} {entry['cpu_s']:7.1f}  {walls}")
    lines.append(f"{'ratio (wall)':<28} {'median':>6}  per repeat")
    for name, entry in summary["ratios"].items():
        each = ", ".join(f"{r:.2f}" for r in entry["wall_ratios"])
        target = entry.get("target")
        mark = "" if not target else f"  target <= {target['at_most']}: " + (
            "(quick)" if target["met"] is None else "met" if target["met"] else "NOT met")
        lines.append(f"{name:<28} {entry['wall_ratio']:6.2f}  {each}{mark}")
    lines.append(f"same test accuracy in every project part: {summary['same_test_acc_all_projects']}"
                 + (f"; TF1's plausible: {summary['parts']['tf1']['test_acc_plausible']}" if "tf1" in summary["parts"]
                    else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="bench-lab-vs-tf1-"))
    results = {"command": " ".join(["python -m benchmarks.bench_lab_vs_tf1", *(argv or sys.argv[1:])]),
               "baseline": args.baseline, "quick": args.quick, "epochs": args.epochs, "repeats": args.repeats,
               "order": args.parts, "machine": machine_info(), "code": code_state()}
    try:
        copies = make_copies(folder, args)
        if args.tf1:  # TensorFlow's files into the page cache, as the copies' first runs put torch's
            subprocess.run([str(args.tf_python), "-c", "import tensorflow"], capture_output=True, check=True,
                           timeout=600)
        runs = repeats(args, copies, folder)
    finally:
        if not args.keep_temp:
            shutil.rmtree(folder, ignore_errors=True)
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["temp_dir"] = str(folder) if args.keep_temp else None
    results["summary"] = summarize(runs, args.quick)
    results["runs"] = runs
    print(table(results))
    write(results, args.out)
    return results


if __name__ == "__main__":
    main()
