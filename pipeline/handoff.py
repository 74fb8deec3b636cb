"""A stage's side of the fork server (pipeline/forkserver.py): its command handed to the server.

`pipeline/stages/__init__.py` calls `hand_off` before a stage imports anything heavy: where
`PIPELINE_FORKSERVER` names a server's socket, the command sends its arguments, environment and
standard streams there and waits; the server forks, the child becomes the stage, and its exit
status becomes the command's. Signals the command is sent (Ctrl-C, DVC's SIGTERM) go to the
child. No server, or one that refuses or ends: `hand_off` returns and the command runs itself.
Only the standard library here, so a stage that runs itself pays nothing for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import sys
from dataclasses import dataclass

ADDRESS_VARIABLE = "PIPELINE_FORKSERVER"
OFF = "0"
STREAMS = (0, 1, 2)
HEADER = struct.Struct("!I")  # the request's length


@dataclass(frozen=True)
class Request:
    """A stage command as the server receives it: enough to become it."""

    module: str
    argv: list[str]
    cwd: str
    environ: dict[str, str]
    path: list[str]
    executable: str


def stage_module() -> str | None:
    """`pipeline.stages.<stage>` when this process is a stage's command (`python -m` of it)."""
    argv = getattr(sys, "orig_argv", [])
    if len(argv) >= 3 and argv[1] == "-m" and argv[2].startswith("pipeline.stages."):
        return argv[2]
    return None


def hand_off() -> None:
    """Run this stage command in a child of the server, if one is there and takes it, and exit
    with its status; otherwise return, and the command runs here."""
    address, module = os.environ.get(ADDRESS_VARIABLE), stage_module()
    if not address or address == OFF or module is None:
        return
    environ = {name: value for name, value in os.environ.items() if name != ADDRESS_VARIABLE}
    request = Request(module, sys.argv[1:], os.getcwd(), environ, sys.path, sys.executable)
    signals = Signals()  # Ctrl-C while the server is still importing reaches the stage too
    try:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.connect(address)
        payload = json.dumps(request.__dict__).encode()
        socket.send_fds(connection, [HEADER.pack(len(payload))], [fd for fd in STREAMS if _is_open(fd)])
        connection.sendall(payload)
        replies = connection.makefile("r")
        answer = replies.readline().split()
    except OSError:
        answer = []  # no server (it ended, or never started)
    if len(answer) != 2 or answer[0] != "pid":  # or it refused: the reason is in its log
        signals.restore()
        return  # the command runs here
    signals.forward_to(int(answer[1]))
    sys.exit(_exit_status(replies.readline().split(), signals))


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


class Signals:
    """What a stage's command is sent (Ctrl-C, SIGTERM from DVC, a hang-up), passed on to the child
    that runs the stage: held until the child is there, then sent to it."""

    FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.pid: int | None = None
        self.pending: list[int] = []
        self.previous = {signum: signal.signal(signum, self.receive) for signum in self.FORWARDED}

    def receive(self, signum, frame) -> None:
        if self.pid is None:
            self.pending.append(signum)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def forward_to(self, pid: int) -> None:
        self.pid = pid
        for signum in self.pending:
            self.receive(signum, None)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        for signum in self.pending:  # as if they had come now
            signal.raise_signal(signum)


def _exit_status(line: list[str], signals: Signals) -> int:
    """The command's exit status: the child's, as DVC would see the stage's own process end."""
    if len(line) != 2 or line[0] != "exit":
        signals.receive(signal.SIGTERM, None)
        print("error: the fork server ended before the stage did (pipeline/forkserver.py)", file=sys.stderr)
        return 1
    code = int(line[1])
    if code < 0:  # the child was killed by a signal: so is this command
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code
