"""`python -m pipeline.commands.repro [--force] [--jobs N]` (`make repro`): `dvc repro`, with the
variants' train stages side by side.

DVC runs a pipeline's stages one at a time, and each train stage trains on `train.threads`
threads (1 by default, for bit-identical results): on a 2-core machine one core idles through
most of the lab. The train stages do not depend on one another, and DVC's documented way to run
independent stages in parallel is a `dvc repro` process each, with `--wait-for-lock`: DVC
releases its repository lock while a stage's command runs, keeps each stage's dependencies and
outputs under read/write locks of their own, and a command that finds the repository lock taken
(to write dvc.lock) waits for it instead of failing. So this command validates the params (a
mistake: one line, before DVC runs anything), then runs `dvc` processes, in order:

  1. `dvc status`: nothing to do, nothing more is run;
  2. `dvc repro -s train@<variant> evaluate@<variant>` of every variant whose train stage is
     stale, `--jobs` at a time (default: the cores this process may use over `train.threads`),
     the first with the stages the train stages read from (check, download, prepare) before its
     own where those are stale (then every variant's chain runs: their shared inputs may
     change); each started once the one before runs its train stage, so the variant that
     finishes first is evaluated while the others still train;
  3. `dvc repro`: the rest (curves, compare, any evaluate left), exactly as DVC would; forced,
     the stages left by name (`dvc stage list`, while the chains run).

Each stage runs its own command with its own inputs, so the outputs and dvc.lock are the ones
`dvc repro` writes (tests/test_pipeline.py holds them byte-identical). `--force` forces every
stage, as `dvc repro --force` does; any other argument (targets, `-s`, `--dry`, ...) goes to one
plain `dvc repro`. The `dvc` processes, and how they stop together: pipeline/commands/dvcs.py.
"""

from __future__ import annotations

import json
import os
import signal

from pipeline import cli
from pipeline.commands.dvcs import DvcFailed, Dvcs

TRAIN_PREFIX = "train@"  # dvc.yaml's `train: foreach: ${variants}`
EVALUATE_PREFIX = "evaluate@"  # and `evaluate: foreach: ${variants}`
# The stages every train stage reads from, in dvc.yaml's order (tests/test_repro.py holds them to
# it); the first chain runs them where they are to run.
UPSTREAM = ("check", "download", "prepare")


def stale_stages(dvcs: Dvcs) -> set[str]:
    """The stages `dvc repro` would run now (a dvc.yaml stage is named by itself in the answer)."""
    return {name.rpartition(":")[2] for name in json.loads(dvcs.output("status", "--json", capture=True) or "{}")}


def variant_chains(trains: list[str], stale: set[str], force: bool) -> list[tuple[str, ...]]:
    """Each train stage to run with its variant's evaluate stage after it: the variant that
    finishes first is evaluated while the others train, on a core that would idle. Where the
    upstream stages are to run, the first chain runs them first (one `dvc` fewer before the
    others start), and every train stage may be to run: their shared inputs may change (a
    params.yaml edit reruns check, whose output seldom does). The stale ones come first; the
    `dvc` of another finds nothing to do where those inputs came out the same."""
    upstream = list(UPSTREAM) if force or stale & set(UPSTREAM) else []
    to_train = sorted((train for train in trains if upstream or train in stale), key=lambda train: train not in stale)
    chains = [(train, EVALUATE_PREFIX + train.removeprefix(TRAIN_PREFIX)) for train in to_train]
    return [(*upstream, *chains[0]), *chains[1:]] if chains else []


def side_by_side(dvcs: Dvcs, chains: list[tuple[str, ...]], jobs: int, force: bool) -> None:
    """`dvc repro -s <stages>` of each chain of stages, `jobs` at a time, each started once the
    one before it runs its train stage (STAGE_RUNS). A failure stops the others (SIGINT, as
    Ctrl-C) and names the chain that failed."""
    options = ["--force"] if force else []
    pending = list(chains)
    while pending or dvcs.running:
        while pending and len(dvcs.running) < jobs and not dvcs.starting():
            stages = pending.pop(0)
            dvcs.start("repro", *options, "-s", *stages, ready=next(s for s in stages if s.startswith(TRAIN_PREFIX)))
        for name, process in dvcs.ended():
            if process.returncode != 0:
                dvcs.stop(signal.SIGINT)
                raise DvcFailed(f"dvc {name} exited with {process.returncode}; the chains beside it "
                                "were stopped", exit_code=process.returncode)


def repro(dvcs: Dvcs, force: bool = False, jobs: int | None = None) -> None:
    from pipeline.config.params import load_params  # pydantic: only where the params are read

    params = load_params()  # a mistake ends the command here, in one line, before DVC runs
    trains = [f"{TRAIN_PREFIX}{variant}" for variant in params.variants]
    jobs = jobs or max(1, len(os.sched_getaffinity(0)) // params.train.threads)
    stale = set() if force else stale_stages(dvcs)
    if not force and not stale:
        print("Data and pipelines are up to date.")
        return
    chains = variant_chains(trains, stale, force)
    if len(chains) < 2 or jobs < 2:  # nothing side by side: DVC's own plan
        dvcs.output("repro", *(["--force"] if force else []), hint=True)
        return
    # Forced, the last `dvc repro` names the stages left: listed (`dvc stage list` takes no lock)
    # while the chains run.
    listing = dvcs.started("stage", "list", "--name-only", capture=True) if force else None
    side_by_side(dvcs, chains, jobs, force)
    if force:
        done = {stage for chain in chains for stage in chain}
        dvcs.output("repro", "--force", "-s", *[name for name in dvcs.result(listing).split() if name not in done],
                    hint=True)
    else:
        dvcs.output("repro", hint=True)


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
