"""Stage `train@<variant>`: train every seed of one variant as one stacked model.

After each epoch: loss and accuracy on the whole train split (eval mode, as the lab does)
and on validation, logged to MLflow; `last.pt` (resumable) and `best.pt` (per replica, by
val_acc) written atomically. A killed stage rerun resumes from the last completed epoch and
continues the same MLflow runs; the result is bit-identical to an uninterrupted run.
MLflow's calls run in the stage's tracking process (pipeline/tracking_process.py).
"""

from __future__ import annotations

import copy
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import checkpoint, cli, tracking
from pipeline.data import as_images, load_split, read_manifest
from pipeline.errors import PipelineError
from pipeline.fsio import atomic_write_json
from pipeline.model import StackedMlp, unstack
from pipeline.params import Params, VariantConfig
from pipeline.reports import METRICS, write_curves
from pipeline.training import (
    TrainingStep,
    epoch_metrics,
    make_optimizer,
    train_epoch,
    trained_state,
)
from pipeline.tracking_process import TrackingProcess


@dataclass(frozen=True)
class Paths:
    prepared: Path
    checkpoints: Path  # persists across DVC reruns: what resume reads
    out: Path  # curves, history and run ids for the later stages

    @classmethod
    def for_variant(cls, root: Path, variant: str) -> Paths:
        data = root / "data"
        return cls(data / "prepared", data / "checkpoints" / variant, data / "train" / variant)


def configure_runtime(threads: int, device: str) -> torch.device:
    """Pinned threads and deterministic kernels: same inputs, same bits (on one device)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise PipelineError("train.device: 'cuda' requested but no CUDA device is available")
    torch.set_num_threads(threads)
    if device == "cuda":
        # On the CPU every kernel this model uses is deterministic for a fixed thread count
        # (tests check bit-identical reruns); the switch would only cost a second of imports.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Deterministic mode also fills every new tensor with NaN, a kernel per allocation;
        # no kernel here reads memory it has not written.
        torch.utils.deterministic.fill_uninitialized_memory = False
    return torch.device(device)


def unfinished_checkpoint(path: Path) -> dict | None:
    """The state of a run that did not complete, if one left a readable `last.pt`."""
    if not path.exists():
        return None
    try:
        state = checkpoint.load(path)
    except checkpoint.CheckpointError as error:
        print(f"warning: {error}; starting fresh", file=sys.stderr)
        return None
    return None if state["complete"] else state


class Stop(Exception):
    """SIGTERM, raised where the loop is so the runs can be closed as KILLED."""


def _raise_stop(signum, frame):
    raise Stop()


def train(params: Params, variant: str, root: Path, runs: tracking.Tracking) -> dict:
    device = configure_runtime(params.train.threads, params.train.device)
    with TrackingProcess(runs) as tracker:  # opens MLflow there while this process loads data
        return train_variant(params.variant(variant), Paths.for_variant(root, variant), device, tracker,
                             tracking.run_tags(runs, root, f"train@{variant}"))


def train_variant(config: VariantConfig, paths: Paths, device: torch.device, tracker: TrackingProcess,
                  tags: dict[str, str]) -> dict:
    variant = config.name
    train_split = load_split(paths.prepared, "train", device)
    val_split = load_split(paths.prepared, "val", device)
    if config.batch_size > len(train_split):
        raise PipelineError(f"train.batch_size: {config.batch_size} exceeds the train split ({len(train_split)})")

    model = StackedMlp(config, config.seeds).to(device)
    optimizer = make_optimizer(model, config)
    last_path, best_path = paths.checkpoints / "last.pt", paths.checkpoints / "best.pt"
    state = unfinished_checkpoint(last_path)
    if state is not None and state["fingerprint"] == config.fingerprint():
        print(f"{last_path}: resuming after epoch {state['epoch']}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        best, history, start_epoch = checkpoint.load(best_path, device), state["history"], state["epoch"]
        run_ids = tracker.submit(tracking.resume_variant_runs, state["run_ids"], copy.deepcopy(history))
    else:
        replaces = None
        if state is not None:
            print(f"{last_path}: params changed since this checkpoint; starting fresh", file=sys.stderr)
            replaces = state["run_ids"]
        run_ids = tracker.submit(tracking.start_variant_runs, tracker.tracking.experiment_name, config, tags,
                                 dataset_lineage(paths.prepared), replaces)
        best = {**trained_state(model, optimizer), "val_acc": torch.full((len(config.seeds),), -1.0),
                "epoch": [0] * len(config.seeds)}
        history, start_epoch = {name: [] for name in METRICS}, 0
    tracker.submit(tracking.prepare_model_logging)

    def save_last(epoch: int, trained: dict, complete: bool) -> None:
        checkpoint.save(last_path, {
            "fingerprint": config.fingerprint(), "config": config.model_dump(), "epoch": epoch,
            "complete": complete, **trained, "history": history, "run_ids": run_ids.result(),
        })

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
        save_last(epoch, trained, complete=False)
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
    except BaseException:
        close_runs("FAILED")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_handler)

    save_last(config.epochs, trained_state(model, optimizer), complete=True)
    summary = finish(tracker, run_ids.result(), config, model, val_split, history, paths, best)
    tracker.call(tracking.set_status, run_ids.result(), "FINISHED")
    return summary


def update_best(best: dict, trained: dict, val_acc: list[float], epoch: int) -> dict:
    """Replica k's weights and optimizer state from this epoch where its val_acc improved."""
    current = torch.tensor(val_acc)
    improved = current > best["val_acc"]
    return checkpoint.merge_replicas(best, {
        **trained, "val_acc": current,
        "epoch": [epoch if up else kept for up, kept in zip(improved.tolist(), best["epoch"])],
    }, improved)


