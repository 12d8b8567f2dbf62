"""radixserve: a fast LLM serving engine in pure async Python."""

from __future__ import annotations

from radixserve.errors import (
    ContextLengthError,
    EngineDeadError,
    InvalidRequestError,
    QueueFullError,
    RadixServeError,
    RequestAbortedError,
)
from radixserve.sampling_params import SamplingParams

__all__ = [
    "ContextLengthError",
    "EngineDeadError",
    "InvalidRequestError",
    "QueueFullError",
    "RadixServeError",
    "RequestAbortedError",
    "SamplingParams",
]
