"""The batch-norm MNIST lab as DVC stages (check, download, prepare, train, evaluate, compare) and their library."""

import os

# numpy's and scipy's OpenBLAS pick their float32 GEMM kernel by the CPU when they load, unless
# OPENBLAS_CORETYPE names one, and kernels differ in the last bits: the evaluate stage's test loss
# was not the same on an AMD EPYC of family 25 (SkylakeX's AVX-512 kernel) and one of family 26
# (OpenBLAS 0.3.31 takes it for Haswell, and machines may set the variable themselves). Every
# process of the pipeline imports this package before numpy, so it names one kernel here: Haswell's
# (AVX2 and FMA), which every x86-64 CPU with those runs, whatever the variable said.
# tests/test_package.py holds numpy to the pick.
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
