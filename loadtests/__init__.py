"""Load tests and serving benchmarks."""
