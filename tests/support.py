"""What the tests and the benchmarks share: running a command with a time limit, the environment a
project's commands run with, and a copy of the project (this tree's or a git revision's) in a
fresh git + DVC repository. No pytest here: the benchmarks (`python -m benchmarks.bench_x`) import
it too. A real `mlflow server` is tests/mlflow_server.py's, for both alike."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_MNIST = ROOT.parent / "shared" / "data" / "mnist"
# What a copy of the project holds besides data: the code, the pipeline, its settings, the lock of
# the environment the check stage reads (the GPU part too), and DVC's config (analytics off, the
# offline plots page) and its templates.
PROJECT_FILES = ("pipeline", "dvc.yaml", "params.yaml", "dvc.lock", ".gitignore", "requirements.lock",
                 "requirements-gpu.lock", ".dvc/config", ".dvc/plots", ".dvc/html")


class CommandFailed(AssertionError):
    """A command that exited non-zero: its line, exit code and output. An AssertionError, so a
    test that runs one fails as an assertion does."""


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 600, check: bool = True):
    """`cmd` in `cwd`, its output captured, killed after `timeout` seconds (TimeoutExpired)."""
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise CommandFailed(f"{' '.join(map(str, cmd))} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def stage_env(mirror: Path | str | None = None, **extra: str) -> dict[str, str]:
    """The environment a real `dvc repro` of a project copy runs with: this venv's tools first,
    MNIST from `mirror` (a folder of the four `.gz` files), no tracking URI of the caller's."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # This tree's pipeline/, not the one installed in the environment (which may be another
    # checkout's); a project's own copy still comes first, `python -m` puts the cwd before it.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["DVC_NO_ANALYTICS"] = "1"
    if mirror is not None:
        env["MNIST_MIRROR"] = str(mirror)
        env["MNIST_CHECKSUMS"] = str(Path(mirror) / "SHA256SUMS.decompressed")
    env["GIT_AUTHOR_NAME"] = env["GIT_COMMITTER_NAME"] = "tests"
    env["GIT_AUTHOR_EMAIL"] = env["GIT_COMMITTER_EMAIL"] = "tests@example.invalid"
    return env | extra


def stage_command(stage: str, variant: str = "", project: Path = ROOT) -> list[str]:
    """`project`'s dvc.yaml command of `stage` (`train@<variant>`'s for a variant), with this Python:
    the paths a test runs a stage with are the ones dvc.yaml names."""
    import shlex

    import yaml

    definition = yaml.safe_load((project / "dvc.yaml").read_text())["stages"][stage]
    _, *args = shlex.split(definition.get("do", definition)["cmd"].replace("${key}", variant))  # _: "python"
    return [sys.executable, *args]


def copy_project(path: Path, env: dict[str, str], source: Path = ROOT, params: dict | None = None,
                 lock: bool = False) -> Path:
    """A copy of the project at `source` (a tree holding PROJECT_FILES) in `path`, a fresh git + DVC
    repository with it committed; `params` (a dict) written as its params.yaml where given, and
    `source`'s dvc.lock copied only with `lock`."""
    import yaml

    skip = {"params.yaml"} if params is not None else set()
    skip |= set() if lock else {"dvc.lock"}
    path.mkdir(parents=True, exist_ok=True)
    run(["git", "init", "-q", "-b", "main"], path, env)
    run(["dvc", "init", "-q"], path, env)
    for name in PROJECT_FILES:  # .dvc/config after `dvc init`, which writes its own
        if name in skip or not (source / name).exists():  # dvc.lock: none before a first repro
            continue
        if (source / name).is_dir():
            shutil.copytree(source / name, path / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source / name, path / name)
    if params is not None:
        (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "add", "-A"], path, env)
    run(["git", "commit", "-qm", "init"], path, env)
    return path


def revision_tree(revision: str, folder: Path) -> Path:
    """PROJECT_FILES as they are at git `revision` of this repository, in `folder` (`git archive`:
    nothing of the repository's own worktrees or refs changes)."""
    listed = run(["git", "ls-tree", "--name-only", revision, *PROJECT_FILES], ROOT, dict(os.environ)).stdout.split()
    archive = subprocess.run(["git", "archive", revision, *listed], cwd=ROOT, capture_output=True, check=True,
                             timeout=120).stdout
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True, timeout=120)
    return folder
