"""Real faults for the fault tier: a full disk (a small tmpfs mounted over a folder), a read-only
folder (a read-only bind mount), a command on a terminal (to signal it where a user would), and
what is left running afterwards. Mounting needs root (CI runs
as root); elsewhere the tests that use these skip, saying why."""

import errno
import fcntl
import os
import select
import shutil
import struct
import subprocess
import tempfile
import termios
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest


def _mount(*args: str) -> None:
    result = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        pytest.skip(f"cannot mount here ({result.stderr.strip() or 'mount failed'}): the fault needs root")


def _umount(path: Path) -> None:
    result = subprocess.run(["umount", str(path)], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:  # busy: a process the test left there; detached, so the next tests run
        subprocess.run(["umount", "--lazy", str(path)], capture_output=True, timeout=30)


def require_mounts() -> None:
    if os.geteuid() != 0:
        pytest.skip("a real full disk or read-only folder needs root (mount); CI runs as root")


def _copy_contents(source: Path, target: Path) -> None:
    """`source`'s files into `target`, so far as they fit."""
    try:
        shutil.copytree(source, target, symlinks=True, dirs_exist_ok=True)
    except shutil.Error:  # some did not fit on a full disk, as they would not have
        pass


@contextmanager
def full_disk(path: Path, size: str = "256k", keep: bool = True):
    """`path` on a tmpfs of `size`: writes past it fail with ENOSPC. `keep`: the folder's files
    are copied onto the tmpfs first (so far as they fit); afterwards the folder holds what the
    tmpfs held, as a disk that filled up would."""
    require_mounts()
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as scratch:
        saved, kept = Path(scratch) / "saved", Path(scratch) / "kept"
        if keep:
            shutil.copytree(path, saved, symlinks=True)
        _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
        try:
            if keep:
                _copy_contents(saved, path)
            yield path
        finally:
            shutil.copytree(path, kept, symlinks=True)
            _umount(path)
            shutil.rmtree(path)
            kept.rename(path)


def fill(folder: Path) -> Path:
    """A file in `folder` grown until its disk is full; delete it to free the space."""
    filler = folder / ".filler"
    with open(filler, "wb", buffering=0) as handle:  # unbuffered: closing it writes nothing more
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
    return filler


@contextmanager
def read_only(path: Path):
    """`path` as a read-only bind mount of itself: writes fail with EROFS, root's too."""
    require_mounts()
    path.mkdir(parents=True, exist_ok=True)
    _mount("--bind", str(path), str(path))
    try:
        _mount("-o", "remount,bind,ro", str(path))
        yield path
    finally:
        _umount(path)


def start_on_a_terminal(command: list[str], path: Path, env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    """`command` in `path`, in a process group of its own, its stderr a terminal (a pty), as a user
    runs it: a train stage draws each epoch's progress bar there. Returns the process and the terminal."""
    terminal, stderr = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # tqdm draws on 0 columns nothing
    process = subprocess.Popen(command, cwd=path, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True,
                               start_new_session=True)
    os.close(stderr)
    return process, terminal


def read_terminal(terminal: int, until: str | None = None, timeout_s: float = 120) -> str:
    """What a process drew on its terminal: up to `until`, or all of it (till every process that
    held the terminal has ended)."""
    seen, deadline = "", time.monotonic() + timeout_s
    while until is None or until not in seen:
        if not select.select([terminal], [], [], max(0.0, deadline - time.monotonic()))[0]:
            raise AssertionError(f"the stage's terminal: no {until or 'end'} within {timeout_s} s: {seen[-300:]!r}")
        try:
            chunk = os.read(terminal, 65536).decode(errors="replace")
        except OSError:  # EIO: no process holds the terminal any more
            chunk = ""
        if not chunk and until is not None:
            raise AssertionError(f"the stage ended before {until!r} on its terminal: {seen[-300:]!r}")
        if not chunk:
            return seen
        seen += chunk
    return seen


def processes_under(root: Path) -> list[psutil.Process]:
    """Live processes whose working directory is inside `root` (a test's project copy)."""
    found = []
    for process in psutil.process_iter(["cwd"]):
        cwd = process.info.get("cwd")
        if process.pid != os.getpid() and cwd and Path(cwd).is_relative_to(root):
            found.append(process)
    return found


def _running(process: psutil.Process) -> str | None:
    """Its command line while it runs (a zombie has ended), else None."""
    try:
        return None if process.status() == psutil.STATUS_ZOMBIE else " ".join(process.cmdline())
    except psutil.Error:  # gone meanwhile
        return None


def wait_until_none_left(root: Path, seconds: float = 5.0) -> list[str]:
    """The command lines of processes still running in `root` after `seconds` (empty when none)."""
    deadline = time.monotonic() + seconds
    while True:
        left = [line for line in map(_running, processes_under(root)) if line is not None]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)
