"""params.yaml validation: every bad value is one line naming its key path, before any work."""

import re

import pytest
import yaml

from pipeline.errors import ParamsError
from pipeline.config.params import load_params, parse_params
from tests.conftest import ROOT, TINY_PARAMS, tiny_params, with_value

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
    ("variants", {"a\n": {}, "no_norm": {}}, "variants: variant name 'a\\n' must be letters"),
    ("variants", {}, "variants: Dictionary should have at least 1 item"),
    ("compare.reference", "nope", "compare.reference: 'nope' is not a variant (variants: batchnorm, no_norm)"),
    ("seeds", [0, 1, 0], "seeds: seeds must be distinct"),
    # Values that lax parsing would take to mean something else, or that crash where they are used:
    ("train.epochs", True, "train.epochs: Input should be a valid integer (got True)"),
    ("train.epochs", 2.5, "train.epochs: Input should be a valid integer (got 2.5)"),
    ("train.lr", "0.01", "train.lr: Input should be a valid number (got '0.01')"),
    ("train.lr", True, "train.lr: Input should be a valid number (got True)"),
    ("train.lr", float("inf"), "train.lr: Input should be a finite number (got inf)"),
    ("train.adam_eps", float("nan"), "train.adam_eps: Input should be a finite number"),
    ("train.weight_decay", float("inf"), "train.weight_decay: Input should be a finite number"),
    ("seeds", ["0"], "seeds.0: Input should be a valid integer (got '0')"),
    ("seeds", [2**64], "seeds.0: Input should be less than or equal to 4294967295"),
    ("seeds", [-1], "seeds.0: Input should be greater than or equal to 0 (got -1)"),
    ("seeds", list(range(257)), "seeds: List should have at most 256 items"),
    ("data.split_seed", 2**64, "data.split_seed: Input should be less than or equal to 4294967295"),
    ("train.hidden_sizes", [10**9], "train.hidden_sizes.0: Input should be less than or equal to 65536"),
    ("train.hidden_sizes", [32] * 65, "train.hidden_sizes: List should have at most 64 items"),
    ("train.threads", 10**6, "train.threads: Input should be less than or equal to 256"),
    ("train.batch_size", 1, "variants.batchnorm: batch norm needs train.batch_size >= 2"),
    ("variants", {"Big": {}, "big": {}, "no_norm": {}}, "variants: variant names must differ in more than letter case"),
    ("variants", {"x" * 65: {}, "no_norm": {}}, "variants: variant name 'xxxx"),
    ("compare.alias", "latest", "compare.alias: 'latest' is reserved by MLflow"),
    ("compare.alias", "v2", "compare.alias: 'v2' is reserved by MLflow"),
    ("compare.alias", "the best", "compare.alias: 'the best': an alias is 1-255 letters, digits"),
    ("variants.batchnorm.norm", None, "variants.batchnorm.norm: null is not a value here; leave the key out"),
    ("compare.challenger_alias", "champion", "compare.challenger_alias: 'champion' is compare.alias already"),
    ("compare.registered_model", "team/mnist", "compare.registered_model: 'team/mnist' is not a registered model name"),
    ("compare.registered_model", "   ", "compare.registered_model: '   ' is not a registered model name"),
    ("mlflow.experiment_name", " ", "mlflow.experiment_name: the experiment name is blank"),
    ("mlflow.experiment_name", "x" * 501, "mlflow.experiment_name: String should have at most 500 characters"),
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
    "duplicate-top-level-key": ("seeds: [0]\nseeds: [1]\n",
                                r'malformed YAML at line 2, column 1: found duplicate key "seeds"'),
    "duplicate-nested-key": ("variants:\n  no_norm:\n    lr: 0.1\n    lr: 0.2\n",
                             r'malformed YAML at line 4, column 5: found duplicate key "lr"'),
    "yaml-1.1-boolean-word": ("train:\n  norm: no\nvariants:\n  no_norm: {}\ncompare:\n  reference: no_norm\n",
                              r"train\.norm: Input should be 'batch', 'layer' or 'none' \(got 'no'\)"),
}


def test_numbers_are_read_as_dvc_reads_them(tmp_path):
    """YAML 1.2, as DVC's parser: `1e-3` is a number (PyYAML's YAML 1.1 would read a string)."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(TINY_PARAMS).replace("lr: 0.01", "lr: 1e-3"))
    assert load_params(path).train.lr == 0.001


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
