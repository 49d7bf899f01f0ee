"""Where lcserve keeps its cache (prepared models, demo adapter)."""

import os
from pathlib import Path


def lcserve_home() -> Path:
    """`$LCSERVE_HOME`, default `~/.cache/lcserve`."""
    return Path(os.environ.get("LCSERVE_HOME") or Path.home() / ".cache" / "lcserve")


def embedded_model_dir() -> Path:
    return lcserve_home() / "models" / "gemma-3-270m"


def demo_adapter_dir() -> Path:
    return lcserve_home() / "adapters" / "gemma-3-270m-writer"
