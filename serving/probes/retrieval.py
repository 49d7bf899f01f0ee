"""The retrieval probe of an embedding model: does retrieval hold past the training length?

A labelled set is built from the shipped public-domain text: documents of L tokens (each a
different passage), each hiding one fact at a given depth ("The ledger of Captain Harville is
kept in the boathouse."), and one query per fact ("Where is the ledger of Captain Harville
kept?"). Each query ranks the documents of its (length, depth) cell by cosine similarity:
recall@1 and MRR, per long-input policy of the gateway (`X-Lcserve-Embedding-Policy`):
`full` (the whole input, up to max_model_len: the reject policy), `truncate` (cut at the
training length) and `chunk` (windows of the training length, pooled). The effective length and
the verdict take the same form as the generative probes'. Scoring and summary are pure; the
run talks to the gateway and writes the same files (summary.json, records.jsonl, report.md, PNGs).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from lcserve.engine import bearer, engine_client
from lcserve.errors import ProbeError
from lcserve.model_config import is_embedding_model
from lcserve.paths import check_output, output_dir

from ..embeddings import POLICY_HEADER
from .client import key_hint
from .sizing import Filler, Insert, fit, with_inserts
from .tasks import load_document
from .verdicts import effective_length

POLICIES = {"full": "reject", "truncate": "truncate", "chunk": "chunk"}  # probe column -> gateway policy
TIERS = {
    "quick": {"lengths": (64, 128, 256, 512, 1024, 2048), "depths": (0.1, 0.5, 0.9), "documents": 8},
    "full": {"lengths": (64, 128, 256, 512, 1024, 2048, 4096), "depths": (0.0, 0.25, 0.5, 0.75, 1.0), "documents": 16},
}
_NAMES = ("Captain Harville", "Mrs Clay", "Admiral Croft", "Lady Russell", "Mr Shepherd", "Captain Benwick",
          "Mrs Smith", "Sir Walter", "Miss Musgrove", "Mr Elliot", "Mrs Croft", "Captain Wentworth",
          "Lady Dalrymple", "Charles Hayter", "Mary Musgrove", "Colonel Wallis")  # fmt: skip
_OBJECTS = ("ledger", "violin", "telescope", "compass", "lantern", "chessboard", "kettle", "sextant")
_PLACES = ("boathouse", "cellar", "chapel", "orchard", "stable", "attic", "greenhouse", "mill", "library",
           "dairy", "granary", "bell tower", "lighthouse", "brewery", "forge", "dovecote")  # fmt: skip


@dataclass(frozen=True)
class Fact:
    statement: str
    query: str


def facts(count: int, seed: int) -> list[Fact]:
    """`count` facts with distinct owners and places, so that only one document answers each query."""
    rng = random.Random(seed)
    owners, places = rng.sample(_NAMES, count), rng.sample(_PLACES, count)
    objects = [rng.choice(_OBJECTS) for _ in range(count)]
    return [
        Fact(f"The {o} of {n} is kept in the {p}.", f"Where is the {o} of {n} kept?")
        for n, o, p in zip(owners, objects, places)
    ]


def ranks(queries: np.ndarray, documents: np.ndarray) -> list[int]:
    """Rank (1 = first) of document i among all for query i, by cosine similarity."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    d = documents / np.linalg.norm(documents, axis=1, keepdims=True)
    scores = q @ d.T
    return [int((scores[i] > scores[i, i]).sum()) + 1 for i in range(len(q))]


def summarize(records: list[dict], training_len: int, max_model_len: int, threshold: float) -> dict:
    """Recall@1 and MRR by length (and by depth) per policy, the effective length and the verdict lines."""
    out: dict = {}
    for policy in POLICIES:
        rows = [r for r in records if r["policy"] == policy]
        by_length: dict[int, dict] = {}
        grid: dict[int, dict[float, float]] = {}
        for length in sorted({r["length"] for r in rows}):
            cell = [r for r in rows if r["length"] == length]
            by_length[length] = {
                "recall_at_1": float(np.mean([r["rank"] == 1 for r in cell])),
                "mrr": float(np.mean([1 / r["rank"] for r in cell])),
                "n": len(cell),
            }
            grid[length] = {
                d: float(np.mean([r["rank"] == 1 for r in cell if r["depth"] == d]))
                for d in sorted({r["depth"] for r in cell})
            }
        held = effective_length({n: row["recall_at_1"] for n, row in by_length.items()}, threshold)
        out[policy] = {"by_length": by_length, "grid": grid, "effective_length": held}
    return {"policies": out, "verdict": verdict(out, training_len, max_model_len, threshold)}


