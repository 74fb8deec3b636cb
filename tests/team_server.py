"""A team's tracking stack on loopback, as the tests start it: PostgreSQL, S3 (moto), `mlflow server`.

PostgreSQL is Debian's: a throwaway cluster in a temporary folder, run as the `postgres` system
user (initdb and pg_ctl refuse root). S3 is moto's server speaking the S3 HTTP API; the MLflow
server reaches it through `MLFLOW_S3_ENDPOINT_URL`, exactly as it would reach MinIO or AWS.
MLflow runs with `--app-name basic-auth` and `--serve-artifacts`: clients need a login, no S3 keys.
Passwords are drawn per run and live in environment variables only.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from tests.mlflow_server import free_port, start_server, stop

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
    """`mlflow server` (basic-auth) on PostgreSQL with artifacts in S3, on a fixed loopback port."""

    folder: Path
    postgres: Postgres
    s3: S3
    port: int
    admin_password: str
    process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        config = self.folder / "basic_auth.ini"
        config.write_text("[mlflow]\ndefault_permission = READ\n"
                          f"database_uri = sqlite:///{self.folder / 'basic_auth.db'}\n"
                          f"admin_username = {ADMIN}\nadmin_password = {self.admin_password}\n"
                          "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        env = {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_S3_ENDPOINT_URL": self.s3.endpoint,
               "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(32),  # CSRF protection of the auth app
               "AWS_ACCESS_KEY_ID": S3_CREDENTIALS["aws_access_key_id"],
               "AWS_SECRET_ACCESS_KEY": S3_CREDENTIALS["aws_secret_access_key"],
               "AWS_DEFAULT_REGION": S3_CREDENTIALS["region_name"]}
        try:
            self.process, _ = start_server(self.folder, self.postgres.uri, "--app-name", "basic-auth", "--serve-artifacts",
                                           "--artifacts-destination", f"s3://{self.s3.bucket}/artifacts",
                                           env=env, port=self.port)
        finally:
            config.unlink()  # read at start; the admin password lives on in this process only

    def stop(self) -> None:
        stop(self.process)


@contextmanager
def team_stack(folder: Path) -> Iterator[TeamServer]:
    """PostgreSQL, S3 and the MLflow server in front of them, all stopped and removed afterwards."""
    postgres = start_postgres()
    s3 = start_s3()
    server = TeamServer(folder, postgres, s3, free_port(), secrets.token_urlsafe(16))
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
