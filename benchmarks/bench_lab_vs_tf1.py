"""The lab against its own TF1 code, side by side: whole processes, the same seed, alternating.

    .venv/bin/python benchmarks/bench_lab_vs_tf1.py [--repeats 3] [--quick] [--parts tf1,published,...]
                                                    [--tf-python .venv-tf/bin/python] [--out FILE]

Each repeat runs its parts one after another (A B C D, A B C D, ...):
  tf1        the lab's TF1 code for seed 0 in the lab's layout (fidelity/lab_tf1.py: both nets in
             one graph and one session, the same batches), in the reference's own environment
  published  `dvc repro --force -s` of train, evaluate (both variants) and compare, seeds: [0]
  default    the same with params.yaml's seeds (5 per variant)
  seeds20    the same with 20 seeds per variant
  <part>_side  the same as `make repro` runs it (pipeline/commands/repro.py): its fork server, the
             train stages side by side, a `dvc repro -s` each, then `dvc repro --force -s` of the rest
  <part>_side_noserver  the same without the fork server and forked dvc commands (PIPELINE_FORKSERVER=0)
each project part in a temp copy of its own that holds raw and prepared data (bench_stage.lab_copy).
Ratios are taken pair by pair within a repeat (published / tf1, default / tf1; a `_side` part / its
`_noserver` twin), then their median.
--quick: 1 epoch on both sides and 1 repeat, to test the benchmark (not the lab's figures; nothing
is written unless --out is given). Keys and targets: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from bench_stage import MARK, lab_copy, lab_env, repro, set_param
from common import ROOT, children_cpu_s, code_state, machine_info, write

HERE = Path(__file__).resolve().parent
VARIANTS = ("batchnorm", "no_norm")
STAGES = [*(f"train@{v}" for v in VARIANTS), *(f"evaluate@{v}" for v in VARIANTS), "compare"]
SEEDS = {"published": [0], "default": None, "seeds20": list(range(20))}  # None: params.yaml's own
SIDE_SPAN = "train and evaluate (side by side)"
SIDE = "_side"  # a part's suffix: its train stages side by side, as `make repro` runs them
NO_SERVER = "_noserver"  # after SIDE: without `make repro`'s fork server and forked dvc commands
PARTS = ["tf1", *SEEDS, *(f"{part}{SIDE}{server}" for part in SEEDS for server in ("", NO_SERVER))]
# Issue 19's targets: (figure, at most).
TARGETS = {"published": ("wall_ratio_vs_tf1", 0.5), "default": ("wall_ratio_vs_tf1", 1.0),
           "seeds20": ("wall_s", 60.0)}
PLAUSIBLE_TF1_TEST_ACC = {"batchnorm": (0.96, 0.98), "no_norm": (0.94, 0.965)}  # at 10 epochs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, help="alternating rounds of every part (default 3; --quick: 1)")
    parser.add_argument("--quick", action="store_true", help="1 epoch, 1 repeat: tests the benchmark")
    parser.add_argument("--parts", default="tf1," + ",".join(SEEDS),
                        help=f"comma-separated, in run order, of {', '.join(PARTS)}")
    parser.add_argument("--tf-python", type=Path, default=ROOT / ".venv-tf" / "bin" / "python",
                        help="the python of the reference's environment (fidelity/requirements.txt)")
    parser.add_argument("--mnist", type=Path, default=ROOT.parent / "shared" / "data" / "mnist",
                        help="MNIST's four .gz files, which the TF1 code reads")
    parser.add_argument("--out", type=Path, help="default benchmarks/lab_vs_tf1.json; --quick: none")
    parser.add_argument("--keep-temp", action="store_true", help="keep the project copies")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    args.parts = [p for p in args.parts.split(",") if p]
    if args.out is None and not args.quick:
        args.out = HERE / "lab_vs_tf1.json"
    if message := problem(args):
        parser.exit(2, f"error: {message}\n")
    return args


def problem(args) -> str | None:
    """What stops the run before it starts, in one line; None when nothing does."""
    if unknown := sorted(set(args.parts) - set(PARTS)):
        return f"--parts: unknown {unknown}, choose from {', '.join(PARTS)}"
    if args.repeats < 1:
        return f"--repeats: {args.repeats}, expected at least 1"
    if "tf1" in args.parts and not args.tf_python.exists():
        return (f"--tf-python: {args.tf_python} missing; make the reference's environment: python3 -m venv "
                ".venv-tf && .venv-tf/bin/pip install -r benchmarks/fidelity/requirements.txt")
    if "tf1" in args.parts and not (args.mnist / "train-images-idx3-ubyte.gz").exists():
        return f"--mnist: {args.mnist} has no train-images-idx3-ubyte.gz"
    if set(args.parts) - {"tf1"} and not all((ROOT / "data" / sub).is_dir() for sub in ("raw", "prepared")):
        return "data/raw or data/prepared missing: run `MNIST_MIRROR=../shared/data/mnist dvc repro prepare` first"
    return None


def run_tf1(args, out: Path) -> dict:
    """The TF1 lab as one whole process: its wall and CPU seconds, its own time by part, accuracies."""
    cmd = [str(args.tf_python), str(HERE / "fidelity" / "lab_tf1.py"), "--mnist", str(args.mnist),
           "--seed", "0", "--epochs", str(args.epochs), "--out", str(out)]
    cpu0, t0 = children_cpu_s(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, children_cpu_s() - cpu0
    if proc.returncode:
        raise SystemExit("error: the TF1 lab failed:\n" + "\n".join(proc.stderr.splitlines()[-10:]))
    report = json.loads(out.read_text())
    return {"wall_s": wall, "cpu_s": cpu, "inside_s": report["seconds"], "epochs": report["epochs"],
            "tensorflow": report["tensorflow"], "layout": report["layout"],
            "test_acc": {v: report["variants"][v]["test_acc"] for v in VARIANTS},
            "test_loss": {v: report["variants"][v]["test_loss"] for v in VARIANTS}}


def seeds_part(part: str) -> str:
    """`published` of `published_side_noserver`: the seeds a part trains."""
    return part.removesuffix(NO_SERVER).removesuffix(SIDE)


def project_copy(folder: Path, part: str, epochs: int) -> tuple[Path, dict]:
    """A copy of the project for one part: its seeds and epochs set, its MLflow store created (so
    that no repeat pays for creating the tables)."""
    from pipeline.handoff import ADDRESS_VARIABLE, OFF

    tmp = folder / part
    tmp.mkdir()
    env = lab_env(tmp) | ({ADDRESS_VARIABLE: OFF} if part.endswith(NO_SERVER) else {})
    lab_copy(tmp, env)
    if SEEDS[seeds_part(part)] is not None:
        set_param(tmp, "seeds", SEEDS[seeds_part(part)])
    set_param(tmp, "  epochs", epochs)
    subprocess.run([sys.executable, "-c", "import mlflow; mlflow.MlflowClient().search_experiments()"],
                   cwd=tmp, env=env, check=True, capture_output=True)
    return tmp, env


def run_project(tmp: Path, env: dict, log_name: str, side: bool) -> dict:
    """The forced stages as `dvc repro` runs them (`side`: as `make repro` does), and the test
    accuracy they give."""
    result = side_by_side(tmp, env, log_name) if side else repro(tmp, env, log_name, "--force", "-s", *STAGES)
    if result["returncode"]:
        raise SystemExit(f"error: dvc repro failed in {tmp}:\n" + "\n".join(result["log_tail"]))
    metrics = {v: json.loads((tmp / "data" / "evaluate" / v / "metrics.json").read_text()) for v in VARIANTS}
    return result | {"test_acc": {v: m["test_acc"] for v, m in metrics.items()}}


SIDE_BY_SIDE = """
from pipeline import forkserver
from pipeline.commands.repro import run_dvc, side_by_side, variant_chains
with forkserver.running():
    side_by_side(variant_chains({trains!r}), {jobs}, True)
    print({mark!r}, flush=True)
    run_dvc("repro", "--force", "-s", *{rest!r})
