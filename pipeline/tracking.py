"""MLflow plumbing: where the tracking store is, and the runs of one variant.

A variant's run is named after it and holds the mean over seeds of every metric; each seed
has a nested child run with its own curves. Runs are addressed by id through `MlflowClient`,
so a resumed stage continues the very runs its checkpoint names. The stages call these
functions through their tracking process (pipeline/tracking_process.py), which supplies the client.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.reports import METRICS
from pipeline.stats import summarize

PARENT_TAG = "mlflow.parentRunId"
INPUTS_TAG = "inputs_digest"  # provenance.inputs_digest of what a variant's run computed from
RESTORED_TAG = "restored_from"  # on a run rebuilt from DVC outputs that this store never saw
# The experiment's kind, as MLflow 3's UI reads it to pick an experiment's page (training runs, not
# the GenAI overview). MLflow 3.17's UI has its workflow selector on and follows the global
# workflow type instead (GenAI by default), so there the kind is a label until a user switches.
EXPERIMENT_TAGS = {
    "mlflow.experimentKind": "custom_model_development",
    "mlflow.note.content": "The batch-norm MNIST lab: one run per variant (mean over seeds), a child "
                           "run per seed, grouped under each `compare` run. Made by `dvc repro`.",
}


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
    """Fail in seconds, before any training, when a tracking server is not there, refuses this
    environment's credentials (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD), or cannot
    reach its own stores: the database behind its runs, the object store behind its artifacts."""
    base = uri.rstrip("/")
    try:
        with urllib.request.urlopen(base + "/health", timeout=timeout_s) as response:
            response.read()
    except urllib.error.HTTPError as error:
        raise TrackingError(f"MLFLOW_TRACKING_URI: {uri} answered HTTP {error.code} on /health") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise TrackingError(f"MLFLOW_TRACKING_URI: cannot reach {uri} ({reason})") from None
    _probe(uri, "/api/2.0/mlflow/experiments/search?max_results=1", "its backend store", timeout_s)
    # Listing the served artifacts' root makes the server call its object store (S3, MinIO): down,
    # it answers 500 after its S3 client's own retries (~9 s here).
    _probe(uri, "/api/2.0/mlflow-artifacts/artifacts?path=", "its artifact store", timeout_s + 20)


def _probe(uri: str, path: str, what: str, timeout_s: float) -> None:
    request = urllib.request.Request(uri.rstrip("/") + path, headers=_basic_auth_header())
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            response.read()
    except urllib.error.HTTPError as error:
        if error.code == 401:
            if "MLFLOW_TRACKING_USERNAME" not in os.environ:
                raise TrackingError(f"MLFLOW_TRACKING_URI: {uri} requires a login; set MLFLOW_TRACKING_USERNAME "
                                    "and MLFLOW_TRACKING_PASSWORD") from None
            raise TrackingError(f"MLFLOW_TRACKING_USERNAME: {uri} refused the credentials of user "
                                f"{os.environ['MLFLOW_TRACKING_USERNAME']!r} (HTTP 401)") from None
        message = _error_message(error)
        if error.code == 404 or "no-serve-artifacts" in message:
            return  # a server that does not serve artifacts: its clients write them themselves
        raise TrackingError(f"MLFLOW_TRACKING_URI: {uri} cannot use {what} (HTTP {error.code}: {message})") from None
    except (urllib.error.URLError, OSError) as error:
        raise TrackingError(f"MLFLOW_TRACKING_URI: {uri} did not answer in {timeout_s:.0f} s when asked "
                            f"to use {what} ({getattr(error, 'reason', error)})") from None


def _error_message(error: urllib.error.HTTPError) -> str:
    """The first line of MLflow's JSON error message, or of the body."""
    body = error.read().decode(errors="replace")
    try:
        body = json.loads(body).get("message", body)
    except (ValueError, AttributeError):
        body = "internal server error" if body.lstrip().startswith("<") else body
    return (body.strip().splitlines() or [""])[0][:200]


def _basic_auth_header() -> dict[str, str]:
    """HTTP basic auth from MLflow's own variables (the password never leaves this process)."""
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if not user:
        return {}
    token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def refused(error: Exception) -> TrackingError | None:
    """MLflow's refusal of an action (no permission, no login) as one line; None for other errors."""
    code = getattr(error, "error_code", "")
    if code in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
        user = os.environ.get("MLFLOW_TRACKING_USERNAME", "(no user)")
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else code
        return TrackingError(f"MLflow refused user {user!r}: {code} ({first_line[:200]})")
    return None


