"""The benchmarks: each runs from the repository root as `python -m benchmarks.<name>` (README.md
here); what they share with the tests is tests/support.py."""
