"""Stage `curves`: every variant's per-epoch curves in one CSV, led by a `variant` column, for `dvc plots`.

dvc.yaml's top-level plots name their source files one by one (a directory is a plot per file; there
is no glob or loop over params). So that the four comparison plots draw a line per variant, the
sweep's and any added later included, with no edit of dvc.yaml, they read this one file; the
`variants` template (.dvc/plots/variants.json) colours a line per value of its `variant` column.
"""

from pathlib import Path

from pipeline import cli
from pipeline.errors import PipelineError
from pipeline.fsio import atomic_write_bytes
from pipeline.config.params import load_params


def curves(variants: list[str], train_dir: Path, out: Path) -> None:
    """`out`: the rows of each variant's `<train_dir>/<variant>/curves.csv`, in params' order."""
    header, rows = None, []
    for variant in variants:
        path = train_dir / variant / "curves.csv"
        try:
            first, *lines = path.read_text().splitlines()
        except OSError as error:
            raise PipelineError(f"{path}: cannot read it ({error.strerror}); train@{variant} writes it") from None
        if header not in (None, first):
            raise PipelineError(f"{path}: columns {first!r}, not {header!r} as the variants before it")
        header = first
        rows += [f"{variant},{line}" for line in lines]
    atomic_write_bytes(out, "".join(f"{row}\n" for row in [f"variant,{header}", *rows]).encode())


if __name__ == "__main__":
    args = cli.arguments(__doc__, "train", "out")  # --train: the train stages' outputs, a folder per variant
    with cli.one_line_errors():
        curves(list(load_params().variants), args.train, args.out)
