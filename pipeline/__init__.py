"""The batch-norm MNIST lab as DVC stages (pipeline/stages/) and their library."""

import os

# OpenBLAS (numpy's, scipy's) picks its float32 GEMM kernel by the CPU, or by OPENBLAS_CORETYPE,
# and kernels differ in the last bits: the evaluate stage's test loss differed between AMD EPYCs of
# family 25 (SkylakeX's AVX-512 kernel) and 26 (taken for Haswell by OpenBLAS 0.3.31). Every process
# of the pipeline imports this package before numpy, so it names one kernel, whatever the variable
# said: Haswell's (AVX2 and FMA), which every x86-64 CPU with those runs (tests/test_package.py).
OPENBLAS_CORE = "Haswell"


def _cpu_flags() -> set[str]:
    """The first CPU's flags, read up to their line only (the file holds a block per CPU)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((set(line.split(":", 1)[1].split()) for line in cpuinfo if line.startswith("flags")), set())
    except OSError:  # not Linux: OpenBLAS's own pick
        return set()


if {"avx2", "fma"} <= _cpu_flags():
    os.environ["OPENBLAS_CORETYPE"] = OPENBLAS_CORE
