"""The latest probe summary as Prometheus gauge samples, for the gateway's exporter
(`serving.metrics.set_probe_results(samples)`)."""

from __future__ import annotations

from ..metrics import PROBE_ACCURACY, PROBE_EFFECTIVE_LENGTH, PROBE_EFFECTIVE_LENGTH_BY


def gauge_samples(summary: dict) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) per model: accuracy per retrieval task and length (the no-context
    control as length "0"), and the needle effective length by lcserve's, RULER's and NoLiMa's definitions
    (0 when none holds)."""
    samples: list[tuple[str, dict[str, str], float]] = []
    for model, entry in summary["models"].items():
        tasks = entry["tasks"]
        for task in ("passkey", "needle"):
            for length, row in tasks.get(task, {}).get("by_length", {}).items():
                if row["accuracy"] is not None:
                    samples.append(
                        (PROBE_ACCURACY, {"model": model, "task": task, "length": str(length)}, float(row["accuracy"]))
                    )
        control = tasks.get("control")
        if control and control["accuracy"] is not None:
            samples.append(
                (PROBE_ACCURACY, {"model": model, "task": "control", "length": "0"}, float(control["accuracy"]))
            )
        if "needle" in tasks:
            samples.append((PROBE_EFFECTIVE_LENGTH, {"model": model}, float(tasks["needle"]["effective_length"] or 0)))
            for name, key in PROBE_EFFECTIVE_LENGTH_BY.items():
                samples.append((name, {"model": model}, float(tasks["needle"].get(key) or 0)))
    return samples
