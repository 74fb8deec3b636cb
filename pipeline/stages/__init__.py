"""The stages of `dvc.yaml`, one module each: `python -m pipeline.stages.<stage>` is a stage's command.

Read them in the DAG's order: check → download → prepare → train@<variant> → curves (every
variant's curves in one file, for `dvc plots`) and evaluate@<variant> → compare. Each module's `__main__` block parses its command line and calls the stage function
with the validated `Params`, inside `cli.one_line_errors()`; what they share is the library in
`pipeline/`.
"""

from pipeline import handoff

# Under `make repro`, a stage's command runs in a child of a process that has imported torch and
# MLflow already (pipeline/forkserver.py), and this call exits with the child's status; under
# `dvc repro`, or when the server does not take the command, it returns at once.
handoff.hand_off()
