"""lcserve.adapters: inspect, merge, verify and mount LoRA adapters against their base."""
