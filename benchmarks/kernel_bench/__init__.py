"""The kernel benchmark's sections, one module each, over shared timing (`timing`), counts (`counts`)
and inputs (`inputs`). `python -m benchmarks.bench_kernels` runs them and writes the JSON."""
