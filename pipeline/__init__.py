"""The batch-norm MNIST lab as DVC stages (check, download, prepare, train, evaluate, compare) and their library."""