def dataset_lineage(prepared: Path) -> dict:
    """What MLflow records of the prepared splits: their digest, sizes and location."""
    manifest = read_manifest(prepared)
    return {"digest": manifest["digest"], "sizes": manifest["sizes"], "uri": prepared.resolve().as_uri()}


def finish(tracker: TrackingProcess, run_ids: dict, config: VariantConfig, model: StackedMlp, val_split,
           history: dict, paths: Paths, best: dict) -> dict:
    """Outputs for the later stages; the checkpoints and the final model into MLflow."""
    write_curves(paths.out / "curves.csv", history)
    atomic_write_json(paths.out / "history.json", {"seeds": config.seeds, "best_epoch": best["epoch"], **history})
    atomic_write_json(paths.out / "run.json", {"variant": config.name, "run_ids": run_ids})

    # The served model is the replica with the best final val_acc, as a plain nn.Module.
    final_val_acc = history["val_acc"][-1]
    replica = max(range(len(final_val_acc)), key=final_val_acc.__getitem__)
    tracker.call(tracking.log_trained_model, run_ids, unstack(model.cpu(), config, replica),
                 as_images(val_split.pixels[:2]).cpu().numpy(), config.seeds[replica], best["epoch"],
                 [paths.checkpoints / "last.pt", paths.checkpoints / "best.pt"])
    return {"run_ids": run_ids, "final": {name: history[name][-1] for name in METRICS}}


class _NoBar:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def progress_bar(samples: int, batch_size: int, label: str):
    """A tqdm bar per epoch on a terminal; nothing otherwise (the epoch line is printed)."""
    if not sys.stderr.isatty():
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=-(-samples // batch_size), desc=label, unit="step", leave=False)


def epoch_line(variant: str, epoch: int, epochs: int, metrics: dict[str, list[float]], seconds: float) -> str:
    means = tracking.summarize(metrics)
    values = " ".join(f"{name}={means[name]:.4f}" for name in METRICS)
    return f"train@{variant} epoch {epoch}/{epochs} {values} ({seconds:.1f}s)"


def main(argv: list[str] | None = None) -> None:
    cli.run_variant_stage(train, __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    main()
