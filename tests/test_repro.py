"""`make repro`'s plan (pipeline/commands/repro.py); tests/test_pipeline.py runs it on a tiny project."""

from __future__ import annotations

import json
import re
import sys

import pytest
import yaml

from pipeline.commands.repro import EVALUATE_PREFIX, TRAIN_PREFIX, UPSTREAM, stale_trains, variant_chains
from pipeline.handoff import ADDRESS_VARIABLE, OFF
from tests.conftest import ROOT, run, stage_env

# `repro.Dvc` in a process of its own (a fork of pytest's would copy its threads): its exit code and
# captured output, as JSON on its last line.
DVC_COMMAND = ("import json, sys; from pipeline.commands.repro import Dvc; dvc = Dvc(*sys.argv[1:], capture=True); "
               "print(json.dumps([dvc.wait(), dvc.output]))")


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


def test_each_variant_is_evaluated_after_its_own_train_stage_and_reads_nothing_another_writes():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert variant_chains(["train@a", "train@b"]) == [("train@a", "evaluate@a"), ("train@b", "evaluate@b")]
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
    decided = run([sys.executable, "-c", "from dvc import analytics; print(analytics.is_enabled())"], ROOT, env)
    assert decided.stdout.split() == ["False"]


@pytest.mark.parametrize("args", [["stage", "list", "--name-only"], ["repro", "--dry", "no-such-stage"]])
def test_a_forked_dvc_command_exits_and_prints_as_the_dvc_script(args):
    """`make repro` forks its dvc commands from itself, DVC imported once: the same exit code and
    output as the `dvc` script's process; forked, it needs no `dvc` on PATH. PIPELINE_FORKSERVER=0:
    the script's process itself."""
    env = stage_env()
    alone = run(["dvc", *args], ROOT, env, check=False)
    no_script = env | {"PATH": "/usr/bin:/bin"}
    forked = json.loads(run([sys.executable, "-c", DVC_COMMAND, *args], ROOT, no_script).stdout.splitlines()[-1])
    unforked = run([sys.executable, "-c", DVC_COMMAND, *args], ROOT, env | {ADDRESS_VARIABLE: OFF})
    assert forked == json.loads(unforked.stdout.splitlines()[-1]) == [alone.returncode, alone.stdout]
    assert (alone.returncode == 0) == (args[0] == "stage")


def test_the_forked_commands_write_dvc_lock_as_dvc_does(tmp_path):
    """`make repro`'s dvc commands read dvc.lock with the safe loader (repro.modify_yaml): a stage's
    entry updated into this project's lock gives DVC's own bytes; dvc.yaml keeps DVC's read."""
    import dvc.dvcfile

    from pipeline.commands.repro import dvc_main, modify_yaml

    dvc_main()
    assert dvc.dvcfile.modify_yaml is modify_yaml
    from dvc.utils.serialize import modify_yaml as modify_yaml_of_dvc

    entry = {"cmd": "python -m x " + "--long-argument " * 8,
             "params": {"params.yaml": {"train.lr": 1e-08, "seeds": [0, 1]}},
             "outs": [{"path": "data/x", "hash": "md5", "md5": "0e12", "size": 3, "isexec": False}]}
    written = {}
    for name, modify in (("dvc", modify_yaml_of_dvc), ("ours", modify_yaml)):
        path = tmp_path / name / "dvc.lock"
        path.parent.mkdir()
        path.write_bytes((ROOT / "dvc.lock").read_bytes())
        with modify(path) as data:
            assert "compare" in data["stages"]
            data["stages"].update({"curves": entry, "new": entry})
        written[name] = path.read_bytes()
    assert written["ours"] == written["dvc"] != (ROOT / "dvc.lock").read_bytes()
    path = tmp_path / "ours" / "dvc.lock"  # the same entry again: nothing to write
    before = path.stat().st_mtime_ns
    with modify_yaml(path) as data:
        data["stages"].update({"curves": entry})
    assert path.stat().st_mtime_ns == before and path.read_bytes() == written["dvc"]


def test_make_repro_refuses_bad_params_in_one_line_before_dvc_runs(project):
    """The fork server starts before the params are read (it imports while they are): a mistake
    still ends the command with one line and exit code 2, and DVC writes nothing."""
    path, env = project
    params = path / "params.yaml"
    params.write_text(re.sub(r"(?m)^(\s+epochs:) \d+$", r"\1 one", params.read_text()))
    result = run([sys.executable, "-m", "pipeline.commands.repro"], path, env, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == ["error: params.yaml: train.epochs: Input should be a valid integer "
                                                 "(got 'one')"]
    assert not (path / "dvc.lock").exists() and not (path / "data").exists()
