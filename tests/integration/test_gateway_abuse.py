"""The gateway under abuse, in front of the real vLLM (the session engine), on loopback, every loop
bounded. After each case the engine's running and waiting requests are back at 0 and its KV cache
is released (vLLM's own /metrics), and the gateway still serves.

Cases: clients that hang up mid-stream, clients that never read, bodies over the limit, invalid
UTF-8, deeply nested JSON, a burst of many connections."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import time

import httpx
import pytest

from lcserve.serving.gateway import Gateway
from lcserve.serving.supervisor import ExternalEngine
from tests.unit.test_metrics import samples
from tests.unit.test_supervisor import wait_until

pytestmark = pytest.mark.integration

SEND_TIMEOUT_S = 5.0
LONG = 4000  # max_tokens (ignore_eos): such a request ends before LONG tokens only when it is aborted
# The abort checks wait for an event (the engine idle: nothing running or waiting), then count tokens
# against what running on would have produced: streams started together decode in lockstep, so a
# request that was not aborted leaves the engine busy until it has LONG tokens, and the total reaches
# streams x LONG. Fewer means the engine requests were cut short, on a machine of any speed.
BURST = 300
FIGURES: dict[str, str] = {}


@pytest.fixture(scope="module")
def gateway(engine):
    upstream = ExternalEngine(engine.url)
    upstream.start()
    g = Gateway(upstream, send_timeout_s=SEND_TIMEOUT_S)
    g.start("127.0.0.1", 0)
    yield g
    g.stop()
    upstream.stop()
    print("\n" + "\n".join(f"{case}: {figure}" for case, figure in FIGURES.items()))


def engine_totals(engine) -> dict[str, float]:
    """vLLM's own figures, summed over labels: running, waiting, KV use, tokens generated."""
    s = samples(httpx.get(f"{engine.url}/metrics", timeout=30).text)

    def total(name: str, **labels) -> float:
        return sum(v for (n, ls), v in s.items() if n == name and labels.items() <= dict(ls).items())

    return {
        "running": total("vllm:num_requests_running"),
        "waiting": total("vllm:num_requests_waiting"),
        "kv": total("vllm:kv_cache_usage_perc"),
        "generated": total("vllm:generation_tokens_total"),
        "prompt": total("vllm:prompt_tokens_total"),
    }


def settle(engine, timeout_s: float = 180) -> tuple[dict[str, float], float]:
    """Wait (bounded) until the engine runs and queues nothing and holds no KV; its totals and the wait."""
    started = time.monotonic()
    idle = wait_until(
        lambda: (lambda t: t["running"] == t["waiting"] == t["kv"] == 0)(engine_totals(engine)), timeout_s
    )
    totals = engine_totals(engine)
    assert idle, f"the engine is not idle {timeout_s:.0f} s later: {totals}"
    return totals, time.monotonic() - started


def gateway_still_serves(engine, gateway) -> None:
    body = {"model": engine.base_model, "prompt": "The sky is", "max_tokens": 2, "temperature": 0}
    assert httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=120).status_code == 200


def gateway_errors(gateway, reason: str) -> float:
    text = httpx.get(f"{gateway.url}/metrics", timeout=30).text
    return sum(
        v
        for (n, ls), v in samples(text).items()
        if n == "lcserve_gateway_errors_total" and dict(ls).get("reason") == reason
    )


def raw_request(port: int, body: dict, path: str = "/v1/completions") -> bytes:
    data = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode() + data


def long_stream(engine, **extra) -> dict:
    return {
        "model": engine.base_model,
        "prompt": "Write a long story about a lighthouse keeper.",
        "max_tokens": LONG,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        **extra,
    }


def test_clients_hanging_up_mid_stream_abort_their_engine_requests(engine, gateway):
    before = settle(engine)[0]
    clients = []
    for _ in range(4):
        client = socket.create_connection(("127.0.0.1", gateway.port), timeout=120)
        client.sendall(raw_request(gateway.port, long_stream(engine)))
        clients.append(client)
    for client in clients:  # each stream is running in the engine: its first token arrived
        received = b""
        while b"data: {" not in received:
            chunk = client.recv(65536)
            assert chunk, received
            received += chunk
    for client in clients:
        client.close()
    after, waited = settle(engine)
    generated = after["generated"] - before["generated"]
    assert generated < 4 * LONG, f"{generated} tokens generated: the engine requests ran on"
    FIGURES["hang up mid-stream"] = f"4 streams, engine idle {waited:.1f} s after, {generated:.0f} tokens generated"
    gateway_still_serves(engine, gateway)


def test_clients_that_never_read_are_dropped_and_their_engine_requests_aborted(engine, gateway):
    """Large events (16 choices x 20 logprobs a token) fill the socket buffers within seconds;
    then the gateway's writes stall, and after SEND_TIMEOUT_S it drops the client. Without that,
    each would hold 16 sequences for 4000 tokens."""
    before = settle(engine)[0]
    stalled_before = gateway_errors(gateway, "client_stalled")
    clients = []
    for _ in range(2):
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(("127.0.0.1", gateway.port))
        # n > 1 needs sampling: vLLM refuses it with greedy decoding
        client.sendall(raw_request(gateway.port, long_stream(engine, n=16, logprobs=20, temperature=1.0)))
        clients.append(client)  # and never read
    try:
        stalled = wait_until(lambda: gateway_errors(gateway, "client_stalled") == stalled_before + 2, 300)
        assert stalled, f"not dropped; the clients had: {[peek(c) for c in clients]}"
        after, waited = settle(engine)
    finally:
        for client in clients:
            client.close()
    generated = after["generated"] - before["generated"]
    assert generated < 2 * 16 * LONG, f"{generated} tokens generated: the engine requests ran on"
    FIGURES["never read"] = f"2 clients dropped, engine idle {waited:.1f} s later, {generated:.0f} tokens generated"
    gateway_still_serves(engine, gateway)


