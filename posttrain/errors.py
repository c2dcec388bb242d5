"""Errors a user can fix, reported by the CLI as one line (the path or key, and the fix) with
exit status 2. Others keep their traceback."""

from __future__ import annotations


class DataError(RuntimeError):
    """The input data cannot be used as a whole (every record rejected, an unreadable file)."""


def all_rejected(what: str, count: int, rejects_file) -> DataError:
    """Nothing usable was read: say how many were rejected and where the reasons are."""
    if count == 0:
        return DataError(f"no {what} to read (the input is empty)")
    return DataError(f"all {count} {what} were rejected; the reasons are in {rejects_file}")
