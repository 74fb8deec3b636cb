"""`python -m pipeline.commands.repro [--force] [--jobs N]` (`make repro`): `dvc repro`, with the
variants' train stages side by side.

DVC runs stages one at a time, and a train stage trains on `train.threads` threads (1 by default, for
bit-identical results): on 2 cores one idles through most of the lab. DVC's documented way to run
independent stages in parallel is a `dvc repro --wait-for-lock` process each (DVC lets go of its lock
while a stage's command runs). So, params valid (a mistake: one line, before DVC runs anything):

  1. `dvc status`: nothing to do, nothing more is run;
  2. `dvc repro -s train@<variant> evaluate@<variant>` of each variant to train (variant_chains), `--jobs`
     at a time (default: usable cores / `train.threads`), each once the one before runs its train stage;
  3. `dvc repro`: the rest (curves, compare), as DVC would; forced, the stages left by name.

Each stage runs its own command on its own inputs: the outputs and dvc.lock are `dvc repro`'s
(tests/test_pipeline.py). Any other argument (targets, `-s`, `--dry`, ...) goes to one `dvc repro`.
"""

import json
import os
import signal
from pathlib import Path

from pipeline import cli
from pipeline.commands.dvcs import DvcFailed, Dvcs

TRAIN_PREFIX = "train@"  # dvc.yaml's `train: foreach: ${variants}`
EVALUATE_PREFIX = "evaluate@"  # and `evaluate: foreach: ${variants}`
# The stages every train stage reads from, in dvc.yaml's order (tests/test_repro.py holds them to it).
UPSTREAM = ("check", "download", "prepare")


def variant_chains(trains: list[str], stale: set[str], force: bool) -> list[tuple[str, ...]]:
    """Each train stage to run with its variant's evaluate stage after it (the first variant done is
    evaluated while the others train). Where the upstream stages are to run, the first chain runs
    them first (one `dvc` fewer), and every variant's chain runs, the stale ones first: their shared
    inputs may change (a params.yaml edit reruns check, whose output seldom does; then the others'
    `dvc` finds nothing to do)."""
    upstream = list(UPSTREAM) if force or stale & set(UPSTREAM) else []
    to_train = sorted((train for train in trains if upstream or train in stale), key=lambda train: train not in stale)
    chains = [(train, EVALUATE_PREFIX + train.removeprefix(TRAIN_PREFIX)) for train in to_train]
    return [(*upstream, *chains[0]), *chains[1:]] if chains else []


def stages_after_chains() -> list[str]:
    """dvc.yaml's stages that no forced chain runs (curves, compare), read from dvc.yaml itself: a
    `dvc stage list` would read dvc.lock too, which the chains rewrite as they end."""
    from ruamel.yaml import YAML

    chained = {*UPSTREAM, TRAIN_PREFIX.removesuffix("@"), EVALUATE_PREFIX.removesuffix("@")}
    return [stage for stage in YAML(typ="safe").load(Path("dvc.yaml").read_text())["stages"] if stage not in chained]


def side_by_side(dvcs: Dvcs, chains: list[tuple[str, ...]], jobs: int, options: list[str]) -> None:
    """Step 2 above: `dvc repro <options> -s <stages>` a chain; a failure stops the others (SIGINT) and names it."""
    pending = list(chains)
    while pending or dvcs.running:  # the chains are the only dvc processes running here
        while pending and len(dvcs.running) < jobs and not dvcs.starting():
            stages = pending.pop(0)
            dvcs.start("repro", *options, "-s", *stages, ready=next(s for s in stages if s.startswith(TRAIN_PREFIX)))
        for process in dvcs.ended():
            if process.returncode != 0:
                dvcs.stop(signal.SIGINT)
                raise DvcFailed(f"dvc {process.name} exited with {process.returncode}; the chains beside it "
                                "were stopped", exit_code=process.returncode)


def repro(dvcs: Dvcs, force: bool = False, jobs: int | None = None) -> None:
    from pipeline.config.params import load_params  # pydantic: only where the params are read

    params = load_params()  # a mistake ends the command here, in one line, before DVC runs
    trains = [f"{TRAIN_PREFIX}{variant}" for variant in params.variants]
    jobs = jobs or max(1, len(os.sched_getaffinity(0)) // params.train.threads)
    # The stages `dvc repro` would run now (a dvc.yaml stage is named by itself in the answer).
    stale = set() if force else {name.rpartition(":")[2]
                                 for name in json.loads(dvcs.output("status", "--json", capture=True) or "{}")}
    if not force and not stale:
        print("Data and pipelines are up to date.")
        return
    options = ["--force"] if force else []
    chains = variant_chains(trains, stale, force)
    if len(chains) > 1 and jobs > 1:  # else nothing side by side: DVC's own plan
        side_by_side(dvcs, chains, jobs, options)
        if force:  # the last `dvc repro` runs the stages no chain ran, by name
            options += ["-s", *stages_after_chains()]
    dvcs.output("repro", *options, hint=True)


if __name__ == "__main__":
    parser = cli.parser(__doc__)
    parser.add_argument("--force", action="store_true", help="run every stage, as `dvc repro --force`")
    parser.add_argument("--jobs", type=int, help="train stages at once (default: cores / train.threads)")
    arguments, others = parser.parse_known_args()
    if arguments.jobs is not None and arguments.jobs < 1:
        parser.error(f"--jobs: {arguments.jobs}, expected at least 1")
    with cli.one_line_errors(), Dvcs() as dvcs:
        if others:  # targets or other options of dvc repro's: DVC's own plan, one stage at a time
            dvcs.output("repro", *(["--force"] if arguments.force else []), *others, hint=True)
        else:
            repro(dvcs, arguments.force, arguments.jobs)
