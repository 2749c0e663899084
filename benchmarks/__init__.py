"""soapdsl benchmarks: run `python -m benchmarks.bench_step` (see README.md)."""
