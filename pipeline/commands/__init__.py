"""The commands that are not stages: `python -m pipeline.commands.<command>`.

`sweep` writes the grid points of params.yaml's `sweep:` into its `variants:`; `distributed` runs
every variant's train and evaluate stages as tasks on a Dask cluster. Neither is in `dvc.yaml`:
they edit params or drive DVC, and what they share is the library in `pipeline/`.
"""
