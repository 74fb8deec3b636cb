"""Stage `train@<variant>`: train every seed of one variant as one stacked model.

After each epoch: loss and accuracy on the whole train split (eval mode, as the lab does)
and on validation, logged to MLflow; the resumable state written atomically to the variant's
scratch folder, `.dvc/tmp/train/<variant>/`, outside DVC's outputs. A killed stage rerun
resumes from the last completed epoch and continues the same MLflow runs; the result is
bit-identical to an uninterrupted run. At the end the outputs are written once: final and
best checkpoints, curves, history and `run.json`, all a function of the stage's inputs alone
(no run ids, times or paths), so DVC's run-cache can restore them. MLflow's calls run in the
stage's tracking process (pipeline/tracking_process.py).
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import checkpoint, cli, provenance, tracking
from pipeline.data import as_images, load_split, read_manifest
from pipeline.errors import PipelineError
from pipeline.fsio import atomic_write_json
from pipeline.model import StackedMlp, served_replica, unstack
from pipeline.params import Params, VariantConfig
from pipeline.reports import METRICS, write_curves
from pipeline.stats import diverged, diverged_epochs, summarize
from pipeline.training import (
    TrainingStep,
    configure_runtime,
    epoch_metrics,
    make_optimizer,
    train_epoch,
    trained_state,
)
from pipeline.tracking_process import TrackingProcess


@dataclass(frozen=True)
class Paths:
    prepared: Path
    scratch: Path  # what a killed run resumes from; DVC neither hashes nor deletes it
    checkpoints: Path  # the final and best checkpoints (DVC output)
    out: Path  # curves, history and run.json for the later stages (DVC outputs)

    @classmethod
    def for_variant(cls, root: Path, variant: str) -> Paths:
        data = root / "data"
        return cls(data / "prepared", root / ".dvc" / "tmp" / "train" / variant, data / "checkpoints" / variant,
                   data / "train" / variant)


def unfinished_checkpoint(path: Path) -> dict | None:
    """The state a killed run left in its scratch folder, if it is readable."""
    if not path.exists():
        return None
    try:
        return checkpoint.load(path)
    except checkpoint.CheckpointError as error:
        print(f"warning: {error}; starting fresh", file=sys.stderr)
        return None


class Stop(Exception):
    """SIGTERM, raised where the loop is so the runs can be closed as KILLED."""


def _raise_stop(signum, frame):
    raise Stop()


@dataclass(frozen=True)
class Inputs:
    """What the run computes from besides its config: data lineage, environment, their digest."""

    dataset: dict  # the prepared splits' digest and sizes
    environment: dict  # environment.json, the check stage's record
    digest: str  # provenance.inputs_digest: MLflow's tag, the resume key, in run.json

    @classmethod
    def of(cls, config: VariantConfig, device: torch.device, threads: int, root: Path, prepared: Path) -> Inputs:
        manifest = read_manifest(prepared)
        environment = provenance.read_environment(root)
        dataset = {"digest": manifest["digest"], "sizes": manifest["sizes"]}
        # The device and the thread count change the last bits of the results: part of the inputs.
        computed_with = config.model_dump() | {"device": device.type, "threads": threads}
        return cls(dataset, environment,
                   provenance.inputs_digest(computed_with, dataset["digest"], environment, "train"))


def train(params: Params, variant: str, root: Path, runs: tracking.Tracking | None = None) -> dict:
    """The stage; `runs` is where MLflow records it (default: this environment's tracking store)."""
    runs = runs or tracking.Tracking.from_environment(params.mlflow.experiment_name, root)
    device = configure_runtime(params.train.threads, params.train.device)
    config, paths = params.variant(variant), Paths.for_variant(root, variant)
    inputs = Inputs.of(config, device, params.train.threads, root, paths.prepared)
    with TrackingProcess(runs) as tracker:  # opens MLflow there while this process loads data
        return train_variant(config, paths, device, tracker, tracking.run_tags(runs, root, f"train@{variant}"),
                             inputs)


def train_variant(config: VariantConfig, paths: Paths, device: torch.device, tracker: TrackingProcess,
                  tags: dict[str, str], inputs: Inputs) -> dict:
    variant = config.name
    train_split = load_split(paths.prepared, "train", device)
    val_split = load_split(paths.prepared, "val", device)
    if config.batch_size > len(train_split):
        raise PipelineError(f"train.batch_size: {config.batch_size} exceeds the train split ({len(train_split)})")

    model = StackedMlp(config, config.seeds).to(device)
    optimizer = make_optimizer(model, config)
    last_path, best_path = paths.scratch / "last.pt", paths.scratch / "best.pt"
    state = unfinished_checkpoint(last_path)
    if state is not None and state["inputs_digest"] == inputs.digest:
        print(f"{last_path}: resuming after epoch {state['epoch']}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        best, history, start_epoch = checkpoint.load(best_path, device), state["history"], state["epoch"]
        run_ids = tracker.submit(tracking.resume_variant_runs, state["run_ids"], copy.deepcopy(history))
    else:
        replaces = None
        if state is not None:
            print(f"{last_path}: params, data, code or environment changed since this checkpoint; "
                  "starting fresh", file=sys.stderr)
            replaces = state["run_ids"]
        run_ids = tracker.submit(tracking.start_variant_runs, tracker.tracking.experiment_name, config,
                                 tags | {tracking.INPUTS_TAG: inputs.digest},
                                 inputs.dataset | {"uri": paths.prepared.resolve().as_uri()}, inputs.environment,
                                 replaces)
        best = {**trained_state(model, optimizer), "val_acc": torch.full((len(config.seeds),), -1.0),
                "epoch": [0] * len(config.seeds)}
        history, start_epoch = {name: [] for name in METRICS}, 0
    tracker.submit(tracking.prepare_model_logging)

    def save_last(epoch: int, trained: dict) -> None:
        checkpoint.save(last_path, {"inputs_digest": inputs.digest, "epoch": epoch, **trained, "history": history,
                                    "run_ids": run_ids.result()})

    evaluated = StackedMlp(config, config.seeds).to(device)  # the evaluation thread's copy
    logged = []  # the MLflow calls of each epoch's metrics

    def record(epoch: int, trained: dict, train_seconds: float) -> None:
        """Evaluate the weights `epoch` ended with, then checkpoint and log them.

        Runs on a second thread while the next epoch trains: with one torch thread each,
        the lab's whole-split evaluation (~0.3 s an epoch for 5 seeds) takes the other core.
        """
        nonlocal best
        evaluated.load_state_dict(trained["model"])
        metrics = epoch_metrics(evaluated, train_split, val_split, config.eval_batch_size)
        for name in METRICS:
            history[name].append(metrics[name])
        best = update_best(best, trained, metrics["val_acc"], epoch)
        checkpoint.save(best_path, best)
        save_last(epoch, trained)
        # Logged after the checkpoint: a crash in between is backfilled on resume.
        logged.append(tracker.submit(tracking.log_replica_metrics, run_ids.result(), metrics, epoch))
        print(epoch_line(variant, epoch, config.epochs, metrics, train_seconds), flush=True)

    def close_runs(status: str) -> None:
        if run_ids.exception() is None:  # waits for the runs to exist
            tracker.call(tracking.set_status, run_ids.result(), status)

    step = TrainingStep(model, optimizer, train_split, config.seeds, config.batch_size)
    previous_handler = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="evaluate") as evaluator:
            recorded = None
            for epoch in range(start_epoch + 1, config.epochs + 1):
                started = time.perf_counter()
                with progress_bar(len(train_split), config.batch_size, f"{variant} epoch {epoch}") as bar:
                    train_epoch(step, epoch, on_step=bar.update if bar else None)
                trained = trained_state(model, optimizer)
                if recorded is not None:
                    recorded.result()  # the previous epoch's record, and any error it raised
                    raise_failed(logged)  # MLflow gone past its retries: stop now, the rerun resumes
                recorded = evaluator.submit(record, epoch, trained, time.perf_counter() - started)
            if recorded is not None:
                recorded.result()
        run_ids.result()  # an MLflow error, even where no epoch was left to train
        for call in logged:
            call.result()
    except (KeyboardInterrupt, Stop):
        close_runs("KILLED")
        raise PipelineError(f"train@{variant}: interrupted; `dvc repro` resumes after the last "
                            f"completed epoch ({last_path})") from None
    except tracking.TrackingError:
        raise  # MLflow refused or is down: closing the runs would fail too; the rerun resumes them
    except BaseException:
        close_runs("FAILED")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_handler)

    summary = finish(tracker, run_ids.result(), config, model, optimizer, val_split, history, paths, best, inputs)
    tracker.call(tracking.set_status, run_ids.result(), "FINISHED")
    shutil.rmtree(paths.scratch)  # the run is complete and recorded: nothing left to resume
    return summary


