"""The thin shell each command runs its work in: one clear line and an exit code on failure.

    if __name__ == "__main__":
        variant = cli.variant_argument(__doc__)
        with cli.one_line_errors():
            train(load_params(), variant, Path.cwd())
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


def variant_argument(doc: str) -> str:
    """The NAME of `python -m pipeline.stages.<stage> --variant NAME`."""
    variant_parser = parser(doc)
    variant_parser.add_argument("--variant", required=True)
    return variant_parser.parse_args().variant
