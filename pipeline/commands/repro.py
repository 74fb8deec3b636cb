"""`python -m pipeline.commands.repro [--force] [--jobs N]` (`make repro`): `dvc repro`, with the
variants' train stages side by side.

DVC runs a pipeline's stages one at a time, and each train stage trains on `train.threads`
threads (1 by default, for bit-identical results): on a 2-core machine one core idles through
most of the lab. The train stages do not depend on one another, and DVC lets independent stages
run from separate `dvc repro` processes: it releases its repository lock while a stage's command
runs, keeps each stage's dependencies and outputs under read/write locks of their own, and
`dvc --wait-for-lock` waits for the repository lock where another process holds it (to write
dvc.lock) instead of failing. So this command starts its fork server (pipeline/forkserver.py:
each stage's command forked from a process that has imported torch and MLflow once), imports
DVC once and forks each `dvc` command below from itself (`Dvc`), then runs, in order:

  1. `dvc status`: nothing to do, nothing more is run;
  2. `dvc repro prepare`, where one of the stages the train stages read from changed;
  3. `dvc repro -s train@<variant> evaluate@<variant>` of every variant whose train stage is
     stale, `--jobs` at a time (default: the cores this process may use over `train.threads`):
     the variant that finishes first is evaluated while the others still train;
  4. `dvc repro`: the rest (curves, compare, any evaluate left), exactly as DVC would.

Each stage runs its own command with its own inputs, so the outputs and dvc.lock are the ones
`dvc repro` writes (tests/test_pipeline.py holds them byte-identical). The published lab's
two train stages, one seed each, take 12.6 s side by side against 17.2 s one after another
(2 cores, medians of 3; docs/performance.md). `--force` forces every stage, as `dvc repro --force` does; any
other argument (targets, `-s`, `--dry`, ...) goes to one plain `dvc repro`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import json
import os
import sys
import time
from pathlib import Path

import yaml

from pipeline import cli, forkserver
from pipeline.errors import PipelineError
from pipeline.handoff import ADDRESS_VARIABLE, OFF

TRAIN_PREFIX = "train@"  # dvc.yaml's `train: foreach: ${variants}`
EVALUATE_PREFIX = "evaluate@"  # and `evaluate: foreach: ${variants}`
# The stages every train stage reads from, in dvc.yaml's order (tests/test_repro.py holds them to
# it); `dvc repro prepare` brings them all up to date.
UPSTREAM = ("check", "download", "prepare")
# What the fork server forked, or refused and why (pipeline/forkserver.py), for the last run.
FORKSERVER_LOG = Path(".dvc/tmp/forkserver.log")


class DvcFailed(PipelineError):
    """A dvc command that failed (it said why on this terminal), with its exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# What a `dvc` command imports, once in this process: each command is then forked from it and runs
# `dvc.cli.main`, what the `dvc` script runs, instead of importing DVC anew. `make repro` runs three
# to six of them, two beside the fork server's imports at the start; `dvc status` 0.74 -> 0.28 s,
# `dvc repro -s evaluate@batchnorm` 1.11 -> 0.68 s (AMD EPYC with AVX-512, medians of 3).
DVC_PRELOAD = (
    "dvc.cli", "dvc.cli.parser", "dvc.commands.repro", "dvc.commands.status", "dvc.repo", "dvc.repo.index",
    "dvc.repo.reproduce", "dvc.repo.status", "dvc.repo.plots", "dvc.repo.metrics", "dvc.repo.params",
    "dvc.repo.stage", "dvc.stage.cache", "dvc.lock", "dvc.rwlock", "dvc.scm", "dvc.cachemgr", "dvc.data_cloud",
    "dvc_data.hashfile.db.local", "dvc_data.hashfile.status", "configobj", "dulwich.index", "dulwich.worktree",
    "dulwich.ignore", "psutil", "ruamel.yaml", "pyparsing", "platformdirs",
)


WAIT_FOR_LOCK = "--wait-for-lock"  # every dvc command this runs (start_dvc)
LOCK_RETRY_S = 0.05  # how often a waiting one tries the repository lock again (dvc_main)


