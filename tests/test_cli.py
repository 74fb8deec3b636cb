"""The stages' shell: one `error:` line and the error's exit code; bugs keep their traceback."""

import errno
import os
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.errors import ParamsError, PipelineError
from pipeline.config.params import load_params
from pipeline.fsio import atomic_write


@pytest.mark.parametrize("error, code, line", [
    (PipelineError("raw data missing"), 1, "error: raw data missing"),
    (ParamsError("params.yaml: train.lr: bad"), 2, "error: params.yaml: train.lr: bad"),
    (KeyboardInterrupt(), 130, "error: interrupted"),
], ids=["pipeline-error", "params-error", "interrupt"])
def test_failure_is_one_line_and_exit_code(capsys, error, code, line):
    with pytest.raises(SystemExit) as caught, cli.one_line_errors():
        raise error
    assert caught.value.code == code
    assert capsys.readouterr().err == line + "\n"


def test_newline_in_a_params_key_still_gives_one_line(tmp_path, capsys):
    params_file = tmp_path / "params.yaml"
    params_file.write_text('variants: {no_norm: {}}\ntrain: {"learning\\nrate": 1}\n')
    with pytest.raises(SystemExit) as caught, cli.one_line_errors():
        load_params(params_file)
    assert caught.value.code == 2
    assert capsys.readouterr().err == f"error: {params_file}: train.learning rate: unknown key\n"


def test_a_bug_is_not_swallowed():
    with pytest.raises(ZeroDivisionError), cli.one_line_errors():
        1 / 0


@pytest.mark.parametrize("code, line", [
    (errno.ENOSPC, "error: out: no space left on device (writing last.pt, 3 bytes); free some space there, "
                   "then `dvc repro` resumes where this stopped"),
    (errno.EROFS, "error: out: read-only file system (writing last.pt, 3 bytes); make it writable, "
                  "then `dvc repro` resumes where this stopped"),
    (errno.EDQUOT, "error: out: disk quota exceeded (writing last.pt, 3 bytes); free some space there, "
                   "then `dvc repro` resumes where this stopped"),
    (errno.EACCES, "error: out: permission denied (writing last.pt, 3 bytes); make it writable, "
                   "then `dvc repro` resumes where this stopped"),
], ids=["full", "read-only", "quota", "not-the-users"])
def test_a_failed_write_is_one_line_naming_its_folder_and_bytes(tmp_path, monkeypatch, capsys, code, line):
    monkeypatch.chdir(tmp_path)

    def fail(handle):
        raise OSError(code, os.strerror(code))  # what write(2) raises: no file named

    with pytest.raises(SystemExit) as caught, cli.one_line_errors():
        atomic_write(Path("out") / "last.pt", fail, size=3)
    assert caught.value.code == 1
    assert capsys.readouterr().err == line + "\n"
    assert list((tmp_path / "out").iterdir()) == []  # no temporary file left


def test_another_os_error_keeps_its_traceback():
    with pytest.raises(FileNotFoundError), cli.one_line_errors():
        open("/nonexistent/file")
