"""The thin shell each command runs its work in: one clear line and an exit code on failure.

    if __name__ == "__main__":
        parser = cli.parser(__doc__)
        parser.add_argument("--out", type=Path, required=True)
        arguments = parser.parse_args()
        with cli.one_line_errors():
            compare(load_params(), arguments.out, ...)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
from collections.abc import Iterator

from pipeline.errors import PipelineError


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """A `PipelineError` (a user's mistake, a missing input) becomes `error: <one line>` on stderr
    and its exit code; a bug keeps its traceback."""
    try:
        yield
        # The process ends next. Python's last garbage collections would walk every object
        # torch and MLflow made (~0.4 s, a sixth of a short stage); the OS frees them anyway.
        gc.freeze()
    except PipelineError as error:
        one_line = " ".join(str(error).splitlines())  # a value quoted in the message may hold newlines
        print(f"error: {one_line}", file=sys.stderr)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


def parser(doc: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=doc.split("\n")[0])

