"""Stage `train@<variant>`: train every seed of one variant as one stacked model.

After each epoch: loss and accuracy on the whole train and validation splits (eval mode, as the lab
does), the resumable state written to `.dvc/tmp/train/<variant>/` (outside DVC's outputs) and mirrored
into MLflow (live curves). A killed stage rerun resumes from the last completed epoch, bit-identical to
an uninterrupted run. The outputs are written once at the end, a function of the inputs alone (no run
ids, times or paths), so DVC's run-cache can restore them; the MLflow record (pipeline/tracking/) is a
view of them. A store that cannot take it costs no training: one line says the record waits, and
compare or `make publish` completes it.
"""

import contextlib
import shutil
import signal
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple, Self

import torch

from pipeline import cli, provenance
from pipeline.config.params import Params, load_params
from pipeline.config.variant import VariantConfig
from pipeline.data import Split, load_split
from pipeline.errors import PipelineError
from pipeline.fsio import atomic_write_json, read_json
from pipeline.nn import checkpoint, inference
from pipeline.nn.model import StackedMlp
from pipeline.nn.optimizer import FusedOptimizer
from pipeline.nn.training import (TrainingStep, configure_runtime, epoch_metrics, make_optimizer, train_epoch,
                                  trained_state)
from pipeline.reports import METRICS, epoch_line, progress_bar, write_curves
from pipeline.stats import diverged_epochs
from pipeline.tracking.process import LiveRecord
from pipeline.tracking.record import read_variant
from pipeline.tracking.store import Tracking


class Paths(NamedTuple):
    """The paths dvc.yaml's command line names, and the scratch folder."""

    prepared: Path  # the prepared splits (DVC dep)
    checkpoints: Path  # the final and best checkpoints (DVC output)
    out: Path  # curves, history and run.json for the later stages (DVC outputs)
    scratch: Path  # what a killed run resumes from: no DVC path (DVC deletes outputs before a stage runs)

    @classmethod
    def of(cls, root: Path, variant: str, prepared: Path, checkpoints: Path, out: Path) -> Self:
        return cls(prepared, checkpoints, out, root / ".dvc" / "tmp" / "train" / variant)


class Inputs(NamedTuple):
    """What the run computes from besides its config: data lineage, environment, their digest."""

    dataset: dict  # the prepared splits' digest and sizes
    environment: dict  # environment.json, the check stage's record
    digest: str  # provenance.inputs_digest: MLflow's tag, the resume key, in run.json

    @classmethod
    def of(cls, config: VariantConfig, device: torch.device, threads: int, root: Path, prepared: Path) -> Self:
        manifest = read_json(prepared / "manifest.json", "rerun prepare")
        dataset = {"digest": manifest["digest"], "sizes": manifest["sizes"]}
        environment = provenance.read_environment(root)
        # The device and the thread count change the last bits of the results: part of the inputs.
        computed_with = config.model_dump() | {"device": device.type, "threads": threads}
        return cls(dataset, environment,
                   provenance.inputs_digest(computed_with, dataset["digest"], environment, "train"))


class Run(NamedTuple):
    """What starting, recording each epoch and finishing share: fixed once the variant's training starts."""

    config: VariantConfig
    paths: Paths
    inputs: Inputs
    record: LiveRecord
    train_split: Split
    val_split: Split
    evaluated: StackedMlp  # the evaluation thread's own copy of the model, loaded anew each epoch


class Progress(NamedTuple):
    """Where training stands after an epoch, what the next one and a resume start from: replaced, never
    changed in place (the tracking process may pickle `history` after `submit`)."""

    epoch: int  # the last epoch recorded; 0 before the first
    best: dict  # per replica, its weights and optimizer state from the epoch of its best val_acc
    history: dict[str, list[list[float]]]  # per metric, the K values of each epoch


def train(params: Params, variant: str, root: Path, paths: Paths, tracking: Tracking | None = None) -> dict:
    """The stage, run in the repository `root`; `tracking`: where MLflow records it (default: the environment's)."""
    tracking = tracking or Tracking.from_environment(params.mlflow.experiment_name, root)
    device = configure_runtime(params.train.threads, params.train.device)
    config = params.variant(variant)
    inputs = Inputs.of(config, device, params.train.threads, root, paths.prepared)
    # The record: a view of the outputs, mirrored after each epoch in a second process (why:
    # pipeline/tracking/process.py; what it cost this stage against the recorder before it: docs/performance.md).
    with LiveRecord(tracking, run_json(config, inputs), inputs.environment) as live:  # MLflow opens meanwhile
        train_split, val_split = load_split(paths.prepared, "train", device), load_split(paths.prepared, "val", device)
        if config.batch_size > len(train_split):
            raise PipelineError(f"train.batch_size: {config.batch_size} exceeds the train split ({len(train_split)})")
        model = StackedMlp(config).to(device)
        optimizer = make_optimizer(model, config)
        run = Run(config, paths, inputs, live, train_split, val_split, StackedMlp(config).to(device))
        progress = start_or_resume(run, model, optimizer)
        if not tracking.is_local:
            live.raise_refused(live.opened)  # a server's refusal: before training
        step = TrainingStep(model, optimizer, train_split, config)
        with (runs_closed_on_failure(run),
              ThreadPoolExecutor(max_workers=1, thread_name_prefix="evaluate") as evaluator):
            # Epoch e is evaluated on the other core while later epochs train; the record never
            # holds training up (its calls run in the tracking process).
            recorded = Future()
            recorded.set_result(progress)
            for epoch in range(progress.epoch + 1, config.epochs + 1):
                started = time.perf_counter()
                with progress_bar(len(train_split), config.batch_size, f"{variant} epoch {epoch}") as bar:
                    train_epoch(step, epoch, on_step=bar.update if bar else None)
                trained = trained_state(model, optimizer)
                live.raise_refused()  # a refusal ends the stage; an outage only makes the record wait
                recorded = evaluator.submit(record_epoch, run, recorded, epoch, trained, time.perf_counter() - started)
            summary = finish(run, recorded.result(), model, optimizer)
        live.finish(read_variant(root, paths.out, paths.checkpoints, None))
        shutil.rmtree(paths.scratch)  # the outputs are written: nothing left to resume
        return summary


