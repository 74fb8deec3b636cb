"""`make repro`'s plan (pipeline/commands/repro.py); tests/test_pipeline.py runs it on a tiny project."""

from __future__ import annotations

import sys

import yaml

from pipeline.commands.repro import TRAIN_PREFIX, UPSTREAM, stale_trains
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


def test_the_stale_train_stages_run_or_all_of_them_where_their_shared_inputs_changed():
    trains = [f"{TRAIN_PREFIX}{variant}" for variant in ("a", "b", "c")]
    assert stale_trains({"train@b", "compare"}, trains, upstream_changed=False) == ["train@b"]
    assert stale_trains({"check"}, trains, upstream_changed=False) == []
    assert stale_trains({"check"}, trains, upstream_changed=True) == trains


def test_this_projects_dvc_commands_send_no_analytics():
    """DVC's analytics are on by default: after every command a process of their own (~0.8 s of CPU
    beside the stages, four or five in a `make repro`) posts a report to analytics.dvc.org.
    .dvc/config turns them off; asked here as DVC decides it, with no variable set."""
    env = {k: v for k, v in stage_env().items() if k not in ("DVC_NO_ANALYTICS", "DVC_TEST")}
    decided = run([sys.executable, "-c", "from dvc import analytics; print(analytics.is_enabled())"], ROOT, env)
    assert decided.stdout.split() == ["False"]
