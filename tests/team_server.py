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
from dataclasses import dataclass
from pathlib import Path

from tests.mlflow_server import free_port, start_server

BUCKET = "mlflow"
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

    def stop(self) -> None:
        as_postgres([postgres_bin("pg_ctl"), "-D", str(self.folder / "data"), "-m", "fast", "stop"])
        shutil.rmtree(self.folder, ignore_errors=True)


def start_postgres() -> Postgres:
    """A PostgreSQL cluster with database `mlflow` owned by user `mlflow`, on a loopback port."""
    folder = Path(tempfile.mkdtemp(prefix="pg-"))  # pytest's folders are not the postgres user's to enter
    password, port = secrets.token_urlsafe(16), free_port()
    shutil.chown(folder, "postgres", "postgres")
    secret = folder / "pwfile"
    secret.write_text(password + "\n")
    shutil.chown(secret, "postgres", "postgres")
    try:
        as_postgres([postgres_bin("initdb"), "-D", str(folder / "data"), "-U", "mlflow", f"--pwfile={secret}",
                     "--auth=scram-sha-256", "--no-sync"])
    finally:
        secret.unlink()
    as_postgres([postgres_bin("pg_ctl"), "-D", str(folder / "data"), "-l", str(folder / "log"), "-w", "-o",
                 f"-p {port} -h 127.0.0.1 -k {folder} -c fsync=off", "start"])
    as_postgres([postgres_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow"],
                env=os.environ | {"PGPASSWORD": password})
    return Postgres(folder, port, password)


def start_s3():
    """moto's S3 server on a loopback port, with the artifacts bucket; (server, endpoint url)."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, **S3_CREDENTIALS).create_bucket(Bucket=BUCKET)
    return server, endpoint


S3_CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}


def s3_keys(endpoint: str) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, **S3_CREDENTIALS)
    return [item["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for item in page.get("Contents", [])]


def start_team_server(folder: Path, postgres: Postgres, s3_endpoint: str):
    """`mlflow server` (basic-auth) on PostgreSQL with artifacts in S3; (process, uri, admin password)."""
    admin_password = secrets.token_urlsafe(16)
    config = folder / "basic_auth.ini"
    config.write_text("[mlflow]\ndefault_permission = READ\n"
                      f"database_uri = sqlite:///{folder / 'basic_auth.db'}\n"
                      f"admin_username = {ADMIN}\nadmin_password = {admin_password}\n"
                      "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(32),  # CSRF protection of the auth app
           "AWS_ACCESS_KEY_ID": S3_CREDENTIALS["aws_access_key_id"],
           "AWS_SECRET_ACCESS_KEY": S3_CREDENTIALS["aws_secret_access_key"],
           "AWS_DEFAULT_REGION": S3_CREDENTIALS["region_name"]}
    try:
        process, uri = start_server(folder, postgres.uri, "--app-name", "basic-auth", "--serve-artifacts",
                                    "--artifacts-destination", f"s3://{BUCKET}/artifacts", env=env)
    finally:
        config.unlink()  # read at start; the admin password lives on in this process only
    return process, uri, admin_password


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