class Dvc:
    """`dvc <args>` started in a child process (as a Popen: `poll`, `wait`, `returncode`);
    `capture`: its standard output kept in `output`, its standard error on this terminal."""

    def __init__(self, *args: str, capture: bool = False) -> None:
        self.returncode, self.output = None, ""
        read, write = os.pipe() if capture else (None, None)
        self.pid = start_dvc(list(args), stdout=write)
        if read is not None:
            os.close(write)
            with os.fdopen(read) as pipe:
                self.output = pipe.read()

    def poll(self) -> int | None:
        if self.returncode is None and (status := os.waitpid(self.pid, os.WNOHANG))[0]:
            self.returncode = os.waitstatus_to_exitcode(status[1])
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode


def start_dvc(args: list[str], stdout: int | None) -> int:
    """The pid of a child forked from this process that runs `dvc --wait-for-lock <args>`
    (`dvc.cli.main`), with `stdout` (a descriptor) as its standard output where given; with
    `PIPELINE_FORKSERVER=0`, no fork server and no forking: a `dvc` process.

    Each waits for the repository lock where another holds it (the variants' chains take it in
    turn), instead of failing after 3 s."""
    args = [WAIT_FOR_LOCK, *args]
    if os.environ.get(ADDRESS_VARIABLE) == OFF:
        actions = [] if stdout is None else [(os.POSIX_SPAWN_DUP2, stdout, 1)]
        return os.posix_spawnp("dvc", ["dvc", *args], os.environ, file_actions=actions)
    main = dvc_main()
    sys.stdout.flush()  # a forked copy of unwritten output would be printed twice
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        if stdout is not None:
            os.dup2(stdout, 1)
        code = forkserver.exit_status(main, args)
        # Not this process's exit functions: they would remove the fork server's socket
        # (`forkserver.running`'s temporary folder); DVC registers none, and its threads are done.
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code)
    return pid


@functools.cache
def dvc_main():
    """`dvc.cli.main`, DVC's modules imported, and two of its defaults changed for the commands
    forked from here: the lock's poll and dvc.lock's read (`modify_yaml`)."""
    for name in DVC_PRELOAD:
        with contextlib.suppress(ImportError):  # a DVC release that moved it imports it itself
            importlib.import_module(name)
    import dvc.dvcfile
    import dvc.lock
    from dvc.cli import main
    from dvc.utils.serialize import _common, _yaml

    # A waiting command tries DVC's lock again every DEFAULT_TIMEOUT / 6 seconds: 0.5 s, a sleep
    # that the variant finishing last took after its evaluate stage whenever the other chain held
    # the lock. Every command here waits (start_dvc), so the value is only that poll: none gives
    # up sooner (one that does not wait gives up after DEFAULT_TIMEOUT). Every 50 ms: 5 alternating
    # pairs of the published lab's chains and the rest, 0.97 (8.09-8.55 s against 8.39-8.79 s;
    # AMD EPYC family 26, 2026-12-04).
    dvc.lock.DEFAULT_TIMEOUT = LOCK_RETRY_S * 6
    if all(hasattr(module, name) for module, name in ((_common, "_load_data"), (_common, "_dump_data"),
                                                      (_yaml, "parse_yaml"), (_yaml, "_dump"),
                                                      (dvc.dvcfile, "modify_yaml"))):
        dvc.dvcfile.modify_yaml = modify_yaml  # else a DVC that moved them: its own reads
    return main


@contextlib.contextmanager
def modify_yaml(path, fs=None):
    """dvc.dvcfile's `modify_yaml`, with a lock file read by ruamel's safe loader (libyaml)
    instead of its round-trip one, then written by DVC's own dumper, where it changed: DVC
    rereads and rewrites dvc.lock after each stage, and the round-trip read, which keeps the
    comments and styles that a lock file has none of, was 67 ms of the ~110 (12-21 ms safe), the
    write 39 ms (none for a stage rerun to the same outputs, as a forced run's). The same bytes
    (tests/test_repro.py); dvc.yaml, which a user writes, keeps DVC's own read."""
    from dvc.utils.serialize import _common, _yaml

    if not os.fspath(path).endswith(".lock"):
        with _yaml.modify_yaml(path, fs=fs) as data:
            yield data
        return
    exists = fs.exists(os.fspath(path)) if fs else os.path.exists(path)
    data = _common._load_data(path, parser=_yaml.parse_yaml, fs=fs) if exists else {}
    before = copy.deepcopy(data)
    yield data
    if not exists or data != before:
        _common._dump_data(path, data, dumper=_yaml._dump, fs=fs)


