"""Atomic file writes: a reader sees the old file or the new one, never half of either. A failed
write raises an `OSError` naming the file, not the temporary one (a failed `write` names none),
with the bytes it needed where known; `pipeline.cli` turns it into one line."""

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from pipeline.errors import PipelineError


def atomic_write(path: Path, write: Callable[[IO[bytes]], None], size: int | None = None) -> None:
    """`write` fills a temporary file beside `path` that then replaces it; `size`: the bytes it
    writes, where known, for the error a full disk gives."""
    path.parent.mkdir(parents=True, exist_ok=True)  # its error names the folder it could not make
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        failed = OSError(error.errno, error.strerror, str(path))
        if size is not None:
            failed.add_note(f"{size:,} bytes")
        raise failed from error
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)  # a failed or interrupted write leaves the previous file as it was


def read_json(path: Path, way_out: str) -> dict:
    """A JSON file another stage wrote; missing or damaged, one line naming it and `way_out`."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise PipelineError(f"{path}: unreadable ({error}); {way_out}") from None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data), len(data))


def atomic_write_json(path: Path, value: object) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())
