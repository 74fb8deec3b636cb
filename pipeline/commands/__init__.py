"""The commands that are not stages (`python -m pipeline.commands.<command>`, none in `dvc.yaml`):
they edit params or drive DVC; what they share is the library in `pipeline/`."""
