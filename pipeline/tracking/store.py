"""MLflow plumbing: where the tracking store is, how a stage reaches it (a server or an SQLite
file checked in seconds, its refusals and outages as one line), and the experiment. What the
runs hold: pipeline/tracking/record.py.
"""

from __future__ import annotations

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

from pipeline.errors import PipelineError

PARENT_TAG = "mlflow.parentRunId"
INPUTS_TAG = "inputs_digest"  # what a run's outputs were computed from: how the record finds it
# The experiment's kind, as MLflow 3's UI reads it to pick an experiment's page (training runs, not
# the GenAI overview). MLflow 3.17's UI has its workflow selector on and follows the global
# workflow type instead (GenAI by default), so there the kind is a label until a user switches.
EXPERIMENT_TAGS = {
    "mlflow.experimentKind": "custom_model_development",
    "mlflow.note.content": "The batch-norm MNIST lab: one run per variant (mean over seeds), a child "
                           "run per seed, grouped under each `compare` run. Made by `dvc repro`.",
}
# MLflow 3 sends usage telemetry to its makers (config.mlflow-telemetry.io) from every process that
# imports it, unless told not to or run under CI: a stage's runs go to its tracking store and
# nowhere else. A user who sets the variable keeps their choice.
TELEMETRY_OFF = ("MLFLOW_DISABLE_TELEMETRY", "true")
# MLflow retries a call that meets a down server 7 times with backoff factor 2: ~4 minutes before a
# stage learns that its store is gone. 4 retries with factor 1 wait 0+2+4+8 s (and a second of
# jitter each): an outage is one line within ~20 s. The train stage does not wait on it (the
# record waits, the outputs complete it later); compare and publish end with the line. MLflow's
# own variables, so a user's setting wins.
RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
# MLflow prints "View run ... at: <url>" for every run it closes (a request and a line per run).
QUIET = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


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
    """Where runs go, and what to tag them with; built once per stage by `from_environment`."""

    uri: str
    root: Path
    experiment_name: str

    @property
    def is_local(self) -> bool:
        return self.uri.startswith("sqlite:")

    @classmethod
    def from_environment(cls, experiment_name: str, cwd: Path | None = None) -> Tracking:
        root = project_root(cwd or Path.cwd())
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"
        return cls(uri, root, experiment_name)


def check_server(uri: str, timeout_s: float = 10.0) -> None:
    """Fail in seconds, before any training, when a tracking server is not there, refuses this
    environment's credentials (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD), or cannot
    reach its own stores: the database behind its runs, the object store behind its artifacts.
    A server that is not there refuses at once; `timeout_s` bounds one that hangs, and leaves a busy
    one its time (a basic-auth login's first check took over 3 s on 2 loaded cores here)."""
    base = uri.rstrip("/")
    try:
        with urllib.request.urlopen(base + "/health", timeout=timeout_s) as response:
            response.read()
    except urllib.error.HTTPError as error:
        raise (StoreDown if error.code >= 500 else TrackingError)(
            f"MLFLOW_TRACKING_URI: {uri} answered HTTP {error.code} on /health") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise StoreDown(f"MLFLOW_TRACKING_URI: cannot reach {uri} ({reason})") from None
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
        raise (StoreDown if error.code >= 500 else TrackingError)(
            f"MLFLOW_TRACKING_URI: {uri} cannot use {what} (HTTP {error.code}: {message})") from None
    except (urllib.error.URLError, OSError) as error:
        raise StoreDown(f"MLFLOW_TRACKING_URI: {uri} did not answer in {timeout_s:.0f} s when asked "
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


def unavailable(error: Exception, uri: str) -> StoreDown:
    """Any other failure of the store (a server that stayed down through MLflow's retries, a disk
    that filled up under an SQLite file) as one line naming the store."""
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return StoreDown(f"MLflow store {uri}: {first_line[:240]}")


@contextmanager
def one_line(uri: str):
    """MLflow's errors (and the I/O beneath them) as a refusal or a StoreDown; bugs as they are."""
    try:
        yield
    except TrackingError:
        raise
    except Exception as error:
        from mlflow.exceptions import MlflowException

        if not isinstance(error, (MlflowException, OSError)):
            raise
        raise refused(error) or unavailable(error, uri) from None


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


# MLflow's first open of an SQLite file writes its schema (~1 MB) and each run adds kilobytes.
MIN_FREE_BYTES = 2 << 20


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_store(tracking: Tracking) -> None:
    """In seconds, before MLflow's own retries: StoreDown or TrackingError (a refusal)."""
    if tracking.is_local:
        check_sqlite(Path(tracking.uri.removeprefix("sqlite:///")))
    elif tracking.uri.startswith(("http://", "https://")):
        check_server(tracking.uri)


def connect(tracking: Tracking, checked: bool = False):
    """Point MLflow at the store and return (client, experiment_id); `checked`: `check_store`
    ran, do not ask again.

    A fresh SQLite store runs its schema migrations on first open; several stages (a DVC
    queue with -j 2) opening it at once would race on them, so the first open is serialised.
    """
    for name, value in (dict([TELEMETRY_OFF]) | RETRIES | QUIET).items():  # read when mlflow is imported
        os.environ.setdefault(name, value)
    import mlflow
    from mlflow import MlflowClient

    if not checked:
        check_store(tracking)
    mlflow.set_tracking_uri(tracking.uri)
    with _file_lock(tracking.root / ".mlflow.lock"):
        client = MlflowClient(tracking.uri)
        return client, _open_experiment(client, tracking)


def _open_experiment(client, tracking: Tracking) -> str:
    """The experiment's id, made with its tags where the store has none of that name."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(tracking.experiment_name)
    if experiment is not None:
        for key, value in EXPERIMENT_TAGS.items():
            if key not in experiment.tags:  # an experiment made before these tags existed
                client.set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id
    # The embedded store keeps artifacts beside the database, not under the cwd.
    location = (tracking.root / "mlartifacts").as_uri() if tracking.is_local else None
    try:
        return client.create_experiment(tracking.experiment_name, artifact_location=location,
                                        tags=EXPERIMENT_TAGS)
    except MlflowException as error:  # a stage of another clone, on a shared server, made it first
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(tracking.experiment_name).experiment_id


def runs_page(tracking: Tracking, experiment: str) -> str:
    """Where a person sees the experiment's runs. MLflow 3.17's UI opens on its global workflow
    type, GenAI by default, whatever the experiment's kind: the link asks for model training."""
    page = f"#/experiments/{experiment}/runs?workflowType=machine_learning"
    if tracking.is_local:
        return f"`mlflow ui --backend-store-uri {tracking.uri}`, then http://127.0.0.1:5000/{page}"
    return f"{tracking.uri.rstrip('/')}/{page}"
