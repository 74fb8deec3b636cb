"""pipeline/__init__.py: the OpenBLAS kernel numpy runs, whatever the machine's environment says."""

import os
import subprocess
import sys

import pytest

import pipeline
from tests.conftest import ROOT

# In a fresh process, as a stage's command starts: the pipeline first, then numpy.
CORE_NAME = ("import pipeline, numpy; from threadpoolctl import threadpool_info; "
             "print(next(i['architecture'] for i in threadpool_info() if i['internal_api'] == 'openblas'))")


@pytest.mark.skipif(not {"avx2", "fma"} <= pipeline._cpu_flags(), reason="no AVX2 and FMA: OpenBLAS's own pick")
@pytest.mark.parametrize("machine_says", [None, "Sandybridge", "Haswell"])
def test_numpy_runs_one_openblas_kernel_whatever_the_environment_names(machine_says):
    env = {name: value for name, value in os.environ.items() if name != "OPENBLAS_CORETYPE"}
    if machine_says is not None:
        env["OPENBLAS_CORETYPE"] = machine_says  # Sandybridge: an AVX kernel, runnable here
    core = subprocess.run([sys.executable, "-c", CORE_NAME], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=True, timeout=60).stdout.strip()
    assert core == pipeline.OPENBLAS_CORE
