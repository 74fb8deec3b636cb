"""Where the tracking store is, and how a stage reaches it: a server or an SQLite file checked in
seconds, its refusals and outages as one line, the experiment. What the runs hold: record.py."""

import base64
import fcntl
import json
import os
import sqlite3
import urllib.error
import urllib.request
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from pipeline.errors import PipelineError

PARENT_TAG = "mlflow.parentRunId"
INPUTS_TAG = "inputs_digest"  # what a run's outputs were computed from: how the record finds it
# The experiment's kind, as MLflow 3's UI reads it to pick an experiment's page (training runs, not
# the GenAI overview); MLflow 3.17's UI follows its global workflow type instead (see runs_page).
EXPERIMENT_TAGS = {
    "mlflow.experimentKind": "custom_model_development",
    "mlflow.note.content": "The batch-norm MNIST lab: one run per variant (mean over seeds), a child "
                           "run per seed, grouped under each `compare` run. Made by `dvc repro`.",
}
# MLflow's own variables, read when it is imported; a user's setting wins.
MLFLOW_DEFAULTS = {
    # MLflow 3 sends usage telemetry to its makers from every process that imports it: a stage's
    # runs go to its tracking store and nowhere else.
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # MLflow retries a down server 7 times with backoff factor 2, ~4 minutes; 4 with factor 1 wait
    # 0+2+4+8 s (and a second of jitter each): an outage is one line within ~20 s.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # not a "View run ... at" line per closed run
}
MIN_FREE_BYTES = 2 << 20  # an SQLite store's first open writes its schema (~1 MB); a run adds kilobytes


class TrackingError(PipelineError):
    """A refusal (login, permission): a mistake to fix, it ends any stage."""


class StoreDown(TrackingError):
    """The store cannot take the record now (down, read-only, full, corrupted): the train stage
    trains on and says the record waits; compare and publish end with this line."""


def project_root(cwd: Path) -> Path:
    """The repository root, also from inside DVC's temporary experiment copies."""
    parts = cwd.resolve().parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return cwd.resolve()


@dataclass(frozen=True)
class Tracking:
    """Where runs go: MLFLOW_TRACKING_URI, or mlflow.db at the project's root."""

    uri: str
    root: Path
    experiment_name: str

    @property
    def is_local(self) -> bool:
        return self.uri.startswith("sqlite:")

    @classmethod
    def from_environment(cls, experiment_name: str, cwd: Path | None = None) -> Self:
        root = project_root(cwd or Path.cwd())
        return cls(os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}", root, experiment_name)


def check_server(uri: str, timeout_s: float = 10.0) -> None:
    """Fail in seconds, before any training, when a server is not there, refuses this environment's
    credentials, or cannot reach the database behind its runs or the object store behind its
    artifacts (listing their root makes it call S3: down, it answers 500 after ~9 s of its own
    retries). `timeout_s` leaves a busy server its time (a basic-auth login's first check took
    over 3 s on 2 loaded cores)."""
    _probe(uri, "/health", None, timeout_s)
    _probe(uri, "/api/2.0/mlflow/experiments/search?max_results=1", "its backend store", timeout_s)
    _probe(uri, "/api/2.0/mlflow-artifacts/artifacts?path=", "its artifact store", timeout_s + 20)