def verdict(policies: dict, training_len: int, max_model_len: int, threshold: float) -> list[str]:
    lines = []
    for policy, entry in policies.items():
        held, rows = entry["effective_length"], entry["by_length"]
        if not rows:
            continue
        if held is None:
            lines.append(f"{policy}: recall@1 is below {threshold:.0%} even at {min(rows)} tokens")
            continue
        beyond = [n for n in rows if n > held]
        where = f"{held / training_len:g}x the training length {training_len}"
        tail = f"; {rows[beyond[0]]['recall_at_1']:.0%} at {beyond[0]}" if beyond else " (every length probed)"
        lines.append(f"{policy}: retrieval holds (recall@1 >= {threshold:.0%}) up to {held} tokens ({where}){tail}")
    lines.append(
        f"full length stops at max_model_len {max_model_len}; truncate keeps the first {training_len} tokens, "
        "so facts deeper than that are lost; chunk embeds every token in windows of the training length"
    )
    return lines


def markdown(summary: dict) -> str:
    policies = summary["policies"]
    lengths = sorted({int(n) for p in policies.values() for n in p["by_length"]})
    parts = [
        f"# lcserve retrieval probe: {summary['model']} at {summary['url']}",
        "",
        f"tier {summary['tier']}, trained at {summary['training_len']} tokens, max_model_len "
        f"{summary['max_model_len']}, {summary['documents']} documents per cell, depths "
        f"{', '.join(f'{d:.0%}' for d in summary['depths'])}, wall time {summary['wall_s']:.0f} s",
        "",
        "| length | " + " | ".join(f"{p} recall@1 | {p} MRR" for p in policies) + " |",
        "|---|" + "---|---|" * len(policies),
    ]
    for n in lengths:
        cells = []
        for p in policies.values():
            row = p["by_length"].get(n) or p["by_length"].get(str(n))
            cells += [f"{row['recall_at_1']:.2f}", f"{row['mrr']:.2f}"] if row else ["-", "-"]
        parts.append(f"| {n} | " + " | ".join(cells) + " |")
    parts += ["", "| policy | effective length |", "|---|---|"]
    parts += [f"| {p} | {e['effective_length'] or 'none'} |" for p, e in policies.items()]
    parts += ["", "## Verdict", *(f"- {line}" for line in summary["verdict"]), ""]
    return "\n".join(parts)


