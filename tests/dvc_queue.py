"""Runs a project's queued DVC experiments to their end and stops the queue's workers.

Polled through `dvc queue status` rather than followed with `dvc exp run --run-all`, which can
wait forever on a queue worker that missed its shutdown (seen in CI with one project's queue,
and here with two clones' queues at once).
"""

import signal
import subprocess
import time
from pathlib import Path

import psutil

from tests.conftest import run


def run_queues(experiments: dict[Path, dict[str, list[str]]], env: dict[str, str], jobs: int = 2,
               timeout_s: float = 900) -> dict[str, str]:
    """{experiment: status} of `dvc exp run --queue -n <name> <arguments>` for every project's
    {name: arguments}, run until none is queued or running; the workers are stopped after.

    Each project's queue runs `jobs` experiments at once, all projects' queues at the same time.
    An experiment DVC failed in its set-up, before any stage ran (no output logs), is queued and
    run once more, on one worker: DVC's queue workers race there when more than one runs
    (treeverse/dvc#10673, open: "fails some experiments that shouldn't fail ... no logs"); a
    failure of the pipeline itself has logs, and stays a failure."""
    statuses = _run(experiments, env, jobs, timeout_s)
    again = {path: {name: arguments for name, arguments in queued.items() if failed_in_setup(path, env, name, statuses)}
             for path, queued in experiments.items()}
    again = {path: queued for path, queued in again.items() if queued}
    if again:
        print(f"queued again, DVC's queue having failed them in set-up: {sorted(n for q in again.values() for n in q)}")
        for path, queued in again.items():
            run(["dvc", "queue", "remove", *queued], path, env, timeout=60)
        statuses |= _run(again, env, 1, timeout_s)
    print_failed_logs(list(experiments), env, statuses)
    return statuses


def _run(experiments: dict[Path, dict[str, list[str]]], env: dict[str, str], jobs: int,
         timeout_s: float) -> dict[str, str]:
    for path, queued in experiments.items():
        for name, arguments in queued.items():
            run(["dvc", "exp", "run", "--queue", "-n", name, *arguments], path, env, timeout=60)
    try:
        for path in experiments:
            # The workers it starts live on holding its stdout: no pipe to wait for the end of.
            subprocess.run(["dvc", "queue", "start", "-j", str(jobs)], cwd=path, env=env, check=True, timeout=60,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        names = {name for queued in experiments.values() for name in queued}
        return wait_for_queues(list(experiments), env, names, timeout_s)
    finally:
        for path in experiments:
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


def failed_in_setup(path: Path, env: dict[str, str], name: str, statuses: dict[str, str]) -> bool:
    """Whether DVC failed the experiment before any stage wrote output (DVC's own wording)."""
    if statuses.get(name) != "Failed":
        return False
    logs = run(["dvc", "queue", "logs", name], path, env, timeout=60, check=False)
    return logs.returncode != 0 and "failed during setup" in logs.stdout + logs.stderr


def print_failed_logs(paths: list[Path], env: dict[str, str], statuses: dict[str, str]) -> None:
    """For the failing test's report, the output of each experiment that did not succeed and the
    queue workers' own logs: the status alone says nothing of why."""
    failed = sorted(name for name, status in statuses.items() if status != "Success")
    for path in paths if failed else ():
        for name in failed:
            logs = run(["dvc", "queue", "logs", name], path, env, timeout=60, check=False)
            print(f"--- {name} ({statuses[name]}), `dvc queue logs` in {path}:\n{logs.stdout[-20000:]}{logs.stderr[-4000:]}")
        for worker_log in sorted((path / ".dvc" / "tmp" / "exps" / "celery").glob("*.out")):
            print(f"--- {worker_log}:\n{worker_log.read_text(errors='replace')[-8000:]}")


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
