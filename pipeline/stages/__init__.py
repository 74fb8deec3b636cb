"""The stages of `dvc.yaml`, one module each, in the DAG's order (docs/pipeline.md): check → download → prepare →
train@<variant> → curves (every variant's curves in one file, for `dvc plots`) and evaluate@<variant> → compare."""