def _probe(uri: str, path: str, what: str | None, timeout_s: float) -> None:
    """GET `path` as MLflow's client would (basic auth from its variables); `what` None: /health."""
    request, user = urllib.request.Request(uri.rstrip("/") + path), os.environ.get("MLFLOW_TRACKING_USERNAME")
    if user and what:
        login = f"{user}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}".encode()
        request.add_header("Authorization", f"Basic {base64.b64encode(login).decode()}")
    try:
        urllib.request.urlopen(request, timeout=timeout_s).close()  # its status is the answer
    except urllib.error.HTTPError as error:
        kind = StoreDown if error.code >= 500 else TrackingError
        if what is None:
            raise kind(f"MLFLOW_TRACKING_URI: {uri} answered HTTP {error.code} on /health") from None
        if error.code == 401:
            raise TrackingError(f"MLFLOW_TRACKING_USERNAME: {uri} refused the credentials of user {user!r} (HTTP 401)"
                                if user else f"MLFLOW_TRACKING_URI: {uri} requires a login; set "
                                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD") from None
        body = error.read().decode(errors="replace")  # MLflow's JSON message, or an HTML page
        try:
            body = json.loads(body).get("message", body)
        except (ValueError, AttributeError):
            body = "internal server error" if body.lstrip().startswith("<") else body
        message = (body.strip().splitlines() or [""])[0][:200]
        if error.code == 404 or "no-serve-artifacts" in message:
            return  # a server that does not serve artifacts: its clients write them themselves
        raise kind(f"MLFLOW_TRACKING_URI: {uri} cannot use {what} (HTTP {error.code}: {message})") from None
    except OSError as error:  # urllib's URLError included
        reason = getattr(error, "reason", error)
        raise StoreDown(f"MLFLOW_TRACKING_URI: cannot reach {uri} ({reason})" if what is None else
                        f"MLFLOW_TRACKING_URI: {uri} did not answer in {timeout_s:.0f} s when asked to use "
                        f"{what} ({reason})") from None


@contextmanager
def one_line(uri: str):
    """MLflow's errors (and the I/O beneath them) as one line: a refusal of an action (no permission,
    no login), or a StoreDown for any other failure (a server down through MLflow's retries, a full
    disk); bugs as they are."""
    try:
        yield
    except TrackingError:
        raise
    except Exception as error:
        from mlflow.exceptions import MlflowException

        if not isinstance(error, (MlflowException, OSError)):
            raise
        code, said = getattr(error, "error_code", ""), (str(error).strip() or type(error).__name__).splitlines()[0]
        if code in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
            user = os.environ.get("MLFLOW_TRACKING_USERNAME", "(no user)")
            raise TrackingError(f"MLflow refused user {user!r}: {code} ({said[:200]})") from None
        raise StoreDown(f"MLflow store {uri}: {said[:240]}") from None


def check_sqlite(path: Path) -> None:
    """Before MLflow opens an SQLite store, whose engine retries a file it cannot open for ~100 s:
    the folder writable, space left, the file whole (the stdlib's sqlite3, in milliseconds)."""
    folder = next(folder for folder in path.parents if folder.exists())  # MLflow makes the missing ones
    if not os.access(folder, os.W_OK) or path.exists() and not os.access(path, os.W_OK):
        raise StoreDown(f"MLflow store {path}: {folder} is not writable")
    free = os.statvfs(folder)
    if free.f_bavail * free.f_frsize < MIN_FREE_BYTES:
        raise StoreDown(f"MLflow store {path}: no space left on its disk")
    if not path.exists():
        return
    try:
        with closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as database:
            verdict = database.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as error:
        verdict = str(error)
    if verdict != "ok":
        raise StoreDown(f"MLflow store {path} is corrupted ({verdict[:120]}); move it aside: "
                        "`make publish` rebuilds every run from the outputs, nothing is lost")


def check_store(tracking: Tracking) -> None:
    """In seconds, before MLflow's own retries: StoreDown or TrackingError (a refusal)."""
    if tracking.is_local:
        check_sqlite(Path(tracking.uri.removeprefix("sqlite:///")))
    elif tracking.uri.startswith(("http://", "https://")):
        check_server(tracking.uri)


def connect(tracking: Tracking):
    """MLflow pointed at the store (check_store it first): (client, experiment id), the experiment
    made with its tags where missing. A fresh SQLite store migrates its schema on first open;
    stages opening it at once (a DVC queue with -j 2) would race on that: opens take turns."""
    for name, value in MLFLOW_DEFAULTS.items():
        os.environ.setdefault(name, value)
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking.uri)
    tracking.root.mkdir(parents=True, exist_ok=True)
    with open(tracking.root / ".mlflow.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released as the file closes
        client = mlflow.MlflowClient(tracking.uri)
        experiment = client.get_experiment_by_name(tracking.experiment_name)
        if experiment is None:
            # The embedded store keeps artifacts beside the database, not under the cwd.
            location = (tracking.root / "mlartifacts").as_uri() if tracking.is_local else None
            try:
                return client, client.create_experiment(tracking.experiment_name, location, EXPERIMENT_TAGS)
            except MlflowException as error:  # a stage of another clone, on a shared server, made it first
                if error.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = client.get_experiment_by_name(tracking.experiment_name)
        for key, value in EXPERIMENT_TAGS.items():
            if key not in experiment.tags:  # an experiment made before these tags existed
                client.set_experiment_tag(experiment.experiment_id, key, value)
        return client, experiment.experiment_id


def runs_page(tracking: Tracking, experiment: str) -> str:
    """Where a person sees the experiment's runs. MLflow 3.17's UI opens on its global workflow
    type, GenAI by default, whatever the experiment's kind: the link asks for model training."""
    page = f"#/experiments/{experiment}/runs?workflowType=machine_learning"
    if tracking.is_local:
        return f"`mlflow ui --backend-store-uri {tracking.uri}`, then http://127.0.0.1:5000/{page}"
    return f"{tracking.uri.rstrip('/')}/{page}"
