"""What the gateway costs: latency and throughput direct to vLLM vs through the gateway, in one run.

Goals (issue 23): the gateway adds under 0.5 ms at p50, spends under 0.7 ms of its CPU per streamed request,
and keeps at least 98% of the throughput.

The gateway runs as its own process (`lcserve gateway --upstream URL`), as it
is deployed. Latency: sequential 1-token completions, direct and gateway interleaved request by
request (alternating which goes first), so both see the same engine state; the overhead is the
median of the paired differences. Throughput: blocks of concurrent streaming requests,
alternating direct and gateway blocks; the ratio is the median over adjacent block pairs, which
resists background load (per-block figures are printed too, to show how much noise there was). Also measured: the gateway process's CPU time
per streamed request, and one /tokenize round trip, the price the context pre-check pays when
a prompt is too long to skip it.

    python benchmarks/bench_gateway.py --engine-url http://127.0.0.1:8000
    python benchmarks/bench_gateway.py --engine-url unix:/run/vllm/vllm.sock   # vLLM started with --uds
    python benchmarks/bench_gateway.py --stand-in   # the gateway's own cost (benchmarks/stand_in_engine.py)

With vLLM on the same few cores, the gateway's figures include waiting for the cores vLLM holds;
`--stand-in` runs the same measurements against a stand-in that answers at once (streamed events
3 ms apart), which leaves the gateway's own cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from lcserve.engine import engine_async_client, engine_client
from lcserve.serving.supervisor import ExternalEngine


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def start_gateway(engine_url: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lcserve.cli", "gateway", "--upstream", engine_url, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the gateway did not start: {proc.stderr.read().decode()[-2000:]}")


def latency(clients: dict[str, httpx.Client], model: str, n: int) -> dict[str, list[float]]:
    body = {"model": model, "prompt": "The capital of France is", "max_tokens": 1, "temperature": 0}
    times: dict[str, list[float]] = {name: [] for name in clients}
    order = list(clients)
    for i in range(n):
        for name in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            r = clients[name].post("/v1/completions", json=body)
            times[name].append(time.perf_counter() - start)
            r.raise_for_status()
    return times


async def throughput_block(url: str, model: str, concurrency: int, requests: int, max_tokens: int) -> tuple[float, int]:
    """(seconds, streamed tokens) for `requests` streaming completions, `concurrency` at a time.
    Streaming is the gateway's heavier path: every token is an event it relays."""
    body = {
        "model": model,
        "prompt": "Write a list of fruits:",
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    queue = list(range(requests))
    tokens = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        while queue:
            queue.pop()
            async with client.stream("POST", "/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        tokens += 1

    async with engine_async_client(url, httpx.Limits(max_connections=concurrency), timeout=600) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return time.perf_counter() - start, tokens


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--engine-url", default="http://127.0.0.1:8000", help="a running vLLM OpenAI server (http://... or unix:/PATH)"
    )
    parser.add_argument("--model", help="served model name (default: the first one the engine lists)")
    parser.add_argument("--latency-requests", type=int, default=200, help="sequential requests per target")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--block-requests", type=int, default=16, help="requests per throughput block")
    parser.add_argument("--blocks", type=int, default=10, help="throughput blocks per target, alternating")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per throughput request")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument(
        "--stand-in", action="store_true", help="measure against benchmarks/stand_in_engine.py instead of vLLM"
    )
    args = parser.parse_args()
    if args.stand_in:
        with tempfile.TemporaryDirectory(prefix="lcserve-stand-in-") as folder:
            socket_path = Path(folder) / "engine.sock"
            stand_in = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("stand_in_engine.py")), str(socket_path), "0.003"]
            )
            try:
                deadline = time.monotonic() + 30
                while not socket_path.exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
                measure(args, f"unix:{socket_path}")
            finally:
                stand_in.terminate()
                stand_in.wait(10)
        return
    measure(args, args.engine_url)


