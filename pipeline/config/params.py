"""Validated parameters: `params.yaml` is loaded once, here, into frozen pydantic models; every
stage takes a `Params`. A bad value is a `ParamsError`: one line naming the key path and what is wrong.

The YAML is read as DVC reads it (ruamel.yaml, YAML 1.2: `1e-3` is a number, `yes` a word), so the
values checked are the values `dvc.lock` records. Types are strict (`true` is no epoch count, `"0.01"`
no learning rate), numbers finite, every bound what the code that consumes the value can run.
"""

import re
from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ParamsError
from pipeline.config.grid import VARIANT_NAME, SweepParams, stale_grid_point
from pipeline.config.variant import RUNTIME, ModelChoices, Seed, Strict, TrainParams, VariantConfig

PARAMS_FILE = Path("params.yaml")  # read from the project root, where DVC runs every stage
MNIST_TRAIN_SIZE = 60_000
MAX_SEEDS = 256  # the seeds list is logged as one MLflow param (at most 6,000 characters)
PYDANTIC_MESSAGES = {"extra_forbidden": "unknown key", "missing": "required key is missing"}


class DataParams(Strict):
    val_size: int = Field(5_000, gt=0, lt=MNIST_TRAIN_SIZE)
    split_seed: Seed = 0


class CompareParams(Strict):
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
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,255}", alias):  # mlflow.utils.validation's alias rule
            raise ValueError(f"{alias!r}: an alias is 1-255 letters, digits, '_' or '-'")
        if alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
            raise ValueError(f"{alias!r} is reserved by MLflow ('latest' and 'v<number>' name versions)")
        return alias


class MlflowParams(Strict):
    experiment_name: str = Field("mnist-batchnorm-lab", min_length=1, max_length=500)

    @field_validator("experiment_name")
    @classmethod
    def _not_blank(cls, name: str) -> str:
        if not name.strip():
            raise ValueError("the experiment name is blank")
        return name


class Params(Strict):
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
            if not VARIANT_NAME.fullmatch(name):
                raise ValueError(f"variant name {name!r} must be letters, digits, '_' or '-' "
                                 "(at most 64; it names folders, stages and runs)")
        if len({name.lower() for name in variants}) != len(variants):
            raise ValueError("variant names must differ in more than letter case "
                             "(they name folders, and some file systems ignore case)")
        return variants

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if stale := stale_grid_point(self.variants, self.sweep.grid()):
            raise ValueError(f"variants.{stale}; variants are not the expansion of sweep: "
                             "(run `python -m pipeline.commands.sweep`)")
        train_size = MNIST_TRAIN_SIZE - self.data.val_size
        if self.train.batch_size > train_size:
            raise ValueError(f"train.batch_size: {self.train.batch_size} is larger than the train split "
                             f"({train_size} images)")
        for name in self.variants:
            config = self.variant(name)
            if config.norm == "batch" and config.batch_size < 2:
                raise ValueError(f"variants.{name}: batch norm needs train.batch_size >= 2 "
                                 "(the statistics of one image are undefined)")
        if self.compare.alias == self.compare.challenger_alias:
            raise ValueError(f"compare.challenger_alias: {self.compare.alias!r} is compare.alias already")
        if self.compare.reference not in self.variants:
            raise ValueError(f"compare.reference: {self.compare.reference!r} is not a variant "
                             f"(variants: {', '.join(self.variants)})")
        return self

    def variant(self, name: str) -> VariantConfig:
        if name not in self.variants:
            raise ParamsError(f"variants.{name}: no such variant (variants: {', '.join(self.variants)})")
        choices = self.train.model_dump(exclude=set(RUNTIME)) | self.variants[name].model_dump(exclude_none=True)
        return VariantConfig(name=name, seeds=self.seeds, **choices)


def _validate(model: type[BaseModel], raw: object, source: str, within: tuple[str, ...] = ()):
    """`raw` as a `model`, or a ParamsError: `<source>: <key path>: <what is wrong>`, each issue."""
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        parts = []
        for issue in error.errors():
            path = ".".join(str(part) for part in (*within, *issue["loc"]))
            message = PYDANTIC_MESSAGES.get(issue["type"], issue["msg"].removeprefix("Value error, "))
            if issue["type"] not in (*PYDANTIC_MESSAGES, "value_error"):
                message += f" (got {issue['input']!r})"
            parts.append(f"{path}: {message}" if path else message)
        raise ParamsError(f"{source}: " + "; ".join(parts)) from None


def parse_params(raw: object, source: str = "params.yaml") -> Params:
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of keys at the top level")
    return _validate(Params, raw, source)


def parse_sweep(raw: dict, source: str = "params.yaml") -> SweepParams:
    """The `sweep:` section alone: its grid, before `variants:` holds it (pipeline/commands/sweep.py)."""
    return _validate(SweepParams, raw.get("sweep", {}), source, ("sweep",))


def parse_yaml(text: str, source: str) -> object:
    """The document as DVC reads it; a duplicate key or a syntax error is a `ParamsError`."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    try:
        return YAML(typ="safe", pure=True).load(text)
    except MarkedYAMLError as error:  # a duplicate key among them: ruamel refuses it, as DVC does
        mark = error.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = (error.problem or "invalid YAML").partition(" with value")[0]  # a list's value reads "[]" there
        raise ParamsError(f"{source}: malformed YAML{where}: {problem}") from None
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


def load_params(path: Path = PARAMS_FILE) -> Params:
    return parse_params(parse_yaml(read_params(path), str(path)), str(path))
