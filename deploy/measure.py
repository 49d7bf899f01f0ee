"""Ask the real engine: start vLLM with a plan's arguments and read its own KV accounting, or
drive streamed requests at it and time them (the load check and the speed calibration).

vLLM logs `<DEVICE> KV cache size: N tokens, Maximum concurrency for L tokens per request: Xx`
once the cache is sized, before warm-up and before the server is ready, so the engine is
stopped as soon as that line appears. No request is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from lcserve.adapters.mount import lora_module
from lcserve.engine import EngineProcess, EngineSpec, engine_async_client, engine_client, isolation_problem
from lcserve.errors import EngineError
from lcserve.vllm_rules import ITL_HISTOGRAM, TTFT_HISTOGRAM

from .plan import ServePlan

CAPACITY_RE = re.compile(
    r"(\w+) KV cache size: ([\d,]+) tokens, "
    r"Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x"
)
FAILURE_RE = re.compile(r"(ValueError|RuntimeError|Error): (.+)")


@dataclass(frozen=True)
class Measured:
    kv_tokens: int
    max_concurrency: float  # as logged, two decimals
    max_model_len: int
    seconds: float


def parse_capacity(log_text: str) -> Measured | None:
    m = CAPACITY_RE.search(log_text)
    if not m:
        return None
    return Measured(int(m.group(2).replace(",", "")), float(m.group(4)), int(m.group(3).replace(",", "")), 0.0)


def measure_capacity(
    model_dir: Path, plan: ServePlan, timeout_s: float = 900, log_path: Path | None = None, extra_args=()
) -> Measured:
    """Start vLLM with `plan` (and `extra_args` after it) on `model_dir`, return its logged KV capacity, stop it."""
    log_path = Path(log_path or tempfile.mkstemp(prefix="lcserve-measure-", suffix=".log")[1])
    # Another engine on this machine may hold the cores vLLM would bind; binding only affects speed.
    bind = {} if "VLLM_CPU_OMP_THREADS_BIND" in os.environ else {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    spec = EngineSpec(
        model=str(model_dir),
        served_model_name=Path(model_dir).name,
        args=["--enforce-eager", "--skip-tokenizer-init", *plan.vllm_args(), *extra_args],
        env={**bind, **plan.env},
        uds=str(Path(tempfile.mkdtemp(prefix="lcserve-")) / "vllm.sock"),  # no TCP port, not even briefly
    )
    spec.private_network = isolation_problem(spec) is None  # its gloo ports out of reach too, where allowed
    engine = EngineProcess(spec, log_path)
    start = time.monotonic()
    engine.start()
    try:
        while time.monotonic() - start < timeout_s:
            text = log_path.read_text(errors="replace")
            found = parse_capacity(text)
            if found:
                return Measured(found.kv_tokens, found.max_concurrency, found.max_model_len, time.monotonic() - start)
            if not engine.alive():
                errors = FAILURE_RE.findall(text)
                lines = text.strip().splitlines()
                detail = errors[-1][1] if errors else (lines[-1] if lines else "no output")
                raise EngineError(
                    f"vLLM exited ({engine.returncode}) before sizing the KV cache: {detail}; log: {log_path}"
                )
            time.sleep(0.5)
        raise EngineError(f"vLLM did not report its KV cache size within {timeout_s:.0f} s; log: {log_path}")
    finally:
        stop_engine(engine)


# --- load: streamed completions at a stated concurrency ---------------------------------------------


@dataclass(frozen=True)
class LoadRun:
    """What a closed-loop load measured: each request's TTFT and every inter-token gap (seconds)."""

    users: int
    prompt: int
    output: int
    rounds: int
    ttfts: tuple[float, ...]
    itls: tuple[float, ...]  # every inter-token gap, as the client saw it
    tpots: tuple[float, ...]  # each request's mean gap: robust where the server sends tokens in bursts
    output_tokens: int
    seconds: float
    engine_ttft_mean: float | None = None  # vLLM's own histograms over the run (None: the server has none)
    engine_itl_mean: float | None = None

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds


_PROMPTS = itertools.count()  # every prompt of this process is drawn from a new seed


