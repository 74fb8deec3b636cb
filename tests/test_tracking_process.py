"""MLflow calls made through the stage's second process: in order, with results and errors."""

from __future__ import annotations

import os

import pytest
from mlflow import MlflowClient

from pipeline.tracking.store import Tracking, TrackingError, experiment_id
from pipeline.tracking.process import TrackingProcess

_seen: list[str] = []  # in the worker: the names of the runs it made, in order


def create_run(client, experiment_name: str, name: str) -> tuple[list[str], int]:
    client.create_run(experiment_id(client, experiment_name), run_name=name)
    _seen.append(name)
    return list(_seen), os.getpid()


def refuse(client, reason: str) -> None:
    raise TrackingError(reason)


def test_calls_run_in_another_process_in_order_and_errors_come_back(tmp_path):
    tracking = Tracking(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path, "lab")
    with TrackingProcess(tracking) as tracker:
        pending = [tracker.submit(create_run, "lab", f"run-{i}") for i in range(3)]
        with pytest.raises(TrackingError, match="^no such run$"):
            tracker.call(refuse, "no such run")
        results = [future.result() for future in pending]
        seen_last, worker = tracker.call(create_run, "lab", "after the error")

    assert [seen for seen, _ in results] == [["run-0"], ["run-0", "run-1"], ["run-0", "run-1", "run-2"]]
    assert seen_last[-1] == "after the error"  # the same worker went on after the error
    assert {pid for _, pid in results} == {worker} and worker != os.getpid()
    client = MlflowClient(tracking.uri)
    names = {run.info.run_name for run in client.search_runs([experiment_id(client, "lab")])}
    assert names == {"run-0", "run-1", "run-2", "after the error"}
