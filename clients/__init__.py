"""lorafold clients: the Python SDK (`LorafoldClient`, `AsyncLorafoldClient`) and the `lorafold` CLI."""

from .client import AsyncLorafoldClient, LorafoldClient
from .errors import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    LorafoldError,
    NotFoundError,
    RateLimitError,
    ServerUnavailableError,
)
from .streaming import AsyncStream, Stream
from .types import (
    AdapterInfo,
    ChatCompletion,
    ChatCompletionChunk,
    ChatMessage,
    Completion,
    CompletionChunk,
    ModelInfo,
    Usage,
)

__all__ = [
    "APIConnectionError",
    "APITimeoutError",
    "AdapterInfo",
    "AsyncLorafoldClient",
    "AsyncStream",
    "AuthenticationError",
    "BadRequestError",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatMessage",
    "Completion",
    "CompletionChunk",
    "LorafoldClient",
    "LorafoldError",
    "ModelInfo",
    "NotFoundError",
    "RateLimitError",
    "ServerUnavailableError",
    "Stream",
    "Usage",
]
