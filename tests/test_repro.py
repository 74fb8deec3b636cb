"""`make repro`'s plan (pipeline/commands/repro.py); tests/test_pipeline.py runs it on a tiny project."""

import re
import sys

import pytest

import yaml

from pipeline.commands.repro import EVALUATE_PREFIX, TRAIN_PREFIX, UPSTREAM, stages_after_chains, variant_chains
from tests.conftest import ROOT, run, stage_env



def test_upstream_is_every_stage_before_train_in_dvc_yaml_and_train_reads_their_outputs():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    names = list(stages)
    assert tuple(names[: names.index(TRAIN_PREFIX.rstrip("@"))]) == UPSTREAM
    train_deps = set(stages["train"]["do"]["deps"])
    assert {"environment.json", "data/prepared"} <= train_deps
    assert {out for name in UPSTREAM for out in stages[name]["outs"]} & train_deps == {"environment.json",
                                                                                       "data/prepared"}
    # Nothing downstream of train feeds another train stage: they may run side by side.
    downstream_outs = {str(out) for name in names[names.index("train") + 1:] for out in stages[name].get("outs", [])
                       if isinstance(out, str)}
    assert not downstream_outs & train_deps


def test_the_stale_train_stages_run_or_all_of_them_after_the_upstream_stages_where_those_are_stale():
    trains = [f"{TRAIN_PREFIX}{variant}" for variant in ("a", "b", "c")]
    assert variant_chains(trains, {"train@b", "compare"}, force=False) == [("train@b", "evaluate@b")]
    assert variant_chains(trains, {"compare"}, force=False) == []
    everything = [(*UPSTREAM, "train@a", "evaluate@a"), ("train@b", "evaluate@b"), ("train@c", "evaluate@c")]
    assert variant_chains(trains, {"prepare"}, force=False) == everything
    assert variant_chains(trains, set(), force=True) == everything
    # A params.yaml edit reruns check: the stale train stage first, the others after it.
    assert variant_chains(trains, {"check", "train@c"}, force=False) == [
        (*UPSTREAM, "train@c", "evaluate@c"), ("train@a", "evaluate@a"), ("train@b", "evaluate@b")]


def test_forced_chains_and_the_last_dvc_repro_run_every_stage_dvc_lists_once(monkeypatch):
    monkeypatch.chdir(ROOT)
    listed = run(["dvc", "stage", "list", "--name-only"], ROOT, stage_env(), timeout=120).stdout.split()
    trains = [stage for stage in listed if stage.startswith(TRAIN_PREFIX)]
    chained = [stage for chain in variant_chains(trains, set(), force=True) for stage in chain]
    assert stages_after_chains() == ["curves", "compare"]
    assert sorted(chained + stages_after_chains()) == sorted(listed)


def test_each_variant_is_evaluated_after_its_own_train_stage_and_reads_nothing_another_writes():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert variant_chains(["train@a", "train@b"], {"train@a", "train@b"}, force=False) == [
        ("train@a", "evaluate@a"), ("train@b", "evaluate@b")]
    assert stages[EVALUATE_PREFIX.rstrip("@")]["foreach"] == stages[TRAIN_PREFIX.rstrip("@")]["foreach"]
    evaluate = stages[EVALUATE_PREFIX.rstrip("@")]["do"]
    # A variant's chain may run beside another's: its evaluate stage reads its own train stage's
    # outputs and the prepared data, nothing that another variant's chain writes.
    shared = {dep for dep in evaluate["deps"] if "${key}" not in dep and not dep.startswith("pipeline/")}
    assert shared == {"environment.json", "data/prepared/test"}


def test_this_projects_dvc_commands_send_no_analytics():
    """DVC's analytics are on by default: after every command a process of their own (~0.8 s of CPU
    beside the stages, four or five in a `make repro`) posts a report to analytics.dvc.org.
    .dvc/config turns them off; asked here as DVC decides it, with no variable set."""
    env = {k: v for k, v in stage_env().items() if k not in ("DVC_NO_ANALYTICS", "DVC_TEST")}
    decided = run([sys.executable, "-c", "from dvc import analytics; print(analytics.is_enabled())"], ROOT, env,
                  timeout=60)
    assert decided.stdout.split() == ["False"]


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_make_repro_refuses_bad_params_in_one_line_before_dvc_runs(project, force):
    """A mistake in params.yaml ends the command with one line and exit code 2, forced or not, before
    it starts any `dvc` (the forced listing included): DVC writes nothing."""
    path, env = project
    params = path / "params.yaml"
    params.write_text(re.sub(r"(?m)^(\s+epochs:) \d+$", r"\1 one", params.read_text()))
    result = run([sys.executable, "-m", "pipeline.commands.repro", *force], path, env, timeout=60, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == ["error: params.yaml: train.epochs: Input should be a valid integer "
                                                 "(got 'one')"]
    assert not (path / "dvc.lock").exists() and not (path / "data").exists()
