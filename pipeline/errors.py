"""The one exception type a stage raises for a user's mistake or an outside fault: the CLI turns
it into one line on stderr and a non-zero exit; anything else is a bug and keeps its traceback."""


class PipelineError(Exception):
    exit_code = 1


class ParamsError(PipelineError):
    """A params.yaml problem, already phrased as one line naming the key path."""

    exit_code = 2
