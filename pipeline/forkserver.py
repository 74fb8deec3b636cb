"""A process that has imported torch and MLflow once, and forks each stage `make repro` runs.

A published `make repro` ran four stage processes and three tracking processes, and ~14 s of
its ~31 s of CPU was imports: torch in each train stage (~2.7 s), MLflow in each tracking
process (~2.9 s), on two cores the train stages need. `pipeline.commands.repro` starts this
server before DVC and points the stages at it (`PIPELINE_FORKSERVER`, a Unix socket); a stage's
command hands itself to it (pipeline/handoff.py) before importing anything heavy, the server
forks, and the child becomes that stage (its streams, environment, arguments, `__main__`) with
the imports done.

The server only forks for a command that would import the same modules the same way: the same
interpreter, `sys.path`, working directory and environment, but for what DVC and the shell set
per stage (DVC_ROOT, DVC_STAGE, ...). Anything else, no server, or one that ends, and the
command runs itself, as `dvc repro` runs it: the same code either way, so the same outputs
(tests/test_forkserver.py holds them byte-identical).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import io
import json
import os
import runpy
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from pipeline.handoff import ADDRESS_VARIABLE, HEADER, OFF, STREAMS, Request
from pipeline.tracking.store import TELEMETRY_OFF

# What the train stages import, all of it before the first fork: importing MLflow after forking
# them (so that they start 2 s sooner) made `make repro` slower, 0.94x against 0.91x of the time
# without a server (docs/performance.md): their tracking processes imported it again. Figures:
# CPU on the 2-core AMD EPYC of family 25.
PRELOAD = (
    "torch",  # 2.7 s
    "mlflow", "mlflow.pytorch", "mlflow.store.tracking.sqlalchemy_store",  # 3.3 s
)
# What only the stages after the train stages import (compare's figures), imported once no
# command waits: the train stages start that much sooner. 5 alternating pairs of the published
# lab's chains and the rest, forced: 0.97 (0.87-1.00) of the wall time, the train stages forked
# at 2.1 s rather than 2.45 s (AMD EPYC family 26, 2026-12-04). Importing it only once a train
# stage has ended (on the core it leaves) measured the same: 0.99 (0.96-1.07), not kept.
PRELOAD_LATER = ("matplotlib.figure", "matplotlib.backends.backend_agg")  # 0.6 s
# Set per stage command by DVC (dvc/stage/run.py) or by the shell it runs the command in.
PER_STAGE = frozenset({"DVC_ROOT", "DVC_STAGE", "PWD", "OLDPWD", "SHLVL", "_"})


def refusal(request: Request, environ: dict[str, str]) -> str | None:
    """Why a child of this server would not import what the command would: None if it would."""
    if request.executable != sys.executable or request.path != sys.path:
        return "another interpreter or sys.path"
    if request.cwd != os.getcwd():
        return f"another working directory ({request.cwd})"
    differ = sorted(name for name in {*request.environ, *environ} - PER_STAGE
                    if request.environ.get(name) != environ.get(name))
    return f"another environment ({', '.join(differ)})" if differ else None


class Server:
    """Accepts commands on a Unix socket, forks each, and reports its exit status."""

    def __init__(self, address: str) -> None:
        self.environ = dict(os.environ)
        self.parent = os.getppid()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(address)
        self.listener.listen(16)  # commands that come while an import runs wait here
        self.children: dict[int, socket.socket] = {}  # pid: its command's connection
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.wakeup, self.wakeup_write = os.pipe()
        os.set_blocking(self.wakeup_write, False)
        self.selector.register(self.wakeup, selectors.EVENT_READ)
        signal.set_wakeup_fd(self.wakeup_write)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes select through the pipe
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    def serve(self) -> Request | None:
        """Imports PRELOAD, then forks each command that comes; returns its request in each child,
        None in the server when `pipeline.commands.repro` ends it or is gone."""
        try:
            _import(PRELOAD)
            later = list(PRELOAD_LATER)
            while os.getppid() == self.parent:
                if (request := self.handle(timeout=0 if later else 0.5)) is not None:
                    return request
                if later and not self.selector.select(timeout=0.05):  # no command waits, none comes
                    _import((later.pop(0),))
        except SystemExit:
            pass
        self.stop()
        return None

    def handle(self, timeout: float) -> Request | None:
        for key, _ in self.selector.select(timeout):
            if key.fileobj is self.listener:
                if (request := self.fork(*self.listener.accept())) is not None:
                    return request
            elif key.fileobj == self.wakeup:
                os.read(self.wakeup, 4096)
                self.reap()
            else:  # a command's connection closed: the command was killed, so is its child
                self.selector.unregister(key.fileobj)
                pid = next(pid for pid, connection in self.children.items() if connection is key.fileobj)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        return None

    def fork(self, connection: socket.socket, _address) -> Request | None:
        connection.settimeout(10)
        request, fds = None, []
        try:
            header, fds, _, _ = socket.recv_fds(connection, HEADER.size, len(STREAMS))
            request = Request(**json.loads(_read_exactly(connection, HEADER.unpack(header)[0])))
            reason = refusal(request, self.environ) if len(fds) == len(STREAMS) else "a closed standard stream"
        except (OSError, ValueError, TypeError) as error:
            reason = f"a bad request ({error})"
        if reason is None and (pid := os.fork()) == 0:
            self.become_child(fds)
            return request
        for fd in fds:  # the command's streams: the child's now, or the command's alone
            os.close(fd)
        if reason is not None:
            log(f"refused {request.module if request else 'a command'}: {reason}")
            _answer(connection, f"refused {reason}")
            connection.close()
            return None
        log(f"forked {pid}: {request.module} {' '.join(request.argv)}")
        _answer(connection, f"pid {pid}")
        self.children[pid] = connection  # its connection's end ends the child too (handle)
        self.selector.register(connection, selectors.EVENT_READ)
        return None

    def become_child(self, fds: list[int]) -> None:
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)
        self.selector.close()
        self.listener.close()
        for fd in (self.wakeup, self.wakeup_write):
            os.close(fd)
        for connection in self.children.values():
            connection.close()
        for target, fd in zip(STREAMS, fds):  # fds: new numbers, above the server's own 0-2
            os.dup2(fd, target)
            os.close(fd)

    def reap(self) -> None:
        while self.children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return
            connection = self.children.pop(pid)
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(connection)
            _answer(connection, f"exit {os.waitstatus_to_exitcode(status)}")
            connection.close()

    def stop(self) -> None:
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        while self.children:
            time.sleep(0.05)
            self.reap()


def _import(modules: tuple[str, ...]) -> None:
    """The modules imported with Python's cyclic collector paused, then their objects frozen out of
    later collections (pipeline/tracking/process.py's `_collector_off`, for the same reasons)."""
    gc.disable()
    try:
        for name in modules:
            importlib.import_module(name)
    finally:
        gc.freeze()
        gc.enable()


def _answer(connection: socket.socket, line: str) -> None:
    with contextlib.suppress(OSError):  # the command may be gone
        connection.sendall(f"{line}\n".encode())


def _read_exactly(connection: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            raise ValueError("the command closed its connection")
        data += chunk
    return data


def log(line: str) -> None:
    print(f"forkserver: {line}", file=sys.stderr, flush=True)


def become(request: Request) -> None:
    """In the child: the stage command the request describes, run as `python -m` would."""
    os.chdir(request.cwd)
    os.environ.clear()
    os.environ.update(request.environ)
    sys.path[:] = request.path
    for name in [name for name in sys.modules if name == "pipeline" or name.startswith("pipeline.")]:
        del sys.modules[name]  # the stage's own code, as it is on disk now
    sys.stdin, sys.stdout, sys.stderr = _streams(request.environ)
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
    sys.argv = [request.module, *request.argv]
    runpy.run_module(request.module, run_name="__main__", alter_sys=True)


def _streams(environ: dict[str, str]) -> tuple:
    """Standard streams on the command's file descriptors, made as Python makes them at start."""
    encoding, errors = sys.stdout.encoding, sys.stdout.errors
    unbuffered = bool(environ.get("PYTHONUNBUFFERED"))
    stdin = io.TextIOWrapper(io.open(0, "rb", closefd=False), encoding=encoding, errors=errors)
    stdout = io.TextIOWrapper(io.open(1, "wb", buffering=0 if unbuffered else -1, closefd=False),
                              encoding=encoding, errors=errors, line_buffering=os.isatty(1),
                              write_through=unbuffered)
    stderr = io.TextIOWrapper(io.open(2, "wb", buffering=0 if unbuffered else -1, closefd=False),
                              encoding=encoding, errors="backslashreplace", line_buffering=True,
                              write_through=unbuffered)
    return stdin, stdout, stderr


@contextlib.contextmanager
def running(log_to: Path | None = None) -> Iterator[None]:
    """A server for the stages that the `dvc` commands run in this block start: its address in
    `PIPELINE_FORKSERVER` while the block runs, its log in `log_to`; the server ends with the
    block. `PIPELINE_FORKSERVER=0`: no server, each stage imports for itself."""
    if os.environ.get(ADDRESS_VARIABLE) == OFF:
        yield
        return
    os.environ.setdefault(*TELEMETRY_OFF)  # the server imports MLflow, for stages that would set it first
    if log_to is not None:
        log_to.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="forkserver-") as folder, open(log_to or os.devnull, "w") as log_file:
        address = Path(folder) / "socket"
        server = subprocess.Popen([sys.executable, "-m", "pipeline.forkserver", str(address)],
                                  stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                                  start_new_session=True)  # Ctrl-C reaches the stages through their commands
        _wait_for(address, server)
        os.environ[ADDRESS_VARIABLE] = str(address)
        try:
            yield
        finally:
            del os.environ[ADDRESS_VARIABLE]
            server.terminate()
            server.wait()


def _wait_for(address: Path, server: subprocess.Popen, timeout_s: float = 10) -> None:
    """Until the server listens (it binds before it imports, ~0.1 s after its start): a command that
    connects after that waits for it; one that came sooner would run itself."""
    deadline = time.monotonic() + timeout_s
    while not address.exists() and server.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)


def main(address: str) -> None:
    """Serve, and end without tearing down what PRELOAD made, a stage or the server alike: the
    server's own end was 0.26 s of `make repro`'s wall time, which waits for it."""
    request = Server(address).serve()
    _exit(0 if request is None else exit_status(become, request))


def exit_status(run, *args) -> int:
    """`run(*args)` in a forked child, and the exit status the interpreter would give it: what it
    returns or SystemExit's argument, or 1 after the traceback Python would print."""
    try:
        return _exit_code(run(*args))
    except SystemExit as exit:
        return _exit_code(exit.code)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        return 1


def _exit_code(code) -> int:
    """SystemExit's argument as the interpreter's exit status."""
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1


def _exit(code: int) -> None:
    """The end of a stage's interpreter without the teardown of every module torch and MLflow
    made: 0.45 s a stage here, against 0.06 s for what follows, which is how multiprocessing ends
    its forked children (threads joined, their exit hooks, std streams flushed), plus the atexit
    functions a process of its own would run."""
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    main(sys.argv[1])