def raise_failed(calls: list) -> None:
    """The error of the first tracking call that has failed so far, if any."""
    for call in calls:
        if call.done() and call.exception() is not None:
            raise call.exception()


def update_best(best: dict, trained: dict, val_acc: list[float], epoch: int) -> dict:
    """Replica k's weights and optimizer state from this epoch where its val_acc improved."""
    current = torch.tensor(val_acc)
    improved = current > best["val_acc"]
    return checkpoint.merge_replicas(best, {
        **trained, "val_acc": current,
        "epoch": [epoch if up else kept for up, kept in zip(improved.tolist(), best["epoch"])],
    }, improved)


def finish(tracker: TrackingProcess, run_ids: dict, config: VariantConfig, model: StackedMlp,
           optimizer, val_split, history: dict, paths: Paths, best: dict, inputs: Inputs) -> dict:
    """The stage's outputs, a function of its inputs alone; the checkpoints and the model into MLflow."""
    diverged_at = diverged_epochs(history["train_loss"])
    checkpoints = write_outputs(paths, config, trained_state(model, optimizer), best, history, diverged_at, inputs)
    replica = served_replica(history["val_acc"][-1], diverged_at)
    served = None if replica is None else (unstack(model.cpu(), config, replica),
                                           as_images(val_split.pixels[:2]).cpu().numpy(), config.seeds[replica])
    tracker.call(tracking.log_trained_model, run_ids, served, best["epoch"], diverged_at, checkpoints)
    return {"run_ids": run_ids, "final": {name: history[name][-1] for name in METRICS}}


