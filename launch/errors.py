"""Errors of the application layer that the command line reports without a traceback."""

from __future__ import annotations


class RoleFailed(RuntimeError):
    """A role died in a way a restart does not fix; the message carries the role's own error."""

    @classmethod
    def of(cls, role: str, error: BaseException) -> RoleFailed:
        """ "<role> failed: <its error's type>: <its error>", the one form both backends print."""
        return cls(f"{role} failed: {type(error).__name__}: {error}")
