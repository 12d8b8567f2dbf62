"""Every exception radixserve raises on purpose, in one place.

`InvalidRequestError` is the user's fault (HTTP 400); it names the offending field. `EngineDeadError` means a
component died and the request cannot finish (HTTP 503). `RequestAbortedError` ends a request someone aborted.
"""

from __future__ import annotations


class RadixServeError(Exception):
    """Base of every error radixserve raises on purpose."""


class InvalidRequestError(RadixServeError, ValueError):
    """Bad input: `field` names what is wrong (dotted path for nested fields)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


class ContextLengthError(InvalidRequestError):
    """The prompt, or the prompt plus the tokens asked for, does not fit the model's context."""


class QueueFullError(RadixServeError):
    """Admission refused: `--max-queued-requests` requests are already waiting (HTTP 503)."""


class EngineDeadError(RadixServeError):
    """An actor or a worker process died; requests in flight cannot finish."""


class RequestAbortedError(RadixServeError):
    """The request was aborted (by its caller, a disconnect, or the engine shutting down)."""


class ModelNotFoundError(RadixServeError, FileNotFoundError):
    """The model path does not exist, or the default model's package is not installed."""


class UnsupportedFeatureError(RadixServeError, NotImplementedError):
    """A configuration asks for something radixserve has not built; raised at start-up, never ignored."""
