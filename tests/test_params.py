"""params.yaml validation: every bad value is one line naming its key path, before any work."""

from __future__ import annotations

import copy
import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.errors import ParamsError
from pipeline.params import load_params, parse_params
from tests.conftest import ROOT, TINY_PARAMS, tiny_params


def with_value(dotted: str, value: object) -> dict:
    """TINY_PARAMS with the key at `dotted` (e.g. `train.lr`) set to `value`."""
    raw = copy.deepcopy(TINY_PARAMS)
    *parents, key = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[key] = value
    return raw


BAD_VALUES = [  # key path, value, what the one-line message says (after "params.yaml: ")
    ("train.learning_rate", 0.1, "train.learning_rate: unknown key"),
    ("variants.batchnorm.learning_rate", 0.1, "variants.batchnorm.learning_rate: unknown key"),
    ("train.epochs", "ten", "train.epochs: Input should be a valid integer"),
    ("train.lr", 0, "train.lr: Input should be greater than 0 (got 0)"),
    ("train.lr", -0.1, "train.lr: Input should be greater than 0 (got -0.1)"),
    ("variants.batchnorm.lr", 0.0, "variants.batchnorm.lr: Input should be greater than 0"),
    ("train.epochs", 0, "train.epochs: Input should be greater than or equal to 1 (got 0)"),
    ("train.batch_size", 0, "train.batch_size: Input should be greater than or equal to 1 (got 0)"),
    ("train.batch_size", 59_901, "train.batch_size: 59901 is larger than the train split (59900 images)"),
    ("train.hidden_sizes", [], "train.hidden_sizes: List should have at least 1 item"),
    ("train.hidden_sizes", [32, 0], "train.hidden_sizes.1: Input should be greater than 0 (got 0)"),
    ("variants.batchnorm.hidden_sizes", [], "variants.batchnorm.hidden_sizes: List should have at least 1 item"),
    ("data.val_size", 0, "data.val_size: Input should be greater than 0 (got 0)"),
    ("data.val_size", 60_000, "data.val_size: Input should be less than 60000 (got 60000)"),
    ("train.norm", "group", "train.norm: Input should be 'batch', 'layer' or 'none' (got 'group')"),
    ("variants.batchnorm.norm", "group", "variants.batchnorm.norm: Input should be 'batch', 'layer' or 'none'"),
    ("train.activation", "swish", "train.activation: Input should be 'relu', 'tanh', 'sigmoid' or 'gelu'"),
    ("train.optimizer", "lbfgs", "train.optimizer: Input should be 'adam', 'sgd' or 'adamw'"),
    ("train.bias_before_bn", "sometimes", "train.bias_before_bn: Input should be a valid boolean"),
    ("variants", {"a/b": {}, "no_norm": {}}, "variants: variant name 'a/b' must be letters"),
    ("variants", {"a b": {}, "no_norm": {}}, "variants: variant name 'a b' must be letters"),
    ("variants", {"..": {}, "no_norm": {}}, "variants: variant name '..' must be letters"),
    ("variants", {}, "variants: Dictionary should have at least 1 item"),
    ("compare.reference", "nope", "compare.reference: 'nope' is not a variant (variants: batchnorm, no_norm)"),
    ("seeds", [0, 1, 0], "seeds: seeds must be distinct"),
]


@pytest.mark.parametrize("key, value, message", BAD_VALUES, ids=[f"{k}={v!r}" for k, v, _ in BAD_VALUES])
def test_bad_value_names_its_key_path(key, value, message):
    with pytest.raises(ParamsError) as caught:
        parse_params(with_value(key, value))
    assert str(caught.value).startswith(f"params.yaml: {message}")
    assert "\n" not in str(caught.value)


def test_missing_variants_is_reported():
    raw = {key: value for key, value in TINY_PARAMS.items() if key != "variants"}
    with pytest.raises(ParamsError, match=r"^params\.yaml: variants: required key is missing$"):
        parse_params(raw)