def peek(sock: socket.socket) -> bytes:
    """The first bytes waiting on a socket (for a failure message)."""
    sock.settimeout(1)
    try:
        return sock.recv(300)
    except OSError:
        return b""


def response_to(sock: socket.socket, timeout_s: float = 60) -> tuple[int, dict]:
    """Status and JSON body of the one response on a raw socket."""
    sock.settimeout(timeout_s)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(
        next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    )
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk
        rest += chunk
    return int(head.split()[1]), json.loads(rest[:length])


def test_bodies_over_the_limit_are_refused_before_they_are_read(engine, gateway):
    before = settle(engine)[0]
    limit = gateway.max_body_bytes
    with socket.create_connection(("127.0.0.1", gateway.port)) as client:  # declared too large: nothing is read
        client.sendall(
            (
                f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {2 * limit}\r\n\r\n"
            ).encode()
            + b'{"prompt": "'
        )
        status, body = response_to(client)
    assert status == 413 and body["error"]["code"] == 413 and f"at most {limit} bytes" in body["error"]["message"]

    with socket.create_connection(("127.0.0.1", gateway.port)) as client:  # chunked: read up to the limit
        client.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"w" * 1024**2
        sent = 0
        while sent < 2 * limit and not select.select([client], [], [], 0)[0]:
            try:
                client.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):  # the gateway answered and hung up
                break
            sent += len(chunk)
        status, body = response_to(client)
    assert status == 413 and body["error"]["code"] == 413 and sent < 2 * limit
    after, _ = settle(engine)
    assert after["prompt"] == before["prompt"]  # nothing reached the engine
    FIGURES["bodies over the limit"] = f"413 at once for {2 * limit} declared bytes; chunked refused after {sent} bytes"
    gateway_still_serves(engine, gateway)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize"])
def test_invalid_utf8_and_deep_json_get_a_clear_400(engine, gateway, path):
    before = settle(engine)[0]
    chat = path == "/v1/chat/completions"
    field = b'"messages": [{"role": "user", "content": "%s"}]' if chat else b'"prompt": "%s"'
    head = b'{"model": "' + engine.base_model.encode() + b'", "max_tokens": 2, '
    cases = [
        (head + field % b"caf\xe9 \xff\xfe" + b"}", "not valid UTF-8"),
        (head + b'"prompt": ' + b"[" * 200 + b"1" + b"]" * 200 + b"}", "levels deep"),
        (b'{"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", "levels deep"),  # past Python's recursion limit
        (head + b'"prompt": "unterminated', "not valid JSON"),
    ]
    for content, words in cases:
        r = httpx.post(
            f"{gateway.url}{path}", content=content, headers={"Content-Type": "application/json"}, timeout=60
        )
        error = r.json()["error"]
        assert r.status_code == 400 and error["code"] == 400 and words in error["message"], (content[:60], r.text)
    assert engine_totals(engine)["prompt"] == before["prompt"]  # none reached the engine
    # a lone surrogate is valid JSON and valid UTF-8: the engine judges it, and must answer clearly
    r = httpx.post(
        f"{gateway.url}{path}",
        content=head + field % b"\\ud800 lone" + b"}",
        headers={"Content-Type": "application/json"},
        timeout=120,
    )
    assert r.status_code < 500, r.text
    settle(engine)
    assert httpx.get(f"{gateway.url}/health", timeout=30).status_code == 200
    FIGURES[f"bad bodies {path}"] = f"400 x {len(cases)}; lone surrogate: HTTP {r.status_code}"
    gateway_still_serves(engine, gateway)


def test_a_burst_of_connections(engine, gateway):
    """BURST connections that open and close at once, then BURST requests at once (half streaming):
    each completes or fails with a clear error; none is lost or hangs."""
    settle(engine)
    for _ in range(BURST):
        socket.create_connection(("127.0.0.1", gateway.port)).close()

    async def one(client: httpx.AsyncClient, i: int) -> str:
        body = {
            "model": engine.base_model,
            "prompt": f"Burst {i}: name a colour.",
            "max_tokens": 2,
            "temperature": 0,
            "stream": i % 2 == 0,
        }
        r = await client.post(f"{gateway.url}/v1/completions", json=body)
        if r.status_code != 200:
            assert r.json()["error"]["message"]
            return "error"
        if body["stream"]:
            assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text, r.text[-300:]
        else:
            assert r.json()["choices"][0]["text"] is not None
        return "completed"

    async def burst():
        limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=httpx.Timeout(300, connect=30), limits=limits) as client:
            return await asyncio.wait_for(
                asyncio.gather(*(one(client, i) for i in range(BURST)), return_exceptions=True), 600
            )

    started = time.monotonic()
    outcomes = asyncio.run(burst())
    elapsed = time.monotonic() - started
    lost = [o for o in outcomes if isinstance(o, BaseException)]
    assert not lost, f"{len(lost)} of {BURST} requests lost or hung: {lost[:3]}"
    _, waited = settle(engine)
    FIGURES["burst"] = (
        f"{BURST} connect/close, then {BURST} requests: {outcomes.count('completed')} completed, "
        f"{outcomes.count('error')} clear errors, 0 lost, in {elapsed:.0f} s"
    )
    assert outcomes.count("completed") == BURST  # a healthy engine queues them all
    gateway_still_serves(engine, gateway)
