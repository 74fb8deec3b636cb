"""A new user's first hour (issue 33), on a real tiny project: `make exp` fits 120 columns, a clone
diffs its metrics and plots against HEAD, the plots page needs no network, a forced run offline
keeps data/raw, a removed grid leaves nothing behind."""

import json
import re

import pytest
import yaml

from pipeline.reports import TITLES
from pipeline.stages.compare import headline, summary_markdown
from tests.conftest import ROOT, make_project, repro_pipeline, run


@pytest.fixture(scope="module")
def committed(tmp_path_factory, tiny_mirror):
    """A tiny project (with this repository's .dvc/config and plots page), reproduced and committed."""
    path, env = make_project(tmp_path_factory.mktemp("first_hour") / "project", tiny_mirror[0])
    repro_pipeline(path, env)
    run(["git", "add", "-A"], path, env)
    run(["git", "commit", "-qm", "results"], path, env)
    return path, env


def test_exp_table_shows_accuracies_verdict_and_changed_params_in_120_columns(committed):
    path, env = committed
    run(["dvc", "exp", "run", "-S", "+variants.no_norm.lr=0.003"], path, env, timeout=600)
    shown = run(["make", "-s", "-f", str(ROOT / "Makefile"), "exp"], path,
                env | {"COLUMNS": "120"}, timeout=120).stdout
    lines = shown.splitlines()
    assert max(map(len, lines)) <= 120 and "…" not in shown, shown  # nothing cut off
    header = lines[1].split()
    assert header[:5] == ["Experiment", "batchnorm.acc", "batchnorm.diff", "batchnorm.verdict", "no_norm.acc"], shown
    assert "variants.no_norm.lr" in header, shown  # the experiment's changed param
    assert len(re.findall(r"\b0\.\d+", shown)) >= 6 and "significant" in shown, shown  # 3 rows x 2 accuracies
    headline = json.loads((path / "data" / "metrics.json").read_text())
    summary = json.loads((path / "data" / "compare" / "summary.json").read_text())
    assert headline["no_norm"] == {"acc": summary["no_norm"]["test_acc_mean"], "loss": summary["no_norm"]["test_loss_mean"]}


def test_a_clone_diffs_metrics_and_plots_against_head(committed, tmp_path):
    path, env = committed
    tracked = run(["git", "ls-files", "data"], path, env).stdout.split()
    assert {"data/metrics.json", "data/curves.csv"} <= set(tracked)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(path), str(clone)], tmp_path, env)
    metrics = run(["dvc", "metrics", "diff", "HEAD", "--all", "--json"], clone, env, timeout=120)
    diff = json.loads(metrics.stdout)
    assert diff["data/metrics.json"]["batchnorm.acc"]["old"] is not None, metrics.stdout
    assert "failed to load" not in metrics.stderr.lower(), metrics.stderr
    plots = run(["dvc", "plots", "diff", "HEAD", "--json"], clone, env, timeout=120)
    assert "failed to load" not in (plots.stdout + plots.stderr).lower(), plots.stdout + plots.stderr
    shown = json.loads(plots.stdout)["data"]
    assert {entry["content"]["title"]["text"] for entries in shown.values() for entry in entries} == set(TITLES.values())
    for name, entries in shown.items():
        assert all("HEAD" in entry["revisions"] for entry in entries), (name, plots.stdout[:2000])


def test_the_plots_page_carries_its_own_vega(committed):
    path, env = committed
    run(["dvc", "plots", "show"], path, env, timeout=120)
    page = (path / "dvc_plots" / "index.html").read_text()
    assert not re.search(r"<script[^>]*src=[\"']?https?://", page)
    assert "vegaEmbed" in page and page.count("<script") >= 4  # the three libraries and the plots


def test_outputs_kept_in_git_are_still_restored_from_the_run_cache(committed):
    path, env = committed
    curves, metrics = path / "data" / "curves.csv", path / "data" / "metrics.json"
    before = curves.read_bytes(), metrics.read_bytes()
    curves.unlink()
    metrics.unlink()
    restored = run(["dvc", "repro", "curves", "compare"], path, env, timeout=300)
    assert restored.stdout.count("is cached - skipping run") == 2, restored.stdout  # neither command ran
    assert (curves.read_bytes(), metrics.read_bytes()) == before


def test_a_forced_run_offline_keeps_the_verified_raw_data(committed):
    path, env = committed
    offline = {key: value for key, value in env.items() if key != "MNIST_MIRROR"}  # the tiny digests stay
    offline |= {"MNIST_MIRROR": "http://127.0.0.1:9/"}  # refused at once; then the torchvision mirrors
    before = sorted((path / "data" / "raw").iterdir())
    forced = run(["dvc", "repro", "--force", "download"], path, offline, timeout=300)
    assert forced.stdout.count("kept the copy DVC's cache holds") == 4, forced.stdout
    assert sorted((path / "data" / "raw").iterdir()) == before
    status = run(["dvc", "status", "download"], path, offline, timeout=120)
    assert "changed" not in status.stdout, status.stdout  # dvc.lock's record, the same bytes


def test_a_removed_grid_leaves_no_lock_entries_or_folders(committed):
    path, env = committed
    params = path / "params.yaml"

    def grid(axes: dict) -> None:
        raw = yaml.safe_load(params.read_text())
        params.write_text(yaml.safe_dump(raw | {"sweep": {"axes": axes}}, sort_keys=False))

    grid({"lr": [0.003]})
    run(["python", "-m", "pipeline.commands.sweep"], path, env)
    repro_pipeline(path, env)
    assert (path / "data" / "train" / "sweep-lr0p003").is_dir()
    grid({})
    said = run(["python", "-m", "pipeline.commands.sweep"], path, env).stdout
    assert "removed the 2 entries" in said, said
    lock = (path / "dvc.lock").read_text()
    assert "@sweep-" not in lock and not re.search(r"path: data/\S*sweep-", lock), lock
    leftovers = [p for p in (path / "data").rglob("*sweep-*")] + [
        line for p in (path / "data").rglob(".gitignore") for line in p.read_text().splitlines() if "sweep-" in line]
    assert leftovers == []
    status = run(["dvc", "status"], path, env, timeout=120).stdout  # params.yaml itself changed, nothing else
    assert re.findall(r"^(\S+):$", status, re.MULTILINE) == ["check", "curves", "compare"], status


def test_the_headline_says_untestable_for_one_seed_and_leaves_the_reference_its_accuracy():
    table = summary_markdown({"a": [0.9], "b": [0.8]}, {"a": [0.1], "b": [0.2]}, "b", seeds=[0], split_seed=0)[1]
    assert headline(table) == {"a": {"acc": 0.9, "loss": pytest.approx(0.1), "diff": pytest.approx(10.0),
                                     "verdict": "untestable"},
                               "b": {"acc": 0.8, "loss": pytest.approx(0.2)}}
