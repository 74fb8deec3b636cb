"""`python -m pipeline.commands.distributed`: every variant's train and evaluate stages as tasks on a Dask
cluster (`DASK_SCHEDULER_ADDRESS`; without one, a plain `dvc repro` here), then this repository's
`dvc repro` restores them all from DVC's run-cache and compares.

A task (run_variant) runs in a worker's own clone at the commit being run, its inputs restored from
the shared remote's run-cache and its outputs pushed back. A worker lost mid-task: Dask runs the
task elsewhere, which closes the runs the lost one left RUNNING.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pipeline import cli
from pipeline.errors import PipelineError
from pipeline.config.params import load_params

# What a worker needs of the coordinator's environment that is not a secret: credentials
# (MLFLOW_TRACKING_PASSWORD, AWS keys) are the worker's own, set where it was started.
FORWARDED = ("MLFLOW_TRACKING_URI", "MNIST_MIRROR", "MNIST_CHECKSUMS")


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()


def committed_head(root: Path) -> str:
    """The commit the workers will clone; refused while the workspace holds edits they would not see."""
    if changed := git(root, "diff", "--name-only", "HEAD", "--", ".", ":(exclude)dvc.lock").splitlines():
        raise PipelineError(f"{changed[0]}: uncommitted change; the workers run the committed code and params: "
                            "commit first")
    return git(root, "rev-parse", "HEAD")


def dvc(cwd: Path, *args: str, env: dict[str, str] | None = None) -> float:
    """Run a DVC command; its seconds. Its output goes to this process's (the worker's log, on a worker)."""
    started = time.perf_counter()
    sys.stdout.flush()
    result = subprocess.run(["dvc", *args], cwd=cwd, env=env, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise PipelineError(f"dvc {' '.join(args)} failed in {cwd} (exit {result.returncode})")
    return time.perf_counter() - started


def run_variant(repository: str, commit: str, variant: str, environment: dict[str, str]) -> dict:
    """The task: train@variant and evaluate@variant through DVC in a clone on this worker; each step's seconds."""
    from distributed import get_worker

    folder = Path(get_worker().local_directory)
    clone = folder / f"{variant}-{commit[:12]}-{os.getpid()}"
    shutil.rmtree(clone, ignore_errors=True)
    env = os.environ | environment
    started = time.perf_counter()
    subprocess.run(["git", "clone", "--quiet", "--no-checkout", repository, str(clone)], check=True, timeout=300)
    git(clone, "checkout", "--quiet", commit)
    # One DVC cache per worker: the prepared data is downloaded once, not once per task.
    dvc(clone, "config", "--local", "cache.dir", str(folder / "dvc-cache"))
    seconds = {"clone": time.perf_counter() - started}
    started = time.perf_counter()
    check = subprocess.run([sys.executable, "-m", "pipeline.stages.check"], cwd=clone, env=env, capture_output=True,
                           text=True)
    if check.returncode != 0:  # this worker's packages differ from the lock: its results would too
        raise PipelineError(f"worker {get_worker().address}: {check.stderr.strip()}")
    seconds["check"] = time.perf_counter() - started
    seconds["repro"] = dvc(clone, "repro", "--pull", f"evaluate@{variant}", env=env)
    seconds["push"] = dvc(clone, "push", "--run-cache", f"train@{variant}", f"evaluate@{variant}", env=env)
    shutil.rmtree(clone, ignore_errors=True)
    return seconds


def run_sweep(root: Path, repository: str) -> None:
    if not os.environ.get("DASK_SCHEDULER_ADDRESS"):
        print("DASK_SCHEDULER_ADDRESS not set: running here with `dvc repro`", flush=True)
        dvc(root, "repro")
        return
    if not os.environ.get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://")):
        raise PipelineError("MLFLOW_TRACKING_URI: the workers need a tracking server they all reach "
                            "(http://...); a local store would stay in their clones")
    from distributed import Client, as_completed

    variants = list(load_params(root / "params.yaml").variants)
    commit = committed_head(root)
    dvc(root, "repro", "prepare")  # check, download, prepare: what every task restores
    dvc(root, "push", "--run-cache")
    environment = {name: os.environ[name] for name in FORWARDED if name in os.environ}
    started = time.perf_counter()
    with Client() as client:  # DASK_SCHEDULER_ADDRESS
        print(f"{len(variants)} variants on {len(client.scheduler_info()['workers'])} workers "
              f"at {client.scheduler.address}", flush=True)
        # retries: a stage that fails (an MLflow outage past its retries, say) runs once more.
        tasks = {client.submit(run_variant, repository, commit, variant, environment, pure=False, retries=1,
                               key=f"variant-{variant}-{commit[:12]}"): variant for variant in variants}
        for task in as_completed(tasks):
            steps = " ".join(f"{name} {value:.1f}s" for name, value in task.result().items())
            print(f"{tasks[task]}: {steps}", flush=True)
    print(f"all variants in {time.perf_counter() - started:.1f}s; restoring them here from the run-cache", flush=True)
    dvc(root, "repro", "--pull")


if __name__ == "__main__":
    parser = cli.parser(__doc__)
    parser.add_argument("--repository", help="the git URL the workers clone (default: this repository's path, "
                                             "for workers on this machine or a shared file system)")
    args = parser.parse_args()
    with cli.one_line_errors():
        run_sweep(Path.cwd(), args.repository or str(Path.cwd()))