def prompt_ids(prompt: int, vocab_size: int) -> list[int]:
    """`prompt` token ids drawn from the ordinary vocabulary, from a seed no other prompt of this
    process used: no prompt shares a cached prefix block with another (vLLM caches prefixes by default).
    The vocabulary's ends (special and rare tokens) are left out: 1000 ids each, or an eighth of a small one."""
    rng = random.Random(f"lcserve-{os.getpid()}-{next(_PROMPTS)}")
    margin = min(1000, vocab_size // 8)
    return [rng.randrange(margin, vocab_size - margin) for _ in range(prompt)]


async def _stream(client: httpx.AsyncClient, url: str, model: str, ids: list[int], output: int) -> tuple:
    """(TTFT, gaps) of one streamed completion of exactly `output` tokens. A chunk may carry several
    tokens (the server coalesces outputs its client has not read yet, and a token with no text of its
    own rides with the next), so each chunk's gap is shared among its tokens, counted by id."""
    body = {
        "model": model,
        "prompt": ids,
        "max_tokens": output,
        "min_tokens": output,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "return_token_ids": True,
    }
    start = time.perf_counter()
    chunks: list[tuple[float, int]] = []  # (arrival, tokens in the chunk)
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            detail = (await response.aread()).decode(errors="replace")[:300]
            raise EngineError(f"{url}: completion failed with HTTP {response.status_code}: {detail}")
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                if "error" in event:  # vLLM reports a failure inside an accepted stream as an event
                    raise EngineError(f"{url}: the completion failed: {str(event['error'])[:300]}")
                choices = event.get("choices") or [{}]
                tokens = len(choices[0].get("token_ids") or ())
                if tokens:
                    chunks.append((time.perf_counter(), tokens))
    if not chunks:
        raise EngineError(f"{url}: the completion streamed no token")
    return chunks[0][0] - start, token_gaps(chunks)


def token_gaps(chunks: list[tuple[float, int]]) -> list[float]:
    """One gap per token after the first chunk: a chunk of n tokens shares its gap n ways (the first
    chunk's extra tokens are not timed, they count in the TTFT)."""
    return [(b - a) / n for (a, _), (b, n) in zip(chunks, chunks[1:]) for _ in range(n)]


async def _load(url: str, model: str, users: int, prompt: int, output: int, rounds: int, vocab: int):
    limits = httpx.Limits(max_connections=users + 2, max_keepalive_connections=users + 2)
    async with engine_async_client(url, limits, timeout=httpx.Timeout(1800.0)) as client:

        async def user(u: int) -> list:
            return [await _stream(client, url, model, prompt_ids(prompt, vocab), output) for _ in range(rounds)]

        return await asyncio.gather(*(user(u) for u in range(users)))


def run_load(
    url: str, model: str, users: int, prompt: int, output: int, rounds: int = 1, vocab_size: int = 32000
) -> LoadRun:
    """`users` closed-loop users, each sending `rounds` requests one after another (prompt and output
    lengths exact, distinct prompts); EngineError when the server does not answer."""
    start, before = time.perf_counter(), engine_latency_totals(url)
    try:
        results = asyncio.run(_load(url, model, users, prompt, output, rounds, vocab_size))
    except httpx.HTTPError as e:
        raise EngineError(f"{url}: no answer from the server ({type(e).__name__}: {e}); is it running?") from None
    seconds = time.perf_counter() - start
    engine = mean_between(before, engine_latency_totals(url))
    flat = [r for per_user in results for r in per_user]
    return LoadRun(
        users,
        prompt,
        output,
        rounds,
        tuple(t for t, _ in flat),
        tuple(g for _, gaps in flat for g in gaps),
        tuple(sum(gaps) / len(gaps) for _, gaps in flat if gaps),
        users * rounds * output,
        seconds,
        engine.get(TTFT_HISTOGRAM),
        engine.get(ITL_HISTOGRAM),
    )


def engine_latency_totals(url: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of vLLM's TTFT and ITL histograms, over every label set; empty when the server
    exposes none. The engine times each token as it leaves the scheduler: at a few milliseconds per
    step (a tiny model) the client's own reading of the stream, not the engine, decides what it sees."""
    try:
        with engine_client(url, timeout=10) as client:
            text = client.get("/metrics").text
    except httpx.HTTPError:
        return {}
    totals = {}
    for name in (TTFT_HISTOGRAM, ITL_HISTOGRAM):
        sums = re.findall(rf"^{name}_sum(?:{{[^}}]*}})? ([\d.e+-]+)$", text, re.M)
        counts = re.findall(rf"^{name}_count(?:{{[^}}]*}})? ([\d.e+-]+)$", text, re.M)
        if counts:
            totals[name] = (sum(map(float, sums)), sum(map(float, counts)))
    return totals


def mean_between(before: dict, after: dict) -> dict[str, float]:
    """Each histogram's mean over the observations made between two readings."""
    means = {}
    for name, (total, count) in after.items():
        old_total, old_count = before.get(name, (0.0, 0.0))
        if count > old_count:
            means[name] = (total - old_total) / (count - old_count)
    return means


def server_state(url: str) -> dict:
    """The served models and the running/waiting request counts; EngineError when unreachable."""
    try:
        with engine_client(url, timeout=10) as client:
            models = client.get("/v1/models").json()
            metrics = client.get("/metrics").text
    except (httpx.HTTPError, ValueError) as e:
        raise EngineError(f"{url}: unreachable ({type(e).__name__}); start the server or fix --url") from None
    counts = {}
    for name in ("num_requests_running", "num_requests_waiting"):
        found = re.findall(rf"^vllm:{name}{{[^}}]*}} ([\d.e+-]+)$", metrics, re.M)
        counts[name] = sum(float(v) for v in found)
    data = models.get("data", [])
    return {"models": [m["id"] for m in data], "adapters": [m["id"] for m in data if m.get("parent")], **counts}


def has_tokenizer(model_dir: Path) -> bool:
    return any(
        (Path(model_dir) / name).exists() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    )


def start_engine(model_dir: Path, plan: ServePlan, extra_args: list[str], env: dict, log_path: Path) -> EngineProcess:
    """vLLM with `plan` on this machine (eager on the CPU build), ready to serve; EngineError if not. Its
    threads are bound as `lcserve serve` binds them (the plan's VLLM_CPU_OMP_THREADS_BIND, else vLLM's own
    binding, which keeps a core for the API server), since the speed measured is the speed served."""
    eager = ["--enforce-eager"] if plan.profile.is_cpu else []
    # the load sends token ids and counts token ids back, so a folder without a tokenizer (a random test model) serves too
    no_tokenizer = [] if has_tokenizer(model_dir) else ["--skip-tokenizer-init"]
    spec = EngineSpec(
        model=str(model_dir),
        served_model_name=Path(model_dir).name,
        args=[*eager, *no_tokenizer, *plan.vllm_args(), *extra_args],
        env={**plan.env, **env},
        uds=str(Path(tempfile.mkdtemp(prefix="lcserve-")) / "vllm.sock"),  # a fresh 0700 folder: no TCP port
    )
    spec.private_network = isolation_problem(spec) is None
    engine = EngineProcess(spec, log_path)
    engine.start()
    try:
        engine.wait_ready(timeout_s=600)
    except BaseException:
        stop_engine(engine)
        raise
    return engine


def stop_engine(engine: EngineProcess) -> None:
    """Stop an engine `start_engine` started, and remove its socket's folder."""
    engine.stop(timeout_s=20)
    shutil.rmtree(Path(engine.spec.uds).parent, ignore_errors=True)


@contextlib.contextmanager
def engine_session(
    plan: ServePlan, adapter: Path | None, url: str | None, log_path: Path, progress
) -> Iterator[tuple[str, str, str | None]]:
    """(url, served base name, served adapter name or None): the server at `url` when given (it must be
    idle), else vLLM started here with `plan` (and `adapter` mounted), stopped on exit."""
    base, lora = plan.model.path.name, adapter.name if adapter else None
    if url:
        state = server_state(url)
        busy = state["num_requests_running"] + state["num_requests_waiting"]
        if busy:
            raise EngineError(f"{url}: busy ({busy:g} requests running or waiting); measure an idle engine")
        bases = [m for m in state["models"] if m not in state["adapters"]]
        base = base if base in bases else (bases[0] if bases else base)
        if lora and lora not in state["adapters"]:  # served under another name: the server's one adapter
            lora = state["adapters"][0] if len(state["adapters"]) == 1 else None
        yield url, base, lora
        return
    extra = ["--lora-modules", lora_module(lora, str(adapter), base)] if adapter else []
    env = {"LCSERVE_CPU_LORA_OPS": "segmented"} if adapter and plan.profile.is_cpu else {}  # as `lcserve serve` does
    progress(f"starting vLLM on {base} (log: {log_path})")
    engine = start_engine(plan.model.path, plan, extra, env, log_path)
    try:
        yield engine.url, base, lora
    finally:
        stop_engine(engine)
