"""Scaling of a sweep on real MNIST: a 12-point grid (6 learning rates x batch norm or none),
5 seeds, 10 epochs, run three ways from scratch: plain `dvc repro`, then
`python -m pipeline.commands.distributed` on a Dask cluster of 1 worker, then of 2 workers.

Each way runs in a fresh clone of HEAD with its own DVC cache and remote (a folder) and its own
MLflow server (SQLite, loopback), so no way restores what another trained. Reports wall times,
the cores the work kept busy (CPU seconds / wall seconds), each task's steps (clone, check,
repro, push), the per-task overhead against a variant's time in plain `dvc repro`, and a model
of wall time for N workers and M variants.

    python -m benchmarks.bench_sweep [--ways local,1,2] [--out sweep.json]
"""

import argparse
import json
import math
import os
import re
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tests.mlflow_server import start_server, stop
from tests.support import ROOT, SHARED_MNIST, run

BIN = Path(sys.executable).parent
GRID = {"lr": [0.001, 0.003, 0.01, 0.03, 0.1, 0.3], "norm": ["batch", "none"]}
TASK_LINE = re.compile(r"^(\S+): clone ([\d.]+)s check ([\d.]+)s repro ([\d.]+)s push ([\d.]+)s$", re.M)
TIMEOUT_S = 3 * 3600  # the whole grid, one way


def project(folder: Path, env: dict[str, str], grid: dict) -> Path:
    """A clone of HEAD with the grid expanded and committed, and a DVC remote of its own."""
    from ruamel.yaml import YAML

    path = folder / "project"
    run(["git", "clone", "-q", str(ROOT), str(path)], folder, env, TIMEOUT_S)
    yaml = YAML()
    params = yaml.load((path / "params.yaml").read_text())
    params["sweep"]["axes"] = grid  # the grid alone: its lr 0.01 points are the lab's two variants
    params["variants"] = {}
    params["compare"]["reference"] = "sweep-none-lr0p01"
    with open(path / "params.yaml", "w") as handle:
        yaml.dump(params, handle)
    run([sys.executable, "-m", "pipeline.commands.sweep"], path, env, TIMEOUT_S)
    run(["dvc", "remote", "add", "-d", "bench", str(folder / "remote")], path, env, TIMEOUT_S)
    run(["git", "commit", "-qam", "12-point grid"], path, env, TIMEOUT_S)
    return path


