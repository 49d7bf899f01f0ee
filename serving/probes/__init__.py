"""Long-context probes: does a short-trained adapter hold at long context, against its base?

`run_probe(config)` runs them on a served endpoint and returns the summary;
`gauge_samples(summary)` turns it into the gateway's Prometheus gauges; `cli.py` is the
`lcserve probe` command.
"""

from .gauges import gauge_samples
from .runner import ProbeConfig, run_probe

__all__ = ["ProbeConfig", "gauge_samples", "run_probe"]
