"""The comparison in a few numbers: the compare stage's `--metrics` file (dvc.yaml's `metrics:`).

What a row of `make exp` and `dvc metrics diff` need from summary.json, under keys short enough
for two variants and a changed param to fit a 120-column terminal: per variant `<variant>.acc`
and `.loss` (means over seeds) and, but for the reference, `.diff` (from the reference, in
percentage points) and `.verdict` (Holm-adjusted Welch at 95%, as summary.md says it).
"""

from __future__ import annotations

import math


def verdict(row: dict) -> str:
    if math.isnan(row["p_holm"]):
        return "untestable"  # one seed: no variance to test with
    return "significant" if row["significant"] else "not significant"


def headline(table: dict[str, dict]) -> dict[str, dict]:
    """{variant: {"acc": ..., "loss": ..., "diff": ..., "verdict": ...}} from summary.json's table."""
    numbers = {}
    for variant, row in table.items():
        numbers[variant] = {"acc": row["test_acc_mean"], "loss": row["test_loss_mean"]}
        if "diff_vs_reference" in row:
            numbers[variant] |= {"diff": 100 * row["diff_vs_reference"], "verdict": verdict(row)}
    return numbers
