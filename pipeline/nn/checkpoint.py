"""Checkpoints: written atomically, loaded with `weights_only=True`, checked before use."""

import io
from pathlib import Path

import torch

from pipeline.errors import PipelineError
from pipeline.fsio import atomic_write_bytes

FORMAT = 2  # 2: the optimizer state of pipeline.nn.optimizer


def save(path: Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """The checkpoint's state; a damaged file is a `PipelineError` naming it."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise PipelineError(f"{path}: no such checkpoint") from None
    except OSError as error:
        raise PipelineError(f"{path}: cannot read ({error.strerror})") from None
    except Exception as error:  # on damaged bytes torch.load raises nearly anything: KeyError, IndexError...
        # in a few words: its weights-only errors are paragraphs of advice
        text = str(error).rpartition("WeightsUnpickler error:")[2]
        words = next((line.strip() for line in text.splitlines() if line.strip()), "").split(". ")[0][:120]
        reason = f"{type(error).__name__}: {words}" if words else type(error).__name__
        raise PipelineError(f"{path}: corrupt or truncated checkpoint ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise PipelineError(f"{path}: not a checkpoint of this pipeline (format {FORMAT})")
    return state


def merge_replicas(best: object, current: object, improved: torch.Tensor) -> object:
    """`best` with replica k taken from `current` where improved[k], for nested state dicts; what
    `best` lacks is copied from `current`. Tensors whose leading dimension is the replica count are
    per-replica; anything else (Adam's step count, hyperparameters) is every replica's, taken as is."""
    if isinstance(current, dict):
        best = best if isinstance(best, dict) else {}
        return {key: merge_replicas(best.get(key), value, improved) for key, value in current.items()}
    if isinstance(current, list):
        best = best if isinstance(best, list) else [None] * len(current)
        return [merge_replicas(b, c, improved) for b, c in zip(best, current, strict=True)]
    if not isinstance(current, torch.Tensor):
        return current
    if isinstance(best, torch.Tensor) and current.dim() > 0 and current.shape[0] == len(improved):
        return torch.where(improved.to(current.device).view(-1, *([1] * (current.dim() - 1))), current, best)
    return current.clone()


def copied(state: object) -> object:
    """A nested state with every tensor cloned."""
    return merge_replicas(None, state, torch.zeros(0, dtype=torch.bool))


def update_best(best: dict, trained: dict, val_acc: list[float], epoch: int) -> dict:
    """Replica k's weights and optimizer state from this epoch where its val_acc improved."""
    current = torch.tensor(val_acc)
    improved = current > best["val_acc"]
    epochs = [epoch if up else kept for up, kept in zip(improved.tolist(), best["epoch"])]
    return merge_replicas(best, {**trained, "val_acc": current, "epoch": epochs}, improved)
