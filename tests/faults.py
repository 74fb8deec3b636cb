"""Real faults for the fault tier: a full disk (a small tmpfs mounted over a folder), a read-only
folder (a read-only bind mount), and what is left running afterwards. Mounting needs root (CI runs
as root); elsewhere the tests that use these skip, saying why."""

from __future__ import annotations

import os
import subprocess
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
    subprocess.run(["umount", "--lazy", str(path)], capture_output=True, timeout=30)


def require_mounts() -> None:
    if os.geteuid() != 0:
        pytest.skip("a real full disk or read-only folder needs root (mount); CI runs as root")


@contextmanager
def full_disk(path: Path, size: str = "256k", keep: bool = True):
    """`path` on a tmpfs of `size`: writes past it fail with ENOSPC. `keep`: the folder's files
    are copied onto the tmpfs first (so far as they fit) and back afterwards, as a disk that
    filled up would keep them."""
    require_mounts()
    path.mkdir(parents=True, exist_ok=True)
    saved = path.with_name(path.name + ".before-full-disk")
    if keep:
        subprocess.run(["cp", "-a", str(path), str(saved)], check=True, timeout=60)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        if keep:
            subprocess.run(f"cp -a {saved}/. {path}/ 2>/dev/null", shell=True, timeout=60)
        yield path
    finally:
        kept = path.with_name(path.name + ".on-full-disk")
        subprocess.run(["cp", "-a", str(path), str(kept)], timeout=60)
        _umount(path)
        if keep:
            subprocess.run(["rm", "-rf", str(saved)], timeout=60)
        subprocess.run(f"cp -a {kept}/. {path}/ && rm -rf {kept}", shell=True, timeout=60)


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


def processes_under(root: Path) -> list[psutil.Process]:
    """Live processes whose working directory is inside `root` (a test's project copy)."""
    found = []
    for process in psutil.process_iter(["cwd"]):
        cwd = process.info.get("cwd")
        if process.pid != os.getpid() and cwd and Path(cwd).is_relative_to(root):
            found.append(process)
    return found


def wait_until_none_left(root: Path, seconds: float = 5.0) -> list[str]:
    """The command lines of processes still running in `root` after `seconds` (empty when none)."""
    deadline = time.monotonic() + seconds
    while True:
        left = [p for p in processes_under(root) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not left or time.monotonic() > deadline:
            return [" ".join(p.cmdline()) for p in left if p.is_running()]
        time.sleep(0.1)
