"""The stages of `dvc.yaml`, one module each: `python -m pipeline.stages.<stage>` is a stage's command.

Read them in the DAG's order: check → download → prepare → train@<variant> → curves (every variant's
curves in one file, for `dvc plots`) and evaluate@<variant> → compare. Each module's `__main__` block
parses its command line and calls the stage function with the validated `Params`, inside
`cli.one_line_errors()`; what they share is the library in `pipeline/`.
"""
