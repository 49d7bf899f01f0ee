"""The retrieval probe's results as `lcserve_probe_retrieval_*` gauges, through the exporter's own
registry and read back with prometheus_client's parser."""

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lcserve.serving import metrics
from lcserve.serving.probes.gauges import gauge_samples
from lcserve.serving.probes.retrieval import summarize


def ranks_record(policy, length, depth, query, rank):
    return {"policy": policy, "length": length, "depth": depth, "query": query, "rank": rank}


def retrieval_summary():
    """4 queries per cell: `full` finds all at 64 and 128 and half at 256; `truncate` loses the deep facts
    from 128 on; `chunk` finds all; hand-made ranks, so recall@1 and MRR are known by hand."""
    records = []
    for length in (64, 128, 256):
        for q in range(4):
            records.append(ranks_record("full", length, 0.5, q, 1 if length < 256 or q < 2 else 2))
            records.append(ranks_record("truncate", length, 0.5, q, 1 if length == 64 or q == 0 else 4))
            records.append(ranks_record("chunk", length, 0.5, q, 1))
    summary = summarize(records, training_len=128, max_model_len=512, threshold=0.8)
    return {"task": "retrieval", "model": "embedder", **summary}


def published(samples) -> dict:
    metrics.set_probe_results(samples)
    text = generate_latest(metrics._PROBE_REGISTRY).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.labels.get("model") == "embedder"
    }


def test_retrieval_summary_becomes_recall_mrr_and_effective_length_gauges():
    values = published(gauge_samples(retrieval_summary()))

    def get(name, **labels):
        return values[(name, tuple(sorted({"model": "embedder", **labels}.items())))]

    assert get("lcserve_probe_retrieval_recall_at_1", policy="full", length="256") == 0.5
    assert get("lcserve_probe_retrieval_mrr", policy="full", length="256") == pytest.approx((1 + 1 + 0.5 + 0.5) / 4)
    assert get("lcserve_probe_retrieval_recall_at_1", policy="truncate", length="128") == 0.25
    assert get("lcserve_probe_retrieval_mrr", policy="truncate", length="128") == pytest.approx((1 + 3 * 0.25) / 4)
    assert get("lcserve_probe_retrieval_effective_length", policy="full") == 128
    assert get("lcserve_probe_retrieval_effective_length", policy="truncate") == 64
    assert get("lcserve_probe_retrieval_effective_length", policy="chunk") == 256
    assert len(values) == 3 * 3 * 2 + 3  # recall and MRR per policy and length, one effective length per policy


def test_a_policy_that_fails_at_the_shortest_length_publishes_zero():
    summary = retrieval_summary()
    summary["policies"]["chunk"]["effective_length"] = None
    samples = {(s[0], s[1]["policy"]): s[2] for s in gauge_samples(summary) if s[0].endswith("effective_length")}
    assert samples[("lcserve_probe_retrieval_effective_length", "chunk")] == 0.0
