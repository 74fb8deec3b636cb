"""MLflow in a second process, so that a stage's own work never waits for it.

A stage computes on one torch thread and leaves the machine's other core mostly idle, while
MLflow costs it seconds of pure Python: the import (~1.4 s), opening the store (~0.3 s) and
the first `log_model` (~1.3 s). In a thread that work would hold the GIL the training loop
needs between kernels; in a process of its own it runs beside the stage (measured for the
train stage: pipeline/stages/train.py). One worker, so calls run in the order they are
submitted; each returns a Future, and an MLflow error comes back as one line: a refusal as
TrackingError, anything else as StoreDown (and every later call fails at once with it).
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

from pipeline.reports import METRICS
from pipeline.tracking import record
from pipeline.tracking.store import StoreDown, Tracking, check_store, connect, experiment_id, one_line

_clients: dict[Tracking, object] = {}  # in the worker: its open store
_outage: list[StoreDown] = []  # in the worker: the store found down
_seen: dict = {}  # in the worker: what the train stage's record found and logged (record.mirror_variant)


@contextlib.contextmanager
def _collector_off() -> Iterator[None]:
    """Python's cyclic collector paused while MLflow is imported and its store opened, then its
    objects frozen out of later collections. The import makes ~270,000 objects that live as long as
    the process, and the collector walked them ~550 times on the way: 0.27 s of a 1.6 s open."""
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def _call(tracking: Tracking, fn: Callable, args: tuple):
    if _outage:  # the calls queued behind one that found the store down fail at once
        raise _outage[0]
    try:
        with one_line(tracking.uri):
            if tracking not in _clients:
                with _collector_off():
                    _clients[tracking] = connect(tracking, checked=True)[0]  # the stage checked the store
            return fn(_clients[tracking], *args)
    except StoreDown as error:
        _outage.append(error)
        raise


def mirror(client, experiment_name: str, outputs: record.VariantOutputs) -> dict:
    """record.mirror_variant in the worker, remembering what it logged between calls."""
    return record.mirror_variant(client, experiment_id(client, experiment_name), outputs, _seen)


def close_runs(client, experiment_name: str, digest: str, status: str) -> None:
    record.close_runs(client, experiment_id(client, experiment_name), digest, status)


def _start_worker(stage_pid: int) -> None:
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


def _open(client) -> None:
    return None


class TrackingProcess:
    """`submit(fn, *args)` runs `fn(client, *args)` in the worker, with its `MlflowClient`, on a
    store that `store.check_store` found usable. Arguments are pickled when the call is sent:
    pass values that nothing changes afterwards. Fork (Linux) gives the worker this process's
    imports for free, torch included; elsewhere it is spawned."""

    def __init__(self, tracking: Tracking) -> None:
        method = "fork" if sys.platform == "linux" else "spawn"
        self.tracking = tracking
        sys.stdout.flush()  # a forked copy of unwritten output would be printed twice
        self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context(method),
                                         initializer=_start_worker, initargs=(os.getpid(),))
        self.submit(_open)  # starts the worker now: MLflow is imported while the stage goes on

    def submit(self, fn: Callable, *args) -> Future:
        return self._pool.submit(_call, self.tracking, fn, args)

    def call(self, fn: Callable, *args):
        return self.submit(fn, *args).result()

    def __enter__(self) -> TrackingProcess:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        # A failed stage drops the calls still queued: the next mirror adds what they carried.
        self._pool.shutdown(wait=True, cancel_futures=exc_type is not None)


class LiveRecord:
    """The train stage's record: its scratch state mirrored (record.mirror_variant) in the tracking
    process as each epoch ends, its outputs at the end. A store that cannot take it (StoreDown,
    now or later) costs no training: one line says the record waits, and nothing more is sent; a
    refusal (TrackingError) ends the stage."""

    def __init__(self, tracking: Tracking, run: dict, environment: dict) -> None:
        self.tracking, self.run, self.environment = tracking, run, environment
        self.process, self.refusal, self.waiting = None, None, False
        try:
            check_store(tracking)  # a refused login ends the stage here, in seconds
        except StoreDown as error:
            self._wait(error)
        else:
            self.process = TrackingProcess(tracking)
        self.opened = self.mirror({})  # the runs made (or found) while the stage loads its data

    def wait_opened(self) -> None:
        """A server that refuses this user's writes ends the stage before it trains."""
        if self.opened is not None:
            self._sent(self.opened)  # waits for it
            self.raise_refused()

    def _wait(self, error: StoreDown) -> None:
        if not self.waiting:
            self.waiting = True
            print(f"warning: the MLflow record waits: {error}; the next `dvc repro` or `make publish` "
                  "completes it from the outputs", file=sys.stderr, flush=True)

    def _sent(self, future: Future) -> None:
        """Called as each call ends (in the pool's thread), and again by a stage that waits on it."""
        error = future.exception() if not future.cancelled() else None
        if isinstance(error, StoreDown):
            self._wait(error)
        elif error is not None:
            self.refusal = error

    def _submit(self, fn: Callable, *args) -> Future | None:
        if self.process is None or self.waiting or self.refusal is not None:
            return None
        future = self.process.submit(fn, *args)
        future.add_done_callback(self._sent)
        return future

    def mirror(self, history: dict) -> Future | None:
        """The epochs of `history` ({metric: [per-epoch values]}) that the runs lack, sent."""
        return self._submit(mirror, self.tracking.experiment_name, record.VariantOutputs(
            self.run, self.environment, history or {name: [] for name in METRICS}))

    def raise_refused(self) -> None:
        if self.refusal is not None:
            raise self.refusal

    def finish(self, outputs: record.VariantOutputs) -> None:
        future = self._submit(mirror, self.tracking.experiment_name, outputs)
        if future is not None:
            self._sent(future)  # waits for it
            self.raise_refused()

    def close(self, status: str) -> None:
        """The runs of these inputs still RUNNING ended `status` (a stage that stops), if the store takes it."""
        future = self._submit(close_runs, self.tracking.experiment_name, self.run["inputs_digest"], status)
        if future is not None:
            future.exception()  # waits; whatever it met, the stage's own error is the one to say

    def __enter__(self) -> LiveRecord:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self.process is not None:
            self.process.__exit__(exc_type, *exc)
