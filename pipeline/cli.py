"""The thin shell every stage's `main` runs in: one clear line and an exit code on failure."""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.params import Params, load_params

PARAMS_FILE = Path("params.yaml")


def run(stage: Callable[[], object]) -> None:
    try:
        stage()
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


def run_with_params(stage: Callable[[Params], object], params_file: Path = PARAMS_FILE) -> None:
    """Validate params.yaml before the stage does any work."""
    run(lambda: stage(load_params(params_file)))


def run_variant_stage(stage: Callable[[Params, str, Path], object], description: str,
                      argv: list[str] | None = None) -> None:
    """`python -m pipeline.<stage> --variant NAME`: `stage(params, NAME, root)`, run in the project root (cwd)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--variant", required=True)
    variant = parser.parse_args(argv).variant
    run_with_params(lambda params: stage(params, variant, Path.cwd()))
