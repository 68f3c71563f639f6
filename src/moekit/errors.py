"""Errors that the command line reports as one line with exit status 2."""


class UsageError(Exception):
    """A user mistake (bad path, bad flag value, bad data): printed as one line, exit 2."""