def plot(summary: dict, out_dir: Path) -> list[Path]:
    """recall@1 and MRR by length per policy; recall@1 by depth and length per policy."""
    from .plots import _heatmap, plt

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for policy, entry in summary["policies"].items():
        rows = sorted((int(n), r) for n, r in entry["by_length"].items())
        for ax, key in zip(axes, ("recall_at_1", "mrr")):
            ax.plot([n for n, _ in rows], [r[key] for _, r in rows], marker="o", label=policy)
    for ax, title in zip(axes, ("recall@1", "MRR")):
        ax.axvline(summary["training_len"], color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("document length (tokens); dashed: training length")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "retrieval_by_length.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    policies = summary["policies"]
    fig, axes = plt.subplots(1, len(policies), figsize=(4 * len(policies), 3.5))
    for i, (ax, (policy, entry)) in enumerate(zip(np.atleast_1d(axes), policies.items())):
        grid = {int(n): {float(d): v for d, v in row.items()} for n, row in entry["grid"].items()}  # JSON keys
        lengths = sorted(grid)
        depths = sorted({d for row in grid.values() for d in row})
        values = np.array([[grid[n].get(d, np.nan) for n in lengths] for d in depths], dtype=float)
        _heatmap(ax, lengths, depths, values, f"{policy}: recall@1", "viridis", 0, 1, first=i == 0)
    fig.tight_layout()
    paths.append(out_dir / "retrieval_by_depth.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


class _Client:
    """The gateway's /v1/models, /tokenize and /v1/embeddings, with errors as ProbeError lines."""

    def __init__(self, url: str, api_key: str | None = None):
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(600, connect=10), headers=bearer(api_key))

    def post(self, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
        try:
            r = self.http.post(path, json=body, headers=headers)
        except httpx.HTTPError as e:
            raise ProbeError(f"{self.url}{path}: {e}; is the server up (lcserve serve)?") from None
        if r.status_code != 200:
            raise ProbeError(f"{self.url}{path} answered {r.status_code}: {r.text[:300]}{key_hint(r)}")
        return r

    def embed(self, model: str, texts: list[str], policy: str) -> np.ndarray:
        r = self.post("/v1/embeddings", {"model": model, "input": texts}, {POLICY_HEADER: POLICIES[policy]})
        if POLICY_HEADER not in r.headers:
            raise ProbeError(
                f"{self.url} is not the lcserve gateway (no {POLICY_HEADER} header): the retrieval probe compares "
                "the gateway's long-input policies; probe the URL `lcserve serve` prints"
            )
        return np.array([d["embedding"] for d in sorted(r.json()["data"], key=lambda d: d["index"])])

    def count(self, model: str, text: str) -> int:
        return int(self.post("/tokenize", {"model": model, "prompt": text}).json()["count"])


def served_embedding_model(url: str, name: str | None, api_key: str | None = None) -> dict | None:
    """The `/v1/models` entry to probe for retrieval: `name` when it is an embedding model, or the one
    model served when it is; None otherwise (a generative server: the generative probes apply)."""
    try:
        with engine_client(url, timeout=30, headers=bearer(api_key)) as client:  # the engine's socket too
            models = client.get("/v1/models").json()["data"]
    except (httpx.HTTPError, httpx.InvalidURL, ValueError, KeyError, TypeError):
        return None  # the generative probe's client words the URL problem
    chosen = [m for m in models if m["id"] == name] or (models if len(models) == 1 else [])
    if chosen and chosen[0].get("root") and is_embedding_model(Path(chosen[0]["root"])):
        return chosen[0]
    return None


def run_retrieval_probe(
    url: str,
    entry: dict,
    tier: str = "quick",
    out_dir: Path | None = None,
    training_len: int | None = None,
    threshold: float = 0.8,
    seed: int = 0,
    say=lambda _line: None,
    api_key: str | None = None,
) -> dict:
    """Probe one embedding model through the gateway (`api_key`: the gateway's); returns the summary
    (written to out_dir too)."""
    from lcserve.model_config import base_training_len

    if out_dir is not None:
        check_output(Path(out_dir), force=True)  # before any request: an earlier probe's folder only
    started = time.monotonic()
    model, max_model_len = entry["id"], int(entry["max_model_len"])
    training_len = training_len or base_training_len(Path(entry["root"]))
    if not training_len:
        raise ProbeError(f"{model}: its training length is unknown; pass --training-len")
    spec = TIERS[tier]
    client = _Client(url, api_key)
    filler = Filler(load_document())
    stride = filler.words // spec["documents"]
    fact_list = facts(spec["documents"], seed)
    queries = client.embed(model, [f.query for f in fact_list], "full")
    records = []
    for length in spec["lengths"]:
        # each document its own passage, sized once per length (the fact adds its tokens at every depth)
        texts_by_depth: dict[float, list[str]] = {d: [] for d in spec["depths"]}
        for j, fact in enumerate(fact_list):
            passage = Filler(filler.text[filler.cuts[j * stride - 1] if j else 0 :])
            budget = length - (client.count(model, fact.statement) - 2)
            n = fit(lambda k, p=passage: client.count(model, p.prefix(k)), budget, passage.words, int(length * 0.7))
            for d in spec["depths"]:
                texts_by_depth[d].append(with_inserts(passage.prefix(n), [Insert(d, fact.statement)])[0])
        for policy in POLICIES:
            if policy == "full" and length > max_model_len:
                continue
            docs = client.embed(model, [t for d in spec["depths"] for t in texts_by_depth[d]], policy)
            for k, depth in enumerate(spec["depths"]):
                cell = docs[k * len(fact_list) : (k + 1) * len(fact_list)]
                for i, rank in enumerate(ranks(queries, cell)):
                    records.append({"policy": policy, "length": length, "depth": depth, "query": i, "rank": rank})
        say(f"length {length}: done ({time.monotonic() - started:.0f} s)")
    summary = {
        "task": "retrieval",
        "url": url,
        "model": model,
        "tier": tier,
        "training_len": training_len,
        "max_model_len": max_model_len,
        "threshold": threshold,
        "documents": spec["documents"],
        "depths": list(spec["depths"]),
        "lengths": list(spec["lengths"]),
        **summarize(records, training_len, max_model_len, threshold),
        "requests": len(spec["lengths"]) * (len(POLICIES) + 1) + 1,
        "wall_s": time.monotonic() - started,
    }
    if out_dir is not None:
        with output_dir(Path(out_dir), force=True) as tmp:
            (tmp / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            (tmp / "report.md").write_text(markdown(json.loads(json.dumps(summary))))
            plot(json.loads(json.dumps(summary)), tmp)
    return summary
