"""The compare stage: the statistics said in words, many variants ranked and Holm-adjusted;
missing inputs refused."""

import json
import math
import subprocess

import pytest
import yaml
from scipy import stats

from pipeline.stages.compare import summary_markdown
from pipeline.stats import mean_interval
from tests.conftest import TINY_PARAMS, stage_command, stage_env
from tests.test_stats import BATCHNORM, LAYER_NORM, NO_NORM


def test_one_seed_gives_no_interval_and_says_so():
    assert math.isnan(mean_interval([0.97]).low)
    text, table = summary_markdown({"batchnorm": [0.97], "no_norm": [0.95]},
                                   {"batchnorm": [0.1], "no_norm": [0.2]}, reference="no_norm", seeds=[0], split_seed=0)
    assert "untestable with one seed" in text and math.isnan(table["batchnorm"]["test_acc_std"])
    [row] = [line for line in text.splitlines() if line.startswith("| 1 | batchnorm |")]
    assert row == "| 1 | batchnorm | 1 | 97.00% | n/a | [n/a, n/a] | 0.1000 |"  # no spread: n/a, not 0.00%
    assert "1 seed (0):" in text and "over the 0 testable comparisons" in text
    assert math.isnan(table["batchnorm"]["p_holm"]) and table["batchnorm"]["significant"] is False


def test_summary_states_the_difference_in_one_sentence():
    text, table = summary_markdown({"batchnorm": BATCHNORM, "no_norm": NO_NORM},
                                   {"batchnorm": [0.1] * 5, "no_norm": [0.2] * 5}, reference="no_norm",
                                   seeds=[0, 1, 2, 3, 4], split_seed=0)
    [sentence] = [line for line in text.splitlines() if line.startswith("- batchnorm vs no_norm")]
    assert "+1.69 points" in sentence and sentence.endswith("significant at 95%.")
    assert "beats a random no_norm seed 100.0% of the time" in sentence
    assert table["batchnorm"]["significant"] is True
    assert table["batchnorm"]["p_holm"] == table["batchnorm"]["p_value"]  # a family of one


def test_many_variants_are_ranked_and_their_p_values_holm_adjusted():
    test_acc = {"no_norm": NO_NORM, "batchnorm": BATCHNORM, "layernorm": LAYER_NORM, "deep": [*NO_NORM[1:], 0.098],
                "same": NO_NORM}
    test_loss = {v: [0.1] * 5 for v in test_acc} | {"deep": [0.2] * 4 + [math.nan]}
    val_acc = {"no_norm": 0.95, "batchnorm": 0.97, "layernorm": 0.96, "deep": 0.80, "same": 0.95}
    text, table = summary_markdown(test_acc, test_loss, "no_norm", seeds=[0, 1, 2, 3, 4], split_seed=3,
                                   rank_by=("val_acc", val_acc))
    assert [line.split(" | ")[1] for line in text.splitlines() if line[2:3].isdigit()] == [
        "batchnorm", "layernorm", "no_norm", "same", "deep"]  # by val_acc; no_norm and same tie: by name
    assert [table[v]["rank"] for v in ("batchnorm", "layernorm", "no_norm", "same", "deep")] == [1, 2, 3, 4, 5]
    assert ("5 seeds (0, 1, 2, 3, 4): a seed sets the initial weights and the order of the training batches; "
            "the train/validation split is fixed (`data.split_seed` 3)") in text
    assert "Ranked by mean last-epoch val_acc over seeds" in text and "| val_acc mean |" in text
    assert "- deep: 1 of 5 seeds diverged (non-finite loss)" in text
    others = ["batchnorm", "layernorm", "same", "deep"]
    raw = [stats.ttest_ind(test_acc[v], NO_NORM, equal_var=False).pvalue for v in others]
    for variant, p in zip(others, raw):
        assert table[variant]["p_value"] == pytest.approx(p, rel=1e-9)
        u = stats.mannwhitneyu(test_acc[variant], NO_NORM).statistic
        assert table[variant]["p_superiority"] == pytest.approx(u / 25)
    # Holm by hand over the four: the smallest times 4, then times 3 (kept monotone), ...
    order = sorted(range(4), key=raw.__getitem__)
    expected, running = {}, 0.0
    for k, index in enumerate(order):
        running = max(running, min(1.0, (4 - k) * raw[index]))
        expected[others[index]] = running
    for variant in others:
        assert table[variant]["p_holm"] == pytest.approx(expected[variant], rel=1e-9)
        assert table[variant]["significant"] == (expected[variant] < 0.05)
        low, high = table[variant]["diff_ci95_bootstrap"]
        assert low <= table[variant]["diff_vs_reference"] <= high
    assert table["same"]["p_superiority"] == 0.5 and table["same"]["p_holm"] == 1.0
    assert "over the 4 testable comparisons with no_norm" in text
    again = summary_markdown(test_acc, test_loss, "no_norm", seeds=[0, 1, 2, 3, 4], split_seed=3,
                             rank_by=("val_acc", val_acc))
    assert again[0] == text and json.dumps(again[1], sort_keys=True) == json.dumps(table, sort_keys=True)


def test_a_missing_input_is_one_line_and_touches_no_store(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    result = subprocess.run(stage_command("compare"), cwd=tmp_path, env=stage_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    history = "data/train/batchnorm/history.json"  # as dvc.yaml's command line names it
    assert result.stderr.splitlines() == [f"error: {history}: unreadable ([Errno 2] No such file or directory: "
                                          f"'{history}'); rerun its stage"]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "data" / "compare").exists()
