"""The numerics of the stacked MLP: model, backprop and fastpath, optimizer, training, inference, checkpoint."""
