"""The thin shell each command runs in: `cli.arguments(__doc__, ...)` (a stage) or `cli.parser(__doc__)`
for its arguments, and around its work `with cli.one_line_errors():` for one clear line and an exit
code on failure."""

import argparse
import contextlib
import errno
import gc
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import PipelineError


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """A `PipelineError` (a user's mistake, a missing input) or a folder it cannot write (full,
    read-only, not its user's) becomes `error: <one line>` on stderr and its exit code; a bug
    keeps its traceback."""
    try:
        yield
        # The process ends next. Python's last garbage collections would walk every object
        # torch and MLflow made (~0.4 s, a sixth of a short stage); the OS frees them anyway.
        gc.freeze()
    except PipelineError as error:
        one_line = " ".join(str(error).splitlines())  # a value quoted in the message may hold newlines
        print(f"error: {one_line}", file=sys.stderr)
        sys.exit(error.exit_code)
    except OSError as error:
        if error.errno not in WAY_OUT:
            raise
        print(f"error: {unwritable(error)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


# What a user's machine does to a write (a full disk or quota, a read-only mount, another owner)
# and what the user can do about it.
WAY_OUT = {errno.ENOSPC: "free some space there", errno.EDQUOT: "free some space there",
           errno.EROFS: "make it writable", errno.EACCES: "make it writable"}


def unwritable(error: OSError) -> str:
    """`<folder>: <what is wrong> (writing <file>, <bytes> bytes); <way out>, then ...`, the folder
    relative to the repository where inside it, the file and bytes where known (fsio notes them)."""
    what = error.strerror[0].lower() + error.strerror[1:] if error.strerror else os.strerror(error.errno)
    rerun = f"{WAY_OUT[error.errno]}, then `dvc repro` resumes where this stopped"
    if not error.filename:
        return f"{what}; {rerun}"
    path = Path(os.fsdecode(error.filename))
    folder, file = (path, None) if path.is_dir() else (path.parent, path.name)
    if folder.absolute().is_relative_to(Path.cwd()):
        folder = folder.absolute().relative_to(Path.cwd())
    writing = ", ".join([*([f"writing {file}"] if file else []), *getattr(error, "__notes__", [])])
    return f"{folder}: {what}{f' ({writing})' if writing else ''}; {rerun}"


def parser(doc: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=doc.split("\n")[0])


def arguments(doc: str, *paths: str, **others: type) -> argparse.Namespace:
    """A stage's command line: a required `--<name>` for each of `paths` (a path) and of `others` (of its type)."""
    command = parser(doc)
    for name, kind in {**dict.fromkeys(paths, Path), **others}.items():
        command.add_argument(f"--{name}", type=kind, required=True)
    return command.parse_args()

