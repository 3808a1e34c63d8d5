"""Benchmarks: each module measures one thing and writes JSON (with the command and machine) and markdown under
benchmarks/results/. Run them from the repository as modules: ``python -m benchmarks.federated --help``."""
