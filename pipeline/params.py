"""Validated parameters: `params.yaml` is loaded once, here, into frozen pydantic models.

Every stage takes a `Params` object; nothing else reads the YAML. A bad value raises
`ParamsError` with one line that names the key path and what is wrong.

The YAML is read as DVC reads it (ruamel.yaml, YAML 1.2: `1e-3` is a number, `yes` a word),
so the values checked here are the values `dvc.lock` records. Types are strict: `true` is no
epoch count and `"0.01"` no learning rate; numbers are finite; every bound is what the code
that consumes the value can run (seeds fit torch's generator, names are what MLflow accepts).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.errors import ParamsError

MNIST_TRAIN_SIZE = 60_000
VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # a folder, a DVC stage key, a run name
MLFLOW_ALIAS = re.compile(r"^[A-Za-z0-9_-]{1,255}$")  # mlflow.utils.validation's alias rule
MLFLOW_VERSION_ALIAS = re.compile(r"^[vV]\d+$")  # reserved by MLflow for version numbers
# Every seed goes into torch.Generator().manual_seed(seed * 1_000_003 + epoch) (training.py);
# below 2**32 that stays far inside the generator's 64 bits.
MAX_SEED = 2**32 - 1
MAX_SEEDS = 256  # the seeds list is logged as one MLflow param (at most 6,000 characters)
MAX_WIDTH = 65_536  # units per hidden layer
MAX_LAYERS = 64
MAX_THREADS = 256

Norm = Literal["batch", "layer", "none"]
Activation = Literal["relu", "tanh", "sigmoid", "gelu"]
Optimizer = Literal["adam", "sgd", "adamw"]
Device = Literal["auto", "cpu", "cuda"]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
HiddenSizes = Annotated[list[Annotated[PositiveInt, Field(le=MAX_WIDTH)]], Field(min_length=1, max_length=MAX_LAYERS)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class DataParams(_Strict):
    val_size: int = Field(5_000, gt=0, lt=MNIST_TRAIN_SIZE)
    split_seed: Seed = 0


class ModelChoices(_Strict):
    """What a variant may override: the architecture and its optimizer."""

    hidden_sizes: HiddenSizes | None = None
    norm: Norm | None = None
    activation: Activation | None = None
    optimizer: Optimizer | None = None
    lr: float | None = Field(None, gt=0)

    @field_validator("*", mode="before")
    @classmethod
    def _no_explicit_null(cls, value: object) -> object:
        # `norm: null` reads as "no norm" but would mean "inherit train.norm": refuse the doubt.
        if value is None:
            raise ValueError("null is not a value here; leave the key out to use the train: default")
        return value


class TrainParams(_Strict):
    """Shared training settings; the model and optimizer fields are every variant's defaults."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    hidden_sizes: HiddenSizes = [32, 32]
    norm: Norm = "none"
    activation: Activation = "relu"
    optimizer: Optimizer = "adam"
    lr: float = Field(0.01, gt=0)
    # TensorFlow 1 defaults, which the lab ran with: BN decay 0.99 is PyTorch momentum 0.01.
    bn_momentum: float = Field(0.01, gt=0, lt=1)
    norm_eps: float = Field(1e-3, gt=0)
    adam_eps: float = Field(1e-8, gt=0)
    # TF1's dense layer kept its bias before batch norm; the port drops it (pipeline/model.py).
    bias_before_bn: bool = False
    weight_decay: float | None = Field(None, ge=0)
    device: Device = "auto"
    threads: int = Field(1, ge=1, le=MAX_THREADS)
    eval_batch_size: int = Field(2_000, ge=1)


class CompareParams(_Strict):
    reference: str = "no_norm"
    registered_model: str = Field("mnist-mlp", min_length=1, max_length=255)  # the Model Registry name
    alias: str = "champion"  # moved to a new version only when it beats the current champion
    challenger_alias: str = "challenger"  # a new version that does not
    select_by: Literal["val_acc", "test_acc"] = "val_acc"  # last-epoch val_acc, or test_acc

    @field_validator("registered_model")
    @classmethod
    def _model_name(cls, name: str) -> str:
        # mlflow.utils.validation._validate_model_name, checked before any stage runs
        if not name.strip() or "/" in name or ":" in name or name == "." or name.startswith(".."):
            raise ValueError(f"{name!r} is not a registered model name MLflow accepts "
                             "(not blank, no '/' or ':', not '.' or starting with '..')")
        return name

    @field_validator("alias", "challenger_alias")
    @classmethod
    def _alias(cls, alias: str) -> str:
        if not MLFLOW_ALIAS.match(alias):
            raise ValueError(f"{alias!r}: an alias is 1-255 letters, digits, '_' or '-'")
        if alias.lower() == "latest" or MLFLOW_VERSION_ALIAS.match(alias):
            raise ValueError(f"{alias!r} is reserved by MLflow ('latest' and 'v<number>' name versions)")
        return alias


class MlflowParams(_Strict):
    experiment_name: str = Field("mnist-batchnorm-lab", min_length=1, max_length=500)

    @field_validator("experiment_name")
    @classmethod
    def _not_blank(cls, name: str) -> str:
        if not name.strip():
            raise ValueError("the experiment name is blank")
        return name


