"""The commands that are not stages (`python -m pipeline.commands.<command>`): they edit params or drive DVC."""
