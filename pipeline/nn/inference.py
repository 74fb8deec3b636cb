"""The stacked MLP in eval mode, in numpy: what the evaluate stage runs instead of torch.

An MLP's forward pass is a few matrix products; importing torch for them was 1.8 s of the
evaluate stage's 2.2 s. The train stage writes the final weights as `weights.npz` beside its
checkpoints (`save_weights`): the state dict's arrays under pipeline/nn/model.py's names and the
variant's config as JSON. `logits` computes what `StackedMlp(config).eval()` computes, the
same operations in the same order (tests/test_inference.py holds them equal to float rounding
for every norm, activation and replica count, and every seed's test accuracy equal).
"""

import io
import json
import math
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pipeline.errors import PipelineError
from pipeline.fsio import atomic_write_bytes
from pipeline.config.variant import VariantConfig

WEIGHTS_FILE = "weights.npz"


def save_weights(path: Path, config: dict, arrays: dict[str, np.ndarray]) -> None:
    """An uncompressed `.npz` that `np.load` reads; its members carry a fixed date (np.savez
    stamps the clock's), so the same weights are the same bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, array in {"config": np.array(json.dumps(config, sort_keys=True)), **arrays}.items():
            with archive.open(zipfile.ZipInfo(f"{name}.npy"), "w") as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())


def load_weights(path: Path) -> tuple[VariantConfig, dict[str, np.ndarray]]:
    """(the variant's config, its arrays by state-dict name); a damaged file is a `PipelineError`."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files}
        config = VariantConfig(**json.loads(arrays.pop("config").item()))
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found; run the train stage") from None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
        raise PipelineError(f"{path}: corrupt or truncated weights ({type(error).__name__}); "
                            "rerun the train stage") from None
    return config, arrays


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """StackedLinear: x [n, in] shared by the K replicas (one wide GEMM, as torch's) or [K, n, in]."""
    if x.ndim == 2:
        replicas, fan_in, fan_out = weight.shape
        wide = x @ weight.transpose(1, 0, 2).reshape(fan_in, replicas * fan_out)
        out = np.ascontiguousarray(wide.reshape(len(x), replicas, fan_out).transpose(1, 0, 2))
    else:
        out = x @ weight
    return out if bias is None else out + bias


def batch_norm(x: np.ndarray, eps: float, weight, bias, running_mean, running_var) -> np.ndarray:
    """Eval mode: the running statistics folded into a scale and a shift, as torch's CPU kernel folds them."""
    scale = weight * (1 / np.sqrt(running_var + np.float32(eps)))
    return x * scale + (bias - running_mean * scale)


def layer_norm(x: np.ndarray, eps: float, weight, bias) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = np.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * (1 / np.sqrt(var + np.float32(eps))) * weight + bias


def gelu(x: np.ndarray) -> np.ndarray:
    """The exact (erf) GELU, nn.GELU's default."""
    from scipy.special import erf  # only a gelu variant pays for its import

    return x * np.float32(0.5) * (1 + erf(x * np.float32(1 / math.sqrt(2))))


NORMS = {"batch": batch_norm, "layer": layer_norm}
ACTIVATIONS = {"relu": lambda x: np.maximum(x, np.float32(0)), "tanh": np.tanh,
               "sigmoid": lambda x: 1 / (1 + np.exp(-x)), "gelu": gelu}


def logits(config: VariantConfig, weights: dict[str, np.ndarray], images: np.ndarray) -> np.ndarray:
    """[K, n, classes] for float32 images [n, 784], each layer at the nn.Sequential position model.py gives it."""
    layers: dict[int, dict[str, np.ndarray]] = {}
    for name, array in weights.items():
        _, position, kind = name.split(".")
        layers.setdefault(int(position), {})[kind] = array
    x, stride = images, 2 if config.norm == "none" else 3  # Linear, [norm,] activation
    for position in range(0, stride * len(config.hidden_sizes), stride):
        x = linear(x, **layers[position])
        if config.norm != "none":
            x = NORMS[config.norm](x, config.norm_eps, **layers[position + 1])
        x = ACTIVATIONS[config.activation](x)
    return linear(x, **layers[stride * len(config.hidden_sizes)])


def cross_entropy(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[K, n] per image and replica of logits [K, n, classes], as F.cross_entropy: log-sum-exp
    less the true class's logit."""
    shifted = scores - scores.max(-1, keepdims=True)
    return np.log(np.exp(shifted).sum(-1)) - np.take_along_axis(shifted, labels[None, :, None], -1)[..., 0]


class Evaluation(NamedTuple):
    """Per replica: mean loss [K], accuracy [K] and confusion counts [K, true, predicted]."""

    loss: np.ndarray
    acc: np.ndarray
    confusion: np.ndarray


def evaluate(config: VariantConfig, weights: dict[str, np.ndarray], pixels: np.ndarray, labels: np.ndarray,
             batch_size: int) -> Evaluation:
    """Every replica on a whole split (uint8 pixels [N, 784]), `batch_size` images at a time."""
    loss_sum, counts = 0.0, 0
    # A diverged replica's logits are inf or NaN: its loss is NaN, as torch's is, without warnings.
    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, len(labels), batch_size):
            images = pixels[start : start + batch_size].astype(np.float32) / np.float32(255)  # data.as_images
            batch_labels = labels[start : start + batch_size]
            out = logits(config, weights, images)
            loss_sum = loss_sum + cross_entropy(out, batch_labels).sum(1, dtype=np.float64)
            classes = out.shape[-1]
            cells = batch_labels * classes + out.argmax(-1)  # [K, n]: true class by row, predicted by column
            counts = counts + np.stack([np.bincount(row, minlength=classes * classes) for row in cells])
    confusion = counts.reshape(len(counts), classes, classes)
    return Evaluation(loss=loss_sum / len(labels), acc=confusion.trace(axis1=1, axis2=2) / len(labels),
                      confusion=confusion)