def write_outputs(paths: Paths, config: VariantConfig, trained: dict, best: dict, history: dict,
                  diverged_at: list[int | None], inputs: Inputs) -> list[Path]:
    """Checkpoints, curves, history and run.json; returns the checkpoint files."""
    checkpoints = [paths.checkpoints / "last.pt", paths.checkpoints / "best.pt"]
    checkpoint.save(checkpoints[0], {"config": config.model_dump(), "epoch": config.epochs, **trained})
    checkpoint.save(checkpoints[1], best)
    write_curves(paths.out / "curves.csv", history)
    atomic_write_json(paths.out / "history.json", {"seeds": config.seeds, "best_epoch": best["epoch"],
                                                   "diverged_epoch": diverged_at, **history})
    # How compare finds this variant's MLflow runs (by tag), or rebuilds them where a store never saw them.
    atomic_write_json(paths.out / "run.json", {"variant": config.name, "inputs_digest": inputs.digest,
                                               "dataset": inputs.dataset})
    return checkpoints


def progress_bar(samples: int, batch_size: int, label: str):
    """A tqdm bar per epoch on a terminal; nothing otherwise (the epoch line is printed)."""
    if not sys.stderr.isatty():
        return contextlib.nullcontext()
    from tqdm import tqdm

    return tqdm(total=-(-samples // batch_size), desc=label, unit="step", leave=False)


def epoch_line(variant: str, epoch: int, epochs: int, metrics: dict[str, list[float]], seconds: float) -> str:
    means = summarize(metrics)
    values = " ".join(f"{name}={means[name]:.4f}" for name in METRICS)
    count = diverged(metrics["train_loss"])
    warning = f" {count} of {len(metrics['train_loss'])} seeds diverged (non-finite loss)" if count else ""
    return f"train@{variant} epoch {epoch}/{epochs} {values} ({seconds:.1f}s){warning}"


def main(argv: list[str] | None = None) -> None:
    cli.run_variant_stage(train, __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    main()
