"""The plugin's errors: one base, :class:`SafeguardError`, for every condition a user can cause and fix, so callers
(and the ``safeguard`` CLI, which prints them without a traceback) catch one type. Each message names the file, key or
cause and the fix. The specific classes keep the built-in base they always had (``ValueError`` for bad settings and
input, ``RuntimeError`` for a run or artifact that cannot be used), so existing ``except ValueError`` code still works.
"""

from __future__ import annotations


class SafeguardError(Exception):
    """Base class of every error safeguard-plugin raises for something the user can fix."""


class ConfigError(SafeguardError, ValueError):
    """A setting (config key, command-line option, API argument) that cannot be used; the message names the key."""


class DataError(SafeguardError, ValueError):
    """Input data that cannot be used (a prompt file, a data set, a model or adapter path); the message names it."""


class ArtifactError(SafeguardError, RuntimeError):
    """An artifact that is missing, malformed, or made for another model."""


class SafeguardRuntimeError(SafeguardError, RuntimeError):
    """The constraints cannot act on this run; the message names the fix."""


__all__ = ["SafeguardError", "ConfigError", "DataError", "ArtifactError", "SafeguardRuntimeError"]
