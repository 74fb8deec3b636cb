"""`make repro` ended every way it can end: a signal to its process group or to one of its
processes, `make`'s death, a failed stage. Real `make`, DVC, stages and signals on tiny MNIST,
the train stages mid-training; each time, no process it started is alive 5 s later."""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import ROOT, make_project, run
from tests.faults import processes_under, wait_until_none_left

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

VARIANTS = ("batchnorm", "no_norm")
# The project's own Makefile, its .venv taken as it is (the tests' interpreter is on PATH).
MAKE_REPRO = ["make", "-o", ".venv/.installed-from-lock", "repro", "ARGS=--jobs 2"]
LONG_EPOCHS = 1000  # minutes of training: the fault always comes mid-training


@pytest.fixture(scope="module")
def upstream_done(tmp_path_factory, tiny_mirror):
    """A project with check, download and prepare done, and train stages that would train for minutes."""
    path, env = make_project(tmp_path_factory.mktemp("repro_faults") / "project", tiny_mirror[0])
    params = yaml.safe_load((path / "params.yaml").read_text())
    params["train"] |= {"epochs": LONG_EPOCHS, "batch_size": 4}
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(ROOT / "Makefile", path / "Makefile")
    run(["dvc", "repro", "prepare"], path, env, timeout=300)
    return path, env


@pytest.fixture
def project(upstream_done, tmp_path):
    """A copy of `upstream_done` for one test; whatever a failed test leaves running is killed."""
    path, env = upstream_done
    copy = tmp_path / "project"
    shutil.copytree(path, copy, symlinks=True)
    yield copy, env
    for process in processes_under(copy):
        process.kill()


def start_make_repro(path: Path, env: dict[str, str]) -> subprocess.Popen:
    """`make repro` as a terminal's job: a process group (and session) of its own, its output in `repro.log`."""
    with open(path / "repro.log", "w") as log:
        return subprocess.Popen(MAKE_REPRO, cwd=path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def log_of(path: Path) -> str:
    return (path / "repro.log").read_text()


def wait_for_training(path: Path, make: subprocess.Popen, timeout_s: float = 180) -> None:
    """Until both variants' train stages have printed an epoch: both chains are running."""
    deadline = time.monotonic() + timeout_s
    while not all(f"train@{variant} epoch 1/" in log_of(path) for variant in VARIANTS):
        assert make.poll() is None, f"make repro exited {make.returncode}:\n{log_of(path)}"
        assert time.monotonic() < deadline, f"no epoch of both variants within {timeout_s} s:\n{log_of(path)}"
        time.sleep(0.2)


def repro_process(path: Path) -> psutil.Process:
    return next(process for process in processes_under(path)
                if "pipeline.commands.repro" in " ".join(process.cmdline()))


@pytest.mark.parametrize("target, signum, says", [
    ("group", signal.SIGINT, "error: interrupted by SIGINT"),  # Ctrl-C
    ("group", signal.SIGTERM, "error: interrupted by SIGTERM"),
    ("make", signal.SIGTERM, "error: interrupted by SIGTERM"),  # make passes it on to its recipe
    ("repro", signal.SIGTERM, "error: interrupted by SIGTERM"),
    ("make", signal.SIGKILL, "error: the process that started it"),  # passes nothing on: make's end is noticed
])
def test_a_signal_to_make_repro_leaves_nothing_running(project, target, signum, says):
    path, env = project
    make = start_make_repro(path, env)
    wait_for_training(path, make)
    if target == "group":
        os.killpg(make.pid, signum)
    else:
        os.kill(make.pid if target == "make" else repro_process(path).pid, signum)
    left = wait_until_none_left(path, seconds=5)
    assert left == [], f"still running 5 s after {signal.Signals(signum).name} to {target}: {left}"
    assert make.wait(timeout=5) != 0
    assert says in log_of(path), log_of(path)


def test_a_failed_stage_stops_the_other_chains_and_leaves_nothing_running(project):
    """no_norm's train stage fails after its first epoch (its scratch folder is a file); the
    batchnorm chain beside it, minutes from its end, is stopped."""
    path, env = project
    (path / ".dvc" / "tmp" / "train").mkdir(parents=True, exist_ok=True)
    (path / ".dvc" / "tmp" / "train" / "no_norm").write_text("not a folder")
    make = start_make_repro(path, env)
    assert make.wait(timeout=240) != 0
    left = wait_until_none_left(path, seconds=5)
    assert left == [], f"still running 5 s after the failed chain ended make repro: {left}"
    log = log_of(path)
    assert "error: dvc repro -s train@no_norm evaluate@no_norm exited with" in log, log
    assert f"train@batchnorm epoch {LONG_EPOCHS}/" not in log, log  # stopped mid-training
    assert not (path / "data" / "train" / "batchnorm" / "history.json").exists()
