"""The record's second process: MLflow's import, store and calls in one forked worker, off the
stage's own work (the train stage's `LiveRecord`; compare draws its figures meanwhile).

A train stage computes on one torch thread and evaluates on a second; MLflow costs it seconds of
pure Python (the import ~1 s, opening an SQLite store ~0.8 s, `log_model` ~0.4 s) that in a thread
would hold the GIL those two need. With the record in a thread instead (the published lab, 3
alternating repeats, medians, 2-core AMD EPYC): plain `dvc repro` 1.14x the wall time (16.3 s
against 14.3 s; 1.23x with log_model's one-off costs paid early in that thread), `make repro`
0.98x either way (its two train stages fill both cores already).
"""

import functools
import multiprocessing
import os
import signal
import sys
import threading
from concurrent.futures import Future, ProcessPoolExecutor

from pipeline.reports import METRICS
from pipeline.tracking import record
from pipeline.tracking.store import StoreDown, Tracking, check_store, connect, one_line

_seen: dict = {}  # in the worker: what record.mirror_variant found and logged
_outage: list[StoreDown] = []  # in the worker: the calls queued behind a failed one fail at once
_store = functools.cache(connect)  # in the worker: opened once (the stage checked the store)


def _call(tracking: Tracking, fn, args: tuple):
    if _outage:
        raise _outage[0]
    try:
        with one_line(tracking.uri):
            return fn(*_store(tracking), *args)
    except StoreDown as error:
        _outage.append(error)
        raise


def opened(client, experiment: str) -> str:
    """The experiment's id, once the store is open."""
    return experiment


def _mirror(client, experiment: str, outputs: record.VariantOutputs) -> None:
    record.mirror_variant(client, experiment, outputs, _seen)


def _warm(client, experiment: str, digest: str) -> None:
    record.warm_model_logging(client, experiment, _seen[digest]["variant"])


def _start_worker() -> None:
    """Ctrl-C reaches the whole process group; the stage decides what its runs become (KILLED)
    and says so through this process, which ends when the stage closes it or is gone: a
    SIGKILLed stage cannot close it, and a forked worker never reads end-of-file."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def exit_with_stage() -> None:
        multiprocessing.parent_process().join()  # its sentinel: the stage's end of a pipe, closed as it dies
        os._exit(1)

    threading.Thread(target=exit_with_stage, daemon=True).start()


class RecordProcess(ProcessPoolExecutor):
    """The worker: `submit(fn, *args)` runs `fn(client, experiment, *args)` there, in order, the
    store opened by the first call; MLflow's errors come back as a refusal or a StoreDown. On
    leaving, it waits for the calls sent; a failed stage drops those not started."""

    def __init__(self, tracking: Tracking) -> None:
        self.tracking = tracking
        sys.stdout.flush()  # a forked copy of unwritten output would be printed twice
        method = "fork" if sys.platform == "linux" else "spawn"  # forked at the first call
        super().__init__(1, multiprocessing.get_context(method), _start_worker)

    def submit(self, fn, *args) -> Future:
        return super().submit(_call, self.tracking, fn, args)

    def __exit__(self, exc_type, *exc) -> None:
        self.shutdown(wait=True, cancel_futures=exc_type is not None)


class LiveRecord(RecordProcess):
    """The stage's scratch state mirrored (record.mirror_variant) after each epoch, its outputs at
    the end. A store that cannot take it (StoreDown, at the start or later) costs no training:
    one line says the record waits, and nothing more is sent (what a stage dropped, the next
    mirror adds). A refusal ends the stage."""

    def __init__(self, tracking: Tracking, run: dict, environment: dict) -> None:
        self.run, self.environment, self.refusal, self.waiting = run, environment, None, False
        try:
            check_store(tracking)  # a refused login ends the stage here, in seconds, before the pool exists
        except StoreDown as error:
            self._wait(error)
        super().__init__(tracking)
        self.opened = self.mirror({})  # the runs made (or found) while the stage loads its data
        self.submit(_warm, run["inputs_digest"])  # log_model's one-off costs paid while the stage trains

    def _wait(self, error: StoreDown) -> None:
        if not self.waiting:
            self.waiting = True
            print(f"warning: the MLflow record waits: {error}; the next `dvc repro` or `make publish` "
                  "completes it from the outputs", file=sys.stderr, flush=True)

    def _sent(self, future: Future) -> None:
        """As each call ends (in the pool's thread), and again where the stage waits on one."""
        error = None if future.cancelled() else future.exception()
        if isinstance(error, StoreDown):
            self._wait(error)
        elif error is not None and self.refusal is None:  # the first one is the cause: later calls fail after it
            self.refusal = error

    def submit(self, fn, *args) -> Future | None:
        if self.waiting or self.refusal is not None:
            return None
        future = super().submit(fn, *args)
        future.add_done_callback(self._sent)
        return future

    def mirror(self, history: dict) -> Future | None:
        """The epochs of `history` ({metric: [per-epoch values]}) that the runs lack, sent."""
        return self.submit(_mirror, record.VariantOutputs(self.run, self.environment,
                                                          history or {name: [] for name in METRICS}))

    def raise_refused(self, wait_for: Future | None = None) -> None:
        if wait_for is not None:
            self._sent(wait_for)  # waits for it
        if self.refusal is not None:
            raise self.refusal

    def finish(self, outputs: record.VariantOutputs) -> None:
        self.raise_refused(self.submit(_mirror, outputs))

    def close(self, status: str) -> None:
        """The runs of these inputs ended `status` (a stage that stops), if the store takes it."""
        if future := self.submit(record.close_runs, self.run["inputs_digest"], status):
            future.exception()  # waits; whatever it met, the stage's own error is the one to say
