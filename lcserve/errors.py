"""Errors a user can cause. The CLI prints them as one line (no traceback) and exits 2.

Each message names the file or argument, what is wrong, and the fix.
"""


class LcserveError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""

    exit_code = 2


class ModelError(LcserveError):
    """A model folder is missing, incomplete or unreadable."""


class AdapterError(LcserveError):
    """An adapter folder is missing, corrupt, or does not fit its base."""


class PlanError(LcserveError):
    """A deployment request that cannot be satisfied (the message gives the largest feasible value)."""


class EngineError(LcserveError):
    """The vLLM engine failed to start, died, or is unreachable."""


class ProbeError(LcserveError):
    """A probe cannot run against the given server (unreachable, unknown model, ladder too long)."""
