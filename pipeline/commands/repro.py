"""`python -m pipeline.commands.repro [--force] [--jobs N]` (`make repro`): `dvc repro`, with the
variants' train stages side by side.

DVC runs a pipeline's stages one at a time, and each train stage trains on `train.threads`
threads (1 by default, for bit-identical results): on a 2-core machine one core idles through
most of the lab. The train stages do not depend on one another, and DVC's documented way to run
independent stages in parallel is a `dvc repro` process each, with `--wait-for-lock`: DVC
releases its repository lock while a stage's command runs, keeps each stage's dependencies and
outputs under read/write locks of their own, and a command that finds the repository lock taken
(to write dvc.lock) waits for it instead of failing. So this command validates the params (a
mistake: one line, before DVC runs anything), then runs `dvc` processes, in order:

  1. `dvc status`: nothing to do, nothing more is run;
  2. `dvc repro prepare`, where one of the stages the train stages read from changed;
  3. `dvc repro -s train@<variant> evaluate@<variant>` of every variant whose train stage is
     stale, `--jobs` at a time (default: the cores this process may use over `train.threads`):
     the variant that finishes first is evaluated while the others still train;
  4. `dvc repro`: the rest (curves, compare, any evaluate left), exactly as DVC would.

Each stage runs its own command with its own inputs, so the outputs and dvc.lock are the ones
`dvc repro` writes (tests/test_pipeline.py holds them byte-identical). `--force` forces every
stage, as `dvc repro --force` does; any other argument (targets, `-s`, `--dry`, ...) goes to one
plain `dvc repro`.

Nothing it starts outlives it (tests/test_repro_faults.py): each `dvc` runs in a process group of
its own, with the stages it runs; a signal that ends this command (Ctrl-C, SIGTERM to it or to
`make`, which passes it on), `make`'s death, or a failed chain sends each running group the
signal (SIGINT for a failed chain, as Ctrl-C: the train stages close their runs KILLED), and
what is alive GRACE_S later is killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from pipeline import cli
from pipeline.errors import PipelineError

TRAIN_PREFIX = "train@"  # dvc.yaml's `train: foreach: ${variants}`
EVALUATE_PREFIX = "evaluate@"  # and `evaluate: foreach: ${variants}`
# The stages every train stage reads from, in dvc.yaml's order (tests/test_repro.py holds them to
# it); `dvc repro prepare` brings them all up to date.
UPSTREAM = ("check", "download", "prepare")
WAIT_FOR_LOCK = "--wait-for-lock"  # every dvc command this runs: the chains take the lock in turn
POLL_S = 0.01  # the next command starts within 10 ms of one's end; a signal or make's end is seen as soon
# What the stages get to end on the signal (a train stage closes its runs KILLED, ~0.1 s with a
# local store) before their groups are killed: whatever ends this command, nothing it started
# is alive 5 s later.
GRACE_S = 3.0
STOPPING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# DVC's line after every `dvc repro` that ran a stage: said once, by the last `dvc repro`, where
# the chains and `dvc repro prepare` before it would have said it three or more times.
PUSH_HINT = "Use `dvc push` to send your updates to remote storage."
# DVC's line as a stage's command starts, when it lets go of the repository lock. A `dvc` that finds
# the lock taken tries again every 0.5 s (dvc/lock.py): a chain started beside one still holding it
# began its stage 0.5 s after it, one started at this line ~0.25 s after.
STAGE_RUNS = "Running stage '"


def pass_on(stream, ran: threading.Event) -> None:
    """A dvc command's standard output onto this one's, line by line, but for DVC's push hint;
    `ran` set at its first stage's command."""
    for line in stream:
        if line.startswith(STAGE_RUNS):
            ran.set()
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


class Dvcs:
    """The `dvc --wait-for-lock <args>` processes this command runs, each in a process group of its
    own (with the stages it runs), all stopped when the block ends: on a signal this process is sent
    (SIGINT, SIGTERM, SIGHUP), its parent's end, a failure, or an error here."""

    def __init__(self) -> None:
        self.running: dict[str, subprocess.Popen] = {}
        self.relays: dict[subprocess.Popen, threading.Thread] = {}  # the outputs passed on (pass_on)
        self.ran: dict[subprocess.Popen, threading.Event] = {}  # set at each one's first stage command
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

    def start(self, *args: str, stdout=None, hint: bool = False) -> subprocess.Popen:
        """`dvc <args>`, its output to `stdout`, or passed on to this terminal (with DVC's push hint
        where `hint`)."""
        self.check()
        relayed = stdout is None and not hint
        process = subprocess.Popen(["dvc", WAIT_FOR_LOCK, *args], stdout=subprocess.PIPE if relayed else stdout,
                                   text=relayed or None, bufsize=1 if relayed else -1, process_group=0)
        if relayed:
            self.ran[process] = threading.Event()
            self.relays[process] = threading.Thread(target=pass_on, args=(process.stdout, self.ran[process]),
                                                    daemon=True)
            self.relays[process].start()
        self.running[" ".join(args)] = process
        return process

    def passed_on(self, process: subprocess.Popen) -> None:
        """Waits until an ended command's output is all on this terminal."""
        relay = self.relays.pop(process, None)
        self.ran.pop(process, None)
        if relay is not None:
            relay.join(timeout=GRACE_S)

    def locking(self) -> bool:
        """Whether a running command has not reached its first stage's command: it holds the
        repository lock, or waits for it."""
        return any(process in self.ran and not self.ran[process].is_set() for process in self.running.values())

    def ended(self) -> list[tuple[str, subprocess.Popen]]:
        """The commands that ended since the last call, after waiting POLL_S for one."""
        time.sleep(POLL_S)
        self.check()
        done = [(name, process) for name, process in self.running.items() if process.poll() is not None]
        for name, process in done:
            del self.running[name]
            self.passed_on(process)
        return done

    def started(self, *args: str, capture: bool = False, hint: bool = False) -> tuple:
        """`dvc <args>` started, for `result`: its standard output kept in a file where `capture`
        (which no answer fills), else on this terminal (DVC's push hint only where `hint`)."""
        stdout = tempfile.TemporaryFile("w+") if capture else None
        return args, self.start(*args, stdout=stdout, hint=hint), stdout

    def result(self, started: tuple) -> str:
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


