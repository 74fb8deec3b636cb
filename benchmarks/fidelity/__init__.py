"""The port against the lab's own TF1 code (README.md here). The TF1 side (reference.py,
lab_tf1.py, trajectory.py's `tf`) runs as scripts in its own environment; the port's side as
`python -m benchmarks.fidelity.<name>` in the project's."""
