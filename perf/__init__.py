"""Benchmarks and network tooling: collective sweeps, topology model, loader and training
benchmarks. Each module is a script: `python -m perf.<name>`."""
