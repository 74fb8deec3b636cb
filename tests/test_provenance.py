"""What the stages depend on: dvc.yaml's code deps against the imports, the environment against the lock."""

import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.utils import canonicalize_name

from pipeline import provenance
from pipeline.errors import PipelineError
from pipeline.provenance import environment, import_closure, read_lock, stage_distributions
from tests.conftest import ROOT

DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())


def stage_definition(stage: str) -> dict:
    definition = DVC_YAML["stages"][stage]
    return definition.get("do", definition)


def command_module(cmd: str) -> str:
    return re.match(r"python -m ([\w.]+)", cmd).group(1)


@pytest.mark.parametrize("stage", list(DVC_YAML["stages"]))
def test_code_deps_are_exactly_the_stage_modules_import_closure(stage):
    definition = stage_definition(stage)
    module = command_module(definition["cmd"])
    declared = {dep for dep in definition["deps"] if dep.startswith("pipeline/")}
    imported = {str(path.relative_to(ROOT)) for path in import_closure(module)}
    assert declared == imported, (f"dvc.yaml stage {stage}: missing {sorted(imported - declared)}, "
                                  f"not imported {sorted(declared - imported)}")


def test_every_stage_module_is_a_stage():
    assert {command_module(stage_definition(s)["cmd"]) for s in DVC_YAML["stages"]} == {
        provenance.stage_module(stage) for stage in provenance.STAGES}


def test_closure_follows_imports_at_any_depth(tmp_path, monkeypatch):
    package = tmp_path / "pipeline"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pipeline import b\nimport os\n")
    (package / "b.py").write_text("def f():\n    from pipeline.c import g\n    import numpy\n")
    (package / "c.py").write_text("g = 1\n")
    (package / "unused.py").write_text("")
    monkeypatch.setattr(provenance, "PACKAGE_DIR", package)
    assert [path.name for path in import_closure("pipeline.a")] == ["__init__.py", "a.py", "b.py", "c.py"]
    assert provenance.third_party_imports(import_closure("pipeline.a")) == {"numpy"}


def test_computing_stages_depend_on_the_environment_record():
    for stage in ("prepare", "train", "evaluate", "compare"):
        assert provenance.ENVIRONMENT_FILE in stage_definition(stage)["deps"], stage
    assert stage_definition("check")["outs"] == [provenance.ENVIRONMENT_FILE]
    assert {"params.yaml", provenance.LOCK_FILE} <= set(stage_definition("check")["deps"])


def test_no_stage_output_persists():
    """A persistent output turns DVC's run-cache off for its stage."""
    for stage in DVC_YAML["stages"]:
        for out in stage_definition(stage).get("outs", []):
            assert not (isinstance(out, dict) and any(o.get("persist") for o in out.values())), stage


def test_lock_pins_every_package_with_hashes():
    text = (ROOT / provenance.LOCK_FILE).read_text()
    hashed = re.findall(r"^([A-Za-z0-9][\w.-]*)==\S+ \\\n(?:\s+--hash=sha256:[0-9a-f]{64}(?: \\)?\n)+", text, re.M)
    python, pins = read_lock(ROOT / provenance.LOCK_FILE)
    assert python == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert len(hashed) == len(pins) > 100


def test_the_installed_environment_is_the_lock():
    """`make env` installs exactly the lock: nothing missing, nothing more, no other version; what
    `make env GPU=1` adds (requirements-gpu.lock), where installed, at its pinned version."""
    _, pins = read_lock(ROOT / provenance.LOCK_FILE)
    _, gpu_pins = read_lock(ROOT / provenance.GPU_LOCK_FILE)
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    installed.pop("pip")  # the venv's own installer; the lock pins what the project runs
    installed.pop("mnist-bn-pipeline", None)  # this checkout's metadata, where a `pip install -e .` left it
    assert {name: version for name, version in installed.items() if name not in gpu_pins} == pins
    assert all(installed[name] == version for name, version in gpu_pins.items() if name in installed)


def test_environment_record_holds_what_computes_not_what_records_or_tests():
    packages = environment(ROOT / provenance.LOCK_FILE)["packages"]
    assert {"torch", "numpy", "scipy", "matplotlib", "pydantic"} <= set(packages)
    assert not {"mlflow", "pytest", "selenium", "dvc"} & set(packages)
    assert packages["torch"] == metadata.version("torch")


def test_environment_differing_from_the_lock_is_one_line(tmp_path):
    lock = (ROOT / provenance.LOCK_FILE).read_text()
    torch_version = metadata.version("torch")
    (tmp_path / "requirements.lock").write_text(lock.replace(f"torch=={torch_version}", "torch==0.0.1"))
    with pytest.raises(PipelineError, match=rf"torch {re.escape(torch_version)} is installed but the lock pins 0\.0\.1"):
        environment(tmp_path / "requirements.lock")
    (tmp_path / "requirements.lock").write_text(lock.replace("with Python 3.", "with Python 2."))
    with pytest.raises(PipelineError, match=r"compiled for Python 2\.\d+, running 3\.\d+"):
        environment(tmp_path / "requirements.lock")


def test_stage_distributions_follow_requirements_transitively():
    distributions = stage_distributions()
    assert {"torch", "numpy", "pillow", "pydantic-core"} <= distributions  # pillow via matplotlib
    assert Path(provenance.__file__).parent == provenance.PACKAGE_DIR
