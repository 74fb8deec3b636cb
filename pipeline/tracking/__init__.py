"""The MLflow record: where the store is and how a stage reaches it, the runs of each variant,
and the Model Registry."""
