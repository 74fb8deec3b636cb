"""The train stage's record, written in a second process so that training never waits for MLflow.

A train stage computes on one torch thread; MLflow costs it seconds of pure Python (the import
~1.4 s, opening the store ~0.3 s, `log_model` ~1.3 s) that in a thread would hold the GIL the
training loop needs between kernels. Measured, the stage's whole-process wall time with the
record in a thread instead of this process: 1.05x (published lab) and 1.08x (tiny data) in one
run, 0.98x and 0.95x in another (alternating, medians, 2 cores shared with other work): too close
to call here; the process keeps MLflow's objects and its GIL off the training loop, and a train
stage on more cores has them to spare. One worker, forked on Linux: calls run in order.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor

from pipeline.reports import METRICS
from pipeline.tracking import model, record
from pipeline.tracking.store import StoreDown, Tracking, check_store, connect, one_line

_opened: list = []  # in the worker: (client, experiment id), once the store is open
_seen: dict = {}  # in the worker: what record.mirror_variant found and logged
_outage: list[StoreDown] = []  # in the worker: the calls queued behind a failed one fail at once


def _call(tracking: Tracking, fn, args: tuple):
    if _outage:
        raise _outage[0]
    try:
        with one_line(tracking.uri):
            if not _opened:
                _opened.append(connect(tracking, checked=True))  # the stage checked the store
            return fn(*_opened[0], *args)
    except StoreDown as error:
        _outage.append(error)
        raise


def _mirror(client, experiment: str, outputs: record.VariantOutputs) -> dict:
    return record.mirror_variant(client, experiment, outputs, _seen)


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


class LiveRecord:
    """The stage's scratch state mirrored (record.mirror_variant) after each epoch, its outputs at
    the end. A store that cannot take it (StoreDown, at the start or later) costs no training:
    one line says the record waits, and nothing more is sent. A refusal ends the stage."""

    def __init__(self, tracking: Tracking, run: dict, environment: dict) -> None:
        self.tracking, self.run, self.environment = tracking, run, environment
        self.pool, self.refusal, self.waiting = None, None, False
        try:
            check_store(tracking)  # a refused login ends the stage here, in seconds
        except StoreDown as error:
            self._wait(error)
        else:
            sys.stdout.flush()  # a forked copy of unwritten output would be printed twice
            method = "fork" if sys.platform == "linux" else "spawn"
            self.pool = ProcessPoolExecutor(1, multiprocessing.get_context(method), _start_worker, (os.getpid(),))
        self.opened = self.mirror({})  # the runs made (or found) while the stage loads its data
        self._submit(model.warm_model_logging)

    def _wait(self, error: StoreDown) -> None:
        if not self.waiting:
            self.waiting = True
            print(f"warning: the MLflow record waits: {error}; the next `dvc repro` or `make publish` "
                  "completes it from the outputs", file=sys.stderr, flush=True)

    def _sent(self, future: Future) -> None:
        """Called as each call ends (in the pool's thread), and again by a stage that waits on it."""
        error = None if future.cancelled() else future.exception()
        if isinstance(error, StoreDown):
            self._wait(error)
        elif error is not None:
            self.refusal = error

    def _submit(self, fn, *args) -> Future | None:
        if self.pool is None or self.waiting or self.refusal is not None:
            return None
        future = self.pool.submit(_call, self.tracking, fn, args)
        future.add_done_callback(self._sent)
        return future

    def mirror(self, history: dict) -> Future | None:
        """The epochs of `history` ({metric: [per-epoch values]}) that the runs lack, sent."""
        return self._submit(_mirror, record.VariantOutputs(self.run, self.environment,
                                                           history or {name: [] for name in METRICS}))

    def raise_refused(self, wait_for: Future | None = None) -> None:
        if wait_for is not None:
            self._sent(wait_for)  # waits for it
        if self.refusal is not None:
            raise self.refusal

    def finish(self, outputs: record.VariantOutputs) -> None:
        self.raise_refused(self._submit(_mirror, outputs))

    def close(self, status: str) -> None:
        """The runs of these inputs still RUNNING ended `status` (a stage that stops), if the store takes it."""
        future = self._submit(record.close_runs, self.run["inputs_digest"], status)
        if future is not None:
            future.exception()  # waits; whatever it met, the stage's own error is the one to say

    def __enter__(self) -> LiveRecord:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self.pool is not None:  # a failed stage drops what is queued: the next mirror adds it
            self.pool.shutdown(wait=True, cancel_futures=exc_type is not None)