class VariantConfig(_Strict):
    """One variant with the shared defaults filled in: everything that shapes its training."""

    name: str
    seeds: list[int]
    epochs: int
    batch_size: int
    hidden_sizes: list[int]
    norm: Norm
    activation: Activation
    optimizer: Optimizer
    lr: float
    bn_momentum: float
    norm_eps: float
    adam_eps: float
    bias_before_bn: bool
    weight_decay: float | None
    eval_batch_size: int


class Params(_Strict):
    data: DataParams = DataParams()
    seeds: list[Seed] = Field([0, 1, 2, 3, 4], min_length=1, max_length=MAX_SEEDS)
    train: TrainParams = TrainParams()
    variants: dict[str, ModelChoices] = Field(min_length=1)
    compare: CompareParams = CompareParams()
    mlflow: MlflowParams = MlflowParams()

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError("seeds must be distinct")
        return seeds

    @field_validator("variants")
    @classmethod
    def _safe_names(cls, variants: dict[str, ModelChoices]) -> dict[str, ModelChoices]:
        for name in variants:
            if not VARIANT_NAME.match(name):
                raise ValueError(
                    f"variant name {name!r} must be letters, digits, '_' or '-' "
                    "(at most 64; it names folders, stages and runs)"
                )
        folded = [name.lower() for name in variants]
        if len(set(folded)) != len(folded):
            raise ValueError("variant names must differ in more than letter case "
                             "(they name folders, and some file systems ignore case)")
        return variants

    @model_validator(mode="after")
    def _consistent(self) -> Params:
        train_size = MNIST_TRAIN_SIZE - self.data.val_size
        if self.train.batch_size > train_size:
            raise ValueError(
                f"train.batch_size: {self.train.batch_size} is larger than the train split "
                f"({train_size} images)"
            )
        for name in self.variants:
            config = self.variant(name)
            if config.norm == "batch" and config.batch_size < 2:
                raise ValueError(f"variants.{name}: batch norm needs train.batch_size >= 2 "
                                 "(the statistics of one image are undefined)")
        if self.compare.alias == self.compare.challenger_alias:
            raise ValueError(f"compare.challenger_alias: {self.compare.alias!r} is compare.alias already")
        if self.compare.reference not in self.variants:
            raise ValueError(
                f"compare.reference: {self.compare.reference!r} is not a variant "
                f"(variants: {', '.join(self.variants)})"
            )
        return self

    def variant(self, name: str) -> VariantConfig:
        if name not in self.variants:
            raise ParamsError(f"variants.{name}: no such variant (variants: {', '.join(self.variants)})")
        overrides = self.variants[name].model_dump(exclude_none=True)
        shared = self.train.model_dump(exclude={"device", "threads"})
        return VariantConfig(name=name, seeds=self.seeds, **(shared | overrides))


def _describe(error: ValidationError, source: str) -> str:
    parts = []
    for issue in error.errors():
        path = ".".join(str(part) for part in issue["loc"])
        if issue["type"] == "extra_forbidden":
            message = "unknown key"
        elif issue["type"] == "missing":
            message = "required key is missing"
        else:
            message = issue["msg"].removeprefix("Value error, ")
            if "input" in issue and issue["type"] not in ("value_error",):
                message += f" (got {issue['input']!r})"
        parts.append(f"{path}: {message}" if path else message)
    return f"{source}: " + "; ".join(parts)


def parse_params(raw: object, source: str = "params.yaml") -> Params:
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of keys at the top level")
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ParamsError(_describe(error, source)) from None


def _duplicate_key(node, path: str = "") -> str | None:
    """The first key that a mapping of the composed YAML repeats, with where; else None."""
    if node is None:
        return None
    if node.tag.endswith(":map"):
        seen = {}
        for key, value in node.value:
            where = f"{path}.{key.value}" if path else str(key.value)
            if key.value in seen:
                return (f"{where}: duplicate key (lines {seen[key.value] + 1} and "
                        f"{key.start_mark.line + 1}); YAML would silently keep the last")
            seen[key.value] = key.start_mark.line
            found = _duplicate_key(value, where)
            if found:
                return found
    elif node.tag.endswith(":seq"):
        for index, item in enumerate(node.value):
            found = _duplicate_key(item, f"{path}.{index}")
            if found:
                return found
    return None


def parse_yaml(text: str, source: str) -> object:
    """The document as DVC reads it; a duplicate key or a syntax error is a `ParamsError`."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    yaml = YAML(typ="safe", pure=True)
    try:
        duplicate = _duplicate_key(yaml.compose(text))
        if duplicate:
            raise ParamsError(f"{source}: {duplicate}")
        return yaml.load(text)
    except MarkedYAMLError as error:
        mark = error.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ParamsError(f"{source}: malformed YAML{where}: {error.problem or 'invalid YAML'}") from None
    except YAMLError as error:
        raise ParamsError(f"{source}: malformed YAML: {error}") from None


def load_params(path: Path | str = "params.yaml") -> Params:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found (run from the project root)") from None
    except OSError as error:
        raise ParamsError(f"{path}: cannot read: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ParamsError(f"{path}: cannot read: not UTF-8 text (byte {error.start})") from None
    return parse_params(parse_yaml(text, str(path)), str(path))
