"""What the benchmark scripts share: the lab's data and config, timing, and running each part
in a child process of its own (so each has its own imports, allocator and peak RSS)."""

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.support import ROOT

VARIANT = "batchnorm"  # the lab's configuration: 784-32-32-10 with batch norm, Adam lr 0.01


class _Enough(Exception):
    """Raised from on_step once the wanted number of steps has run."""


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


def setup(threads: int):
    import torch

    from pipeline.config.params import load_params

    torch.set_num_threads(threads)
    params = load_params(ROOT / "params.yaml")
    return params, params.variant(VARIANT)


def lab_splits(threads: int):
    """The lab's params, batchnorm config and prepared train/val splits, as the stage loads them."""
    import torch

    from pipeline.data import load_split

    params, config = setup(threads)
    prepared = ROOT / "data" / "prepared"
    train = load_split(prepared, "train", torch.device("cpu"))
    val = load_split(prepared, "val", torch.device("cpu"))
    return params, config, train, val


def children_cpu_s() -> float:
    """CPU seconds (user + system) of this process's finished children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_info() -> dict:
    """The machine and the moment measured: cores (all, and those this process may run on), the
    CPU's model and whether it has AVX-512 (two "AMD EPYC"s here, with and without it: the lab's
    train stages take ~1.7x as long on the one without), Python, the UTC time and the load average."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return {"cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "cpu": platform.processor() or platform.machine(), "cpu_model": models[0] if models else None,
            "cpu_avx512": "avx512f" in flags,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "loadavg_start": os.getloadavg()}


def timed(fn, repeats: int) -> dict:
    """Wall seconds of `fn()` over repeats: best and median (the machine is shared)."""
    walls = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - started)
    return {"best_s": min(walls), "median_s": statistics.median(walls), "all_s": walls}


def project_steps(seeds: list[int], config, train, steps: int, private: bool | None = None):
    """A fresh stack trained for exactly `steps` steps with the project's loop; returns it.

    `private`: pipeline/nn/fastpath.py's path (default: the one the stage takes)."""
    from pipeline.nn.model import StackedMlp
    from pipeline.nn.training import TrainingStep, make_optimizer, train_epoch

    config = config.model_copy(update={"seeds": seeds})
    model = StackedMlp(config)
    step = TrainingStep(model, make_optimizer(model, config, private), train, config)
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


def code_state() -> dict:
    """Which code was measured: the commit, and the files changed since it."""
    def git(*cmd: str) -> str:
        result = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=False)
        return result.stdout.rstrip()  # not strip(): porcelain lines may start with a space

    changed = [line[3:] for line in git("status", "--porcelain", "--", "pipeline", "dvc.yaml",
                                        "params.yaml").splitlines()]
    return {"commit": git("rev-parse", "HEAD").strip() or None, "uncommitted": changed}


# ------------------------------------------------------------------------------- driver


def parse_args(doc: str, parts: dict, argv: list[str] | None, out: Path | None = None) -> argparse.Namespace:
    """The options every script takes; `parts` maps a part's name to its function."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--out", type=Path, default=out, help="write every figure here as JSON")
    parser.add_argument("--steps", type=int, default=2000, help="timed steps per measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (params.yaml train.threads)")
    parser.add_argument("--pipeline", action=argparse.BooleanOptionalAction, default=True,
                        help="also time `dvc repro` of the lab in a temp copy (default: on)")
    parser.add_argument("--parts", default=",".join(parts), help="comma-separated subset of: " + ", ".join(parts))
    parser.add_argument("--keep-temp", action="store_true", help="keep the pipeline's temp copy")
    parser.add_argument("--part", choices=list(parts), help=argparse.SUPPRESS)
    parser.add_argument("--part-out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_part(name: str, part, args) -> dict:
    """One part in a child process of the script that defines it."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = Path(handle.name)
    module = part.__module__
    if module == "__main__":  # the script run (`python -m benchmarks.bench_x`) defines it
        module = sys.modules["__main__"].__spec__.name
    cmd = [sys.executable, "-m", module, "--part", name, "--part-out", str(out),
           "--steps", str(args.steps), "--threads", str(args.threads)]
    if args.keep_temp:
        cmd.append("--keep-temp")
    t0, load = time.perf_counter(), os.getloadavg()[0]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False, timeout=3600)
    ran = {"part_wall_s": time.perf_counter() - t0, "loadavg_1min_before_after": [load, os.getloadavg()[0]]}
    try:
        if proc.returncode != 0:
            return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-5:], **ran}
        return json.loads(out.read_text()) | ran
    finally:
        out.unlink(missing_ok=True)


def child(part, args) -> None:
    result = part(args)
    result["peak_rss_mb"] = peak_rss_mb()
    Path(args.part_out).write_text(json.dumps(result, default=str))


def measure(parts: dict, args) -> dict:
    """Every part asked for (`--parts`, less `pipeline` under --no-pipeline), each in its child."""
    import torch

    wanted = [p for p in args.parts.split(",") if p and (p != "pipeline" or args.pipeline)]
    results = {"machine": machine_info() | {"torch": torch.__version__, "threads": args.threads},
               "code": code_state()}
    for name in wanted:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = run_part(name, parts[name], args)
    results["machine"]["loadavg_end"] = os.getloadavg()
    return results


def main(doc: str, parts: dict, argv: list[str] | None = None,
         out: Path | None = None) -> tuple[dict, argparse.Namespace] | None:
    """A script's entry point: a part's child (None), or (results, args) of a run of its parts."""
    args = parse_args(doc, parts, argv, out)
    if args.part:
        child(parts[args.part], args)
        return None
    return measure(parts, args), args


def write(results: dict, out: Path | None) -> None:
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {out}")


def run_alone(doc: str, parts: dict) -> None:
    """A script that runs its own parts: their JSON to stdout, and to --out where given."""
    ran = main(doc, parts)
    if ran is not None:
        results, args = ran
        print(json.dumps(results, indent=2, default=str))
        write(results, args.out)