BAD_FILES = {  # file content (None: no file), the one-line message after the path
    "malformed-yaml": ("train:\n  epochs: [1, 2\n", r"malformed YAML at line 3, column 1: .*"),
    "tab-indented": ("train:\n\tepochs: 2\n", r"malformed YAML at line 2, column 1: found character '\\t' .*"),
    "top-level-list": ("- 1\n- 2\n", r"expected a mapping of keys at the top level"),
    "empty-file": ("", r"expected a mapping of keys at the top level"),
    "not-utf8": (b"train:\n  norm: \xff\n", r"cannot read: not UTF-8 text .*"),
    "missing-file": (None, r"file not found \(run from the project root\)"),
}


@pytest.mark.parametrize("content, message", BAD_FILES.values(), ids=BAD_FILES)
def test_bad_file_names_the_file_and_the_problem(tmp_path, content, message):
    path = tmp_path / "params.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ParamsError) as caught:
        load_params(path)
    assert caught.value.exit_code == 2
    assert re.fullmatch(re.escape(f"{path}: ") + message, str(caught.value)), str(caught.value)


@pytest.fixture
def stage_dir(tmp_path) -> Path:
    """A project folder whose data/ tree already holds raw and prepared files."""
    for name, content in {
        "data/raw/train-images-idx3-ubyte.gz": b"raw bytes",
        "data/prepared/train.pt": b"old prepared split",
        "data/prepared/manifest.json": b'{"digest": "old"}\n',
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    return tmp_path


def tree_digests(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


STAGE_CASES = {  # params.yaml text (None: no file), what stderr's one line starts with
    "unknown-key": (yaml.safe_dump(with_value("variants.batchnorm.learning_rate", 0.1)),
                    "error: params.yaml: variants.batchnorm.learning_rate: unknown key"),
    "malformed-yaml": ("train: [1\n", "error: params.yaml: malformed YAML at line 2"),
    "missing-file": (None, "error: params.yaml: file not found"),
}


@pytest.mark.parametrize("text, first_words", STAGE_CASES.values(), ids=STAGE_CASES)
def test_prepare_stage_rejects_bad_params_before_touching_data(stage_dir, text, first_words):
    if text is not None:
        (stage_dir / "params.yaml").write_text(text)
    before = tree_digests(stage_dir / "data")
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.prepare", "--raw", "data/raw", "--out", "data/prepared"],
        cwd=stage_dir, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(first_words), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert tree_digests(stage_dir / "data") == before


def test_repository_params_load():
    params = load_params(ROOT / "params.yaml")
    assert params.compare.reference in params.variants
    assert {"batchnorm", "no_norm"} <= set(params.variants)


def test_variant_merges_its_overrides_with_the_shared_defaults():
    params = tiny_params(train={"lr": 0.02, "hidden_sizes": [16]},
                         variants={"batchnorm": {"norm": "batch", "lr": 0.5}})
    batchnorm, no_norm = params.variant("batchnorm"), params.variant("no_norm")
    assert (batchnorm.norm, batchnorm.lr, batchnorm.hidden_sizes) == ("batch", 0.5, [16])
    assert (no_norm.norm, no_norm.lr, no_norm.hidden_sizes) == ("none", 0.02, [16])
    assert batchnorm.epochs == no_norm.epochs == TINY_PARAMS["train"]["epochs"]
    assert batchnorm.seeds == TINY_PARAMS["seeds"]


def test_unknown_variant_is_a_params_error():
    with pytest.raises(ParamsError, match=r"^variants\.nope: no such variant \(variants: batchnorm, no_norm\)$"):
        tiny_params().variant("nope")


def test_fingerprint_follows_the_numbers_not_the_machine():
    base = tiny_params().variant("batchnorm").fingerprint()
    assert tiny_params(train={"lr": 0.02}).variant("batchnorm").fingerprint() != base
    assert tiny_params(seeds=[0, 2]).variant("batchnorm").fingerprint() != base
    assert tiny_params(train={"bias_before_bn": True}).variant("batchnorm").fingerprint() != base
    assert tiny_params(train={"device": "cpu", "threads": 4}).variant("batchnorm").fingerprint() == base
    assert tiny_params().variant("no_norm").fingerprint() != base
