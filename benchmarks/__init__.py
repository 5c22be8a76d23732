"""Benchmarks: the runtime against native JAX (`python -m benchmarks.run`)."""
