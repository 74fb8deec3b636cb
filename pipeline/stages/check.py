"""Stage `check`: the whole params.yaml validated, and the environment recorded, before any other stage.

DVC deletes a stage's outputs before it runs the command, so a stage cannot protect its own outputs
from a bad value. This stage, at the root of the DAG, depends on the whole `params.yaml` (and on
`requirements.lock`), so any edit, a `dvc exp run -S` too, runs it first; every computing stage
depends on its `environment.json`, so nothing else runs when it fails. A valid edit rewrites it with
the same bytes, and DVC reruns just the stages whose own params changed. On top of the params' own
rules it checks this machine: a CUDA device where one is asked for, and memory for the largest model.
"""

from pathlib import Path

from pipeline import cli, provenance
from pipeline.errors import ParamsError
from pipeline.fsio import atomic_write_json
from pipeline.config.params import Params, load_params
from pipeline.config.variant import VariantConfig, layer_sizes

FLOAT_BYTES = 4
# Copies of a replica stack's parameters alive at once: weights, gradients, Adam's two moments,
# the evaluation thread's weights, the best epoch's and the checkpoint's copies (3 tensors each).
STATE_COPIES = 11
MNIST_IMAGES = 70_000
SPLIT_BYTES = MNIST_IMAGES * 28 * 28  # MNIST as uint8 pixels, held whole


def estimated_bytes(config: VariantConfig) -> int:
    """A generous estimate of a variant's peak memory in its train stage."""
    weights = sum(fan_in * fan_out + fan_out for fan_in, fan_out in layer_sizes(config))
    norms = 0 if config.norm == "none" else 4 * sum(config.hidden_sizes)  # scale, shift, running stats
    replicas = len(config.seeds)
    state = STATE_COPIES * (weights + norms) * replicas * FLOAT_BYTES
    # Evaluation: a batch of images (no larger than a split), each layer's activations per replica, twice over.
    batch = min(config.eval_batch_size, MNIST_IMAGES)
    activations = 2 * batch * (28 * 28 + replicas * (sum(config.hidden_sizes) + 10)) * FLOAT_BYTES
    return state + activations + SPLIT_BYTES


def check(params: Params, root: Path) -> dict:
    if params.train.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ParamsError("params.yaml: train.device: 'cuda' but this machine has no CUDA device (use auto or cpu)")
    import psutil

    total = psutil.virtual_memory().total
    for name in params.variants:
        needed = estimated_bytes(params.variant(name))
        if needed > total:
            raise ParamsError(f"params.yaml: variants.{name}: needs about {needed / 2**30:.1f} GiB (hidden_sizes x "
                              f"{len(params.seeds)} seeds), this machine has {total / 2**30:.1f} GiB")
    environment = provenance.environment(root / provenance.LOCK_FILE)
    atomic_write_json(root / provenance.ENVIRONMENT_FILE, environment)
    print(f"params.yaml valid; environment: Python {environment['python']}, "
          f"{len(environment['packages'])} packages as {provenance.LOCK_FILE} pins them")
    return environment


if __name__ == "__main__":
    cli.arguments(__doc__)
    with cli.one_line_errors():
        check(load_params(), Path())  # relative paths in messages
