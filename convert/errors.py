"""Errors of the converter; the CLI prints their message as one line and exits non-zero."""


class CheckpointError(ValueError):
    """A checkpoint that is unreadable, unsafe, or does not match its config."""


class ExportError(RuntimeError):
    """The JAX -> ONNX export itself failed."""


class ParityError(RuntimeError):
    """An exported model that does not match JAX within tolerance; carries the report."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report
