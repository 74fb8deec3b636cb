"""The served model in a variant's run: logged once from its checkpoint, found again, and the
one-off costs of logging it paid early by the train stage's tracking process."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

MODEL_NAME = "model"  # the logged model of a variant's run, registered by compare


def logged_model_ids(client, experiment: str, run_id: str) -> list[str]:
    """The ids of the models logged (READY) in `run_id`, the newest first."""
    from mlflow.entities import LoggedModelStatus

    models = client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}' AND "
                                                                     f"name = '{MODEL_NAME}'")
    ready = sorted((m for m in models if m.status == LoggedModelStatus.READY), key=lambda m: -m.creation_timestamp)
    return [m.model_id for m in ready]


def log_model(client, run_id: str, outputs) -> None:
    """The served seed (pipeline/nn/model.served_model) as a plain nn.Sequential, with its
    signature; none when every seed diverged. Pickle, not MLflow's default pt2: torch.export costs
    ~2.3 s here, and the model is a plain stack of torch.nn layers; whoever loads it is told so in
    the registered model's description. The input example is two blank images: the images are
    not among the outputs, and the record is a function of them. `outputs`: a record.VariantOutputs."""
    import mlflow
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    from pipeline.nn.checkpoint import load
    from pipeline.nn.model import served_model

    served = served_model(load(outputs.checkpoints / "last.pt"), outputs.history)
    if served is None:
        return
    model, seed = served
    client.set_tag(run_id, "served_seed", str(seed))
    example = np.zeros((2, model[1].in_features), dtype=np.float32)
    with torch.no_grad():
        signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
    with _no_pickle_warning(), mlflow.start_run(run_id=run_id):  # in the run's experiment: so is its model
        # Explicit requirements: inferring them imports the model in a subprocess (~6 s).
        mlflow.pytorch.log_model(model, name=MODEL_NAME, signature=signature, input_example=example,
                                 serialization_format="pickle",
                                 pip_requirements=mlflow.pytorch.get_default_pip_requirements())


def warm_model_logging(client, experiment: str, run_id: str) -> None:
    """log_model's one-off costs paid while the stage trains (the train stage's tracking process
    calls it once the store is open), where `run_id` has no model yet: a rerun of the same inputs
    logs none (train stage alone, 6 alternating runs: CPU 6.07 -> 5.86 s with the skip). Paid:
    the flavor's import, and the map of every installed distribution's modules that MLflow builds
    to check a requirement (torch's 14,700-file record included), by saving a one-layer model to a
    folder thrown away (0.37 s of CPU where torch is imported already, as in the forked tracking
    process). Train stage, whole process, against the same code without it (alternating,
    medians, 2 busy cores): the published lab 0.78x the wall time (5.69 s against 7.32 s), tiny
    data 0.88x (4.95 s, 5.65 s)."""
    if logged_model_ids(client, experiment, run_id):
        return
    import tempfile

    import mlflow.pytorch
    import torch

    with _no_pickle_warning(), tempfile.TemporaryDirectory() as folder:
        mlflow.pytorch.save_model(torch.nn.Linear(1, 1), Path(folder) / "model", serialization_format="pickle",
                                  pip_requirements=mlflow.pytorch.get_default_pip_requirements())


@contextlib.contextmanager
def _no_pickle_warning():
    """MLflow warns about pickle on every model it saves; whoever loads one is told once, in the
    registered model's description (pipeline/tracking/registry.py)."""
    logger = logging.getLogger("mlflow.pytorch")
    logger.addFilter(_not_the_pickle_warning)
    try:
        yield
    finally:
        logger.removeFilter(_not_the_pickle_warning)


def _not_the_pickle_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Saving pytorch model by Pickle")
