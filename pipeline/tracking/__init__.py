"""The MLflow record: where the store is and how a stage reaches it, each variant's runs, the Model Registry."""
