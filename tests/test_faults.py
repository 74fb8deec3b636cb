"""The fault tier: real faults on a tiny reproduced project, each in a copy of it.

A full disk (a filled tmpfs) under every folder the pipeline writes, read-only bind mounts,
SIGINT/SIGTERM/SIGKILL to a train stage and to its process group at an epoch, truncated and
garbage files in data/, a config larger than memory. Each test asserts the one line, the exit
code, what is kept, that no process is left, and that the rerun gives the clean run's outputs
(the same dvc.lock, or the same bytes where a stage's command ran alone). Mounts need root: the
tests that use them skip elsewhere, saying so (tests/faults.py).
"""

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.nn import checkpoint
from tests.conftest import TINY_PARAMS, make_project, run, stage_command, tiny_mnist_arrays, write_mirror
from tests.faults import fill, full_disk, read_only, read_terminal, start_on_a_terminal, wait_until_none_left
from tests.test_train import wait_for_epoch

EPOCHS = 4
TRAIN = stage_command("train", "batchnorm")
SCRATCH = Path(".dvc/tmp/train/batchnorm")  # the resumable state (pipeline.stages.train.Paths)
TRAIN_OUTPUTS = ("data/checkpoints/batchnorm", "data/train/batchnorm")
RESUMES = "then `dvc repro` resumes where this stopped"


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A tiny project reproduced once, committed: what every fault's rerun must give again.
    (2,000 training images in batches of 4, ~0.4 s an epoch, so that a signal lands mid-run.)"""
    mirror = tmp_path_factory.mktemp("mirror")
    write_mirror(mirror, tiny_mnist_arrays(train=2100, test=200))
    path, env = make_project(tmp_path_factory.mktemp("clean") / "project", mirror)
    raw = yaml.safe_load(yaml.safe_dump(TINY_PARAMS))
    raw["train"] |= {"epochs": EPOCHS, "batch_size": 4}
    (path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    run(["dvc", "repro"], path, env, timeout=480)  # not conftest.repro_pipeline: this tier is `faults`
    run(["git", "add", "-A"], path, env)
    run(["git", "commit", "-qm", "clean repro"], path, env)
    return path, env


@pytest.fixture
def project(clean, tmp_path) -> tuple[Path, dict[str, str]]:
    """A copy of the clean project (its DVC cache and MLflow store too) for one fault. (Its MLflow
    experiment's artifact location is the clean project's, an absolute path: no test reads them.)"""
    path = tmp_path / "project"
    shutil.copytree(clean[0], path, symlinks=True)
    return path, clean[1]


def files(path: Path, *folders: str) -> dict[str, bytes]:
    """Every file under `folders` of the project at `path`, by relative path."""
    return {str(file.relative_to(path)): file.read_bytes()
            for folder in folders for file in sorted((path / folder).rglob("*")) if file.is_file()}


def set_param(path: Path, section: str, key: str, value: object) -> str:
    """params.yaml with `section.key` set to `value`; returns the file as it was."""
    before = (path / "params.yaml").read_text()
    raw = yaml.safe_load(before)
    raw[section][key] = value
    (path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return before


def stage(command: list[str], path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return run(command, path, env, timeout=300, check=False)


def last_line(result: subprocess.CompletedProcess) -> str:
    print(f"what the user saw: {result.stderr}")  # in the report of a failure, or with -rP
    return result.stderr.strip().splitlines()[-1]


def assert_one_line(result: subprocess.CompletedProcess, pattern: str) -> None:
    line = last_line(result)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert re.fullmatch(pattern, line), line


def assert_nothing_left(path: Path) -> None:
    assert wait_until_none_left(path, 5) == []


def assert_rerun_is_clean(path: Path, env: dict[str, str], clean: Path) -> None:
    """`dvc repro` after the fault: the clean run's dvc.lock and outputs."""
    run(["dvc", "repro"], path, env, timeout=300)
    assert (path / "dvc.lock").read_text() == (clean / "dvc.lock").read_text()
    assert files(path, "data") == files(clean, "data")
    assert_nothing_left(path)


def last_epoch(waited_for: int, stdout: str) -> int:
    """The last epoch the stage printed (it prints an epoch once its state is written): the one a
    test waited for (wait_for_epoch read the lines up to it), or one after it."""
    return max([waited_for, *(int(epoch) for epoch in re.findall(r"epoch (\d+)/", stdout))])


