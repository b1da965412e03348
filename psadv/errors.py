"""Exceptions for mistakes a user can make.

Library code raises these; the CLI turns them into a one-line message and an exit code
(no traceback). Anything else escaping is a bug and keeps its traceback.
"""


class PsadvError(Exception):
    """A problem with the user's input or environment, reported as one line."""

    exit_code = 1


class UsageError(PsadvError):
    """The command line or config file asks for something invalid (exit code 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """An invalid or unknown configuration key or value."""


class DataError(PsadvError):
    """A dataset file is missing, corrupted or cannot be fetched."""


class CheckpointError(PsadvError):
    """A checkpoint is missing, truncated, corrupted, foreign or incompatible."""
