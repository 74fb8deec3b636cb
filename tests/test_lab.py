"""The real lab on real MNIST, end to end: slow (about two minutes), needs ../shared/data/mnist."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

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
    # dvc.lock, stage for stage (so the committed results are the current code's).
    committed = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]
    reproduced = yaml.safe_load((path / "dvc.lock").read_text())["stages"]
    differing = sorted(stage for stage in committed.keys() | reproduced.keys()
                       if committed.get(stage) != reproduced.get(stage))
    assert not differing, f"dvc.lock differs from the committed one in {differing}: `make repro` on real MNIST, commit it"
