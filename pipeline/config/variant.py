"""What a variant is, defined once: the fields of `train:` (`TrainParams`). The rest derive from it:
`ModelChoices`, the subset a variant may override in `variants:` (each optional), and
`VariantConfig`, one variant with the `train:` defaults filled in, which the train, evaluate and
compare stages take whole (and checkpoints carry).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, create_model, field_validator
from pydantic.fields import FieldInfo

# Every seed goes into torch.Generator().manual_seed(seed * 1_000_003 + epoch) (training.py);
# below 2**32 that stays far inside the generator's 64 bits.
MAX_SEED = 2**32 - 1
MAX_WIDTH = 65_536  # units per hidden layer
MAX_LAYERS = 64
MAX_THREADS = 256

Norm = Literal["batch", "layer", "none"]
Activation = Literal["relu", "tanh", "sigmoid", "gelu"]
Optimizer = Literal["adam", "sgd", "adamw"]
Device = Literal["auto", "cpu", "cuda"]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
HiddenSizes = Annotated[list[Annotated[PositiveInt, Field(le=MAX_WIDTH)]], Field(min_length=1, max_length=MAX_LAYERS)]


class Strict(BaseModel):
    """A params section: unknown keys refused, values frozen, no coercion, finite numbers."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class TrainParams(Strict):
    """Shared training settings; the fields named in VARIANT_CHOICES are every variant's defaults."""

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
    # TF1's dense layer kept its bias before batch norm; the port drops it (pipeline/nn/model.py).
    bias_before_bn: bool = False
    weight_decay: float | None = Field(None, ge=0)
    device: Device = "auto"
    threads: int = Field(1, ge=1, le=MAX_THREADS)
    eval_batch_size: int = Field(1_000, ge=1)


VARIANT_CHOICES = ("hidden_sizes", "norm", "activation", "optimizer", "lr")  # the architecture and its optimizer
RUNTIME = ("device", "threads")  # where a variant runs, not what it is: no part of a VariantConfig


def _constrained(field: FieldInfo) -> object:
    """The field's type with its constraints (`gt=0`, lengths) attached, without its default."""
    return Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation


class Choices(Strict):
    @field_validator("*", mode="before")
    @classmethod
    def _no_explicit_null(cls, value: object) -> object:
        # `norm: null` reads as "no norm" but would mean "inherit train.norm": refuse the doubt.
        if value is None:
            raise ValueError("null is not a value here; leave the key out to use the train: default")
        return value


ModelChoices = create_model(
    "ModelChoices", __base__=Choices, __doc__="What a variant may override: the architecture and its optimizer.",
    **{key: (_constrained(TrainParams.model_fields[key]) | None, None) for key in VARIANT_CHOICES},
)

VariantConfig = create_model(
    "VariantConfig", __base__=Strict,
    __doc__="One variant with the shared defaults filled in: everything that shapes its training.",
    name=(str, ...), seeds=(list[int], ...),
    **{key: (_constrained(field), ...) for key, field in TrainParams.model_fields.items() if key not in RUNTIME},
)


def variant_config(name: str, seeds: list[int], train: TrainParams, choices: ModelChoices) -> VariantConfig:
    shared = train.model_dump(exclude=set(RUNTIME))
    return VariantConfig(name=name, seeds=seeds, **(shared | choices.model_dump(exclude_none=True)))
