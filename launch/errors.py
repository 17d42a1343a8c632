"""Errors of the application layer that the command line reports without a traceback."""


class RoleFailed(RuntimeError):
    """A role died in a way a restart does not fix; the message carries the role's own error."""
