"""A real Dask cluster on loopback, as the tests start it: `dask scheduler` and `dask worker`
processes (each worker with its nanny, one thread, a folder of its own), stopped afterwards."""

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DASK = str(Path(sys.executable).parent / "dask")


@dataclass
class Cluster:
    folder: Path
    env: dict[str, str]
    scheduler: subprocess.Popen | None = None
    workers: list[subprocess.Popen] = field(default_factory=list)

    @property
    def scheduler_file(self) -> Path:
        return self.folder / "scheduler.json"

    @property
    def address(self) -> str:
        import json

        return json.loads(self.scheduler_file.read_text())["address"]

    def _start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "w")
        return subprocess.Popen([DASK, *args], cwd=self.folder, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: a worker dies whole

    def start(self, workers: int) -> None:
        self.scheduler = self._start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", "0",
                                     "--no-dashboard", "--scheduler-file", str(self.scheduler_file))
        deadline = time.monotonic() + 60
        while not self.scheduler_file.exists():
            assert time.monotonic() < deadline and self.scheduler.poll() is None, "no Dask scheduler"
            time.sleep(0.2)
        for n in range(workers):
            self.add_worker(f"worker{n}")
        from distributed import Client

        with Client(self.address, timeout=60) as client:
            client.wait_for_workers(workers, timeout=120)

    def add_worker(self, name: str) -> None:
        (self.folder / name).mkdir(exist_ok=True)
        self.workers.append(self._start(name, "worker", "--scheduler-file", str(self.scheduler_file),
                                        "--name", name, "--nthreads", "1", "--nworkers", "1", "--no-dashboard",
                                        "--host", "127.0.0.1", "--local-directory", str(self.folder / name)))

    def kill(self, worker: subprocess.Popen) -> None:
        """The worker, its nanny and whatever its task started: a machine gone."""
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)

    def stop(self) -> None:
        for process in [*self.workers, self.scheduler]:
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
