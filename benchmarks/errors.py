"""Errors a user of the benchmark can act on; the CLI prints their message as one line and exits non-zero."""


class BenchmarkError(ValueError):
    """Bad options or inputs for a benchmark run (threads, batches, a model that is not the checkpoint's)."""
