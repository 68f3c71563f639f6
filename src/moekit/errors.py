"""Errors that the command line reports as one line with exit status 2.

The CLI catches ``UsageError`` and nothing broader, so a bug inside moekit still shows its
traceback. Bad input met deep in library code (a config field, a config.json, a checkpoint)
raises a subclass that is also a ``ValueError``: library callers who catch ``ValueError`` keep
working, and the CLI still prints one line.
"""


class UsageError(Exception):
    """A user mistake (bad path, bad flag value, bad data): printed as one line, exit 2."""


class ConfigError(UsageError, ValueError):
    """A config value or config file that is wrong: unknown field, value out of range, wrong type."""


class ModelFolderError(UsageError, ValueError):
    """A model folder or checkpoint that cannot be read or written as asked: missing or
    mismatched tensors, unsupported formats."""


__all__ = ["UsageError", "ConfigError", "ModelFolderError"]
