"""The real lab on real MNIST, end to end: slow (about two minutes), needs ../shared/data/mnist."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.commands.repro import UPSTREAM
from tests.conftest import ROOT, SHARED_MNIST, make_project, run

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason=f"real MNIST mirror {SHARED_MNIST} not present"),
]


def test_lab_reproduces_the_batch_norm_result(tmp_path):
    path, env = make_project(tmp_path / "lab", SHARED_MNIST)
    shutil.copy(ROOT / "params.yaml", path / "params.yaml")  # the lab's own settings, not tiny ones
    env = env | {"MNIST_CHECKSUMS": ""}  # the built-in digests of the real files
    run(["dvc", "repro"], path, env, timeout=900)

    def metrics(variant: str) -> dict:
        return json.loads((path / "data" / "evaluate" / variant / "metrics.json").read_text())

    batchnorm, no_norm = metrics("batchnorm"), metrics("no_norm")
    assert batchnorm["test_acc"] >= 0.965
    assert no_norm["test_acc"] >= 0.935
    assert batchnorm["test_acc"] > no_norm["test_acc"]
    summary = json.loads((path / "data" / "compare" / "summary.json").read_text())
    assert summary["batchnorm"]["significant"], summary["batchnorm"]

    # Outputs are a function of the inputs: this repro in a fresh repository gives the committed
    # dvc.lock, stage for stage (so the committed results are the current code's). The bits of what
    # trains and evaluates depend on the CPU too (MKL, OpenBLAS and torch pick their kernels by its
    # vendor and instruction set: an AMD EPYC and an Intel Xeon differ from train@ on); elsewhere
    # than on LOCK_MACHINE's kind, every stage's command, code, params and shared inputs must match.
    committed = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]
    reproduced = yaml.safe_load((path / "dvc.lock").read_text())["stages"]
    same_machine = this_machine() == LOCK_MACHINE
    view = (lambda name, stage: stage) if same_machine else machine_independent
    differing = sorted(name for name in committed.keys() | reproduced.keys()
                       if view(name, committed.get(name)) != view(name, reproduced.get(name)))
    assert not differing, (f"dvc.lock differs from the committed one in {differing}: `make repro` on real MNIST "
                           f"on a {LOCK_MACHINE} machine, commit it" + ("" if same_machine else
                                                                       " (this machine: only what no CPU changes)"))
    if not same_machine:
        print(f"this machine {this_machine()}, the lock's {LOCK_MACHINE}: compared what no CPU changes")


# The kind of machine the committed dvc.lock was made on.
LOCK_MACHINE = {"vendor": "AuthenticAMD", "torch_cpu_capability": "AVX512"}
SHARED_INPUTS = ("environment.json", "data/prepared", "data/prepared/test")  # the upstream stages' outputs


def this_machine() -> dict[str, str]:
    import torch

    vendor = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("vendor_id")), "unknown")
    return {"vendor": vendor, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def machine_independent(name: str, stage: dict | None) -> dict | None:
    """A stage's lock entry less what the CPU changes: the upstream stages (no float arithmetic)
    whole; of the rest, the command, params, code and the upstream stages' outputs they read."""
    if stage is None or name in UPSTREAM:
        return stage
    return {"cmd": stage["cmd"], "params": stage.get("params"),
            "deps": [dep for dep in stage["deps"] if dep["path"].startswith("pipeline/") or dep["path"] in SHARED_INPUTS]}
