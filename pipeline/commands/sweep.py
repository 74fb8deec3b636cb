"""`python -m pipeline.commands.sweep`: the grid points of params.yaml's `sweep:` written into its `variants:`.

DVC makes the `train@<variant>` and `evaluate@<variant>` stages from `foreach: ${variants}` as it
parses dvc.yaml: it cannot compute a grid. So each grid point is written into `variants:`, a variant
like any other (its own stages, cache, params dep and column in `dvc exp show`), named `sweep-...`
after the hand-written ones; this command replaces exactly those, in ruamel.yaml's round trip (which
keeps comments and quotes). A point removed leaves nothing behind (its stages' dvc.lock entries and
outputs go); DVC's cache keeps their data, so a point added back is restored from the run-cache.
"""

import io
import shutil
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedBase, CommentedMap, CommentedSeq
from ruamel.yaml.error import CommentMark
from ruamel.yaml.representer import RoundTripRepresenter
from ruamel.yaml.tokens import CommentToken
from ruamel.yaml.util import load_yaml_guess_indent

from pipeline import cli
from pipeline.fsio import atomic_write_bytes
from pipeline.config.grid import GRID_PREFIX
from pipeline.config.params import PARAMS_FILE, parse_params, parse_sweep, parse_yaml, read_params
from pipeline.config.variant import ModelChoices


class _Representer(RoundTripRepresenter):
    """Writes a float as YAML 1.1 reads it too (`1.0e-05`; PyYAML reads `1e-05` as a string), and
    null as `null` (the round trip would leave `weight_decay: null` as `weight_decay:`)."""

    def represent_none(self, value: None):
        return self.represent_scalar("tag:yaml.org,2002:null", "null")

    def represent_float(self, value: float):
        text = repr(value)
        if "e" in text and "." not in text:
            text = text.replace("e", ".0e")
        return self.represent_scalar("tag:yaml.org,2002:float", text)


_Representer.add_representer(float, _Representer.represent_float)
_Representer.add_representer(type(None), _Representer.represent_none)


def _round_trip(text: str) -> tuple[YAML, CommentedMap]:
    """A YAML that writes `text`'s document back as it is indented and quoted, and the document."""
    yaml = YAML()
    yaml.Representer = _Representer
    yaml.preserve_quotes = True
    yaml.width = 4096  # no line of the file is wrapped that was not
    document, sequence, offset = load_yaml_guess_indent(text, yaml=yaml)
    # A block section's keys sit one indent deep (a flow one's column says nothing).
    mapping = next((section.lc.col for section in document.values()
                    if isinstance(section, CommentedMap) and not section.fa.flow_style()), 2)
    yaml.indent(mapping=mapping, sequence=sequence or mapping, offset=offset or 0)
    return yaml, document


def _last_comment(node: CommentedBase) -> tuple[list, int] | None:
    """(comment entry, index into it) where ruamel keeps the text after a block's last line: on the
    deepest last entry; None for a flow block (its parent's entry keeps it)."""
    if node.fa.flow_style() or not node:
        return None
    key, position = (next(reversed(node)), 2) if isinstance(node, CommentedMap) else (len(node) - 1, 0)
    value = node[key]
    inner = _last_comment(value) if isinstance(value, (CommentedMap, CommentedSeq)) else None
    return inner or (node.ca.items.setdefault(key, [None, None, None, None]), position)


def rewrite(text: str, grid: dict[str, ModelChoices]) -> str:
    """`text` with the grid points of `variants:` replaced by `grid`'s, after the hand-written ones."""
    yaml, document = _round_trip(text)
    variants = document["variants"]
    # The blank lines and comments between `variants:`'s last line and the next section: taken off
    # that line (an end-of-line comment stays) to follow the new last line.
    entry, position = _last_comment(variants) or ([None], 0)
    line, _, gap = entry[position].value.partition("\n") if entry[position] else ("", "", "")
    if line:  # the first newline ends the entry's own line
        entry[position].value = line + "\n"
    else:
        entry[position] = None
    for name in [name for name in variants if name.startswith(GRID_PREFIX)]:
        del variants[name]
    for name, choices in grid.items():
        variants[name] = CommentedMap(choices.model_dump(exclude_none=True))
        variants[name].fa.set_flow_style()  # on one line (what is inside a flow node is flow too)
    if gap and variants:
        entry, position = _last_comment(variants)
        if entry[position] is None:
            entry[position] = CommentToken("\n" + gap, CommentMark(0), None)
        else:
            entry[position].value += gap
    out = io.StringIO()
    yaml.dump(document, out)
    return out.getvalue()


LOCK_FILE = "dvc.lock"  # beside params.yaml, at the repository's root
VARIANT_STAGES = ("train", "evaluate")  # dvc.yaml's `foreach: ${variants}` stages


def remove_output(path: Path, root: Path) -> None:
    """`path`, its line in its folder's .gitignore (DVC's), and the folders left empty below `root`."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    folder = path.parent
    ignore = folder / ".gitignore"
    if ignore.exists():
        if lines := [line for line in ignore.read_text().splitlines() if line != f"/{path.name}"]:
            ignore.write_text("".join(f"{line}\n" for line in lines))
        else:
            ignore.unlink()
    while folder != root and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent


def forget(points: set[str], root: Path) -> int:
    """Removes the dvc.lock entries of `points`' stages and their outputs; returns how many entries.
    dvc.lock is rewritten by ruamel's round trip, which writes DVC's own layout back unchanged."""
    lock = root / LOCK_FILE
    if not points or not lock.exists():
        return 0
    yaml = YAML()
    document = yaml.load(lock.read_text())
    stages = document.get("stages", {})
    names = [f"{kind}@{point}" for point in sorted(points) for kind in VARIANT_STAGES if f"{kind}@{point}" in stages]
    for name in names:
        for out in stages.pop(name).get("outs", []):
            remove_output(root / out["path"], root)
    if names:
        text = io.StringIO()
        yaml.dump(document, text)
        atomic_write_bytes(lock, text.getvalue().encode())
    return len(names)


def sweep(path: Path = PARAMS_FILE) -> None:
    source = str(path)
    text = read_params(path)
    raw = parse_yaml(text, source)
    if not isinstance(raw, dict) or not isinstance(raw.get("variants"), dict):
        parse_params(raw, source)  # names what is wrong with the top level or `variants:`
    grid = parse_sweep(raw, source).grid()
    new_text = rewrite(text, grid)
    parse_params(parse_yaml(new_text, source), source)  # nothing written that the check stage would refuse
    before = {name for name in raw["variants"] if name.startswith(GRID_PREFIX)}
    if new_text != text:
        atomic_write_bytes(path, new_text.encode())
    removed = before - grid.keys()
    print(f"{source}: variants hold the {len(grid)} grid points of sweep: "
          f"({len(grid.keys() - before)} added, {len(removed)} removed)")
    if entries := forget(removed, path.parent):
        print(f"{LOCK_FILE}: removed the {entries} entries of the removed points' stages, and their outputs")


if __name__ == "__main__":
    cli.parser(__doc__).parse_args()
    with cli.one_line_errors():
        sweep()
