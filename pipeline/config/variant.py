"""What a variant is, defined once: the fields of `train:` (`TrainParams`). From it, `ModelChoices`: what a
variant may override in `variants:`; `VariantConfig`: one variant with the `train:` defaults filled in,
which the train, evaluate and compare stages take whole (and checkpoints carry)."""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, create_model, field_validator

# Every seed goes into torch.Generator().manual_seed(seed * 1_000_003 + epoch) (training.py);
# below 2**32 that stays far inside the generator's 64 bits.
MAX_SEED = 2**32 - 1
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
Width = Annotated[PositiveInt, Field(le=65_536)]  # units per hidden layer


class Strict(BaseModel):  # a params section
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class TrainParams(Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    hidden_sizes: list[Width] = Field([32, 32], min_length=1, max_length=64)
    norm: Literal["batch", "layer", "none"] = "none"
    activation: Literal["relu", "tanh", "sigmoid", "gelu"] = "relu"
    optimizer: Literal["adam", "sgd", "adamw"] = "adam"
    lr: float = Field(0.01, gt=0)
    # TensorFlow 1 defaults, which the lab ran with: BN decay 0.99 is PyTorch momentum 0.01.
    bn_momentum: float = Field(0.01, gt=0, lt=1)
    norm_eps: float = Field(1e-3, gt=0)
    adam_eps: float = Field(1e-8, gt=0)
    # TF1's dense layer kept its bias before batch norm; the port drops it (pipeline/nn/model.py).
    bias_before_bn: bool = False
    weight_decay: float | None = Field(None, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(1, ge=1, le=256)
    eval_batch_size: int = Field(1_000, ge=1)


VARIANT_CHOICES = ("hidden_sizes", "norm", "activation", "optimizer", "lr")  # the architecture and its optimizer
RUNTIME = ("device", "threads")  # where a variant runs, not what it is: no part of a VariantConfig


def constrained(key: str) -> object:
    """`train.<key>`'s type with its constraints (`gt=0`, lengths) attached, without its default."""
    field = TrainParams.model_fields[key]
    return Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation


class Choices(Strict):
    @field_validator("*", mode="before")
    @classmethod
    def _no_explicit_null(cls, value: object) -> object:
        # `norm: null` reads as "no norm" but would mean "inherit train.norm": refuse the doubt.
        if value is None:
            raise ValueError("null is not a value here; leave the key out to use the train: default")
        return value


ModelChoices = create_model("ModelChoices", __base__=Choices,
                            **{key: (constrained(key) | None, None) for key in VARIANT_CHOICES})

VariantConfig = create_model("VariantConfig", __base__=Strict, name=(str, ...), seeds=(list[int], ...),
                             **{key: (constrained(key), ...) for key in TrainParams.model_fields if key not in RUNTIME})


def layer_sizes(config: VariantConfig) -> list[tuple[int, int]]:
    """(fan_in, fan_out) of each Linear; here, not in nn/: torch's import would cost check 1.4 s a params edit."""
    sizes = [28 * 28, *config.hidden_sizes, 10]
    return list(zip(sizes[:-1], sizes[1:]))
