"""Typed errors of the engine's public API.

Every input error names the offending field (``err.field``) and subclasses
``ValueError``, so ``except ValueError`` keeps working for callers who do not care
which check failed. Input checks run before any work is scheduled: a bad request
never reaches the block manager, and the other requests of a batch are unaffected.
"""

from __future__ import annotations


class MinipagedError(Exception):
    """Base class of every error the engine raises on purpose."""


class InputError(MinipagedError, ValueError):
    """A user-supplied value is invalid; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class InvalidSamplingParamsError(InputError):
    """A ``SamplingParams`` field is out of range (``field`` is its name)."""


class InvalidEngineConfigError(InputError):
    """An ``LLM(...)`` / ``EngineConfig`` argument is out of range."""


class InvalidPromptError(InputError):
    """A prompt is empty, malformed or holds token ids outside the vocabulary."""


class PromptTooLongError(InvalidPromptError):
    """The prompt has more tokens than ``max_model_len``."""


class RequestTooLargeError(InputError):
    """The request could never fit in the KV cache, even running alone."""


class UnsupportedQuantizationError(InputError):
    """A checkpoint's ``quantization_config`` asks for a scheme minipaged does not run (``field`` is the key)."""


class InvalidQuantizedWeightError(InputError):
    """A quantized checkpoint's tensor is missing, mis-shaped or of the wrong dtype (``field`` names it)."""


class EngineDeadError(MinipagedError, RuntimeError):
    """The engine loop failed; the request cannot complete (the cause is chained, and logged once).

    The message names only the cause's type: a worker's error text can hold a whole remote
    traceback, which belongs in the log, not in an answer to a client.
    """


class UnknownRequestError(MinipagedError, KeyError):
    """``abort`` (or a lookup) named a request id the engine does not hold."""

    def __init__(self, request_id: object) -> None:
        self.request_id = request_id
        super().__init__(f"unknown request id {request_id!r}")
