"""Errors a user can cause. The CLI prints them as one line (no traceback) and exits 2.

Each message names the file or argument, what is wrong, and the fix.
"""

import re


class LcserveError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""

    exit_code = 2


class ModelError(LcserveError):
    """A model folder is missing, incomplete or unreadable."""


class AdapterError(LcserveError):
    """An adapter folder is missing, corrupt, or does not fit its base."""


class PlanError(LcserveError):
    """A deployment request that cannot be satisfied (the message gives the largest feasible value).

    The message names settings as `{max_model_len}`, `{max_num_seqs}`, ... so each command can
    word them as its user typed them (`--max-model-len`, or MAX_MODEL_LEN for serve_vllm.sh);
    by default they read as vLLM's own flags. `setting` is the one the error is about.
    """

    def __init__(self, message: str, setting: str | None = None):
        self.template = message
        self.setting = setting
        super().__init__(self.worded())

    def worded(self, names: dict[str, str] | None = None) -> str:
        """The message with each `{setting}` replaced by `names[setting]`, else by `--setting-name`."""
        names = names or {}
        return re.sub(r"\{([a-z_]+)\}", lambda m: names.get(m[1], "--" + m[1].replace("_", "-")), self.template)


class EngineError(LcserveError):
    """The vLLM engine failed to start, died, or is unreachable."""


class ProbeError(LcserveError):
    """A probe cannot run against the given server (unreachable, unknown model, ladder too long)."""
