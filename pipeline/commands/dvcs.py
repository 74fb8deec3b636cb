"""The `dvc` processes `make repro` runs side by side (pipeline/commands/repro.py), stopped together.

Nothing they start outlives them (tests/test_repro_faults.py): each `dvc` runs in a process group of
its own, with its stages. A signal that ends this command (Ctrl-C, SIGTERM to it or to `make`, which
passes it on), `make`'s death or a failed chain (SIGINT, as Ctrl-C: the train stages close their runs
KILLED) sends each group the signal, and what is alive GRACE_S later is killed.
"""

import contextlib
import os
import signal
import subprocess
import threading
import time
from typing import Self

from pipeline.errors import PipelineError

POLL_S = 0.01  # the next command starts within 10 ms of one's end; a signal or make's end is seen as soon
# What the stages get to end on the signal (a train stage closes its runs KILLED, ~0.1 s with a
# local store): whatever ends this command, nothing it started is alive 5 s later.
GRACE_S = 3.0
# DVC's line after every `dvc repro` that ran a stage: said once, by the last `dvc repro`, where
# the chains before it would have said it two or more times.
PUSH_HINT = "Use `dvc push` to send your updates to remote storage."
# DVC's line as a stage's command starts, when it lets go of the repository lock. A `dvc` that finds
# the lock taken tries again every 0.5 s (dvc/lock.py): a chain started beside one still holding it
# began its stage 0.5 s after it, one started at this line ~0.3 s after.
STAGE_RUNS = "Running stage '{}':"


class DvcFailed(PipelineError):
    """A dvc command that failed (it said why on this terminal), or all stopped as a signal came or
    whatever started this command ended; with the exit code to end with."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = 128 - exit_code if exit_code < 0 else exit_code  # -N: killed by signal N, as a shell says


class Dvc(subprocess.Popen):
    """`dvc --wait-for-lock <args>` in a process group of its own (with the stages it runs). Its output
    is kept (`capture`), passed on to this terminal line by line but DVC's push hint, or (`hint`)
    left as it is; `ready` once the stage `stage` starts its command (at once without one)."""

    def __init__(self, args: tuple[str, ...], capture: bool, hint: bool, stage: str | None) -> None:
        super().__init__(["dvc", "--wait-for-lock", *args], stdout=None if hint else subprocess.PIPE, text=True,
                         bufsize=1, process_group=0)
        self.name, self.ready = " ".join(args), stage is None
        self.kept: list[str] | None = [] if capture else None
        self.relay = threading.Thread(target=self.pass_on, args=(STAGE_RUNS.format(stage),), daemon=True)
        self.relay.start()

    def pass_on(self, stage_runs: str) -> None:
        for line in self.stdout or ():  # `hint`: DVC writes to this terminal itself
            self.ready = self.ready or line.strip() == stage_runs
            if self.kept is not None:
                self.kept.append(line)
            elif line.strip() != PUSH_HINT:
                print(line, end="", flush=True)


class Dvcs:
    """The `dvc` processes this command runs, all stopped as the block ends (a signal, `make`'s end, an error)."""

    def __init__(self) -> None:
        self.running: list[Dvc] = []
        self.signum: int | None = None
        self.parent = os.getppid()

    def __enter__(self) -> Self:
        self.previous = {signum: signal.signal(signum, self.receive)
                         for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        return self

    def __exit__(self, *exc) -> None:
        self.stop(self.signum or signal.SIGTERM)
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def receive(self, signum: int, frame) -> None:
        if self.signum is None:  # seen by `check` within POLL_S
            self.signum, self.cause = signum, f"interrupted by {signal.Signals(signum).name}"

    def check(self) -> None:
        if self.signum is None and os.getppid() != self.parent:  # `make` killed (SIGKILL passes nothing on)
            self.signum, self.cause = signal.SIGTERM, f"the process that started it ({self.parent}) ended"
        if self.signum is not None:
            raise DvcFailed(f"{self.cause}: the dvc commands and stages it started were stopped; `make repro` "
                            "resumes where they were", exit_code=128 + self.signum)

    def start(self, *args: str, capture: bool = False, hint: bool = False, ready: str | None = None) -> Dvc:
        self.check()
        self.running.append(Dvc(args, capture, hint, ready))
        return self.running[-1]

    def starting(self) -> bool:
        """Whether a running command has not reached its `ready` stage's command yet: it holds the
        repository lock, waits for it, or runs the stages before."""
        return not all(process.ready for process in self.running)

    def ended(self) -> list[Dvc]:
        """The commands that ended since the last call (output all passed on), after waiting POLL_S."""
        time.sleep(POLL_S)
        self.check()
        done = [process for process in self.running if process.poll() is not None]
        for process in done:
            self.running.remove(process)
            process.relay.join(timeout=GRACE_S)
        return done

    def result(self, process: Dvc) -> str:
        """A started command's kept output once it ends (others may end meanwhile); DvcFailed if it failed."""
        while process in self.running:
            self.ended()
        if process.returncode != 0:
            raise DvcFailed(f"dvc {process.name} exited with {process.returncode}", exit_code=process.returncode)
        return "".join(process.kept or [])

    def output(self, *args: str, capture: bool = False, hint: bool = False) -> str:
        return self.result(self.start(*args, capture=capture, hint=hint))

    def stop(self, signum: int) -> None:
        """`signum` to each running command's group, SIGKILL to each GRACE_S later (a group outlives
        its `dvc` where DVC died on SIGTERM before the stage it ran)."""
        groups = [process.pid for process in self.running]
        deadline = time.monotonic() + GRACE_S
        for sent in (signum, signal.SIGKILL):
            for group in groups:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, sent)
            while sent == signum and time.monotonic() < deadline and any(map(_group_alive, groups)):
                for process in self.running:
                    process.poll()  # reaped: a group of zombies is empty
                time.sleep(POLL_S)
        for process in self.running:
            process.wait()
            process.relay.join(timeout=GRACE_S)
        self.running.clear()


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False
