"""What a stage raises for a user's mistake or an outside fault (`cli.one_line_errors` prints it as one line)."""


class PipelineError(Exception):
    exit_code = 1


class ParamsError(PipelineError):
    """A params.yaml problem, already phrased as one line naming the key path."""

    exit_code = 2
