"""The fork server (pipeline/forkserver.py) and a stage command's hand-off to it
(pipeline/handoff.py): a stage forked by a real server is the stage run by itself, in its outputs,
streams, exit status and signals; a command the server would not run alike runs itself."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from pipeline import forkserver
from pipeline.forkserver import PER_STAGE, refusal
from pipeline.handoff import ADDRESS_VARIABLE, OFF, Request
from tests.conftest import run, stage_command, stage_env
from tests.test_train import (  # noqa: F401  (slow_mirror: a fixture)
    TRAIN,
    assert_same_result,
    final_state,
    make_prepared,
    paths,
    slow_mirror,
    wait_for_epoch,
)

CHECK = stage_command("check")


@contextlib.contextmanager
def served(path: Path, monkeypatch) -> Iterator[Path]:
    """`forkserver.running()` as `make repro` runs it, for stage commands run in `path` with the
    test's stage environment: inherited in the block, as `make repro`'s dvc commands inherit it
    (the process's own, which has more than `os.environ` under pytest); yields the server's log."""
    env = stage_env()
    for name in set(os.environ) - set(env):
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(path)
    log = path / "forkserver.log"
    with forkserver.running(log_to=log):
        yield log


def forked_pids(log: Path, module: str) -> list[int]:
    return [int(pid) for pid in re.findall(rf"^forkserver: forked (\d+): {module}\b", log.read_text(), re.M)]


def outcome(result: subprocess.CompletedProcess) -> tuple:
    return result.returncode, result.stdout, result.stderr


def test_a_forked_train_stage_writes_what_it_writes_alone(tmp_path, monkeypatch, tiny_mirror):
    alone = make_prepared(tmp_path / "alone", tiny_mirror[0])
    assert run(TRAIN, alone, stage_env()).returncode == 0
    forked = make_prepared(tmp_path / "forked", tiny_mirror[0])
    with served(forked, monkeypatch) as log:
        run(TRAIN, forked, env=None)
    assert len(forked_pids(log, "pipeline.stages.train")) == 1
    assert_same_result(final_state(forked), final_state(alone))
    for name in ("history.json", "curves.csv"):
        assert (paths(forked).out / name).read_bytes() == (paths(alone).out / name).read_bytes(), name


def test_exit_status_and_streams_are_the_stages(tmp_path, monkeypatch):
    """Its help, a usage error, and a user's mistake (no params.yaml here: one line)."""
    commands = [[*CHECK, "--help"], [*CHECK, "--no-such-option"], CHECK]
    alone = [outcome(run(command, tmp_path, stage_env(), check=False)) for command in commands]
    with served(tmp_path, monkeypatch) as log:
        forked = [outcome(run(command, tmp_path, env=None, check=False)) for command in commands]
    assert forked == alone
    assert [code for code, _, _ in forked] == [0, 2, 2]
    assert "usage:" in forked[0][1] and "--no-such-option" in forked[1][2]
    assert "params.yaml" in forked[2][2] and "Traceback" not in forked[2][2]
    assert len(forked_pids(log, "pipeline.stages.check")) == 3


def test_a_command_in_another_environment_runs_itself(tmp_path, monkeypatch):
    alone = outcome(run(CHECK, tmp_path, stage_env(EXTRA="1"), check=False))
    with served(tmp_path, monkeypatch) as log:
        monkeypatch.setenv("EXTRA", "1")
        itself = outcome(run(CHECK, tmp_path, env=None, check=False))
    assert itself == alone
    assert "refused pipeline.stages.check: another environment (EXTRA)" in log.read_text()
    assert forked_pids(log, "pipeline.stages.check") == []


def test_without_a_server_the_command_runs_itself(tmp_path):
    alone = outcome(run(CHECK, tmp_path, stage_env(), check=False))
    for address in (str(tmp_path / "no-socket"), OFF):
        assert outcome(run(CHECK, tmp_path, stage_env(**{ADDRESS_VARIABLE: address}), check=False)) == alone


def train_past_epoch_1(path: Path) -> subprocess.Popen:
    """train@batchnorm's command in `path`, in the environment it inherits, once epoch 1 is done."""
    command = subprocess.Popen(TRAIN, cwd=path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_epoch(command, 1)
    return command


def test_sigterm_to_the_command_reaches_the_forked_stage(tmp_path, monkeypatch, slow_mirror):
    path = make_prepared(tmp_path, slow_mirror)
    with served(path, monkeypatch) as log:
        command = train_past_epoch_1(path)
        command.send_signal(signal.SIGTERM)
        _, stderr = command.communicate(timeout=60)
    assert len(forked_pids(log, "pipeline.stages.train")) == 1
    assert command.returncode != 0
    assert stderr.strip().splitlines()[-1].startswith("error: train@batchnorm: interrupted")
    assert "Traceback" not in stderr


def test_a_killed_command_takes_its_forked_stage_with_it(tmp_path, monkeypatch, slow_mirror):
    path = make_prepared(tmp_path, slow_mirror)
    with served(path, monkeypatch) as log:
        command = train_past_epoch_1(path)
        [stage] = forked_pids(log, "pipeline.stages.train")
        command.kill()  # SIGKILL: the command cannot pass it on, its closed connection tells the server
        command.wait(timeout=30)
        deadline = time.monotonic() + 30
        while is_running(stage) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not is_running(stage)
    assert not (paths(path).out / "history.json").exists()  # it did not train to its end


def is_running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_running_ends_its_server_and_off_starts_none(tmp_path, monkeypatch):
    monkeypatch.delenv(ADDRESS_VARIABLE, raising=False)
    with forkserver.running():
        address = Path(os.environ[ADDRESS_VARIABLE])
        assert address.is_socket()
    assert ADDRESS_VARIABLE not in os.environ and not address.exists()
    monkeypatch.setenv(ADDRESS_VARIABLE, OFF)
    with forkserver.running(log_to=tmp_path / "log"):
        assert os.environ[ADDRESS_VARIABLE] == OFF
    assert not (tmp_path / "log").exists()


def test_refusal_lets_differ_only_what_dvc_and_the_shell_set_per_stage():
    environ = dict(os.environ)
    request = Request("pipeline.stages.check", [], os.getcwd(), environ, list(sys.path), sys.executable)
    assert refusal(request, environ) is None
    assert refusal(request, {**environ, **{name: "per stage" for name in PER_STAGE}}) is None
    assert refusal(request, {**environ, "EXTRA": "1"}) == "another environment (EXTRA)"
    moved = Request(**{**request.__dict__, "cwd": "/"})
    assert refusal(moved, environ) == "another working directory (/)"
    assert refusal(Request(**{**request.__dict__, "path": []}), environ) == "another interpreter or sys.path"
