"""Typed exceptions for errors a user can cause. Each message names the culprit.

The lower layer ``sharding`` cannot import cpmjax, so the types both raise are defined there
(:mod:`sharding.errors`) and re-exported here as the same class objects: ``CpmjaxError`` is
``sharding.errors.LibraryError`` and ``ConfigError``, ``ShapeMismatchError``, ``ShardingError``
are sharding's. ``except cpmjax.errors.ConfigError`` (or ``CpmjaxError``) therefore catches the
errors raised inside ``sharding`` too. ``ShapeMismatchError`` is a ``ValueError``, not a
``TensorError``: one type for every shape mismatch, checkpoint tensors or attention inputs.
"""

from __future__ import annotations

from sharding.errors import ConfigError, ShapeMismatchError, ShardingError
from sharding.errors import LibraryError as CpmjaxError

__all__ = [
    "CheckpointError",
    "CompressionError",
    "ConfigError",
    "CpmjaxError",
    "DeltaError",
    "EmptyPromptError",
    "FitError",
    "InputError",
    "MissingPathError",
    "MissingTensorError",
    "NonFiniteLossError",
    "OutOfRangeError",
    "PromptTooLongError",
    "QuantizedCheckpointError",
    "ShapeMismatchError",
    "ShardingError",
    "TensorError",
    "TokenIdError",
    "ToolArgumentsError",
    "ToolCallParseError",
    "ToolDefinitionError",
    "ToolError",
    "ToolExecutionError",
    "TrainingError",
    "UnexpectedTensorError",
    "UnknownToolError",
]


class CheckpointError(CpmjaxError):
    """A checkpoint directory or file is missing, corrupt, or incomplete."""


class MissingPathError(CheckpointError, FileNotFoundError):
    """A path the user named does not exist."""


class TensorError(CheckpointError):
    """A checkpoint tensor is missing or unexpected."""


class MissingTensorError(TensorError, KeyError):
    """A tensor the model needs is not in the checkpoint."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class UnexpectedTensorError(TensorError, ValueError):
    """The checkpoint holds a tensor the model does not use."""


class InputError(CpmjaxError, ValueError):
    """Bad input to generation: empty prompt, token id out of range, too long."""


class TokenIdError(InputError):
    """A token id is negative or not below the vocabulary size."""


class PromptTooLongError(InputError):
    """prompt length + max_new_tokens exceeds max_position_embeddings."""


class EmptyPromptError(InputError):
    """A prompt has no tokens."""


class TrainingError(CpmjaxError):
    """Training cannot go on (for example the loss became NaN or inf)."""


class NonFiniteLossError(TrainingError, FloatingPointError):
    """The loss is NaN or inf; the last good checkpoint is kept."""


class DeltaError(CpmjaxError, ValueError):
    """A delta cannot be attached, loaded, or merged."""


class CompressionError(CpmjaxError, ValueError):
    """Bad arguments to ``cpmjax.compress`` (bits, sparsity, pattern, experts) or a model it
    cannot compress; raised before any compute, naming the culprit."""


class QuantizedCheckpointError(CompressionError, CheckpointError):
    """A quantized checkpoint does not match the quantization config or model it is loaded
    with."""



class ToolError(CpmjaxError):
    """A tool cannot be defined, parsed, validated or run (``cpmjax.tools``). ``kind`` is a short
    machine-readable name of the failure that an agent shows the model as an observation."""

    kind = "tool_error"

    def __init__(self, message: str = "", *, kind: str | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind


class ToolDefinitionError(ToolError, ValueError):
    """A function cannot be registered as a tool (no docstring, untyped argument, bad name)."""

    kind = "definition"


class ToolCallParseError(ToolError, ValueError):
    """Model text is not a well-formed tool call in the expected format."""

    kind = "unparseable"


class UnknownToolError(ToolError, LookupError):
    """A call names a tool the registry does not hold."""

    kind = "unknown_tool"


class ToolArgumentsError(ToolError, ValueError):
    """A call's arguments fail the tool's JSON schema (checked before any call)."""

    kind = "invalid_arguments"


class ToolExecutionError(ToolError, RuntimeError):
    """The tool ran and failed: it raised, timed out, ran out of memory, printed too much."""


class FitError(CpmjaxError, ValueError):
    """A scaling-law fit cannot use its data (fewer points than parameters, non-positive sizes,
    non-finite values, unsorted or duplicate dates) or found no solution (``cpmjax.scaling``)."""


class OutOfRangeError(FitError):
    """A value lies outside what a fitted law can invert: a score outside a sigmoid's reachable
    range, or a loss at or below a loss law's floor at the given token budget."""
