"""Validated parameters: `params.yaml` is loaded once, here, into frozen pydantic models.

Every stage takes a `Params` object; nothing else reads the YAML. A bad value raises
`ParamsError` with one line that names the key path and what is wrong.

The YAML is read as DVC reads it (ruamel.yaml, YAML 1.2: `1e-3` is a number, `yes` a word),
so the values checked here are the values `dvc.lock` records. Types are strict: `true` is no
epoch count and `"0.01"` no learning rate; numbers are finite; every bound is what the code
that consumes the value can run (seeds fit torch's generator, names are what MLflow accepts).
The grid points of `sweep:` must be in `variants:` as `python -m pipeline.sweep` writes them.
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from pipeline.errors import ParamsError

PARAMS_FILE = Path("params.yaml")  # read from the project root, where DVC runs every stage
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
# Every grid point is a train and an evaluate stage, an MLflow run and a line in each plot.
MAX_GRID_POINTS = 256
GRID_PREFIX = "sweep-"  # the variants named so are the grid points of `sweep:`, and nothing else

Norm = Literal["batch", "layer", "none"]
Activation = Literal["relu", "tanh", "sigmoid", "gelu"]
Optimizer = Literal["adam", "sgd", "adamw"]
Device = Literal["auto", "cpu", "cuda"]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
HiddenSizes = Annotated[list[Annotated[PositiveInt, Field(le=MAX_WIDTH)]], Field(min_length=1, max_length=MAX_LAYERS)]
LearningRate = Annotated[float, Field(gt=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class DataParams(_Strict):
    val_size: int = Field(5_000, gt=0, lt=MNIST_TRAIN_SIZE)
    split_seed: Seed = 0


class _Choices(_Strict):
    @field_validator("*", mode="before")
    @classmethod
    def _no_explicit_null(cls, value: object) -> object:
        # `norm: null` reads as "no norm" but would mean "inherit train.norm": refuse the doubt.
        if value is None:
            raise ValueError("null is not a value here; leave the key out to use the train: default")
        return value


class ModelChoices(_Choices):
    """What a variant may override: the architecture and its optimizer."""

    hidden_sizes: HiddenSizes | None = None
    norm: Norm | None = None
    activation: Activation | None = None
    optimizer: Optimizer | None = None
    lr: LearningRate | None = None


class _Axes(_Choices):
    @field_validator("*")
    @classmethod
    def _distinct(cls, values: list) -> list:
        seen = set()
        for value in values:
            if repr(value) in seen:  # validated values: `1` and `1.0` are both 1.0 by now
                raise ValueError(f"the values of an axis must be distinct ({value!r} twice)")
            seen.add(repr(value))
        return values


def _axis(choice: FieldInfo) -> tuple:
    """The axis of a ModelChoices key: a non-empty list of values that the key itself accepts."""
    (value_type,) = [arg for arg in get_args(choice.annotation) if arg is not type(None)]
    return list[value_type] | None, Field(None, min_length=1, max_length=MAX_GRID_POINTS)


# Built from ModelChoices so that an axis accepts exactly what a variant's key does, and a key
# added there can be swept without a second list of types to keep in step.
SweepAxes = create_model(
    "SweepAxes", __base__=_Axes, __doc__="Values to cross, per key a variant may override.",
    **{key: _axis(choice) for key, choice in ModelChoices.model_fields.items()},
)


def _number(value: float) -> str:
    # repr is the shortest text that reads back as the same number, so distinct values get
    # distinct names. '-' joins a name's parts and '.' would split the key path
    # `variants.<name>`, so they become 'm' and 'p': 0.003 -> 0p003, 1e-05 -> 1em05.
    return repr(value).replace(".", "p").replace("e-", "em").replace("e+", "e")


NAME_LABELS = {"hidden_sizes": "h"}  # a number in a name follows its key's label; words go bare


def grid_point_name(choices: dict) -> str:
    """`sweep-h64x64-batch-tanh-lr0p003`: the prefix, then each swept key's value in ModelChoices'
    order. Only [a-z0-9-]: no '.', which DVC would read as a key path in `variants.<name>`."""
    parts = []
    for key, value in choices.items():
        if isinstance(value, str):
            parts.append(value)  # a word of the key's Literal; no two keys share one
        else:
            numbers = value if isinstance(value, list) else [value]
            parts.append(NAME_LABELS.get(key, key) + "x".join(_number(number) for number in numbers))
    return GRID_PREFIX + "-".join(parts)


def expand(axes: SweepAxes) -> dict[str, ModelChoices]:
    """The grid points by name, in the order of the axes' values (the last key varies fastest)."""
    swept = axes.model_dump(exclude_none=True)  # ModelChoices' key order, so names are stable
    if not swept:
        return {}
    points = [dict(zip(swept, values)) for values in itertools.product(*swept.values())]
    return {grid_point_name(point): ModelChoices.model_validate(point) for point in points}


