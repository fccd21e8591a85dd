"""Errors the CLI turns into one clear line and a non-zero exit (never a traceback)."""


class VlmqError(Exception):
    """A user-facing failure: bad input, unsupported model, an incomplete output directory."""

    exit_code = 2


class UnsupportedModelError(VlmqError):
    pass


class CalibrationDataError(VlmqError):
    pass


class OutputDirError(VlmqError):
    pass


class NumericalError(VlmqError):
    exit_code = 3


class PromptError(VlmqError, ValueError):
    """A prompt that does not fit the images given (e.g. <image> placeholders against images): one line and
    exit 2 in `run`, a 400 in `serve` (which refuses any ValueError of a request)."""
