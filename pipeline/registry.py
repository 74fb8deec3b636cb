"""The compare stage's last step: the best variant's served model into the MLflow Model Registry.

The best variant has the highest mean over seeds of `val_acc` at the last epoch (from
`data/train/<variant>/history.json`), or of `test_acc` when `compare.select_by: test_acc`.
The model that train logged in that variant's run (`name="model"`: its best seed as a plain
`nn.Sequential`) becomes a new version of `compare.registered_model`, tagged with the variant
and its score, and `compare.alias` (default `champion`) moves to it, so
`models:/<registered_model>@<alias>` is always the latest comparison's pick.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.errors import PipelineError
from pipeline.params import Params
from pipeline.stats import mean_std

LOGGED_MODEL_NAME = "model"  # what train.finish passes to mlflow.pytorch.log_model


@dataclass(frozen=True)
class Choice:
    variant: str
    metric: str
    score: float  # mean over seeds


def select_best(params: Params, histories: dict[str, dict], test_acc: dict[str, list[float]]) -> Choice | None:
    """The variant with the highest mean score; ties go to the one listed first in params.

    Only variants with a served model (a seed that never diverged) and a finite score are
    candidates; None when there is none (nothing is registered).
    """
    metric = params.compare.select_by
    if metric == "val_acc":
        scores = {v: mean_std(histories[v]["val_acc"][-1])[0] for v in params.variants}
    else:
        scores = {v: mean_std(test_acc[v])[0] for v in params.variants}
    candidates = [v for v in params.variants if math.isfinite(scores[v])
                  and any(epoch is None for epoch in histories[v]["diverged_epoch"])]
    if not candidates:
        return None
    best = max(candidates, key=scores.__getitem__)
    return Choice(best, metric, scores[best])


def logged_model_id(client, experiment_id: str, run_id: str) -> str:
    """The id of the model train logged in `run_id` (MLflow 3 keeps it as a LoggedModel)."""
    from mlflow.entities import LoggedModelStatus

    models = client.search_logged_models(
        [experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{LOGGED_MODEL_NAME}'",
    )
    ready = [m for m in models if m.status == LoggedModelStatus.READY]
    if not ready:
        raise PipelineError(
            f"run {run_id} has no logged model {LOGGED_MODEL_NAME!r}; rerun its train stage (dvc repro -f)"
        )
    return max(ready, key=lambda m: m.creation_timestamp).model_id


def register_best(client, experiment_id: str, params: Params, choice: Choice, run_id: str,
                  compare_run_id: str) -> dict:
    """A new version of the registered model from `run_id`'s logged model; the alias moves to it."""
    from mlflow.exceptions import MlflowException

    name, alias = params.compare.registered_model, params.compare.alias
    model_id = logged_model_id(client, experiment_id, run_id)
    try:
        client.create_registered_model(
            name, description="The best variant of the batch-norm MNIST lab, picked by the compare stage.")
    except MlflowException as error:
        if error.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    version = client.create_model_version(
        name,
        source=f"models:/{model_id}",
        run_id=run_id,
        model_id=model_id,
        tags={"variant": choice.variant, "select_by": choice.metric, choice.metric: f"{choice.score:.6f}",
              "compare_run_id": compare_run_id},
        description=f"{choice.variant}: mean {choice.metric} over seeds {choice.score:.4f}",
    )
    client.set_registered_model_alias(name, alias, version.version)
    return {"name": name, "version": int(version.version), "alias": alias, "variant": choice.variant,
            "select_by": choice.metric, "score": choice.score, "run_id": run_id, "model_id": model_id,
            "model_uri": f"models:/{name}@{alias}"}