def stale_stages(dvcs: Dvcs) -> set[str]:
    """The stages `dvc repro` would run now (a dvc.yaml stage is named by itself in the answer)."""
    return {name.rpartition(":")[2] for name in json.loads(dvcs.output("status", "--json", capture=True) or "{}")}


def upstream_outputs() -> dict:
    """What dvc.lock says the upstream stages wrote: the train stages' inputs among them."""
    if not Path("dvc.lock").exists():
        return {}
    stages = yaml.safe_load(Path("dvc.lock").read_text()).get("stages", {})
    return {name: stages.get(name, {}).get("outs") for name in UPSTREAM}


def stale_trains(stale: set[str], trains: list[str], upstream_changed: bool) -> list[str]:
    """The train stages to run: all where an input they share changed, else the stale ones."""
    return list(trains) if upstream_changed else [name for name in trains if name in stale]


def variant_chains(trains: list[str]) -> list[tuple[str, ...]]:
    """Each train stage with its variant's evaluate stage after it: the variant that finishes
    first is evaluated while the others train, on a core that would idle."""
    return [(train, EVALUATE_PREFIX + train.removeprefix(TRAIN_PREFIX)) for train in trains]


def side_by_side(dvcs: Dvcs, chains: list[tuple[str, ...]], jobs: int, force: bool) -> None:
    """`dvc repro -s <stages>` of each chain of stages, `jobs` at a time, each started once the
    one before it runs its stage (STAGE_RUNS). A failure stops the others (SIGINT, as Ctrl-C)
    and names the chain that failed."""
    options = ["--force"] if force else []
    pending = list(chains)
    while pending or dvcs.running:
        while pending and len(dvcs.running) < jobs and not dvcs.locking():
            dvcs.start("repro", *options, "-s", *pending.pop(0))
        for name, process in dvcs.ended():
            if process.returncode != 0:
                dvcs.stop(signal.SIGINT)
                raise DvcFailed(f"dvc {name} exited with {process.returncode}; the chains beside it "
                                "were stopped", exit_code=process.returncode)


def repro(dvcs: Dvcs, force: bool = False, jobs: int | None = None) -> None:
    from pipeline.config.params import load_params  # pydantic: only where the params are read

    params = load_params()  # a mistake ends the command here, in one line, before DVC runs
    trains = [f"{TRAIN_PREFIX}{variant}" for variant in params.variants]
    jobs = jobs or max(1, len(os.sched_getaffinity(0)) // params.train.threads)
    stale = set() if force else stale_stages(dvcs)
    if not force and not stale:
        print("Data and pipelines are up to date.")
        return
    force_option = ["--force"] if force else []
    # Forced, the stages are named for the last `dvc repro`: listed while the upstream stages run
    # (`dvc stage list` takes no lock), ~0.3 s off a forced run.
    listing = dvcs.started("stage", "list", "--name-only", capture=True) if force else None
    before = upstream_outputs()
    if force or stale & set(UPSTREAM):
        dvcs.output("repro", *force_option, UPSTREAM[-1])
    names = dvcs.result(listing).split() if listing else []
    to_train = stale_trains(stale, trains, force or upstream_outputs() != before)
    chains = variant_chains(to_train) if len(to_train) > 1 and jobs > 1 else []
    if chains:
        side_by_side(dvcs, chains, jobs, force)
    if force:  # the rest, forced once
        done = {*UPSTREAM, *(stage for chain in chains for stage in chain)}
        dvcs.output("repro", "--force", "-s", *[name for name in names if name not in done], hint=True)
    else:
        dvcs.output("repro", hint=True)


if __name__ == "__main__":
    parser = cli.parser(__doc__)
    parser.add_argument("--force", action="store_true", help="run every stage, as `dvc repro --force`")
    parser.add_argument("--jobs", type=int, help="train stages at once (default: cores / train.threads)")
    arguments, others = parser.parse_known_args()
    if arguments.jobs is not None and arguments.jobs < 1:
        parser.error(f"--jobs: {arguments.jobs}, expected at least 1")
    with cli.one_line_errors(), Dvcs() as dvcs:
        if others:  # targets or other options of dvc repro's: DVC's own plan, one stage at a time
            dvcs.output("repro", *(["--force"] if arguments.force else []), *others, hint=True)
        else:
            repro(dvcs, arguments.force, arguments.jobs)
