"""Params and variants: `params.yaml` as one validated pydantic object, each variant's config, the sweep's grid."""
