"""Typed exceptions for errors a user can cause. Each message names the culprit."""

from __future__ import annotations


class CpmjaxError(Exception):
    """Base class of every error cpmjax raises on purpose."""


class CheckpointError(CpmjaxError):
    """A checkpoint directory or file is missing, corrupt, or incomplete."""


class MissingPathError(CheckpointError, FileNotFoundError):
    """A path the user named does not exist."""


class ConfigError(CpmjaxError, ValueError):
    """A config value is missing, unsupported, or inconsistent."""


class TensorError(CheckpointError):
    """A tensor is missing, unexpected, or has the wrong shape."""


class ShapeMismatchError(TensorError, ValueError):
    """A tensor's shape does not match what the config implies."""


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


class ShardingError(CpmjaxError, ValueError):
    """A mesh or sharded layout is inconsistent with the inputs."""
