"""Benchmarks for the SPEC §9 bars. Ratios are measured within one run; results go to results.md."""
