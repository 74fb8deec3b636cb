"""`dvc` commands run side by side by `make repro` (pipeline/commands/repro.py), each a process of
its own, stopped together.

Nothing they start outlives them (tests/test_repro_faults.py): each `dvc` runs in a process
group of its own, with the stages it runs; a signal that ends the command running them (Ctrl-C,
SIGTERM to it or to `make`, which passes it on), `make`'s death, or a failed chain sends each
running group the signal (SIGINT for a failed chain, as Ctrl-C: the train stages close their
runs KILLED), and what is alive GRACE_S later is killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import IO, NamedTuple

from pipeline.errors import PipelineError

WAIT_FOR_LOCK = "--wait-for-lock"  # every dvc command run here: the chains take the lock in turn
POLL_S = 0.01  # the next command starts within 10 ms of one's end; a signal or make's end is seen as soon
# What the stages get to end on the signal (a train stage closes its runs KILLED, ~0.1 s with a
# local store) before their groups are killed: whatever ends this command, nothing it started
# is alive 5 s later.
GRACE_S = 3.0
STOPPING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# DVC's line after every `dvc repro` that ran a stage: said once, by the last `dvc repro`, where
# the chains before it would have said it two or more times.
PUSH_HINT = "Use `dvc push` to send your updates to remote storage."
# DVC's line as a stage's command starts, when it lets go of the repository lock. A `dvc` that finds
# the lock taken tries again every 0.5 s (dvc/lock.py): a chain started beside one still holding it
# began its stage 0.5 s after it, one started at this line ~0.3 s after.
STAGE_RUNS = "Running stage '{}':"


def pass_on(stream, ready: str | None, started: threading.Event) -> None:
    """A dvc command's standard output onto this one's, line by line, but for DVC's push hint;
    `started` set as the stage `ready` starts its command."""
    for line in stream:
        if ready is not None and line.strip() == STAGE_RUNS.format(ready):
            started.set()
        if line.strip() != PUSH_HINT:
            sys.stdout.write(line)
            sys.stdout.flush()


class DvcFailed(PipelineError):
    """A dvc command that failed (it said why on this terminal), with its exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Stopped(PipelineError):
    """This command was sent a signal, or whatever started it ended."""

    def __init__(self, signum: int, cause: str) -> None:
        super().__init__(f"{cause}: the dvc commands and stages it started were stopped; `make repro` "
                         "resumes where they were")
        self.exit_code = 128 + signum


class Started(NamedTuple):
    """A command `Dvcs.result` waits for: its arguments, its process, where its output is kept."""

    args: tuple[str, ...]
    process: subprocess.Popen
    stdout: IO[str] | None


class Dvcs:
    """The `dvc --wait-for-lock <args>` processes this command runs, each in a process group of its
    own (with the stages it runs), all stopped when the block ends: on a signal this process is sent
    (SIGINT, SIGTERM, SIGHUP), its parent's end, a failure, or an error here."""

    def __init__(self) -> None:
        self.running: dict[str, subprocess.Popen] = {}
        self.relays: dict[subprocess.Popen, threading.Thread] = {}  # the outputs passed on (pass_on)
        self.ready: dict[subprocess.Popen, threading.Event] = {}  # set as its `ready` stage starts
        self.signum: int | None = None
        self.parent = os.getppid()

    def __enter__(self) -> Dvcs:
        self.previous = {signum: signal.signal(signum, self.receive) for signum in STOPPING}
        return self

    def __exit__(self, *exc) -> None:
        self.stop(self.signum or signal.SIGTERM)
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def receive(self, signum: int, frame) -> None:
        self.signum = self.signum or signum  # seen by `check` within POLL_S

    def check(self) -> None:
        """Raises `Stopped` where a signal came or the parent (`make`) is gone."""
        if self.signum is not None:
            raise Stopped(self.signum, f"interrupted by {signal.Signals(self.signum).name}")
        if os.getppid() != self.parent:  # `make` killed (SIGKILL passes nothing on)
            self.signum = signal.SIGTERM
            raise Stopped(self.signum, f"the process that started it ({self.parent}) ended")

    def start(self, *args: str, stdout=None, hint: bool = False, ready: str | None = None) -> subprocess.Popen:
        """`dvc <args>`, its output to `stdout`, or passed on to this terminal (with DVC's push hint
        where `hint`); `ready`: the stage whose command's start `starting` waits for."""
        self.check()
        relayed = stdout is None and not hint
        process = subprocess.Popen(["dvc", WAIT_FOR_LOCK, *args], stdout=subprocess.PIPE if relayed else stdout,
                                   text=relayed or None, bufsize=1 if relayed else -1, process_group=0)
        if relayed:
            stage_started = threading.Event()
            if ready is not None:
                self.ready[process] = stage_started
            self.relays[process] = threading.Thread(target=pass_on, args=(process.stdout, ready, stage_started),
                                                    daemon=True)
            self.relays[process].start()
        self.running[" ".join(args)] = process
        return process

    def passed_on(self, process: subprocess.Popen) -> None:
        """Waits until an ended command's output is all on this terminal."""
        relay = self.relays.pop(process, None)
        self.ready.pop(process, None)
        if relay is not None:
            relay.join(timeout=GRACE_S)

    def starting(self) -> bool:
        """Whether a running command has not reached its `ready` stage's command yet: it holds the
        repository lock, waits for it, or runs the stages before."""
        return any(not self.ready[process].is_set() for process in self.running.values()
                   if process in self.ready)

    def ended(self) -> list[tuple[str, subprocess.Popen]]:
        """The commands that ended since the last call, after waiting POLL_S for one."""
        time.sleep(POLL_S)
        self.check()
        done = [(name, process) for name, process in self.running.items() if process.poll() is not None]
        for name, process in done:
            del self.running[name]
            self.passed_on(process)
        return done

    def started(self, *args: str, capture: bool = False, hint: bool = False) -> Started:
        """`dvc <args>` started, for `result`: its standard output kept in a file where `capture`
        (which no answer fills), else on this terminal (DVC's push hint only where `hint`)."""
        stdout = tempfile.TemporaryFile("w+") if capture else None
        return Started(args, self.start(*args, stdout=stdout, hint=hint), stdout)

    def result(self, started: Started) -> str:
        """A `started` command to its end (others may end meanwhile), its captured output returned;
        its failure raises DvcFailed."""
        args, process, stdout = started
        while process in self.running.values():
            self.ended()
        if process.returncode != 0:
            raise DvcFailed(f"dvc {' '.join(args)} exited with {process.returncode}", exit_code=process.returncode)
        if stdout is None:
            return ""
        with stdout:
            stdout.seek(0)
            return stdout.read()

    def output(self, *args: str, capture: bool = False, hint: bool = False) -> str:
        return self.result(self.started(*args, capture=capture, hint=hint))

    def stop(self, signum: int) -> None:
        """`signum` to each running command's group, SIGKILL to each GRACE_S later (a group outlives
        its `dvc` where DVC died on SIGTERM before the stage it ran)."""
        groups = [process.pid for process in self.running.values()]
        _signal_groups(groups, signum)
        deadline = time.monotonic() + GRACE_S
        while any(_group_alive(group) for group in groups) and time.monotonic() < deadline:
            for process in self.running.values():
                process.poll()  # reaped: a group of zombies is empty
            time.sleep(POLL_S)
        _signal_groups(groups, signal.SIGKILL)
        for process in self.running.values():
            process.wait()
            self.passed_on(process)
        self.running.clear()


def _signal_groups(groups: list[int], signum: int) -> None:
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signum)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False
