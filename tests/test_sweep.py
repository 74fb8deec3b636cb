"""The grid in params: `sweep:` expanded into named variants, refused in one line when it is bad."""

import copy
import json
import re
import statistics
import subprocess
import sys

import pytest
import yaml

from pipeline.errors import ParamsError
from pipeline.config.grid import VARIANT_NAME
from pipeline.config.params import load_params, parse_params, parse_sweep
from pipeline.reports import TITLES
from pipeline.commands.sweep import rewrite, sweep
from tests.conftest import ROOT, TINY_PARAMS, make_project, repro_pipeline, run, stage_env


def with_sweep(axes: dict, **sections) -> dict:
    raw = copy.deepcopy(TINY_PARAMS) | sections
    raw["sweep"] = {"axes": axes}
    return raw


def test_grid_points_are_named_by_their_values_in_a_fixed_key_order():
    # Written in another key order than ModelChoices': the names do not depend on it.
    grid = parse_sweep(with_sweep({"lr": [0.003, 0.01], "activation": ["tanh"], "norm": ["batch", "none"]})).grid()
    assert list(grid) == [
        "sweep-batch-tanh-lr0p003", "sweep-batch-tanh-lr0p01", "sweep-none-tanh-lr0p003", "sweep-none-tanh-lr0p01",
    ]
    assert grid["sweep-none-tanh-lr0p003"].model_dump(exclude_none=True) == {
        "norm": "none", "activation": "tanh", "lr": 0.003}


@pytest.mark.parametrize("axes, name", [
    ({"hidden_sizes": [[64, 64]]}, "sweep-h64x64"),
    ({"hidden_sizes": [[512]], "optimizer": ["adamw"]}, "sweep-h512-adamw"),
    ({"lr": [1e-05]}, "sweep-lr1em05"),
    ({"lr": [0.1 + 0.2]}, "sweep-lr0p30000000000000004"),  # distinct from 0.3: distinct names
    ({"lr": [1]}, "sweep-lr1p0"),  # an integer is the float it stands for
    ({"norm": ["layer"], "activation": ["gelu"], "optimizer": ["sgd"]}, "sweep-layer-gelu-sgd"),
])
def test_names_are_safe_for_stages_paths_runs_and_shells(axes, name):
    (only,) = parse_sweep(with_sweep(axes)).grid()
    assert only == name
    assert re.fullmatch(r"[a-z0-9-]+", name) and VARIANT_NAME.match(name)


def test_no_axes_no_grid():
    assert parse_sweep(with_sweep({})).grid() == {}
    assert parse_sweep({}).grid() == {}


SOURCE = """\
# the lab
seeds:
  - 0
  - 1
train:
  epochs: 2
  hidden_sizes: [8]
  weight_decay: null   # the optimizer's default
variants:   # hand-written first
  Wide:
    hidden_sizes:
      - 16
      - 16   # two layers
  no_norm: {norm: none}

  # the next section
sweep:
  axes:
    norm: [batch, none]
    lr: [0.003, 1.0e-05]
compare:
  reference: no_norm
mlflow:
  experiment_name: "tiny lab"
"""
EXPANDED = SOURCE.replace("  no_norm: {norm: none}\n", """\
  no_norm: {norm: none}
  sweep-batch-lr0p003: {norm: batch, lr: 0.003}
  sweep-batch-lr1em05: {norm: batch, lr: 1.0e-05}
  sweep-none-lr0p003: {norm: none, lr: 0.003}
  sweep-none-lr1em05: {norm: none, lr: 1.0e-05}
""")


def test_expansion_adds_one_line_per_grid_point_and_keeps_every_other_byte():
    grid = parse_sweep(yaml.safe_load(SOURCE)).grid()
    assert rewrite(SOURCE, grid) == EXPANDED
    assert rewrite(EXPANDED, grid) == EXPANDED  # idempotent
    assert rewrite(EXPANDED, {}) == SOURCE  # the points of an earlier expansion are replaced
    # Read back as YAML 1.1 too (PyYAML reads `1e-05` as a string):
    assert yaml.safe_load(EXPANDED)["variants"]["sweep-none-lr1em05"] == {"norm": "none", "lr": 1e-05}


def test_the_repository_params_yaml_keeps_its_bytes():
    text = (ROOT / "params.yaml").read_text()
    grid = parse_sweep(with_sweep({"norm": ["batch", "layer"]})).grid()
    expanded = rewrite(text, grid)
    assert expanded.replace("  sweep-batch: {norm: batch}\n  sweep-layer: {norm: layer}\n", "") == text
    assert rewrite(expanded, {}) == text


