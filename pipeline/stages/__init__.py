"""The stages of `dvc.yaml`, one module each: `python -m pipeline.stages.<stage>` is a stage's command.

Read them in the DAG's order: check → download → prepare → train@<variant> → evaluate@<variant>
→ compare. Each `main` parses its command line and hands one validated `Params` to the stage
function (`pipeline/cli.py`); everything they share is the library in `pipeline/`.
"""
