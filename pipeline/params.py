"""Validated parameters: `params.yaml` is loaded once, here, into frozen pydantic models.

Every stage takes a `Params` object; nothing else reads the YAML. A bad value raises
`ParamsError` with one line that names the key path and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
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
VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")

Norm = Literal["batch", "layer", "none"]
Activation = Literal["relu", "tanh", "sigmoid", "gelu"]
Optimizer = Literal["adam", "sgd", "adamw"]
Device = Literal["auto", "cpu", "cuda"]
HiddenSizes = Annotated[list[PositiveInt], Field(min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(_Strict):
    val_size: int = Field(5_000, gt=0, lt=MNIST_TRAIN_SIZE)
    split_seed: int = Field(0, ge=0)


class ModelChoices(_Strict):
    """What a variant may override: the architecture and its optimizer."""

    hidden_sizes: HiddenSizes | None = None
    norm: Norm | None = None
    activation: Activation | None = None
    optimizer: Optimizer | None = None
    lr: float | None = Field(None, gt=0)


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
    threads: int = Field(1, ge=1)
    eval_batch_size: int = Field(2_000, ge=1)


class CompareParams(_Strict):
    reference: str = "no_norm"
    registered_model: str = Field("mnist-mlp", min_length=1)  # the Model Registry name
    alias: str = Field("champion", min_length=1)  # moved to each new version
    select_by: Literal["val_acc", "test_acc"] = "val_acc"  # last-epoch val_acc, or test_acc


class MlflowParams(_Strict):
    experiment_name: str = Field("mnist-batchnorm-lab", min_length=1)


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

    def fingerprint(self) -> str:
        """Digest of every field that changes the numbers (device and threads excluded)."""
        blob = json.dumps(self.model_dump(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class Params(_Strict):
    data: DataParams = DataParams()
    seeds: list[int] = Field([0, 1, 2, 3, 4], min_length=1)
    train: TrainParams = TrainParams()
    variants: dict[str, ModelChoices] = Field(min_length=1)
    compare: CompareParams = CompareParams()
    mlflow: MlflowParams = MlflowParams()

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError("seeds must be distinct")
        if any(seed < 0 for seed in seeds):
            raise ValueError("seeds must be >= 0")
        return seeds

    @field_validator("variants")
    @classmethod
    def _safe_names(cls, variants: dict[str, ModelChoices]) -> dict[str, ModelChoices]:
        for name in variants:
            if not VARIANT_NAME.match(name):
                raise ValueError(
                    f"variant name {name!r} must be letters, digits, '_' or '-' "
                    "(it names folders and runs)"
                )
        return variants

    @model_validator(mode="after")
    def _consistent(self) -> Params:
        train_size = MNIST_TRAIN_SIZE - self.data.val_size
        if self.train.batch_size > train_size:
            raise ValueError(
                f"train.batch_size: {self.train.batch_size} is larger than the train split "
                f"({train_size} images)"
            )
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
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise ParamsError(f"{path}: malformed YAML{where}: {problem}") from None
    return parse_params(raw, str(path))