def unavailable(error: Exception, uri: str) -> TrackingError | None:
    """A tracking server (or its database, or its object store) that stayed down through MLflow's
    retries, as one line; None for other errors. The stage's scratch state keeps every epoch."""
    message = str(error).strip()
    if not message.startswith("API request to"):
        return None
    return TrackingError(f"MLflow at {uri} is unavailable ({message.splitlines()[0][:240]}); rerun the stage "
                         "when it is back: it resumes and completes the record")


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
    from mlflow.exceptions import MlflowException

    if tracking.uri.startswith(("http://", "https://")):
        check_server(tracking.uri)
    mlflow.set_tracking_uri(tracking.uri)
    with _file_lock(tracking.root / ".mlflow.lock"):
        client = MlflowClient(tracking.uri)
        experiment = client.get_experiment_by_name(tracking.experiment_name)
        if experiment is not None:
            for key, value in EXPERIMENT_TAGS.items():
                if key not in experiment.tags:  # an experiment made before these tags existed
                    client.set_experiment_tag(experiment.experiment_id, key, value)
            return client, experiment.experiment_id
        # The embedded store keeps artifacts beside the database, not under the cwd.
        location = (tracking.root / "mlartifacts").as_uri() if tracking.is_local else None
        try:
            return client, client.create_experiment(tracking.experiment_name, artifact_location=location,
                                                    tags=EXPERIMENT_TAGS)
        except MlflowException as error:  # a stage of another clone, on a shared server, made it first
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return client, client.get_experiment_by_name(tracking.experiment_name).experiment_id


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


def close_abandoned(client, experiment: str, digest: str) -> None:
    """Mark FAILED the runs of these inputs that an attempt now gone left RUNNING: a worker lost
    mid-task whose task Dask runs again elsewhere, a machine that died (its scratch state with it)."""
    for found in client.search_runs([experiment], f"tags.{INPUTS_TAG} = '{digest}' AND attributes.status = 'RUNNING'"):
        client.set_terminated(found.info.run_id, status="FAILED")


def experiment_id(client, name: str) -> str:
    """The id of an experiment that `connect` made sure of."""
    return client.get_experiment_by_name(name).experiment_id


def runs_page(tracking: Tracking, experiment: str) -> str:
    """Where a person sees the experiment's runs. MLflow 3.17's UI opens on its global workflow
    type, GenAI by default, whatever the experiment's kind: the link asks for model training."""
    page = f"#/experiments/{experiment}/runs?workflowType=machine_learning"
    if tracking.is_local:
        return f"`mlflow ui --backend-store-uri {tracking.uri}`, then http://127.0.0.1:5000/{page}"
    return f"{tracking.uri.rstrip('/')}/{page}"


def start_variant_runs(client, experiment_name: str, config, tags: dict[str, str], dataset: dict,
                       environment: dict, replaces: dict | None = None) -> dict:
    """The variant's run and one nested child run per seed; returns their ids.

    Params: the variant's config and the environment it ran in (`env.python`, `env.<package>`).
    `replaces`: the runs of a checkpoint this training does not resume (marked FAILED).
    """
    if replaces is not None:
        close_dangling(client, replaces)
    experiment = experiment_id(client, experiment_name)
    close_abandoned(client, experiment, tags[INPUTS_TAG])
    params = flatten("", config.model_dump(exclude={"name"})) | flatten("env", {
        "python": environment["python"], **environment["packages"]})
    variant = client.create_run(experiment, run_name=config.name, tags={**tags, "variant": config.name})
    log_params(client, variant.info.run_id, params | {"replicas": str(len(config.seeds))})
    seed_run_ids = []
    for seed in config.seeds:
        child = client.create_run(
            experiment,
            run_name=f"{config.name}-seed{seed}",
            tags={**tags, "variant": config.name, PARENT_TAG: variant.info.run_id},
        )
        log_params(client, child.info.run_id, params | {"seed": str(seed)})
        seed_run_ids.append(child.info.run_id)
    run_ids = {"variant": variant.info.run_id, "seeds": seed_run_ids}
    log_dataset(client, run_ids, dataset)
    return run_ids


def resume_variant_runs(client, run_ids: dict, history: dict[str, list[list[float]]]) -> dict:
    """The runs a checkpoint names, RUNNING again, with the epochs a crash kept from them."""
    set_status(client, run_ids, "RUNNING")
    backfill_metrics(client, run_ids, history)
    return run_ids


def log_dataset(client, run_ids: dict, dataset: dict) -> None:
    """Dataset lineage: the prepared splits' digest and where they are, on every run of the variant.

    Through the client, not `mlflow.start_run`: leaving that context would end the run.
    """
    from mlflow.entities import Dataset, DatasetInput, InputTag

    entity = Dataset(name=f"mnist-{dataset['digest']}", digest=dataset["digest"], source_type="local",
                     source=json.dumps({"uri": dataset["uri"]}), profile=json.dumps(dataset["sizes"]))
    lineage = DatasetInput(entity, [InputTag("mlflow.data.context", "training")])
    for run_id in all_run_ids(run_ids):
        client.log_inputs(run_id, datasets=[lineage])


