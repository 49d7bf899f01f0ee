"""lcserve.serving: launch and supervise vLLM, the gateway, metrics and long-context probes."""
