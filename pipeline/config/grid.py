"""The grid of `sweep:`: axes of values per key a variant may override, crossed into grid points, each
a variant named from its values (`sweep-batch-lr0p003`). `python -m pipeline.commands.sweep` writes
them into `variants:`; `Params` refuses a `variants:` that is not the expansion of its `sweep:`."""

import itertools
import math
import re
from typing import Self

from pydantic import Field, create_model, field_validator, model_validator

from pipeline.config.variant import VARIANT_CHOICES, Choices, ModelChoices, Strict, constrained

VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # a folder, a DVC stage key, a run name
# Every grid point is a train and an evaluate stage, an MLflow run and a line in each plot.
MAX_GRID_POINTS = 256
GRID_PREFIX = "sweep-"  # the variants named so are the grid points of `sweep:`, and nothing else
NAME_LABELS = {"hidden_sizes": "h"}  # a number in a name follows its key's label


class _Axes(Choices):
    @field_validator("*")
    @classmethod
    def _distinct(cls, values: list) -> list:
        for value in values:  # validated values: `1` and `1.0` are both 1.0 by now
            if values.count(value) > 1:
                raise ValueError(f"the values of an axis must be distinct ({value!r} twice)")
        return values

    @model_validator(mode="after")
    def _bounded(self) -> Self:
        lengths = [len(values) for values in self.model_dump(exclude_none=True).values()]
        if math.prod(lengths) > MAX_GRID_POINTS:
            raise ValueError(f"{math.prod(lengths)} grid points ({' x '.join(map(str, lengths))}); "
                             f"at most {MAX_GRID_POINTS}")
        longest = max(self.grid(), key=len, default="")
        if longest and not VARIANT_NAME.fullmatch(longest):  # only its length can fail the rule
            raise ValueError(f"grid point {longest!r} has a name longer than 64 characters "
                             "(it names folders, stages and runs)")
        return self

    def grid(self) -> dict[str, ModelChoices]:
        """The grid points by name, in the order of the axes' values (the last key varies fastest)."""
        swept = self.model_dump(exclude_none=True)  # ModelChoices' key order, so names are stable
        points = [dict(zip(swept, values)) for values in itertools.product(*swept.values())] if swept else []
        return {grid_point_name(point): ModelChoices.model_validate(point) for point in points}


# An axis accepts exactly what a variant's key does (the same constrained type), and a key added
# to VARIANT_CHOICES can be swept without a second list of types to keep in step.
SweepAxes = create_model("SweepAxes", __base__=_Axes,
                         **{key: (list[constrained(key)] | None, Field(None, min_length=1, max_length=MAX_GRID_POINTS))
                            for key in VARIANT_CHOICES})


def _number(value: float) -> str:
    # repr is the shortest text that reads back as the same number, so distinct values get
    # distinct names. '-' joins a name's parts and '.' would split the key path
    # `variants.<name>`, so they become 'm' and 'p': 0.003 -> 0p003, 1e-05 -> 1em05.
    return repr(value).replace(".", "p").replace("e-", "em").replace("e+", "e")


def grid_point_name(choices: dict) -> str:
    """`sweep-h64x64-batch-tanh-lr0p003`: the prefix, then each swept key's value in ModelChoices' order."""
    parts = []
    for key, value in choices.items():  # a word (of the key's Literal: no two keys share one) goes bare
        numbers = value if isinstance(value, list) else [value]
        parts.append(value if isinstance(value, str) else NAME_LABELS.get(key, key) + "x".join(map(_number, numbers)))
    return GRID_PREFIX + "-".join(parts)


class SweepParams(Strict):
    axes: SweepAxes = SweepAxes()

    def grid(self) -> dict[str, ModelChoices]:
        return self.axes.grid()


def stale_grid_point(variants: dict[str, ModelChoices], grid: dict[str, ModelChoices]) -> str | None:
    """`<name>: <what>` for the first grid point that `variants:` and `grid` disagree on; else None."""
    written = {name: choices for name, choices in variants.items() if name.startswith(GRID_PREFIX)}
    for name in [*grid, *written]:
        if name not in written:
            return f"{name}: missing"
        if name not in grid:
            return f"{name}: not a grid point of sweep: (names starting {GRID_PREFIX!r} are the grid's)"
        if written[name] != grid[name]:
            return f"{name}: not the values of its grid point"
    return None
