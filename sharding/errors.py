"""Typed exceptions of the ``sharding`` package (errors a caller can cause; each message names
the culprit).

``sharding`` imports nothing from ``cpmjax``, so the error types live here. ``cpmjax.errors``
builds on them: ``cpmjax.errors.CpmjaxError`` *is* :class:`LibraryError`, and
``cpmjax.errors.ConfigError`` / ``ShapeMismatchError`` / ``ShardingError`` *are* the classes
below, so ``except cpmjax.errors.ConfigError`` (or ``CpmjaxError``) catches what this package
raises. (``except`` matches on the real class hierarchy; a base class can only be shared by
defining it in the lower layer.)
"""

from __future__ import annotations

__all__ = ["ConfigError", "LibraryError", "ShapeMismatchError", "ShardingError"]


class LibraryError(Exception):
    """Base class of every error raised on purpose (``cpmjax.errors.CpmjaxError`` is this)."""


class ConfigError(LibraryError, ValueError):
    """A config value or option is missing, unsupported, or inconsistent."""


class ShapeMismatchError(LibraryError, ValueError):
    """An array's shape does not match what the arguments imply."""


class ShardingError(LibraryError, ValueError):
    """A mesh or sharded layout is inconsistent with the inputs."""
