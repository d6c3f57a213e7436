"""User-facing errors.

Anything the user can fix (bad data, a bad flag, a missing file) raises :class:`DpolabError` or a
subclass; the CLI prints it as one clear line and exits with status 2, never a traceback.
"""

from __future__ import annotations


class DpolabError(Exception):
    """An error caused by the user's input, shown without a traceback."""


class ConfigError(DpolabError):
    """A bad configuration value, flag or config file."""


class DataError(DpolabError):
    """A problem in a data file, located by file, line (1-based) and field when known."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 field: str | None = None):
        self.path, self.line, self.field, self.reason = path, line, field, message
        where = ""
        if path is not None:
            where = str(path) + (f":{line}" if line is not None else "")
        parts = [p for p in (where, f"field '{field}'" if field else "") if p]
        super().__init__((": ".join(parts) + ": " if parts else "") + message)


class NonFiniteError(DpolabError):
    """A loss or gradient became NaN/inf during training."""
