"""The kernel benchmark's sections, one module each, over shared timing (`timing`), counts (`counts`)
and inputs (`inputs`). `benchmarks/bench_kernels.py` runs them and writes the JSON."""
