"""`python -m pipeline.commands.publish [--dry-run]` (`make publish`): the workspace's results into
the tracking store that MLFLOW_TRACKING_URI names (default: mlflow.db at the repository root),
without training: every variant's runs with every epoch, the comparison's run and the registered
model, all read from DVC's outputs (pipeline/tracking/workspace.py), as the compare stage ends.
A workspace filled by `dvc pull` or DVC's run-cache publishes the same runs as one that trained;
run again, it adds nothing; over a partial record, it completes it.
"""

from pathlib import Path

from pipeline import cli
from pipeline.config.params import Params, load_params
from pipeline.tracking.store import Tracking, check_store, connect, one_line, runs_page
from pipeline.tracking.workspace import Workspace, mirror_workspace, missing


def publish(params: Params, tracking: Tracking, workspace: Workspace, dry_run: bool = False) -> None:
    """The workspace's results mirrored into `tracking`'s store, or (`dry_run`) what that would add."""
    with one_line(tracking.uri):
        check_store(tracking)
        client, experiment = connect(tracking)
        if dry_run:
            lines = missing(client, experiment, params, workspace)
            print("\n".join(lines) or f"{tracking.uri} holds every result of this workspace already")
            return
        if registered := mirror_workspace(client, experiment, params, workspace):
            print(f"registered: {registered['name']} version {registered['version']} ({registered['variant']})")
        print(f"published to {tracking.uri}; runs: {runs_page(tracking, experiment)}")


if __name__ == "__main__":
    parser = cli.parser(__doc__)
    parser.add_argument("--dry-run", action="store_true", help="say what it would add, add nothing")
    dry_run = parser.parse_args().dry_run
    with cli.one_line_errors():
        params = load_params()
        publish(params, Tracking.from_environment(params.mlflow.experiment_name), Workspace.of(Path.cwd()), dry_run)
