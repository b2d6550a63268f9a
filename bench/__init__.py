"""Benchmarks of the measured bars (bench/results.md). Ratios are measured within one run; results go to results.md."""