def measured(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[str, float, float]:
    """(stdout, wall seconds, CPU seconds of every process it waited for)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    out = run(cmd, cwd, env, TIMEOUT_S).stdout
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return out, wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def run_way(way: str, folder: Path, grid: dict) -> dict:
    env = os.environ | {"DVC_NO_ANALYTICS": "1", "MNIST_MIRROR": str(SHARED_MNIST), "PATH": f"{BIN}:{os.environ['PATH']}",
                        "MLFLOW_DISABLE_TELEMETRY": "true"}
    path = project(folder, env, grid)
    server, uri = start_server(folder, f"sqlite:///{folder / 'mlflow.db'}", env=env)
    env["MLFLOW_TRACKING_URI"] = uri
    try:
        if way == "local":
            _, wall, cpu = measured(["dvc", "repro"], path, env)
            return {"way": way, "wall_s": wall, "cores_busy": cpu / wall, "seeds": seed_results(path),
                    "summary": (path / "data" / "compare" / "summary.md").read_text()}
        from distributed import LocalCluster

        with LocalCluster(n_workers=int(way), threads_per_worker=1, processes=True, dashboard_address=None,
                          host="127.0.0.1", local_directory=str(folder / "workers")) as cluster:
            out, wall, _ = measured([sys.executable, "-m", "pipeline.commands.distributed"], path,
                                    env | {"DASK_SCHEDULER_ADDRESS": cluster.scheduler_address})
        tasks = {m[0]: dict(zip(("clone", "check", "repro", "push"), map(float, m[1:]))) for m in TASK_LINE.findall(out)}
        setup = float(re.search(r"all variants in ([\d.]+)s", out).group(1))
        return {"way": f"{way} worker(s)", "workers": int(way), "wall_s": wall, "tasks_s": setup, "tasks": tasks}
    finally:
        stop(server)


def seed_results(path: Path) -> dict:
    """{variant: {"val_acc": last epoch's per seed, "test_acc": per seed}} of a finished repro."""
    found = {}
    for history in sorted((path / "data" / "train").glob("*/history.json")):
        variant = history.parent.name
        per_seed = json.loads((path / "data" / "evaluate" / variant / "per_seed.json").read_text())
        found[variant] = {"val_acc": json.loads(history.read_text())["val_acc"][-1], "test_acc": per_seed["test_acc"]}
    return found


def batch_norm_answer(seeds: dict) -> None:
    """Does batch norm win at each variant's best learning rate? And at each learning rate?"""
    from pipeline.stats import holm, mean_std, welch_difference

    def best(norm: str) -> str:
        return max((v for v in seeds if f"-{norm}-" in v), key=lambda v: mean_std(seeds[v]["val_acc"])[0])

    batch, none = best("batch"), best("none")
    diff = welch_difference(seeds[batch]["test_acc"], seeds[none]["test_acc"])
    print(f"best lr by val_acc: {batch} vs {none}: test_acc {diff.delta.mean * 100:+.2f} points "
          f"[{diff.delta.low * 100:+.2f}, {diff.delta.high * 100:+.2f}], Welch p = {diff.p_value:.2g}")
    pairs = [(v, v.replace("-batch-", "-none-")) for v in sorted(seeds) if "-batch-" in v]
    diffs = [welch_difference(seeds[a]["test_acc"], seeds[b]["test_acc"]) for a, b in pairs]
    for (a, _), d, p_holm in zip(pairs, diffs, holm([d.p_value for d in diffs]), strict=True):
        print(f"  {a.removeprefix('sweep-batch-')}: batch - none = {d.delta.mean * 100:+.2f} points, "
              f"Welch p = {d.p_value:.2g}, Holm p (over {len(pairs)} lrs) = {p_holm:.2g}")


def report(results: list[dict], variants: int) -> None:
    local = next((r for r in results if r["way"] == "local"), None)
    per_variant = local["wall_s"] / variants if local else None
    for r in results:
        print(f"{r['way']:>12}: wall {r['wall_s']:.0f}s" + (f", {r['cores_busy']:.2f} cores busy" if "cores_busy" in r else
                                                           f", tasks {r['tasks_s']:.0f}s"))
        if "tasks" in r:
            steps = {k: sum(t[k] for t in r["tasks"].values()) / len(r["tasks"]) for k in ("clone", "check", "repro", "push")}
            task = sum(steps.values())
            print("              mean task: " + " ".join(f"{k} {v:.1f}s" for k, v in steps.items()) + f" = {task:.1f}s")
            if per_variant:
                print(f"              overhead against a variant in plain dvc repro ({per_variant:.1f}s): "
                      f"{task - per_variant:+.1f}s ({(task - per_variant) / per_variant:+.0%})")
    one = next((r for r in results if r.get("workers") == 1), None)
    if one:
        task = one["tasks_s"] / len(one["tasks"])
        fixed = one["wall_s"] - one["tasks_s"]
        print(f"model: wall(N workers, M variants) = {fixed:.0f}s + ceil(M/N) x {task:.1f}s "
              "(one core per worker; on this 2-core machine two workers share it with the coordinator)")
        for n, m in ((1, 12), (2, 12), (4, 12), (8, 48)):
            print(f"  N={n} M={m}: {fixed + math.ceil(m / n) * task:.0f}s" +
                  (f" vs plain dvc repro {m * per_variant:.0f}s" if per_variant else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ways", default="local,1,2")
    parser.add_argument("--lrs", help="a smaller grid's learning rates, e.g. 0.01 (a quick check)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    grid = GRID | ({"lr": [float(lr) for lr in args.lrs.split(",")]} if args.lrs else {})
    results = []
    for way in args.ways.split(","):
        folder = Path(tempfile.mkdtemp(prefix=f"bench-sweep-{way}-"))
        try:
            results.append(run_way(way, folder, grid))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "summary"}), flush=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    report(results, len(grid["lr"]) * len(grid["norm"]))
    for result in results:
        if "summary" in result:
            print(result["summary"])
            batch_norm_answer(result["seeds"])
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
