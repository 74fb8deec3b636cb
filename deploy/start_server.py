"""Start the team's MLflow tracking server: basic-auth logins, runs in a database, artifacts in
an object store, configured by the files of this folder and by the environment.

    export MLFLOW_BACKEND_STORE_URI=postgresql+psycopg2://mlflow:PASSWORD@db.example:5432/mlflow
    export MLFLOW_ARTIFACTS_DESTINATION=s3://team-bucket/mlflow
    export MLFLOW_FLASK_SERVER_SECRET_KEY=...   # the auth app's CSRF key: any long random string
    export MLFLOW_AUTH_ADMIN_PASSWORD=...        # the first start only: it creates user `admin`
    export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... [MLFLOW_S3_ENDPOINT_URL=http://minio:9000]
    python deploy/start_server.py --state-dir /srv/mlflow --host 0.0.0.0 --port 5000 \
        --allowed-hosts mlflow.example:5000

Every secret comes from the environment, none from a file of the repository, and none goes on
the command line (other users of the machine can read that): MLflow's server reads the database
URI from MLFLOW_BACKEND_STORE_URI. The auth config is deploy/basic_auth.ini (or the file
MLFLOW_AUTH_CONFIG_PATH names); its users live in `basic_auth.db` in `--state-dir`, where the
server runs. Arguments after `--state-dir` go to `mlflow server` as they are.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

AUTH_CONFIG = Path(__file__).resolve().parent / "basic_auth.ini"
# Worker processes. With the credential cache on, a request is mostly MLflow's own Python
# (serialising, SQLAlchemy) while PostgreSQL and S3 answer in between: a few workers a core keep
# the cores busy. Each costs ~250 MB. MLFLOW_WORKERS (MLflow's own variable) overrides it.
WORKERS = 4
REQUIRED = {
    "MLFLOW_BACKEND_STORE_URI": "the runs' database, e.g. postgresql+psycopg2://user:password@host:5432/mlflow",
    "MLFLOW_ARTIFACTS_DESTINATION": "where the server keeps artifacts, e.g. s3://bucket/prefix",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "the auth app's CSRF key, the same across restarts and workers",
}


def server_environment(environ: dict[str, str], state_dir: Path) -> dict[str, str]:
    """The server's environment: the caller's, with this deployment's defaults where it sets none.

    Raises SystemExit with one line naming what is missing.
    """
    for name, what in REQUIRED.items():
        if not environ.get(name):
            raise SystemExit(f"error: {name} is not set: {what}")
    if not (state_dir / "basic_auth.db").exists() and not environ.get("MLFLOW_AUTH_ADMIN_PASSWORD"):
        raise SystemExit(f"error: MLFLOW_AUTH_ADMIN_PASSWORD is not set: {state_dir} has no user store yet, "
                         "and its first start creates the admin with that password")
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(AUTH_CONFIG),
        "MLFLOW_WORKERS": str(WORKERS),
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # GenAI jobs: this project runs none
        "MLFLOW_DISABLE_TELEMETRY": "true",  # no usage reports to MLflow's makers (pipeline/tracking/store.py)
    } | environ


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", type=Path, required=True, help="where the server runs and keeps its users")
    args, forwarded = parser.parse_known_args(argv)
    state_dir = args.state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    env = server_environment(dict(os.environ), state_dir)
    config = Path(env["MLFLOW_AUTH_CONFIG_PATH"])
    if not config.is_file():
        raise SystemExit(f"error: MLFLOW_AUTH_CONFIG_PATH: {config} is not a file")
    os.chdir(state_dir)
    command = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--serve-artifacts", *forwarded]
    os.execve(sys.executable, command, env)  # the server takes this process's place: signals reach it


if __name__ == "__main__":
    main(sys.argv[1:])