def prepare_model_logging(client) -> None:
    """Pay `log_model`'s one-off costs early: the flavor's import and MLflow's map of installed
    packages to modules (~1 s), which it builds on first use to check the requirements."""
    import mlflow.pytorch  # noqa: F401
    from mlflow.utils import requirements_utils

    build_map = getattr(requirements_utils, "_init_packages_to_modules_map", None)
    if build_map is not None:  # private: if it goes away, the first log_model pays as before
        build_map()


def log_trained_model(client, run_ids: dict, served: tuple | None, best_epochs: list[int],
                      diverged_epochs: list[int | None], checkpoints: list[Path]) -> None:
    """A finished variant: each seed's best epoch and divergence, the checkpoints, and the
    served model (`served`: a plain nn.Module, an input example, its seed; None when every
    seed diverged) with its signature, in the variant's run."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    for run_id, best_epoch, diverged in zip(run_ids["seeds"], best_epochs, diverged_epochs, strict=True):
        client.set_tag(run_id, "best_epoch", str(best_epoch))
        client.set_tag(run_id, "diverged", "false" if diverged is None else f"true (epoch {diverged})")
    count = sum(epoch is not None for epoch in diverged_epochs)
    client.set_tag(run_ids["variant"], "diverged_seeds", f"{count} of {len(diverged_epochs)}")
    for path in checkpoints:
        client.log_artifact(run_ids["variant"], str(path), "checkpoints")
    if served is None:
        return
    model, example, served_seed = served
    with torch.no_grad():
        signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
    with mlflow.start_run(run_id=run_ids["variant"]):
        mlflow.set_tag("served_seed", str(served_seed))
        # Explicit requirements: inferring them imports the model in a subprocess (~6 s).
        # Pickle, not MLflow's default pt2: torch.export costs ~2.3 s here (importing
        # torch._dynamo, tracing), and the model is a plain nn.Sequential of torch.nn layers.
        mlflow.pytorch.log_model(model, name="model", signature=signature, input_example=example,
                                 serialization_format="pickle",
                                 pip_requirements=mlflow.pytorch.get_default_pip_requirements())


def find_variant_runs(client, experiment_name: str, digests: dict[str, str], seeds: list[int]) -> dict:
    """{variant: run ids} of the newest finished run of each variant computed from these inputs
    (its `inputs_digest` tag), with a child run for every seed; None where the store has none."""
    experiment = experiment_id(client, experiment_name)
    found = {}
    for variant, digest in digests.items():
        runs = client.search_runs([experiment], f"tags.{INPUTS_TAG} = '{digest}' AND attributes.run_name = "
                                  f"'{variant}' AND attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        children = client.search_runs([experiment], f"tags.`{PARENT_TAG}` = '{runs[0].info.run_id}'") if runs else []
        by_seed = {child.data.params.get("seed"): child.info.run_id for child in children}
        complete = runs and all(str(seed) in by_seed for seed in seeds)
        found[variant] = {"variant": runs[0].info.run_id, "seeds": [by_seed[str(s)] for s in seeds]} if complete else None
    return found


def restore_variant_runs(client, experiment_name: str, config, tags: dict[str, str], dataset: dict,
                         environment: dict, history: dict, served: tuple | None, checkpoints: list[Path]) -> dict:
    """A variant's runs rebuilt from its train stage's outputs, for a store that never saw the runs
    that made them (DVC restored the outputs from another machine's run-cache): params, per-epoch
    metrics, checkpoints and model, tagged `restored_from`. Returns their ids."""
    import numpy as np

    run_ids = start_variant_runs(client, experiment_name, config, tags | {RESTORED_TAG: "dvc-outputs"}, dataset,
                                 environment)
    backfill_metrics(client, run_ids, {name: history[name] for name in METRICS})
    if served is not None:  # the images are not an input of compare: two blank ones as the example
        model, seed = served
        served = (model, np.zeros((2, model[1].in_features), dtype=np.float32), seed)
    log_trained_model(client, run_ids, served, history["best_epoch"], history["diverged_epoch"], checkpoints)
    set_status(client, run_ids, "FINISHED")
    return run_ids


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


def backfill_metrics(client, run_ids: dict, history: dict[str, list[list[float]]]) -> None:
    """Log the checkpointed epochs that a crash or an outage kept from reaching MLflow, run by run:
    a call cut short may have reached some seeds' runs and not the others."""
    epochs = [{name: values[epoch] for name, values in history.items()} for epoch in range(len(history["val_acc"]))]
    for replica, run_id in enumerate(run_ids["seeds"]):
        _backfill(client, run_id, [{name: values[replica] for name, values in metrics.items()} for metrics in epochs])
    _backfill(client, run_ids["variant"], [summarize(metrics) for metrics in epochs])


def _backfill(client, run_id: str, metrics_by_epoch: list[dict[str, float]]) -> None:
    logged = {m.step for m in client.get_metric_history(run_id, "val_acc")}  # one log_batch: all or none
    for epoch, metrics in enumerate(metrics_by_epoch, start=1):
        if epoch not in logged:
            log_metrics(client, run_id, metrics, epoch)
