"""The check stage through real DVC: a bad params.yaml changes nothing; the environment decides reruns."""

import hashlib
import re
from pathlib import Path

import pytest

from tests.conftest import run
from tests.shared_project import reproduced_project

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_mirror):
    """The shared reproduced project; each test leaves params.yaml and the lock as it found them."""
    path, env = reproduced_project(tmp_path_factory, tiny_mirror[0])
    yield path, env
    run(["git", "checkout", "params.yaml", "requirements.lock"], path, env)
    run(["dvc", "repro"], path, env)  # environment.json back from the run-cache


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def stages_named(status: str) -> set[str]:
    return set(re.findall(r"^(\S+):$", status, re.MULTILINE))


TYPOS = {  # name: (edit of params.yaml as (old, new), how the one error line starts)
    "key-inside-a-variant": (("  no_norm:\n", "  no_norm:\n    learning_rate: 0.005\n"),
                             "error: params.yaml: variants.no_norm.learning_rate: unknown key"),
    "top-level-key": (("seeds:", "learning_rate: 0.1\nseeds:"), "error: params.yaml: learning_rate: unknown key"),
    # DVC reads params.yaml itself first and refuses a duplicate key before any stage runs.
    "duplicate-key": (("  epochs: 2\n", "  epochs: 2\n  epochs: 3\n"),
                      "ERROR: unable to read: 'params.yaml', YAML file structure is corrupted"),
    "infinite-lr": (("  lr: 0.01\n", "  lr: .inf\n"), "error: params.yaml: train.lr: Input should be a finite number"),
    "yes-as-epochs": (("  epochs: 2\n", "  epochs: yes\n"),
                      "error: params.yaml: train.epochs: Input should be a valid integer"),
    "repeated-seed": (("seeds:\n- 0\n- 1\n", "seeds:\n- 0\n- 0\n"), "error: params.yaml: seeds: seeds must be distinct"),
    "reserved-alias": (("  alias: champion\n", "  alias: latest\n"),
                       "error: params.yaml: compare.alias: 'latest' is reserved"),
    "model-too-big": (("  - 32\n  - 32\n", "  - 65536\n  - 65536\n  - 65536\n"),
                      "error: params.yaml: variants.batchnorm: needs about"),
}


@pytest.mark.parametrize("edit, message", TYPOS.values(), ids=TYPOS)
def test_bad_params_stop_dvc_repro_before_any_output_changes(project, edit, message):
    path, env = project
    before = tree_digest(path / "data")
    params = path / "params.yaml"
    original = params.read_text()
    assert edit[0] in original
    params.write_text(original.replace(edit[0], edit[1], 1))
    try:
        result = run(["dvc", "repro"], path, env, check=False)
    finally:
        params.write_text(original)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith(message.split(":")[0] + ":")]
    assert errors and errors[0].startswith(message), result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("error: ")]) <= 1
    assert "Traceback" not in result.stdout + result.stderr
    assert "Running stage 'train" not in result.stdout
    assert tree_digest(path / "data") == before


def test_a_misspelled_exp_run_override_changes_nothing(project):
    path, env = project
    before = tree_digest(path / "data")
    result = run(["dvc", "exp", "run", "-S", "+variants.batchnorm.learning_rate=0.1"], path, env, check=False)
    assert result.returncode != 0
    assert "error: params.yaml: variants.batchnorm.learning_rate: unknown key" in result.stdout + result.stderr
    run(["git", "checkout", "params.yaml"], path, env)
    assert tree_digest(path / "data") == before


def fake_distribution(folder: Path, name: str, version: str) -> None:
    """Metadata that makes importlib.metadata report `version` for `name` (code untouched)."""
    info = folder / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_a_new_torch_reruns_the_stages_that_compute_and_a_new_pytest_none(project, tmp_path):
    path, env = project
    lock = path / "requirements.lock"
    locked = lock.read_text()
    torch_pin = re.search(r"^torch==(\S+)", locked, re.MULTILINE).group(0)
    pytest_pin = re.search(r"^pytest==(\S+)", locked, re.MULTILINE).group(0)

    lock.write_text(locked.replace(pytest_pin, "pytest==99.0.0"))  # a test-only package moves
    run(["dvc", "repro", "check"], path, env)
    assert "Data and pipelines are up to date" in run(["dvc", "status"], path, env).stdout

    lock.write_text(locked.replace(torch_pin, "torch==99.0.0"))  # as `make lock` after an upgrade writes it
    fake_distribution(tmp_path / "site", "torch", "99.0.0")  # ... and `make env` installs it
    run(["dvc", "repro", "check"], path, env | {"PYTHONPATH": str(tmp_path / "site")})
    named = stages_named(run(["dvc", "status"], path, env).stdout)
    assert {"prepare", "train@batchnorm", "train@no_norm", "evaluate@batchnorm", "evaluate@no_norm",
            "compare"} <= named
    assert "download" not in named

    lock.write_text(locked)
    result = run(["dvc", "repro", "check"], path, env)
    assert "Stage 'check' is cached" in result.stdout  # the run-cache gives the record back
    assert "Data and pipelines are up to date" in run(["dvc", "status"], path, env).stdout


def test_installed_versions_that_differ_from_the_lock_are_refused(project, tmp_path):
    path, env = project
    fake_distribution(tmp_path / "site", "numpy", "0.1.0")
    (path / "requirements.lock").write_text((path / "requirements.lock").read_text() + "\n")  # check reruns
    result = run(["dvc", "repro", "check"], path, env | {"PYTHONPATH": str(tmp_path / "site")}, check=False)
    assert result.returncode != 0
    assert re.search(r"error: requirements\.lock: numpy 0\.1\.0 is installed but the lock pins \S+; recreate "
                     r"the environment \(make env\)", result.stderr), result.stderr
    run(["git", "checkout", "requirements.lock"], path, env)
    run(["dvc", "repro", "check"], path, env)  # the refused check left environment.json deleted


def test_editing_a_library_file_names_exactly_the_stages_that_import_it(project):
    path, env = project
    stats = path / "pipeline" / "stats.py"
    original = stats.read_text()
    stats.write_text(original + "\n# an edit\n")
    try:
        named = stages_named(run(["dvc", "status"], path, env).stdout)
    finally:
        stats.write_text(original)
    assert named == {"train@batchnorm", "train@no_norm", "evaluate@batchnorm", "evaluate@no_norm", "compare"}
