"""A real `mlflow server` on a free loopback port, for the tests (started, waited for, stopped)."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

MLFLOW = str(Path(sys.executable).parent / "mlflow")


def free_port() -> int:
    """A loopback port nobody listens on (once the probe socket is closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_healthy(uri: str, process: subprocess.Popen, log: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise AssertionError(f"mlflow server exited {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"mlflow server not healthy after {timeout_s}s:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's whole process group (its workers too), then SIGKILL."""
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)


def start_server(folder: Path, backend_store_uri: str, *extra: str, env: dict[str, str] | None = None,
                 port: int | None = None):
    """`mlflow server` on a loopback port (a free one by default); returns (process, uri) once /health answers."""
    port = port or free_port()
    return launch([MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                   "--backend-store-uri", backend_store_uri, *extra], folder, port, env)


def launch(command: list[str], folder: Path, port: int, env: dict[str, str] | None = None, timeout_s: float = 60):
    """A server `command` listening on `port`, its output in `folder`; (process, uri) once /health answers."""
    log = folder / f"server-{port}.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            command, cwd=folder, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            # No background job runner (GenAI jobs: several worker processes) on 2 shared cores,
            # and no usage telemetry.
            env=os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
            | (env or {}),
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(uri, process, log, timeout_s)
    except BaseException:
        stop(process)
        raise
    return process, uri
