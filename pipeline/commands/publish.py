"""`python -m pipeline.commands.publish [--dry-run]` (`make publish`): the workspace's results into
the tracking store that MLFLOW_TRACKING_URI names (default: mlflow.db at the repository root),
without training.

Every variant's run and per-seed runs with every epoch, their evaluation, checkpoints and model,
the comparison's run with its figures and tables, and the registered model with its aliases, all
read from DVC's outputs (pipeline/tracking/record.py): a workspace that trained, one filled by
`dvc pull`, or one DVC restored from its run-cache publishes the same runs. Run again, it adds
nothing; over a partial record (a store that was down while a stage trained), it completes it.
The compare stage ends with the same call. `--dry-run` says what it would add, and adds nothing.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import cli
from pipeline.config.params import Params, load_params
from pipeline.tracking.store import Tracking, connect, one_line, runs_page
from pipeline.tracking.workspace import Workspace, mirror_workspace, missing


def publish(params: Params, workspace: Workspace, tracking: Tracking, dry_run: bool) -> None:
    with one_line(tracking.uri):
        client, experiment = connect(tracking)
        if dry_run:
            lines = missing(client, experiment, params, workspace)
            print("\n".join(lines) or f"{tracking.uri} holds every result of this workspace already")
            return
        registered = mirror_workspace(client, experiment, params, workspace)
    if registered is not None:
        print(f"registered: {registered['name']} version {registered['version']} ({registered['variant']})")
    print(f"published to {tracking.uri}; runs: {runs_page(tracking, experiment)}")


if __name__ == "__main__":
    parser = cli.parser(__doc__)
    parser.add_argument("--dry-run", action="store_true", help="say what it would add, add nothing")
    arguments = parser.parse_args()
    with cli.one_line_errors():
        params = load_params()
        publish(params, Workspace.of(Path.cwd()), Tracking.from_environment(params.mlflow.experiment_name),
                arguments.dry_run)