def test_the_command_writes_a_valid_file_and_twice_the_same_bytes(tmp_path, capsys):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(with_sweep({"norm": ["batch", "layer"]}), sort_keys=False))
    sweep(path)
    first = path.read_bytes()
    sweep(path)
    assert path.read_bytes() == first
    assert capsys.readouterr().out.splitlines() == [
        f"{path}: variants hold the 2 grid points of sweep: (2 added, 0 removed)",
        f"{path}: variants hold the 2 grid points of sweep: (0 added, 0 removed)",
    ]
    assert list(load_params(path).variants) == ["batchnorm", "no_norm", "sweep-batch", "sweep-layer"]


BAD_SWEEPS = {  # params (raw), the one line after "<path>: "
    "unknown-axis-key": (with_sweep({"learning_rate": [0.1]}), "sweep.axes.learning_rate: unknown key"),
    "unknown-sweep-key": (with_sweep({}) | {"sweep": {"axis": {"lr": [0.1]}}}, "sweep.axis: unknown key"),
    "empty-axis": (with_sweep({"lr": []}), "sweep.axes.lr: List should have at least 1 item"),
    "null-axis": (with_sweep({"norm": None}), "sweep.axes.norm: null is not a value here"),
    "bad-word": (with_sweep({"norm": ["batch", "group"]}),
                 "sweep.axes.norm.1: Input should be 'batch', 'layer' or 'none' (got 'group')"),
    "bad-number": (with_sweep({"lr": [0.01, 0]}), "sweep.axes.lr.1: Input should be greater than 0 (got 0)"),
    "string-number": (with_sweep({"lr": ["0.01"]}), "sweep.axes.lr.0: Input should be a valid number"),
    "bad-layers": (with_sweep({"hidden_sizes": [[]]}), "sweep.axes.hidden_sizes.0: List should have at least 1 item"),
    "not-a-list": (with_sweep({"lr": 0.01}), "sweep.axes.lr: Input should be a valid list"),
    "duplicate-value": (with_sweep({"lr": [0.01, 0.03, 0.01]}),
                        "sweep.axes.lr: the values of an axis must be distinct (0.01 twice)"),
    "duplicate-as-float": (with_sweep({"lr": [1, 1.0]}), "sweep.axes.lr: the values of an axis must be distinct"),
    "too-many-points": (with_sweep({"hidden_sizes": [[width] for width in range(1, 17)],
                                    "lr": [0.001 * k for k in range(1, 18)]}),
                        "sweep.axes: 272 grid points (16 x 17); at most 256"),
    "name-too-long": (with_sweep({"hidden_sizes": [[1000] * 13]}),
                      "sweep.axes: grid point 'sweep-h1000x1000x1000x1000x1000x1000x1000x1000x1000x1000x1000x1000x1000'"
                      " has a name longer than 64 characters"),
    # The expansion is validated as a whole: the reference may not vanish with an old grid point.
    "reference-dropped": (with_sweep({"lr": [0.1]}, variants={"no_norm": {}, "sweep-lr0p01": {"lr": 0.01}},
                                     compare=TINY_PARAMS["compare"] | {"reference": "sweep-lr0p01"}),
                          "compare.reference: 'sweep-lr0p01' is not a variant"),
    "bad-elsewhere": (with_sweep({"lr": [0.1]}, seeds=[0, 0]), "seeds: seeds must be distinct"),
}


@pytest.mark.parametrize("raw, message", BAD_SWEEPS.values(), ids=BAD_SWEEPS)
def test_a_bad_sweep_is_one_line_and_leaves_params_yaml_unchanged(tmp_path, raw, message):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    before = path.read_bytes()
    with pytest.raises(ParamsError) as caught:
        sweep(path)
    assert caught.value.exit_code == 2
    assert str(caught.value).startswith(f"{path}: {message}"), str(caught.value)
    assert "\n" not in str(caught.value)
    assert path.read_bytes() == before