"""


def side_by_side(tmp: Path, env: dict, log_name: str) -> dict:
    """The forced stages as `make repro` runs them (pipeline/commands/repro.py): its fork server,
    each variant's train and evaluate stages side by side with the others' (two at a time on this
    machine's cores), then one `dvc repro` of the rest; its `commands_s` has the side-by-side span
    as one entry."""
    from pipeline.commands.repro import variant_chains

    trains = [stage for stage in STAGES if stage.startswith("train@")]
    chained = {stage for chain in variant_chains(trains) for stage in chain}
    code = SIDE_BY_SIDE.format(trains=trains, jobs=len(os.sched_getaffinity(0)), mark=f"{MARK}{SIDE_SPAN}",
                               rest=[stage for stage in STAGES if stage not in chained])
    return repro(tmp, env, log_name, command=[sys.executable, "-c", code])


def median_of(runs: list[dict], key: str) -> dict:
    """Each sub-key's median over the runs (e.g. every stage's command seconds)."""
    return {name: statistics.median(run[key][name] for run in runs) for name in runs[0][key]}


def summarize(runs: dict, epochs: int, quick: bool) -> dict:
    """Medians per part; ratios to the TF1 run of the same repeat, then their median; targets
    (`met` null in quick mode: one epoch is not the lab)."""
    tf1 = runs.get("tf1")
    summary = {}
    for part, results in runs.items():
        walls, cpus = [r["wall_s"] for r in results], [r["cpu_s"] for r in results]
        entry = {"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus), "walls_s": walls}
        if part == "tf1":
            entry["inside_s"] = median_of(results, "inside_s")
            low_high = PLAUSIBLE_TF1_TEST_ACC
            entry["test_acc"] = results[0]["test_acc"]
            entry["test_acc_plausible"] = (all(low_high[v][0] <= results[0]["test_acc"][v] <= low_high[v][1]
                                               for v in VARIANTS) if epochs == 10 else None)
        else:
            entry |= {"commands_s": median_of(results, "commands_s"),
                      "dvc_s": statistics.median(r["dvc_s"] for r in results), "test_acc": results[0]["test_acc"]}
            if tf1:
                ratios = [r["wall_s"] / t["wall_s"] for r, t in zip(results, tf1)]
                entry |= {"wall_ratio_vs_tf1": statistics.median(ratios), "wall_ratios_vs_tf1": ratios,
                          "cpu_ratio_vs_tf1": statistics.median(r["cpu_s"] / t["cpu_s"] for r, t in zip(results, tf1))}
        entry["same_test_acc_every_repeat"] = all(r["test_acc"] == results[0]["test_acc"] for r in results)
        figure, limit = TARGETS.get(seeds_part(part), (None, None))
        if figure in entry:
            entry["target"] = {"figure": figure, "at_most": limit, "met": None if quick else entry[figure] <= limit}
        summary[part] = entry
    for part, results in runs.items():  # what the fork server changes, repeat by repeat
        if part.endswith(SIDE) and (without := runs.get(part + NO_SERVER)):
            ratios = [r["wall_s"] / w["wall_s"] for r, w in zip(results, without)]
            summary[part] |= {"wall_ratio_vs_no_server": statistics.median(ratios), "wall_ratios_vs_no_server": ratios}
    return summary


def table(results: dict) -> str:
    s, quick = results["summary"], results["quick"]
    lines = [f"lab vs its TF1 code: seed 0, {results['epochs']} epochs, {results['repeats']} alternating repeat(s), "
             f"medians; {results['machine']['cpus']} CPUs ({results['machine']['cpu_model']}), "
             f"load {results['machine']['loadavg_start'][0]:.2f} at start"]
    if quick:
        lines.append("QUICK MODE: 1 epoch, tests the benchmark; these are not the lab's figures")
    lines.append(f"{'part':<40} {'wall s':>7} {'cpu s':>7} {'wall/tf1':>8} {'cpu/tf1':>8}  target")
    names = {"tf1": "TF1 lab code (seed 0, both nets)", "published": "published lab (1 seed per variant)",
             "default": "default lab (params.yaml's seeds)", "seeds20": "20 seeds x 2 variants"}
    names |= {f"{part}{SIDE}{server}": f"{names[part].split(' (')[0]}, side by side{label}"
              for part in SEEDS for server, label in (("", ""), (NO_SERVER, ", no server"))}
    for part, e in s.items():
        ratio = f"{e['wall_ratio_vs_tf1']:8.2f} {e['cpu_ratio_vs_tf1']:8.2f}" if "wall_ratio_vs_tf1" in e else " " * 17
        target = e.get("target")
        mark = "" if not target else f"  {target['figure']} <= {target['at_most']}: " + (
            "(quick)" if quick else "met" if target["met"] else "NOT met")
        lines.append(f"{names[part]:<40} {e['wall_s']:7.1f} {e['cpu_s']:7.1f} {ratio}{mark}")
    for part, e in s.items():
        if part == "tf1":
            inside = ", ".join(f"{k.removesuffix('_s')} {v:.1f}" for k, v in e["inside_s"].items())
            acc = ", ".join(f"{v} {a:.2%}" for v, a in e["test_acc"].items())
            lines.append(f"  tf1 inside: {inside}; test_acc {acc} (plausible: {e['test_acc_plausible']})")
        else:
            stages = ", ".join(f"{k} {v:.1f}" for k, v in e["commands_s"].items())
            lines.append(f"  {part} per stage: {stages}, dvc {e['dvc_s']:.1f}")
            if "wall_ratio_vs_no_server" in e:
                lines.append(f"  {part} / without the fork server: {e['wall_ratio_vs_no_server']:.2f} "
                             f"({', '.join(f'{r:.2f}' for r in e['wall_ratios_vs_no_server'])})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from pipeline.config.params import load_params

    train = load_params(ROOT / "params.yaml").train
    args.epochs = 1 if args.quick else train.epochs  # the TF1 side too (the lab's 10)
    folder = Path(tempfile.mkdtemp(prefix="bench-lab-vs-tf1-"))
    results = {"command": " ".join(["python benchmarks/bench_lab_vs_tf1.py", *(argv or sys.argv[1:])]),
               "quick": args.quick, "epochs": args.epochs, "repeats": args.repeats, "order": args.parts,
               "machine": machine_info() | {"torch": metadata.version("torch"), "project_threads": train.threads,
                                            "tf1_threads": "1 intra-op, 1 inter-op"},
               "code": code_state()}
    try:
        copies = {part: project_copy(folder, part, args.epochs) for part in args.parts if part != "tf1"}
        if "tf1" in args.parts:  # TensorFlow's files into the page cache, as torch's are after the copies
            subprocess.run([str(args.tf_python), "-c", "import tensorflow"], capture_output=True, check=True)
        runs = {part: [] for part in args.parts}
        for repeat in range(args.repeats):
            for part in args.parts:
                load = os.getloadavg()[0]
                ran = (run_tf1(args, folder / f"tf1_{repeat}.json") if part == "tf1" else
                       run_project(*copies[part], f"repro_{repeat}.log", SIDE in part))
                runs[part].append(ran | {"loadavg_1min_before": load})
                print(f"repeat {repeat + 1}/{args.repeats} {part}: {ran['wall_s']:.1f} s wall, {ran['cpu_s']:.1f} s CPU",
                      file=sys.stderr, flush=True)
    finally:
        if not args.keep_temp:
            shutil.rmtree(folder, ignore_errors=True)
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["temp_dir"] = str(folder) if args.keep_temp else None
    results["summary"] = summarize(runs, results["epochs"], args.quick)
    results["runs"] = runs
    print(table(results))
    write(results, args.out)
    return results


if __name__ == "__main__":
    main()
