"""The `dvc` processes `make repro` runs (pipeline/commands/dvcs.py), against real `dvc` commands;
tests/test_repro_faults.py stops them."""

import time

import pytest

from pipeline.commands.dvcs import DvcFailed, Dvcs
from tests.conftest import ROOT, run, stage_env


@pytest.mark.parametrize("args", [["stage", "list", "--name-only"], ["repro", "--dry", "no-such-stage"]])
def test_a_dvc_command_answers_and_exits_as_the_dvc_script_run_alone(args, monkeypatch):
    """`make repro` runs each dvc command as a process of its own (`Dvcs`): its captured output is
    what `dvc` prints; its failure is a DvcFailed with its exit code."""
    env = stage_env()
    alone = run(["dvc", *args], ROOT, env, timeout=120, check=False)
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PATH", env["PATH"])
    with Dvcs() as dvcs:
        try:
            answer = dvcs.output(*args, capture=True)
        except DvcFailed as failed:
            answer = failed.exit_code
    assert answer == (alone.stdout if alone.returncode == 0 else alone.returncode)
    assert (alone.returncode == 0) == (args[0] == "stage")


def test_the_next_chain_starts_once_dvc_has_started_the_train_stage_of_the_one_before(tmp_path, monkeypatch):
    """`side_by_side` starts a chain once the one before it runs its train stage's command
    (`ready`), which DVC announces with STAGE_RUNS as it lets go of the repository lock: seen
    here after the stages before it and while a real `dvc repro`'s stage still runs, not only at
    its end (a DVC that said it otherwise would make each chain wait for the one before)."""
    env = stage_env()
    run(["dvc", "init", "--no-scm", "-q"], tmp_path, env)
    (tmp_path / "dvc.yaml").write_text("stages:\n  first:\n    cmd: python -c pass\n"
                                       "  slow:\n    cmd: python -c \"import time; time.sleep(3)\"\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", env["PATH"])
    with Dvcs() as dvcs:
        process = dvcs.start("repro", "-s", "first", "slow", ready="slow")
        assert dvcs.starting()
        while dvcs.starting() and process.poll() is None:
            time.sleep(0.01)
        assert process.poll() is None, "the stage's command ended before its start was seen"
        assert not dvcs.starting()


def test_a_dvc_killed_by_a_signal_ends_the_command_as_a_shell_says_it():
    """A dvc process killed by SIGKILL returns -9; `make repro` then exits 137, as the shell reports
    a killed command (sys.exit(-9) would exit 247)."""
    with Dvcs() as dvcs:
        process = dvcs.start("stage", "list", "--name-only", capture=True)
        process.kill()
        with pytest.raises(DvcFailed) as failed:
            dvcs.result(process)
    assert failed.value.exit_code == 137
