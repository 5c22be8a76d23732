"""Errors a user can act on; the CLIs print their message as one line and exit non-zero."""


class AudioError(ValueError):
    """Audio that cannot be decoded or analysed (unreadable, empty, non-finite, too long)."""


class AudioDecodeError(AudioError):
    """Bytes that no decoder can read: not audio, an unsupported codec, or corrupt or truncated."""


class AudioTooLongError(AudioError):
    """Audio longer than the caller's limit (or the hard safety limit)."""


class ConfigError(ValueError):
    """A setting (environment variable or option) with an unusable value."""


class ModelError(ValueError):
    """A model file the runtime cannot use (missing, not ONNX, metadata not as expected)."""


class InputError(ValueError):
    """A precomputed spectrogram or request of the wrong shape or content."""


class ModelOutputError(RuntimeError):
    """The model gave NaN or infinite scores: the model's fault, not the input's (HTTP 500 model_failed)."""
