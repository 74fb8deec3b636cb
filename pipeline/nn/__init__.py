"""The numerics of the stacked MLP: the model, its hand-written backward pass and the fast path
that checks it against torch's, the optimizer, training and evaluation, inference in numpy, and
the checkpoints of a training state."""
