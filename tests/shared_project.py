"""One tiny reproduced project for the test modules that only need *a* reproduced project.

A tiny `dvc repro` costs about a minute (seven stage processes, each importing torch and
MLflow), so test_queue, test_registry, test_remote and test_ui share one per pytest process:
each module's fixture calls `reproduced_project`. The repro is committed (dvc.lock and all),
as a team would have it. Modules may add to it (experiments, registry versions, a remote, a
commit) but never undo what the others rely on: the committed repro and its MLflow runs.
"""

from pathlib import Path

from tests.conftest import make_project, repro_pipeline, run

_SHARED: dict[str, object] = {}


def reproduced_project(tmp_path_factory, mirror: Path) -> tuple[Path, dict[str, str]]:
    """(path, env) of the shared project: tracking into `<path>/mlflow.db`, repro committed."""
    if "error" in _SHARED:
        raise _SHARED["error"]
    if "project" not in _SHARED:
        try:
            path, env = make_project(tmp_path_factory.mktemp("shared") / "project", mirror)
            env = env | {"DVC_NO_ANALYTICS": "1"}  # no analytics process per dvc command
            repro_pipeline(path, env, timeout=480)
            run(["git", "add", "-A"], path, env)
            run(["git", "commit", "-qm", "tiny repro"], path, env)
        except Exception as error:  # one failed repro, not one per module
            _SHARED["error"] = error
            raise
        _SHARED["project"] = (path, env)
    return _SHARED["project"]
