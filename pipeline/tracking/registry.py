"""The compare stage's last step: the best variant's served model into the MLflow Model Registry.

The best variant has the highest mean over seeds of `val_acc` at the last epoch (from
`data/train/<variant>/history.json`), or of `test_acc` when `compare.select_by: test_acc`.
The model logged in that variant's run (pipeline/tracking/record.py: its best seed as a plain
`nn.Sequential`) becomes a version of `compare.registered_model`, tagged with the variant, the
metric and its score, the data digest, the variant's inputs digest and the compare run: one
version per distinct trained model, so a rerun that writes the same bytes adds none.

`compare.alias` (default `champion`) moves to the new version only when it beats the current
champion on the same metric over the same data; otherwise the new version gets
`compare.challenger_alias`. After every registration the champion is settled again over all
comparable versions, so comparisons finishing in any order (a DVC queue) leave it on the best.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.config.params import Params
from pipeline.errors import PipelineError
from pipeline.stats import mean_std
from pipeline.tracking.model import MODEL_NAME, logged_model_ids
from pipeline.tracking.store import INPUTS_TAG

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


def register(client, experiment_id: str, params: Params, choice: Choice, run_id: str, compare_run_id: str,
             data_digest: str, inputs_digest: str) -> dict:
    """The version of the registered model that `run_id`'s logged model is: the one already made
    from these inputs (`inputs_digest`: the same trained bytes; no alias moves), or a new one,
    champion or challenger."""
    from mlflow.exceptions import MlflowException

    name = params.compare.registered_model
    made = versions_of(client, name, inputs_digest)
    if made:
        version = client.get_model_version(name, made[0].version)
        return _registered(name, version.version, (version.aliases or [""])[0], choice)
    model_ids = logged_model_ids(client, experiment_id, run_id)
    if not model_ids:
        raise PipelineError(f"run {run_id} has no logged model {MODEL_NAME!r}; rerun its train stage (dvc repro -f)")
    try:
        client.create_registered_model(
            name, description="The best variant of the batch-norm MNIST lab, picked by the compare stage. Its "
                              "versions are pickled torch models (MLflow's pickle format, which runs code when "
                              "loaded): load them only from a tracking server you trust.")
    except MlflowException as error:
        if error.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    version = client.create_model_version(
        name, source=f"models:/{model_ids[0]}", run_id=run_id, model_id=model_ids[0],
        tags={"variant": choice.variant, "select_by": choice.metric, "score": repr(choice.score),
              choice.metric: f"{choice.score:.6f}", "data_digest": data_digest, INPUTS_TAG: inputs_digest,
              "compare_run_id": compare_run_id},
        description=f"{choice.variant}: mean {choice.metric} over seeds {choice.score:.4f}",
    )
    first = versions_of(client, name, inputs_digest)[0]
    if first.version != version.version:  # a comparison registering the same model at once made it first
        client.delete_model_version(name, version.version)
        first = client.get_model_version(name, first.version)
        return _registered(name, first.version, (first.aliases or [""])[0], choice)
    alias = settle_aliases(client, name, params.compare.alias, params.compare.challenger_alias, version.version)
    return _registered(name, version.version, alias, choice)


def versions_of(client, name: str, inputs_digest: str) -> list:
    """The versions of `name` made from these inputs (the same trained bytes), oldest first."""
    return sorted((v for v in client.search_model_versions(f"name = '{name}'") if v.tags.get(INPUTS_TAG) == inputs_digest),
                  key=lambda v: int(v.version))


def _registered(name: str, version: str, alias: str, choice: Choice) -> dict:
    return {"name": name, "version": int(version), "alias": alias, "variant": choice.variant,
            "select_by": choice.metric, "score": choice.score}


def _score(version) -> float:
    try:
        return float(version.tags.get("score", "nan"))
    except ValueError:
        return math.nan


def _comparable(version, reference) -> bool:
    """Scored on the same metric over the same data, with a finite score."""
    return (math.isfinite(_score(version)) and "data_digest" in version.tags
            and all(version.tags.get(key) == reference.tags.get(key) for key in ("select_by", "data_digest")))


def settle_aliases(client, name: str, champion: str, challenger: str, new_version: str | int) -> str:
    """Put `champion` on the best version comparable with the current champion (the new one
    where there is none, or it is not comparable with anything newer scoring); `challenger` on
    the new version where it is not the champion. Returns the alias the new version got.

    Read, decide, write, then read again: a comparison registering at the same time is seen
    on the next pass, so concurrent compares end on the same, best, champion.
    """
    from mlflow.exceptions import MlflowException

    new_version, seen = str(new_version), set()
    for _ in range(10):
        versions = {str(v.version): v for v in client.search_model_versions(f"name = '{name}'")}
        if set(versions) == seen:
            break
        seen = set(versions)
        try:
            current = versions.get(str(client.get_model_version_by_alias(name, champion).version))
        except MlflowException:  # no champion yet
            current = None
        reference = current if current is not None and _comparable(current, current) else versions[new_version]
        candidates = [v for v in versions.values() if _comparable(v, reference)] or [versions[new_version]]
        best = max(candidates, key=lambda v: (_score(v), -int(v.version)))  # a tie keeps the earlier version
        client.set_registered_model_alias(name, champion, best.version)
    if str(best.version) == new_version:
        return champion
    client.set_registered_model_alias(name, challenger, new_version)
    return challenger
