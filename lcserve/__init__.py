"""lcserve: serve LoRA adapters trained at short length on long-context bases with vLLM."""

__version__ = "0.1.0"
