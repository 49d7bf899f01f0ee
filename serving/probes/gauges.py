"""The latest probe summary as Prometheus gauge samples, for the gateway's exporter
(`serving.metrics.set_probe_results(samples)`): the generative probes' summary or, for an
embedding model, the retrieval probe's."""

from __future__ import annotations

from ..metrics import (
    PROBE_ACCURACY,
    PROBE_EFFECTIVE_LENGTH,
    PROBE_EFFECTIVE_LENGTH_BY,
    PROBE_RETRIEVAL_EFFECTIVE_LENGTH,
    PROBE_RETRIEVAL_MRR,
    PROBE_RETRIEVAL_RECALL,
    PROBE_STYLE_MARKERS,
    PROBE_STYLE_SIGNED_OFF,
)

Sample = tuple[str, dict[str, str], float]


def gauge_samples(summary: dict) -> list[Sample]:
    """(name, labels, value) per model: accuracy per retrieval task and length (the no-context
    control as length "0"), the needle effective length by lcserve's, RULER's and NoLiMa's definitions
    (0 when none holds), and style at length; for a retrieval summary, `retrieval_samples`."""
    if summary.get("task") == "retrieval":
        return retrieval_samples(summary)
    samples: list[Sample] = []
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
        for length, row in entry.get("style", {}).items():
            labels = {"model": model, "length": str(length)}
            samples.append((PROBE_STYLE_MARKERS, labels, float(row["markers_per_answer"])))
            if row["signed_off"] is not None:
                samples.append((PROBE_STYLE_SIGNED_OFF, labels, float(row["signed_off"])))
    return samples


def retrieval_samples(summary: dict) -> list[Sample]:
    """The retrieval probe (serving/probes/retrieval.py): recall@1 and MRR per policy and length, and
    each policy's effective length (0 when recall@1 misses the threshold even at the shortest)."""
    model = summary["model"]
    samples: list[Sample] = []
    for policy, entry in summary["policies"].items():
        for length, row in entry["by_length"].items():
            labels = {"model": model, "policy": policy, "length": str(length)}
            samples.append((PROBE_RETRIEVAL_RECALL, labels, float(row["recall_at_1"])))
            samples.append((PROBE_RETRIEVAL_MRR, labels, float(row["mrr"])))
        if entry["by_length"]:
            held = float(entry["effective_length"] or 0)
            samples.append((PROBE_RETRIEVAL_EFFECTIVE_LENGTH, {"model": model, "policy": policy}, held))
    return samples
