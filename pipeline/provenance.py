"""What a stage's outputs are a function of: its code, its environment, its inputs.

- `import_closure`: the `pipeline/` files a stage module imports at any depth, function-level
  imports too: `dvc.yaml`'s code deps (tests/test_provenance.py holds the two equal).
- `environment`: Python's version and every distribution the stages' code can import (and what
  they require), as `requirements.lock` pins them: the check stage's `environment.json`, on which
  every computing stage depends (a new torch or numpy reruns them, a new pytest does not).
- `inputs_digest`: a variant's config, data, environment and code in one fingerprint, which tags
  its MLflow runs: compare finds them without run ids (new on every run) in DVC's outputs.
"""

import ast
import functools
import hashlib
import json
import re
import sys
from importlib import metadata
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.fsio import read_json

PACKAGE = "pipeline"
PACKAGE_DIR = Path(__file__).resolve().parent
STAGES = ("check", "download", "prepare", "train", "curves", "evaluate", "compare")  # dvc.yaml's stages
# MLflow records what the stages compute: no DVC output depends on its version (or its ~100
# requirements), so upgrading it reruns nothing.
RECORDERS = {"mlflow"}
LOCK_FILE = "requirements.lock"
# What `make env GPU=1` adds (triton, torch.compile's, which no stage calls) changes no number:
# the record leaves it out, so CPU and GPU set-ups share environment.json (and the run-cache);
# installed, it must still be the version pinned there.
GPU_LOCK_FILE = "requirements-gpu.lock"
ENVIRONMENT_FILE = "environment.json"  # the check stage's output, at the repository root


# The check stage walks seven stages' closures, which share most files: parsed once, 105 -> 52 ms.
@functools.cache
def _imported_names(path: Path) -> frozenset[str]:
    """Every module name an `import` statement in the file names, at any depth."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pipeline import x`
    return frozenset(names)


def stage_module(stage: str) -> str:
    return f"{PACKAGE}.stages.{stage}"


def import_closure(module: str) -> list[Path]:
    """The package files `module` (e.g. `pipeline.stages.train`) runs, `__init__`s included."""
    files, pending = set(), [module]
    while pending:
        name = pending.pop()
        package, *parts = name.split(".")
        if package != PACKAGE:
            continue
        if parts:
            pending.append(name.rpartition(".")[0])  # importing `a.b` runs `a/__init__.py` first
        base = PACKAGE_DIR.joinpath(*parts)
        candidates = [base.with_suffix(".py"), base / "__init__.py"] if parts else [base / "__init__.py"]
        path = next((path for path in candidates if path.is_file()), None)
        if path is not None and path not in files:
            files.add(path)
            pending.extend(_imported_names(path))
    return sorted(files)


def third_party_imports(files: list[Path]) -> set[str]:
    """Top-level names of the modules outside the standard library and this package."""
    tops = {name.split(".")[0] for path in files for name in _imported_names(path)}
    return {top for top in tops if top != PACKAGE and top not in sys.stdlib_module_names}


def stage_distributions() -> set[str]:
    """The installed distributions whose code the stages can run, recorders left out, and
    transitively those they require (extras left out)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    modules = third_party_imports([path for stage in STAGES for path in import_closure(stage_module(stage))])
    providers = metadata.packages_distributions()
    found, pending = set(), [dist for module in modules - RECORDERS for dist in providers.get(module, [module])]
    while pending:
        name = canonicalize_name(pending.pop())
        if name in found:
            continue
        try:
            requirements = map(Requirement, metadata.requires(name) or [])
        except metadata.PackageNotFoundError:
            continue  # an optional requirement that is not installed
        found.add(name)
        pending += [req.name for req in requirements if req.marker is None or req.marker.evaluate({"extra": ""})]
    return found


def read_lock(path: Path) -> tuple[str | None, dict[str, str]]:
    """(the Python `major.minor` it was compiled for, {canonical name: pinned version})."""
    from packaging.utils import canonicalize_name

    try:
        text = path.read_text()
    except OSError as error:
        raise PipelineError(f"{path}: cannot read ({error.strerror}); the lock file pins the environment")
    python = re.search(r"autogenerated by pip-compile with Python (\d+\.\d+)", text)
    pins = dict(re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s\\;]+)", text, re.MULTILINE))
    return (python.group(1) if python else None), {canonicalize_name(name): version for name, version in pins.items()}


def environment(lock_path: Path) -> dict:
    """The versions that can change the stages' numbers, as installed; one line if they are
    not what the lock file pins (then the record would not be a function of the lock)."""
    locked_python, pins = read_lock(lock_path)
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    if locked_python and locked_python != python:
        raise PipelineError(f"{lock_path}: compiled for Python {locked_python}, running {python}; "
                            "recreate the environment (make env)")
    gpu_lock = lock_path.with_name(GPU_LOCK_FILE)
    optional = read_lock(gpu_lock)[1] if gpu_lock.exists() else {}
    packages = {}
    for name in sorted(stage_distributions()):
        installed = metadata.version(name)
        if name in optional:
            if optional[name] != installed:
                raise PipelineError(f"{gpu_lock}: {name} {installed} is installed but the lock pins {optional[name]}; "
                                    "recreate the environment (make env GPU=1)")
            continue
        if pins.get(name) != installed:
            pinned = f"pins {pins[name]}" if name in pins else "does not pin it"
            raise PipelineError(f"{lock_path}: {name} {installed} is installed but the lock {pinned}; "
                                "recreate the environment (make env) or update the lock (make lock)")
        packages[name] = installed
    return {"python": python, "packages": packages}


def read_environment(root: Path) -> dict:
    return read_json(root / ENVIRONMENT_FILE, "run the check stage (dvc repro check)")


def inputs_digest(config: dict, data_digest: str, environment_record: dict, stage: str) -> str:
    code = {str(path.relative_to(PACKAGE_DIR.parent)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in import_closure(stage_module(stage))}
    blob = json.dumps({"config": config, "data": data_digest, "environment": environment_record, "code": code},
                      sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:32]
