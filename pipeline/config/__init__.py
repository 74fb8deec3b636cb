"""Params and variants: `params.yaml` validated as one pydantic object, each variant's resolved
config, and the sweep's grid of variants."""