def resume_to_clean_outputs(path: Path, env: dict[str, str], clean: Path, after: int) -> None:
    resumed = stage(TRAIN, path, env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after epoch {after}" in resumed.stdout
    assert files(path, *TRAIN_OUTPUTS) == files(clean, *TRAIN_OUTPUTS)
    assert not (path / SCRATCH).exists()


def finish(process: subprocess.Popen) -> tuple[str, str]:
    try:
        return process.communicate(timeout=120)
    finally:
        process.kill()


def test_full_disk_under_the_resumable_state(project, clean):
    """A disk with room for one epoch's state (best.pt and last.pt, and one more file being
    written), not for epoch 2's: an atomic write needs the old file and the new one at once."""
    path, env = project
    state = (clean[0] / "data" / "checkpoints" / "batchnorm" / "best.pt").stat().st_size  # as each state file
    with full_disk(path / SCRATCH.parent, size=f"{int(2.5 * state) // 1024}k", keep=False):  # the stage deletes SCRATCH
        result = stage(TRAIN, path, env)
        assert_one_line(result, rf"error: {SCRATCH}: no space left on device \(writing best\.pt, [\d,]+ bytes\); "
                                rf"free some space there, {re.escape(RESUMES)}")
        assert_nothing_left(path)
    assert checkpoint.load(path / SCRATCH / "last.pt")["epoch"] == 1  # the last epoch it finished, whole
    resume_to_clean_outputs(path, env, clean[0], 1)  # on a disk with room


@pytest.mark.parametrize("folder", TRAIN_OUTPUTS)
def test_full_disk_under_the_train_outputs(project, clean, folder):
    path, env = project
    with full_disk(path / folder, size="4m") as full:
        filler = fill(full)
        result = stage(TRAIN, path, env)
        assert_one_line(result, rf"error: {folder}: no space left on device \(writing [\w.]+, [\d,]+ bytes\); "
                                rf"free some space there, {re.escape(RESUMES)}")
        assert_nothing_left(path)
        assert checkpoint.load(path / SCRATCH / "last.pt")["epoch"] == EPOCHS
        assert files(path, folder) == files(clean[0], folder) | {f"{folder}/.filler": filler.read_bytes()}
        filler.unlink()
        resume_to_clean_outputs(path, env, clean[0], EPOCHS)


# The stage that writes each output folder; the tmpfs goes over the folder itself (DVC, which would
# delete the folder before the stage, is not run under the fault: the stage's own command is).
OUTPUT_STAGES = {
    "data/raw": ["download"],
    "data/prepared": ["prepare"],
    "data/evaluate": ["evaluate", "batchnorm"],
    "data/compare": ["compare"],
}


@pytest.mark.parametrize("folder", OUTPUT_STAGES)
def test_full_disk_under_an_output_folder(project, clean, folder):
    path, env = project
    keep = folder != "data/raw"  # the download skips files it finds verified: its folder starts empty
    with full_disk(path / folder, size="4m", keep=keep) as full:
        filler = fill(full)
        result = stage(stage_command(*OUTPUT_STAGES[folder]), path, env)
        assert_one_line(result, rf"error: {folder}[\w/]*: no space left on device \(writing [\w.-]+, [\d,]+ bytes\); "
                                rf"free some space there, {re.escape(RESUMES)}")
        assert_nothing_left(path)
        filler.unlink()
    if keep:  # the files it was replacing are as they were
        assert files(path, folder) == files(clean[0], folder)
    assert_rerun_is_clean(path, env, clean[0])


def test_full_dvc_cache(project, clean):
    """DVC's own write: DVC reports it (its error, not ours)."""
    path, env = project
    params = set_param(path, "data", "val_size", 120)  # outputs the cache has no copy of
    with full_disk(path / ".dvc" / "cache", size="16m") as cache:
        filler = fill(cache)
        result = run(["dvc", "repro", "--single-item", "prepare"], path, env, timeout=300, check=False)
        last_line(result)
        assert result.returncode != 0
        assert "No space left on device" in result.stderr or "no space left" in result.stderr.lower(), result.stderr
        assert "Traceback" not in result.stderr, result.stderr
        assert_nothing_left(path)
        filler.unlink()
    (path / "params.yaml").write_text(params)
    assert_rerun_is_clean(path, env, clean[0])


@pytest.mark.parametrize("folder", ["data", ".dvc/cache"])
def test_read_only_folder(project, clean, folder):
    path, env = project
    params = set_param(path, "data", "val_size", 120)  # outputs to write, and to cache
    with read_only(path / folder):
        result = run(["dvc", "repro", "--single-item", "prepare"], path, env, timeout=300, check=False)
        line = last_line(result)
        assert result.returncode != 0
        assert "Traceback" not in result.stderr, result.stderr
        assert "read-only file system" in line.lower(), result.stderr
        assert_nothing_left(path)
    (path / "params.yaml").write_text(params)
    assert_rerun_is_clean(path, env, clean[0])


@pytest.mark.parametrize("to_group", [False, True], ids=["stage", "group"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_signal_at_an_epoch(project, clean, signum, to_group):
    """SIGINT (Ctrl-C at its terminal) or SIGTERM while epoch 2 trains: the state of epoch 1 is
    kept. SIGKILL once epoch 1 is recorded (before, nothing would be there to resume)."""
    path, env = project
    process, terminal = start_on_a_terminal(TRAIN, path, env)
    try:
        if signum == signal.SIGKILL:
            wait_for_epoch(process, 1)
        else:
            read_terminal(terminal, until="batchnorm epoch 2")  # its progress bar: epoch 2 trains
        (os.killpg if to_group else os.kill)(process.pid, signum)
        stdout, _ = finish(process)
        stderr = read_terminal(terminal).replace("\r\n", "\n")
    finally:
        os.close(terminal)
    print(f"what the user saw: {stderr}")
    if signum == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL
        # Training runs ahead of the records (the first waits ~2 s for MLflow's start): the kill finds
        # epoch 1 recorded, perhaps later ones too.
        kept = checkpoint.load(path / SCRATCH / "last.pt")["epoch"]
        assert 1 <= kept == last_epoch(1, stdout) <= EPOCHS
    else:
        assert process.returncode == 1 and "Traceback" not in stderr, stderr
        assert stderr.strip().splitlines()[-1].split("\r")[-1] == (
            "error: train@batchnorm: interrupted; `dvc repro` resumes after the last completed epoch "
            f"({path / SCRATCH / 'last.pt'})")
        kept = checkpoint.load(path / SCRATCH / "last.pt")["epoch"]
        assert kept == 1
    assert_nothing_left(path)  # its tracking process too, even when SIGKILL left it no word
    assert files(path, *TRAIN_OUTPUTS) == files(clean[0], *TRAIN_OUTPUTS)  # untouched
    resume_to_clean_outputs(path, env, clean[0], kept)


# A damaged input, the stage that reads it, and that stage's line.
DAMAGED = {
    "prepared-truncated": ("data/prepared/train/images.npy", TRAIN, r"error: data/prepared/train: unreadable .*"),
    "prepared-garbage": ("data/prepared/test/labels.npy", stage_command("evaluate", "batchnorm"),
                         r"error: data/prepared/test: unreadable .*"),
    "raw-truncated": ("data/raw/train-labels-idx1-ubyte.gz", stage_command("prepare"),
                      r"error: data/raw/train-labels-idx1-ubyte\.gz: .*"),
    "raw-garbage": ("data/raw/train-images-idx3-ubyte.gz", stage_command("prepare"),
                    r"error: data/raw/train-images-idx3-ubyte\.gz: .*"),
    "checkpoint-truncated": ("data/checkpoints/batchnorm/weights.npz", stage_command("evaluate", "batchnorm"),
                             r"error: data/checkpoints/batchnorm/weights\.npz: .*"),
    "checkpoint-garbage": ("data/checkpoints/batchnorm/weights.npz", stage_command("evaluate", "batchnorm"),
                           r"error: data/checkpoints/batchnorm/weights\.npz: .*"),
}


@pytest.mark.parametrize("name", DAMAGED)
def test_damaged_file_in_data(project, clean, name):
    path, env = project
    relative, command, line = DAMAGED[name]
    file = path / relative
    if name.endswith("truncated"):
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    else:
        file.write_bytes(b"<html>not what was asked for</html>\n" * 8)
    assert_one_line(stage(command, path, env), line)
    assert_nothing_left(path)
    assert_rerun_is_clean(path, env, clean[0])  # DVC sees the changed output and restores it


def test_config_larger_than_memory_is_refused_by_the_check_stage(project, clean):
    path, env = project
    params = set_param(path, "train", "hidden_sizes", [65536, 65536])
    result = run(["dvc", "repro"], path, env, timeout=300, check=False)
    last_line(result)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert re.search(r"^error: params\.yaml: variants\.\w+: needs about [\d.]+ GiB .*[\d.]+ GiB$", result.stderr,
                     re.MULTILINE), result.stderr
    assert_nothing_left(path)
    (path / "params.yaml").write_text(params)
    assert_rerun_is_clean(path, env, clean[0])