def run_json(config: VariantConfig, inputs: Inputs) -> dict:
    """run.json: what the record of the variant is made of besides its history (and how it is found)."""
    return {"variant": config.name, "inputs_digest": inputs.digest, "config": config.model_dump(exclude={"name"}),
            "seeds": config.seeds, "dataset": inputs.dataset}


def start_or_resume(run: Run, model: StackedMlp, optimizer: FusedOptimizer) -> Progress:
    """A killed run's progress, its weights loaded into `model` and `optimizer`, where its
    inputs are this run's; otherwise a fresh start from epoch 0."""
    last_path, state = run.paths.scratch / "last.pt", None
    if last_path.exists():
        try:
            state = checkpoint.load(last_path)
        except PipelineError as error:
            print(f"warning: {error}; starting fresh", file=sys.stderr)
    if state is not None and state["inputs_digest"] == run.inputs.digest:
        print(f"{last_path}: resuming after epoch {state['epoch']}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        best = checkpoint.load(run.paths.scratch / "best.pt", run.train_split.labels.device)
        return Progress(state["epoch"], best, state["history"])
    if state is not None:
        print(f"{last_path}: params, data, code or environment changed since this checkpoint; "
              "starting fresh", file=sys.stderr)
    best = {**trained_state(model, optimizer), "val_acc": torch.full((len(run.config.seeds),), -1.0),
            "epoch": [0] * len(run.config.seeds)}
    return Progress(0, best, {name: [] for name in METRICS})


def record_epoch(run: Run, previous: Future, epoch: int, trained: dict, train_seconds: float) -> Progress:
    """Evaluate the weights `epoch` ended with, checkpoint and log them; the progress after it. On the
    evaluation thread while the next epochs train (with one torch thread each, the lab's whole-split
    evaluation, ~0.3 s an epoch for 5 seeds, takes the other core), after `previous`: its error is ours."""
    progress = previous.result()
    run.evaluated.load_state_dict(trained["model"])
    metrics = epoch_metrics(run.evaluated, run.train_split, run.val_split, run.config.eval_batch_size)
    history = {name: [*progress.history[name], metrics[name]] for name in METRICS}
    best = checkpoint.update_best(progress.best, trained, metrics["val_acc"], epoch)
    checkpoint.save(run.paths.scratch / "best.pt", best)
    checkpoint.save(run.paths.scratch / "last.pt", {"inputs_digest": run.inputs.digest, "epoch": epoch, **trained,
                                                    "history": history})
    run.record.mirror(history)  # after the checkpoint: what a crash keeps from MLflow, the next mirror adds
    print(epoch_line(run.config.name, epoch, run.config.epochs, metrics, train_seconds), flush=True)
    return Progress(epoch, best, history)


@contextlib.contextmanager
def runs_closed_on_failure(run: Run):
    """SIGTERM or Ctrl-C: the runs KILLED and one line; any other error: FAILED, raised as is."""
    previous_handler = signal.signal(signal.SIGTERM, signal.default_int_handler)  # raises KeyboardInterrupt
    try:
        yield
    except KeyboardInterrupt:
        run.record.close("KILLED")
        raise PipelineError(f"train@{run.config.name}: interrupted; `dvc repro` resumes after the last "
                            f"completed epoch ({run.paths.scratch / 'last.pt'})") from None
    except BaseException:
        run.record.close("FAILED")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


def finish(run: Run, progress: Progress, model: StackedMlp, optimizer: FusedOptimizer) -> dict:
    """The stage's outputs (checkpoints, weights, curves, history, run.json); the last epoch's metrics."""
    config, paths, history, trained = run.config, run.paths, progress.history, trained_state(model, optimizer)
    checkpoint.save(paths.checkpoints / "last.pt", {"config": config.model_dump(), "epoch": config.epochs, **trained})
    checkpoint.save(paths.checkpoints / "best.pt", progress.best)
    inference.save_weights(paths.checkpoints / inference.WEIGHTS_FILE, config.model_dump(),
                           {name: tensor.cpu().numpy() for name, tensor in trained["model"].items()})
    write_curves(paths.out / "curves.csv", history)
    atomic_write_json(paths.out / "history.json", {"seeds": config.seeds, "best_epoch": progress.best["epoch"],
                                                   "diverged_epoch": diverged_epochs(history["train_loss"]), **history})
    atomic_write_json(paths.out / "run.json", run_json(config, run.inputs))  # the record's key and params
    return {"final": {name: history[name][-1] for name in METRICS}}


if __name__ == "__main__":
    args = cli.arguments(__doc__, "prepared", "checkpoints", "out", variant=str)
    with cli.one_line_errors():
        root = Path.cwd()
        paths = Paths.of(root, args.variant, args.prepared, args.checkpoints, args.out)
        train(load_params(), args.variant, root, paths)
