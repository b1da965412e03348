"""Exceptions for mistakes a user can make, and the one-line text of a failed file operation.

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


class TrainingDiverged(PsadvError):
    """The loss or the parameters became NaN or infinite; the last good checkpoint is kept."""


class StorageError(PsadvError):
    """Writing a run's files failed (disk full, file too large, read-only, ...)."""


class Interrupted(PsadvError):
    """A signal stopped work that has nothing to save (``psadv eval``): exit code 128 + the signal's
    number, as a shell reports a process the signal killed (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


def io_error_text(exc: BaseException) -> str:
    """One line for a failed read or write. HDF5 wraps the system's reason in a long multi-line
    report (``... errno = 28, error message = 'No space left on device', ...``): keep the reason."""
    text = str(exc)
    marker = "error message = '"
    if marker in text:
        reason = text.split(marker, 1)[1].split("'", 1)[0]
        errno_text = text.split("errno = ", 1)[1].split(",", 1)[0].strip() if "errno = " in text else ""
        return f"{reason} (errno {errno_text})" if errno_text.isdigit() else reason
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    lines = text.strip().splitlines()
    return lines[0] if lines else type(exc).__name__