def measure(args, engine_url: str) -> None:
    """The latency, throughput and CPU figures of the gateway in front of `engine_url`, printed."""

    ExternalEngine(engine_url).start()  # EngineError when nothing serves there
    with engine_client(engine_url, timeout=10) as engine:
        model = args.model or engine.get("/v1/models").json()["data"][0]["id"]
    proc, gateway_url = start_gateway(engine_url)
    urls = {"direct": engine_url, "gateway": gateway_url}
    try:
        clients = {name: engine_client(url, timeout=120) for name, url in urls.items()}  # http:// or unix:
        with clients["direct"], clients["gateway"]:
            latency(clients, model, 10)  # warm-up: connections, caches
            lat = latency(clients, model, args.latency_requests)
            tok_body = {"model": model, "prompt": "The capital of France is " * 200}
            tokenize = []
            for _ in range(50):
                start = time.perf_counter()
                clients["direct"].post("/tokenize", json=tok_body).raise_for_status()
                tokenize.append(time.perf_counter() - start)
        thr: dict[str, list[tuple[float, int]]] = {name: [] for name in urls}
        gateway_cpu = 0.0
        for block in range(args.blocks):
            for name in list(urls) if block % 2 == 0 else list(urls)[::-1]:
                cpu_before = cpu_seconds(proc.pid)
                thr[name].append(
                    asyncio.run(
                        throughput_block(urls[name], model, args.concurrency, args.block_requests, args.max_tokens)
                    )
                )
                if name == "gateway":
                    gateway_cpu += cpu_seconds(proc.pid) - cpu_before
    finally:
        proc.terminate()
        proc.wait(30)

    paired = [g - d for d, g in zip(lat["direct"], lat["gateway"])]
    figures = {
        name: {
            "p50_ms": pct(lat[name], 50) * 1e3,
            "p99_ms": pct(lat[name], 99) * 1e3,
            "req_per_s": sum(args.block_requests for _ in thr[name]) / sum(s for s, _ in thr[name]),
            "tok_per_s": sum(t for _, t in thr[name]) / sum(s for s, _ in thr[name]),
        }
        for name in urls
    }
    result = {
        "model": model,
        "latency_requests": args.latency_requests,
        "concurrency": args.concurrency,
        "throughput_requests": args.blocks * args.block_requests,
        "max_tokens": args.max_tokens,
        **figures,
        "added_p50_ms_paired": statistics.median(paired) * 1e3,
        # adjacent blocks see the same background load: the median of their ratios resists it
        "throughput_ratio": statistics.median(
            direct_s / gateway_s for (direct_s, _), (gateway_s, _) in zip(thr["direct"], thr["gateway"])
        ),
        "tokenize_p50_ms": pct(tokenize, 50) * 1e3,
        "gateway_cpu_ms_per_request": gateway_cpu / (args.blocks * args.block_requests) * 1e3,
        "blocks_req_per_s": {name: [round(args.block_requests / s, 3) for s, _ in thr[name]] for name in urls},
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    table = Table(
        title=f"gateway vs direct ({model}; latency: {args.latency_requests} sequential 1-token requests; "
        f"throughput: {args.blocks}x{args.block_requests} streams of {args.max_tokens} tokens, "
        f"{args.concurrency} concurrent)"
    )
    for column in ("", "direct", "gateway", "gateway / direct"):
        table.add_column(column, justify="right")
    d, g = figures["direct"], figures["gateway"]
    table.add_row("latency p50 (ms)", f"{d['p50_ms']:.2f}", f"{g['p50_ms']:.2f}", f"{g['p50_ms'] / d['p50_ms']:.3f}")
    table.add_row("latency p99 (ms)", f"{d['p99_ms']:.2f}", f"{g['p99_ms']:.2f}", f"{g['p99_ms'] / d['p99_ms']:.3f}")
    table.add_row(
        "throughput (req/s)", f"{d['req_per_s']:.2f}", f"{g['req_per_s']:.2f}", f"{g['req_per_s'] / d['req_per_s']:.3f}"
    )
    table.add_row(
        "throughput (tok/s)", f"{d['tok_per_s']:.1f}", f"{g['tok_per_s']:.1f}", f"{g['tok_per_s'] / d['tok_per_s']:.3f}"
    )
    table.add_row("throughput, median of block pairs", "", "", f"{result['throughput_ratio']:.3f}")
    console = Console()
    console.print(table)
    added = result["added_p50_ms_paired"]
    console.print(
        f"added latency, median of paired differences: {added:.2f} ms (goal < 0.5 ms: "
        f"{'met' if added < 0.5 else 'NOT met'}); throughput kept: {result['throughput_ratio']:.1%} "
        + (
            "(a stand-in with no compute: the gateway's ceiling, no goal)"
            if args.stand_in
            else f"(goal >= 98%: {'met' if result['throughput_ratio'] >= 0.98 else 'NOT met'})"
        )
    )
    console.print(
        f"throughput per block (req/s), to judge the noise: direct {result['blocks_req_per_s']['direct']}, "
        f"gateway {result['blocks_req_per_s']['gateway']}"
    )
    console.print(
        f"gateway CPU per streamed request: {result['gateway_cpu_ms_per_request']:.2f} ms (goal < 0.7 ms: "
        f"{'met' if result['gateway_cpu_ms_per_request'] < 0.7 else 'NOT met'}; on a CPU-only box this is taken "
        "from the engine)"
    )
    console.print(
        f"/tokenize round trip p50: {result['tokenize_p50_ms']:.2f} ms (paid by the pre-check only when "
        "a prompt comes within 512 tokens + its JSON size of max_model_len)"
    )


if __name__ == "__main__":
    main()
