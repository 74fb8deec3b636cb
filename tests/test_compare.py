"""The compare stage: the statistics said in words; missing inputs refused."""

from __future__ import annotations

import math
import subprocess
import sys

import yaml

from pipeline.compare import summary_markdown
from pipeline.stats import mean_interval
from tests.conftest import TINY_PARAMS, stage_env
from tests.test_stats import BATCHNORM, NO_NORM


def test_one_seed_gives_no_interval_and_says_so():
    assert math.isnan(mean_interval([0.97]).low)
    text, table = summary_markdown({"batchnorm": [0.97], "no_norm": [0.95]},
                                   {"batchnorm": [0.1], "no_norm": [0.2]}, reference="no_norm")
    assert "untestable with one seed" in text and table["batchnorm"]["test_acc_std"] == 0.0


def test_summary_states_the_difference_in_one_sentence():
    text, table = summary_markdown({"batchnorm": BATCHNORM, "no_norm": NO_NORM},
                                   {"batchnorm": [0.1] * 5, "no_norm": [0.2] * 5}, reference="no_norm")
    [sentence] = [line for line in text.splitlines() if line.startswith("- batchnorm vs no_norm")]
    assert "+1.69 points" in sentence and sentence.endswith("significant at 95%.")
    assert table["batchnorm"]["significant"] is True


def test_a_missing_input_is_one_line_and_touches_no_store(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    result = subprocess.run([sys.executable, "-m", "pipeline.compare"], cwd=tmp_path, env=stage_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    history = tmp_path / "data" / "train" / "batchnorm" / "history.json"
    assert result.stderr.splitlines() == [f"error: {history}: unreadable ([Errno 2] No such file or directory: "
                                          f"'{history}'); rerun its stage"]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "data" / "compare").exists()
