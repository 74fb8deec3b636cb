"""MLflow in a second process, so that a stage's own work never waits for it.

A stage computes on one torch thread and leaves the machine's other core mostly idle, while
MLflow costs it seconds of pure Python: the import (~1.4 s), opening the store (~0.3 s) and
the first `log_model` (~1.3 s, most of it mapping every installed package to its modules).
In a thread that work would hold the GIL the training loop needs between kernels; in a
process of its own it runs beside the stage. One worker, so calls run in the order they are
submitted; each returns a Future, and an exception comes back as raised there (a
`PipelineError` still ends the stage with its one line).
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor

from pipeline.tracking.store import Tracking, check_server, connect, refused, unavailable

_clients: dict[Tracking, object] = {}  # in the worker: its open store
_outage: list[Exception] = []  # in the worker: the store found down, once MLflow's retries gave up


def _client(tracking: Tracking):
    if tracking not in _clients:  # a failure is not kept: the next call tries again and raises
        with _collector_off():
            _clients[tracking] = connect(tracking, checked=True)[0]  # TrackingProcess checked the server
    return _clients[tracking]


@contextlib.contextmanager
def _collector_off() -> Iterator[None]:
    """Python's cyclic collector paused while MLflow is imported and its store opened, then its
    objects frozen out of later collections. The import makes ~270,000 objects that live as long as
    the process, and the collector walked them ~550 times on the way: 0.27 s of a 1.6 s open (the
    wait the compare stage ends on); the frozen heap keeps a long stage's later collections short."""
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def _call(tracking: Tracking, fn: Callable, args: tuple):
    if _outage:  # the calls queued behind one that found the store down fail at once, not ~60 s each
        raise _outage[0]
    try:
        return fn(_client(tracking), *args)
    except Exception as error:  # a refusal (a READ-only user, say) or an outage is one line, not a traceback
        outage = unavailable(error, tracking.uri)
        if outage is not None:
            _outage.append(outage)
        raise refused(error) or outage or error


# MLflow retries a call that meets a down server (connection refused, 5xx) 7 times with backoff
# factor 2: ~4 minutes before a stage learns that its store is gone. 6 retries with factor 1 wait
# 0+2+4+8+16+32 s: a restart of the team server (deploy/, 4 workers: 22-28 s here on 2 busy
# cores) is ridden out, an outage fails the stage after ~60 s of waits and the rerun resumes. A
# server whose database is gone answers each try slowly, not at once: the stage failed 168 s after
# PostgreSQL stopped (test_team_faults, 2 cores). MLflow's own variables, so a user's setting wins.
RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "6", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
# MLflow prints "View run ... at: <url>" for every run it closes, and asks the server for the run
# to do so: a request per run and a line per run on the stage's terminal. The compare stage
# prints where the runs are, once.
QUIET = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


def _start_worker(stage_pid: int) -> None:
    for name, value in (RETRIES | QUIET).items():
        os.environ.setdefault(name, value)
    # Ctrl-C reaches the whole process group; the stage decides what its runs become (KILLED)
    # and says so through this process, which ends when the stage closes it or is gone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(stage_pid,), daemon=True).start()


def _exit_with(stage_pid: int) -> None:
    """A SIGKILLed stage cannot close its worker, and a forked one never reads end-of-file."""
    while os.getppid() == stage_pid:
        time.sleep(0.5)
    os._exit(1)


def _opened(client) -> None:
    return None


class TrackingProcess:
    """`submit(fn, *args)` runs `fn(client, *args)` in the worker, with its `MlflowClient`.

    Arguments are pickled when the call is sent, which can be later than `submit`: pass
    values that nothing changes afterwards. Fork (Linux) gives the worker this process's
    imports for free, torch included; elsewhere it is spawned.
    """

    def __init__(self, tracking: Tracking) -> None:
        if not tracking.is_local:
            check_server(tracking.uri)  # in seconds, before the stage does any work
        method = "fork" if sys.platform == "linux" else "spawn"
        self.tracking = tracking
        sys.stdout.flush()  # a forked copy of unwritten output would be printed twice
        self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context(method),
                                         initializer=_start_worker, initargs=(os.getpid(),))
        self.submit(_opened)  # starts the worker now: MLflow is imported while the stage goes on

    def submit(self, fn: Callable, *args) -> Future:
        return self._pool.submit(_call, self.tracking, fn, args)

    def call(self, fn: Callable, *args):
        return self.submit(fn, *args).result()

    def __enter__(self) -> TrackingProcess:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        # A failed stage drops the calls still queued: against a store that is down each would
        # retry for ~60 s; the rerun resumes from the checkpoint and backfills what they carried.
        self._pool.shutdown(wait=True, cancel_futures=exc_type is not None)
