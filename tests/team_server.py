"""A team's tracking stack on loopback, as the tests start it: PostgreSQL, S3 (moto), `mlflow server`.

PostgreSQL is Debian's: a throwaway cluster in a temporary folder, run as the `postgres` system
user (initdb and pg_ctl refuse root). S3 is moto's server speaking the S3 HTTP API; the MLflow
server reaches it through `MLFLOW_S3_ENDPOINT_URL`, exactly as it would reach MinIO or AWS.
MLflow starts as a team starts it, from deploy/ (start_server.py, basic_auth.ini): basic-auth
logins, artifacts served by MLflow (clients need a login, no S3 keys), the credential cache on.
Passwords are drawn per run and live in environment variables only.
"""

import glob
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from tests.mlflow_server import free_port, launch, stop

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
START_SCRIPT, AUTH_CONFIG = DEPLOY / "start_server.py", DEPLOY / "basic_auth.ini"
ADMIN = "admin"


def postgres_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def as_postgres(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return subprocess.run(prefix + cmd, check=True, capture_output=True, text=True, timeout=120, **kwargs)


@dataclass
class Postgres:
    folder: Path
    port: int
    password: str

    @property
    def uri(self) -> str:
        return f"postgresql+psycopg2://mlflow:{self.password}@127.0.0.1:{self.port}/mlflow"

    def start(self) -> None:
        as_postgres([postgres_bin("pg_ctl"), "-D", str(self.folder / "data"), "-l", str(self.folder / "log"), "-w",
                     "-o", f"-p {self.port} -h 127.0.0.1 -k {self.folder} -c fsync=off", "start"])

    def stop(self) -> None:
        """Stop the server, keeping its data: `start` brings it back."""
        as_postgres([postgres_bin("pg_ctl"), "-D", str(self.folder / "data"), "-m", "fast", "stop"])

    def scalar(self, sql: str) -> object:
        """One value straight from the database, as MLflow's server stored it."""
        import sqlalchemy

        engine = sqlalchemy.create_engine(self.uri)
        try:
            with engine.connect() as connection:
                return connection.execute(sqlalchemy.text(sql)).scalar_one()
        finally:
            engine.dispose()


def start_postgres() -> Postgres:
    """A PostgreSQL cluster with database `mlflow` owned by user `mlflow`, on a loopback port."""
    folder = Path(tempfile.mkdtemp(prefix="pg-"))  # pytest's folders are not the postgres user's to enter
    postgres = Postgres(folder, free_port(), secrets.token_urlsafe(16))
    shutil.chown(folder, "postgres", "postgres")
    secret = folder / "pwfile"
    secret.write_text(postgres.password + "\n")
    shutil.chown(secret, "postgres", "postgres")
    try:
        as_postgres([postgres_bin("initdb"), "-D", str(folder / "data"), "-U", "mlflow", f"--pwfile={secret}",
                     "--auth=scram-sha-256", "--no-sync"])
    finally:
        secret.unlink()
    postgres.start()
    as_postgres([postgres_bin("createdb"), "-h", "127.0.0.1", "-p", str(postgres.port), "-U", "mlflow", "mlflow"],
                env=os.environ | {"PGPASSWORD": postgres.password})
    return postgres


@dataclass
class S3:
    """moto's S3 server on a loopback port. moto keeps the buckets of every server it runs in this
    process, across restarts: each server has a bucket of its own."""

    port: int
    bucket: str
    server: object = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def keys(self, prefix: str = "") -> list[str]:
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.endpoint, **S3_CREDENTIALS)
        return [item["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
                for item in page.get("Contents", [])]


def start_s3() -> S3:
    """moto's S3 server with an empty bucket of its own (the artifacts' and the DVC remotes')."""
    import boto3

    s3 = S3(free_port(), f"mlflow-{secrets.token_hex(4)}")
    s3.start()
    boto3.client("s3", endpoint_url=s3.endpoint, **S3_CREDENTIALS).create_bucket(Bucket=s3.bucket)
    return s3


S3_CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}


@dataclass
class TeamServer:
    """`mlflow server` (basic-auth) on PostgreSQL with artifacts in S3, on a fixed loopback port,
    started as a team starts theirs: deploy/start_server.py, secrets in its environment only.
    `auth_config`: another auth config than deploy/basic_auth.ini (MLFLOW_AUTH_CONFIG_PATH)."""

    folder: Path  # the server's state folder: its user store and its log
    postgres: Postgres
    s3: S3
    port: int
    admin_password: str
    auth_config: Path | None = None
    artifacts_prefix: str = "artifacts"  # where in the S3 server's bucket the artifacts go
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(32))  # CSRF key of the auth app
    process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environment(self) -> dict[str, str]:
        """What the start script reads: the database, the bucket, the secrets, S3's endpoint."""
        return {"MLFLOW_BACKEND_STORE_URI": self.postgres.uri, "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{self.s3.bucket}/{self.artifacts_prefix}",
                "MLFLOW_AUTH_ADMIN_PASSWORD": self.admin_password, "MLFLOW_FLASK_SERVER_SECRET_KEY": self.secret_key,
                "MLFLOW_S3_ENDPOINT_URL": self.s3.endpoint,
                "AWS_ACCESS_KEY_ID": S3_CREDENTIALS["aws_access_key_id"],
                "AWS_SECRET_ACCESS_KEY": S3_CREDENTIALS["aws_secret_access_key"],
                "AWS_DEFAULT_REGION": S3_CREDENTIALS["region_name"]} | (
            {"MLFLOW_AUTH_CONFIG_PATH": str(self.auth_config)} if self.auth_config else {})

    def start(self) -> None:
        self.process, _ = launch([sys.executable, str(START_SCRIPT), "--state-dir", str(self.folder),
                                  "--host", "127.0.0.1", "--port", str(self.port)],
                                 self.folder, self.port, self.environment(),
                                 timeout_s=180)  # its workers import MLflow at once: ~60 s on 2 busy cores

    def stop(self) -> None:
        stop(self.process)


def auth_config_with(folder: Path, **settings: object) -> Path:
    """deploy/basic_auth.ini with some of its settings changed (each must be there), in `folder`."""
    text = AUTH_CONFIG.read_text()
    for key, value in settings.items():
        text, count = re.subn(rf"^{key} = .*$", f"{key} = {value}", text, flags=re.MULTILINE)
        assert count == 1, f"{AUTH_CONFIG} has no setting {key}"
    path = folder / "basic_auth.ini"
    path.write_text(text)
    return path


@contextmanager
def team_stack(folder: Path, **server_options) -> Iterator[TeamServer]:
    """PostgreSQL, S3 and the MLflow server in front of them, all stopped and removed afterwards.
    `server_options`: TeamServer's own (auth_config, artifacts_prefix)."""
    postgres = start_postgres()
    s3 = start_s3()
    server = TeamServer(folder, postgres, s3, free_port(), secrets.token_urlsafe(16), **server_options)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        s3.stop()
        with suppress(subprocess.CalledProcessError):  # a test may have left it stopped
            postgres.stop()
        shutil.rmtree(postgres.folder, ignore_errors=True)


def login(user: str, password: str) -> dict[str, str]:
    """A user's login as the stages read it: MLflow's own environment variables."""
    return {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}


def create_user(uri: str, admin_password: str, username: str) -> str:
    """A user of the server, with a fresh password (returned)."""
    from mlflow.server.auth.client import AuthServiceClient

    password = secrets.token_urlsafe(16)
    saved = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ |= {"MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": admin_password}
    try:
        AuthServiceClient(uri).create_user(username, password)
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    return password