GRID = {"lr": [0.01], "norm": ["batch", "none"]}
STALE = {  # variants: as written, the one line after "params.yaml: "
    "not-expanded": ({"no_norm": {}}, "variants.sweep-batch-lr0p01: missing; variants are not the expansion of "
                                      "sweep: (run `python -m pipeline.commands.sweep`)"),
    "point-edited": ({"no_norm": {}, "sweep-batch-lr0p01": {"norm": "batch", "lr": 0.02},
                      "sweep-none-lr0p01": {"norm": "none", "lr": 0.01}},
                     "variants.sweep-batch-lr0p01: not the values of its grid point"),
    "hand-written-with-the-prefix": ({"no_norm": {}, "sweep-batch-lr0p01": {"norm": "batch", "lr": 0.01},
                                      "sweep-none-lr0p01": {"norm": "none", "lr": 0.01}, "sweep-mine": {}},
                                     "variants.sweep-mine: not a grid point of sweep: (names starting 'sweep-' "
                                     "are the grid's)"),
}


@pytest.mark.parametrize("variants, message", STALE.values(), ids=STALE)
def test_variants_that_are_not_the_expansion_are_refused_by_every_stage(variants, message):
    with pytest.raises(ParamsError) as caught:
        parse_params(with_sweep(GRID, variants=variants))
    assert str(caught.value).startswith(f"params.yaml: {message}"), str(caught.value)


def test_the_check_stage_and_the_command_exit_2_with_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(with_sweep(GRID), sort_keys=False))
    env = stage_env()
    check = subprocess.run([sys.executable, "-m", "pipeline.stages.check"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 2
    assert check.stderr == ("error: params.yaml: variants.sweep-batch-lr0p01: missing; variants are not the "
                            "expansion of sweep: (run `python -m pipeline.commands.sweep`)\n")
    assert not (tmp_path / "environment.json").exists()

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(with_sweep({"lr": []}), sort_keys=False))
    command = subprocess.run([sys.executable, "-m", "pipeline.commands.sweep"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
    assert command.returncode == 2
    assert command.stderr.startswith("error: params.yaml: sweep.axes.lr: List should have at least 1 item")
    assert len(command.stderr.splitlines()) == 1


def stages_run(output: str) -> list[str]:
    return re.findall(r"^Running stage '([^']+)'", output, re.MULTILINE)


@pytest.mark.timeout(900)
def test_dvc_repro_runs_a_train_and_an_evaluate_stage_per_grid_point(tmp_path, tiny_mirror):
    path, env = make_project(tmp_path / "project", tiny_mirror[0])
    # Two axes, two points (one value of norm): 3 variants to train with the reference, not 5 (the
    # repro tier's longest test); the grid's names over more values are the unit tests' above.
    raw = with_sweep({"lr": [0.01, 0.03], "norm": ["batch"]}, variants={"no_norm": {"norm": "none"}})
    (path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    run([sys.executable, "-m", "pipeline.commands.sweep"], path, env)
    points = ["sweep-batch-lr0p01", "sweep-batch-lr0p03"]

    ran = stages_run(repro_pipeline(path, env, timeout=900).stdout)
    for stage in ("train", "evaluate"):
        assert [name for name in ran if name.startswith(f"{stage}@")] == [
            f"{stage}@{variant}" for variant in ["no_norm", *points]]
    assert ran[-1] == "compare"
    for variant in points:
        metrics = json.loads((path / "data" / "evaluate" / variant / "metrics.json").read_text())
        assert 0 < metrics["test_acc"] <= 1
        assert variant in (path / "data" / "compare" / "summary.md").read_text()

    # Each of `dvc plots show`'s four comparison plots draws every variant, the grid points included.
    data = json.loads(run(["dvc", "plots", "show", "--json"], path, env).stdout)["data"]
    shown = {plot["content"]["title"]["text"]: plots for plots in data.values() for plot in plots}
    assert set(shown) == set(TITLES.values())
    for metric, title in TITLES.items():
        [plot] = shown[title]
        rows = plot["content"]["data"]["values"]
        for variant in ["no_norm", *points]:
            history = json.loads((path / "data" / "train" / variant / "history.json").read_text())
            assert [float(row[metric]) for row in rows if row["variant"] == variant] == pytest.approx(
                [statistics.fmean(epoch) for epoch in history[metric]], abs=1e-6), (title, variant)

    # A narrower grid: the remaining points are still cached, nothing trains again.
    raw = yaml.safe_load((path / "params.yaml").read_text())
    raw["sweep"]["axes"]["lr"] = [0.01]
    (path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    run([sys.executable, "-m", "pipeline.commands.sweep"], path, env)
    status = run(["dvc", "status"], path, env).stdout
    assert set(re.findall(r"^(\S+):$", status, re.MULTILINE)) == {"check", "curves", "compare"}
