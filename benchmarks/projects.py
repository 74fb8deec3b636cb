"""Project copies the benchmarks time commands in: the lab's data given, a param set, and a
command's wall and CPU seconds with each stage's share read from DVC's output."""

import contextlib
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

from benchmarks.common import children_cpu_s
from tests.support import ROOT, SHARED_MNIST, copy_project, run, stage_env

def lab_env(tmp: Path, mirror: Path = SHARED_MNIST) -> dict[str, str]:
    """The environment `dvc repro` runs with in a copy: this venv's dvc, MNIST from `mirror`,
    MLflow to a sqlite db in the copy, output unbuffered (each line timed as it comes)."""
    return stage_env(mirror, MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}", PYTHONUNBUFFERED="1")


def lab_copy(tmp: Path, env: dict[str, str], source: Path = ROOT, data: bool = True) -> Path:
    """A copy of the project at `source` in `tmp` (tests/support.py's, with its dvc.lock). `data`:
    this tree's data/raw and data/prepared given (the check stage run, then `dvc commit download
    prepare`), so that `dvc repro` starts from the prepared data."""
    copy_project(tmp, env, source, lock=True)
    if data:
        for sub in ("raw", "prepared"):
            shutil.copytree(ROOT / "data" / sub, tmp / "data" / sub)
        run(["dvc", "repro", "-q", "check"], tmp, env)  # environment.json, which prepare depends on
        run(["dvc", "commit", "-f", "-q", "download", "prepare"], tmp, env)  # data given: download excluded
    return tmp


def set_param(tmp: Path, key: str, value) -> None:
    """One line of the copy's params.yaml, `key: value`; `key` with its indent ("seeds", "  epochs")."""
    params_file = tmp / "params.yaml"
    text, found = re.subn(rf"(?m)^{key}: .*$", f"{key}: {value}", params_file.read_text())
    if found != 1:
        raise ValueError(f"params.yaml: {found} lines for {key.strip()!r}, expected 1")
    params_file.write_text(text)


def timed_command(tmp: Path, env: dict[str, str], log_name: str, command: list[str], timeout: float = 1800) -> dict:
    """Wall and CPU seconds of `command` (e.g. `dvc repro`) in `tmp`, its output in `log_name`, and
    each stage's seconds from what DVC prints: `stages_s` from its announcement to the next,
    `commands_s` from the command's start (DVC's `> cmd` line) to `Updating lock file` after it (the
    command, then saving its outputs); `dvc_s` is the rest of the wall time. Stages run side by side
    (`make repro`'s) overlap: there only the wall and CPU seconds compare. Killed, with the stages
    it started, after `timeout` seconds."""
    cpu0, t0 = children_cpu_s(), time.perf_counter()
    with open(tmp / log_name, "w") as log:
        proc = subprocess.Popen(command, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # a group of its own: it and its stages end together
        limit = threading.Timer(timeout, kill_group, (proc,))  # its output then ends, and so does the reading
        limit.start()
        try:
            stages = read_stages(proc.stdout, log)
            code = proc.wait()
        finally:
            limit.cancel()
            if proc.poll() is None:  # reading failed (or was interrupted)
                kill_group(proc)
                proc.wait()
    wall, cpu = time.perf_counter() - t0, children_cpu_s() - cpu0
    ends = [stage[1] for stage in stages[1:]] + [t0 + wall]
    commands = {name: (updated or end) - (started or announced)
                for (name, announced, started, updated), end in zip(stages, ends)}
    tail = (tmp / log_name).read_text().splitlines()[-15:]
    return {"wall_s": wall, "cpu_s": cpu, "returncode": code,
            "stages_s": {stage[0]: end - stage[1] for stage, end in zip(stages, ends)},
            "commands_s": commands, "dvc_s": wall - sum(commands.values()), **({"log_tail": tail} if code else {})}


def kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):  # ended already
        os.killpg(proc.pid, signal.SIGKILL)


def read_stages(lines, log) -> list[list]:
    """From a command's output lines (each also written to `log`): [name, announced, command
    started, lock updated] per stage DVC ran, as perf_counter times."""
    stages = []
    for line in lines:
        log.write(line)
        now = time.perf_counter()
        if line.startswith("Running stage '"):
            stages.append([line.split("'")[1], now, None, None])
        elif stages and stages[-1][2] is None and line.startswith("> "):
            stages[-1][2] = now
        elif stages and stages[-1][3] is None and line.startswith("Updating lock file"):
            stages[-1][3] = now
    return stages
