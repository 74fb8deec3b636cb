"""MLflow plumbing: where the tracking store is, and the runs of one variant.

A variant's run is named after it and holds the mean over seeds of every metric; each seed
has a nested child run with its own curves. Runs are addressed by id through `MlflowClient`,
so a resumed stage continues the very runs its checkpoint names.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError

PARENT_TAG = "mlflow.parentRunId"


class TrackingError(PipelineError):
    pass


def project_root(cwd: Path) -> Path:
    """The repository root, also from inside DVC's temporary experiment copies."""
    parts = cwd.resolve().parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return cwd.resolve()


@dataclass(frozen=True)
class Tracking:
    """Where runs go, and what to tag them with; built once per stage by `from_environment`."""

    uri: str
    root: Path
    experiment_name: str
    dvc_exp_name: str | None = None

    @property
    def is_local(self) -> bool:
        return self.uri.startswith("sqlite:")

    @classmethod
    def from_environment(cls, experiment_name: str, cwd: Path | None = None) -> Tracking:
        root = project_root(cwd or Path.cwd())
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"
        return cls(uri, root, experiment_name, os.environ.get("DVC_EXP_NAME"))


def check_server(uri: str, timeout_s: float = 3.0) -> None:
    """Fail in seconds, before any training, when a tracking server is not there."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
            response.read()
    except urllib.error.HTTPError as error:
        raise TrackingError(f"MLFLOW_TRACKING_URI: {uri} answered HTTP {error.code} on /health") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise TrackingError(f"MLFLOW_TRACKING_URI: cannot reach {uri} ({reason})") from None


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def connect(tracking: Tracking):
    """Point MLflow at the store and return (client, experiment_id).

    A fresh SQLite store runs its schema migrations on first open; several stages (a DVC
    queue with -j 2) opening it at once would race on them, so the first open is serialised.
    """
    import mlflow
    from mlflow import MlflowClient

    if tracking.uri.startswith(("http://", "https://")):
        check_server(tracking.uri)
    mlflow.set_tracking_uri(tracking.uri)
    with _file_lock(tracking.root / ".mlflow.lock"):
        client = MlflowClient(tracking.uri)
        experiment = client.get_experiment_by_name(tracking.experiment_name)
        if experiment is not None:
            return client, experiment.experiment_id
        # The embedded store keeps artifacts beside the database, not under the cwd.
        location = (tracking.root / "mlartifacts").as_uri() if tracking.is_local else None
        return client, client.create_experiment(tracking.experiment_name, artifact_location=location)


def git_commit(root: Path) -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def run_tags(tracking: Tracking, cwd: Path, stage: str) -> dict[str, str]:
    """Where a run came from: the stage (the UI's Source column), git commit, DVC experiment."""
    tags = {"mlflow.source.name": f"dvc stage {stage}", "mlflow.source.type": "LOCAL"}
    commit = git_commit(cwd)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if tracking.dvc_exp_name:
        tags["dvc_exp_name"] = tracking.dvc_exp_name
    return tags


def flatten(prefix: str, value: object) -> dict[str, str]:
    """Nested params as MLflow's flat `a.b.c` keys."""
    if isinstance(value, dict):
        flat = {}
        for key, item in value.items():
            flat |= flatten(f"{prefix}.{key}" if prefix else str(key), item)
        return flat
    return {prefix: str(value)}


def log_metrics(client, run_id: str, metrics: dict[str, float], step: int) -> None:
    """All of one epoch's metrics in a single call: the store costs ms per call, not per value."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow's per-call limit on params
        client.log_batch(run_id, params=items[start : start + 100])


def close_dangling(client, run_ids: dict) -> None:
    """Mark FAILED the runs a crash left RUNNING (and that this store still has)."""
    from mlflow.exceptions import MlflowException

    for run_id in all_run_ids(run_ids):
        try:
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, status="FAILED")
        except MlflowException:  # gone, or recorded in another store
            pass


def start_variant_runs(client, experiment_id: str, config, tags: dict[str, str]) -> dict:
    """The variant's run and one nested child run per seed; returns their ids."""
    params = flatten("", config.model_dump(exclude={"name"}))
    variant = client.create_run(experiment_id, run_name=config.name, tags={**tags, "variant": config.name})
    log_params(client, variant.info.run_id, params | {"replicas": str(len(config.seeds))})
    seed_run_ids = []
    for seed in config.seeds:
        child = client.create_run(
            experiment_id,
            run_name=f"{config.name}-seed{seed}",
            tags={**tags, "variant": config.name, PARENT_TAG: variant.info.run_id},
        )
        log_params(client, child.info.run_id, params | {"seed": str(seed)})
        seed_run_ids.append(child.info.run_id)
    return {"variant": variant.info.run_id, "seeds": seed_run_ids}


def all_run_ids(run_ids: dict) -> list[str]:
    return [run_ids["variant"], *run_ids["seeds"]]


def set_status(client, run_ids: dict, status: str) -> None:
    """RUNNING again on resume; FINISHED, FAILED or KILLED at the end."""
    for run_id in all_run_ids(run_ids):
        if status == "RUNNING":
            client.update_run(run_id, status="RUNNING")
        else:
            client.set_terminated(run_id, status=status)


def log_replica_metrics(client, run_ids: dict, metrics: dict[str, list[float]], step: int) -> None:
    """Each seed's values into its child run; their mean (and spread) into the variant run."""
    for replica, run_id in enumerate(run_ids["seeds"]):
        log_metrics(client, run_id, {name: values[replica] for name, values in metrics.items()}, step)
    log_metrics(client, run_ids["variant"], summarize(metrics), step)


def summarize(metrics: dict[str, list[float]]) -> dict[str, float]:
    """Mean over seeds of each metric, and its sample std (0 for a single seed)."""
    import statistics

    summary = {}
    for name, values in metrics.items():
        summary[name] = statistics.fmean(values)
        summary[f"{name}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return summary


def backfill_metrics(client, run_ids: dict, history: dict[str, list[list[float]]]) -> None:
    """Log the checkpointed epochs that a crash kept from reaching MLflow (at most the last)."""
    logged = {m.step for m in client.get_metric_history(run_ids["variant"], "val_acc")}
    for epoch in range(1, len(history["val_acc"]) + 1):
        if epoch not in logged:
            metrics = {name: values[epoch - 1] for name, values in history.items()}
            log_replica_metrics(client, run_ids, metrics, step=epoch)