class SweepParams(_Strict):
    """A grid of variants: every combination of the axes' values is one variant, a grid point."""

    axes: SweepAxes = SweepAxes()

    @field_validator("axes")
    @classmethod
    def _bounded(cls, axes: SweepAxes) -> SweepAxes:
        lengths = [len(values) for values in axes.model_dump(exclude_none=True).values()]
        if lengths and math.prod(lengths) > MAX_GRID_POINTS:
            raise ValueError(f"{math.prod(lengths)} grid points ({' x '.join(map(str, lengths))}); "
                             f"at most {MAX_GRID_POINTS}")
        for name in expand(axes):
            if not VARIANT_NAME.match(name):  # only its length can fail the rule
                raise ValueError(f"grid point {name!r} has a name longer than 64 characters "
                                 "(it names folders, stages and runs)")
        return axes

    def grid(self) -> dict[str, ModelChoices]:
        return expand(self.axes)


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
    sweep: SweepParams = SweepParams()
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
        stale = _stale_grid_point(self.variants, self.sweep.grid())
        if stale:
            raise ValueError(f"variants.{stale}; variants are not the expansion of sweep: "
                             "(run `python -m pipeline.sweep`)")
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


def _stale_grid_point(variants: dict[str, ModelChoices], grid: dict[str, ModelChoices]) -> str | None:
    """`<name>: <what>` for the first grid point that `variants:` and `grid` disagree on; else None."""
    written = {name: choices for name, choices in variants.items() if name.startswith(GRID_PREFIX)}
    for name in [*grid, *written]:
        if name not in written:
            return f"{name}: missing"
        if name not in grid:
            return f"{name}: not a grid point of sweep: (names starting {GRID_PREFIX!r} are the grid's)"
        if written[name].model_dump(exclude_none=True) != grid[name].model_dump(exclude_none=True):
            return f"{name}: not the values of its grid point"
    return None


def _describe(error: ValidationError, source: str, within: tuple[str, ...]) -> str:
    parts = []
    for issue in error.errors():
        path = ".".join(str(part) for part in (*within, *issue["loc"]))
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


def _validate(model: type[BaseModel], raw: object, source: str, within: tuple[str, ...] = ()):
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        raise ParamsError(_describe(error, source, within)) from None


def parse_params(raw: object, source: str = "params.yaml") -> Params:
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of keys at the top level")
    return _validate(Params, raw, source)


def parse_sweep(raw: dict, source: str = "params.yaml") -> SweepParams:
    """The `sweep:` section alone: its grid, before `variants:` holds it (pipeline/sweep.py)."""
    return _validate(SweepParams, raw.get("sweep", {}), source, ("sweep",))


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


def read_params(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found (run from the project root)") from None
    except OSError as error:
        raise ParamsError(f"{path}: cannot read: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ParamsError(f"{path}: cannot read: not UTF-8 text (byte {error.start})") from None


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    path = Path(path)
    return parse_params(parse_yaml(read_params(path), str(path)), str(path))
