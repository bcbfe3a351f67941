"""Synthetic H&E-like slides, cohorts and mosaics for samples, tests and benchmarks."""
