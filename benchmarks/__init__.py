"""Scripts that measure `ttt_helpers` and write their results, with provenance, to `results/*.json`.

Each runs from the repository root as a module, e.g. `python -m benchmarks.bench_kernels --dry-run`;
benchmarks/README.md says what each one measures.
"""