def run_dvc(*args: str) -> None:
    """`dvc <args>` on this terminal; its failure ends the command with its exit code."""
    code = Dvc(*args).wait()
    if code != 0:
        raise DvcFailed(f"dvc {' '.join(args)} exited with {code}", exit_code=code)


def dvc_output(*args: str) -> str:
    dvc = Dvc(*args, capture=True)
    if dvc.wait() != 0:
        raise DvcFailed(f"dvc {' '.join(args)} exited with {dvc.returncode}", exit_code=dvc.returncode)
    return dvc.output


def stale_stages() -> set[str]:
    """The stages `dvc repro` would run now (a dvc.yaml stage is named by itself in the answer)."""
    return {name.rpartition(":")[2] for name in json.loads(dvc_output("status", "--json") or "{}")}


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


def side_by_side(chains: list[tuple[str, ...]], jobs: int, force: bool) -> None:
    """`dvc repro -s <stages>` of each chain of stages, `jobs` at a time. After a failure no new
    one starts; the error names the first that failed once the running ones have ended."""
    options = ["--force"] if force else []
    pending, running, failed = list(chains), {}, []
    while pending or running:
        while pending and len(running) < jobs and not failed:
            chain = pending.pop(0)
            running[" ".join(chain)] = Dvc("repro", *options, "-s", *chain)
        time.sleep(0.01)  # the rest starts within 10 ms of the last chain's end
        for name, process in list(running.items()):
            if process.poll() is not None:
                del running[name]
                if process.returncode != 0:
                    failed.append((name, process.returncode))
        if failed and not running:
            name, code = failed[0]
            raise DvcFailed(f"dvc repro -s {name} exited with {code}; the stages that had started "
                            "with it ran to their end", exit_code=code)


def repro(force: bool = False, jobs: int | None = None) -> None:
    # The fork server first: it imports torch and MLflow (~2 s, what the train stages wait for)
    # while this process imports pydantic and reads the params (~0.1 s that used to come before the
    # server's start), then asks `dvc status`. A mistake in params.yaml still ends the command
    # before DVC runs anything.
    with forkserver.running(log_to=FORKSERVER_LOG):
        from pipeline.config.params import load_params

        params = load_params()
        trains = [f"{TRAIN_PREFIX}{variant}" for variant in params.variants]
        jobs = jobs or max(1, len(os.sched_getaffinity(0)) // params.train.threads)
        stale = set() if force else stale_stages()
        if not force and not stale:
            print("Data and pipelines are up to date.")
            return
        run_stages(trains, jobs, force, stale)


def run_stages(trains: list[str], jobs: int, force: bool, stale: set[str]) -> None:
    force_option = ["--force"] if force else []
    # Listed first, while the fork server imports (the stages wait for it), not on the way to the rest.
    names = dvc_output("stage", "list", "--name-only").split() if force else []
    before = upstream_outputs()
    if force or stale & set(UPSTREAM):
        run_dvc("repro", *force_option, UPSTREAM[-1])
    to_train = stale_trains(stale, trains, force or upstream_outputs() != before)
    together = len(to_train) > 1 and jobs > 1
    chains = variant_chains(to_train) if together else []
    if chains:
        side_by_side(chains, jobs, force)
    if force:  # the rest, forced once
        done = {*UPSTREAM, *(stage for chain in chains for stage in chain)}
        run_dvc("repro", "--force", "-s", *[name for name in names if name not in done])
    else:
        run_dvc("repro")


if __name__ == "__main__":
    parser = cli.parser(__doc__)
    parser.add_argument("--force", action="store_true", help="run every stage, as `dvc repro --force`")
    parser.add_argument("--jobs", type=int, help="train stages at once (default: cores / train.threads)")
    arguments, others = parser.parse_known_args()
    if arguments.jobs is not None and arguments.jobs < 1:
        parser.error(f"--jobs: {arguments.jobs}, expected at least 1")
    with cli.one_line_errors():
        if others:  # targets or other options of dvc repro's: DVC's own plan, one stage at a time
            run_dvc("repro", *(["--force"] if arguments.force else []), *others)
        else:
            repro(arguments.force, arguments.jobs)
