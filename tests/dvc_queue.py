"""Runs a project's queued DVC experiments to their end and stops the queue's workers.

Polled through `dvc queue status` rather than followed with `dvc exp run --run-all`, which can
wait forever on a queue worker that missed its shutdown (seen in CI with one project's queue,
and here with two clones' queues at once).
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

import psutil

from tests.conftest import run


def run_queues(paths: Iterable[Path], env: dict[str, str], names: Iterable[str], jobs: int = 2,
               timeout_s: float = 900) -> dict[str, str]:
    """{experiment: status} once none of `names`, queued in these projects, is queued or running.

    Each project's queue runs `jobs` experiments at once, all projects' queues at the same time;
    their workers are stopped before this returns."""
    paths = list(paths)
    try:
        for path in paths:
            # The workers it starts live on holding its stdout: no pipe to wait for the end of.
            subprocess.run(["dvc", "queue", "start", "-j", str(jobs)], cwd=path, env=env, check=True, timeout=60,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        statuses = wait_for_queues(paths, env, set(names), timeout_s)
        print_failed_logs(paths, env, statuses)
        return statuses
    finally:
        for path in paths:
            stop_workers(path, env)


def wait_for_queues(paths: list[Path], env: dict[str, str], names: set[str], timeout_s: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    while True:
        lines = [line for path in paths for line in run(["dvc", "queue", "status"], path, env, timeout=60).stdout.splitlines()]
        statuses = {fields[1]: fields[-1] for fields in map(str.split, lines) if fields[1:2] and fields[1] in names}
        if set(statuses) == names and not {"Queued", "Running"} & set(statuses.values()):
            return statuses
        assert time.monotonic() < deadline, "\n".join(lines)
        time.sleep(5)


def print_failed_logs(paths: list[Path], env: dict[str, str], statuses: dict[str, str]) -> None:
    """The output of each experiment that did not succeed, for the failing test's report: the status
    alone says nothing of why (a CI run's `load-b-0.02` showed only `Failed`)."""
    for name in sorted(n for n, status in statuses.items() if status != "Success"):
        for path in paths:
            logs = run(["dvc", "queue", "logs", name], path, env, timeout=60, check=False)
            if logs.returncode == 0:
                print(f"--- {name} ({statuses[name]}), `dvc queue logs` in {path}:\n{logs.stdout[-20000:]}{logs.stderr[-4000:]}")
                break


def stop_workers(path: Path, env: dict[str, str]) -> None:
    """`dvc queue stop`, then end any worker of this project's queue that is still there.

    A dvc-task worker that asked itself to shut down while another still ran can miss the
    request and idle forever; its pid is in `.dvc/tmp/exps/celery/dvc-exp-worker-<n>.pid`.
    """
    run(["dvc", "queue", "stop"], path, env, timeout=60, check=False)
    for pid_file in (path / ".dvc" / "tmp" / "exps" / "celery").glob("dvc-exp-worker-*.pid"):
        try:
            worker = psutil.Process(int(pid_file.read_text().strip()))
            if "queue-worker" not in worker.cmdline() or worker.cwd() != str(path):
                continue
            worker.wait(timeout=12)  # an idle worker stops itself after 10 s
        except (ValueError, psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        except psutil.TimeoutExpired:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=15)
            except psutil.TimeoutExpired:
                worker.kill()
