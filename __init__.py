"""radixserve: a fast LLM serving engine in pure async Python."""

from __future__ import annotations

from radixserve.engine import Engine
from radixserve.errors import (
    ContextLengthError,
    EngineDeadError,
    InvalidRequestError,
    QueueFullError,
    RadixServeError,
    RequestAbortedError,
)
from radixserve.outputs import GenerateOutput, StreamDelta
from radixserve.sampling_params import SamplingParams

__all__ = [
    "ContextLengthError",
    "Engine",
    "GenerateOutput",
    "StreamDelta",
    "EngineDeadError",
    "InvalidRequestError",
    "QueueFullError",
    "RadixServeError",
    "RequestAbortedError",
    "SamplingParams",
]
