"""Soak: mixed traffic through `lcserve serve` while its engine is killed at random moments.

`lcserve serve` runs as it is deployed (the embedded model with the demo adapter `writer`, gateway,
supervisor, watchdog), in a subprocess. Clients send a mix: base and adapter, short and long
prompts, streaming and not, some cancelled by the client mid-way. At random moments while the
engine serves, its API server or its engine core is SIGKILLed; the supervisor restarts it.

Each request ends as one of:
- completed: the whole answer (a stream ends with [DONE] and no error event);
- failed clearly: an HTTP error in vLLM's error shape (503 with Retry-After while the engine is
  down, 502 when it died under the request), or a stream that ends with an error event, [DONE];
- cancelled: the client hung up on purpose;
- lost: anything else (a reset connection, a truncated body or stream, an unparseable answer);
- hung: no answer within the request deadline.
Goal: 0 lost, 0 hung, every kill followed by a restart, the engine idle (no running or waiting
request, KV cache released) at the end, and the gateway's RSS flat.

    python benchmarks/bench_soak.py --minutes 5
    python benchmarks/bench_soak.py --minutes 10 --kill-every 30 90 --workers 6

The integration tier kills the engine under load once (tests/integration/test_serving_restart.py);
the soak's minutes of mixed traffic are left to this benchmark, outside CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from lcserve.engine import free_port

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
BASE, ADAPTER = "gemma-3-270m", "writer"
OUTCOMES = ("completed", "failed_clear", "cancelled", "lost", "hung")


@dataclass
class Soak:
    """The served stack in a subprocess, and what was seen of it."""

    workdir: Path
    max_model_len: int = 2048
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    outcomes: Counter = field(default_factory=Counter)
    by_kind: Counter = field(default_factory=Counter)
    lost_examples: list[str] = field(default_factory=list)
    kills: list[str] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output(self) -> Path:
        return self.workdir / "serve.out"

    def start(self, ready_timeout_s: float = 900) -> float:
        """Start `lcserve serve`, wait until it is ready; the seconds it took."""
        env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "nobind"}  # beside another engine, not on its cores
        started = time.monotonic()
        with self.output.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "lcserve.cli",
                    "serve",
                    "--port",
                    str(self.port),
                    "--max-model-len",
                    str(self.max_model_len),
                    "--log-file",
                    str(self.workdir / "vllm.log"),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        while time.monotonic() - started < ready_timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lcserve serve exited with {self.proc.returncode}:\n{self.logs()}")
            if "ready in " in self.output.read_text():
                return time.monotonic() - started
            time.sleep(0.5)
        raise RuntimeError(f"lcserve serve was not ready within {ready_timeout_s:.0f} s:\n{self.logs()}")

    def stop(self) -> int | None:
        """SIGTERM, as an operator stops it; its exit code (None if it had to be killed)."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.terminate()
        try:
            return self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return None

    def logs(self) -> str:
        vllm_log = self.workdir / "vllm.log"
        tail = vllm_log.read_text()[-3000:] if vllm_log.exists() else ""
        return f"--- lcserve ---\n{self.output.read_text()[-3000:]}\n--- vllm ---\n{tail}"

    # ---- the engine's processes and state --------------------------------------------

    def engine_processes(self) -> dict[str, int]:
        """'server' and 'core' -> pid, among the stack's descendants."""
        found, pending = {}, [self.proc.pid]
        while pending:
            for children in Path(f"/proc/{pending.pop()}/task").glob("*/children"):
                try:
                    pids = children.read_text().split()
                except OSError:
                    continue
                for pid in pids:
                    try:
                        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                    except OSError:
                        continue
                    if b"lcserve.watchdog" not in cmdline and b"vllm.entrypoints.openai.api_server" in cmdline:
                        found["server"] = int(pid)
                    elif cmdline.startswith(b"VLLM::EngineCore"):
                        found["core"] = int(pid)
                    pending.append(int(pid))
        return found

    def engine_url(self) -> str | None:
        server = self.engine_processes().get("server")
        if server is None:
            return None
        args = Path(f"/proc/{server}/cmdline").read_bytes().split(b"\0")
        return f"http://127.0.0.1:{int(args[args.index(b'--port') + 1])}"

    def gateway_metric(self, name: str) -> float | None:
        try:
            text = httpx.get(f"{self.url}/metrics", timeout=30).text
        except httpx.HTTPError:
            return None
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return None

    def engine_state(self) -> dict[str, float] | None:
        """vLLM's running, waiting and KV use, summed over labels (None while it is down)."""
        url = self.engine_url()
        if url is None:
            return None
        try:
            text = httpx.get(f"{url}/metrics", timeout=30).text
        except httpx.HTTPError:
            return None
        totals = dict.fromkeys(
            ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"), 0.0
        )
        for line in text.splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in totals:
                totals[name] += float(line.rsplit(" ", 1)[1])
        return {
            "running": totals["vllm:num_requests_running"],
            "waiting": totals["vllm:num_requests_waiting"],
            "kv_usage": totals["vllm:kv_cache_usage_perc"],
        }

    def rss_kib_now(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    # ---- traffic -----------------------------------------------------------------------

    async def request(self, client: httpx.AsyncClient, rng: random.Random, deadline_s: float) -> float:
        """One request of the mix; records its outcome; returns how long the worker should pause."""
        model = rng.choice((BASE, ADAPTER))
        long_prompt = rng.random() < 0.3
        stream = rng.random() < 0.5
        cancel = rng.random() < 0.15
        prompt = FILLER * (rng.randint(60, 100) if long_prompt else 1) + "Tell me about the sea."
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": rng.randint(4, 24),
            "temperature": 0.7,
            "stream": stream,
        }
        kind = f"{model}/{'long' if long_prompt else 'short'}/{'stream' if stream else 'json'}"
        try:
            outcome, pause = await asyncio.wait_for(self._send(client, body, cancel, rng), deadline_s)
        except (TimeoutError, httpx.TimeoutException):
            outcome, pause = "hung", 0.0
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
            outcome, pause = "lost", 0.5
            if len(self.lost_examples) < 5:
                self.lost_examples.append(f"{kind}: {type(e).__name__}: {e}")
        self.outcomes[outcome] += 1
        self.by_kind[(kind, outcome)] += 1
        return pause

    async def _send(self, client: httpx.AsyncClient, body: dict, cancel: bool, rng: random.Random) -> tuple[str, float]:
        if body["stream"]:
            async with client.stream("POST", f"{self.url}/v1/completions", json=body) as r:
                if r.status_code != 200:
                    return self._refusal(r.status_code, await r.aread(), r.headers)
                events = []
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line[len("data: ") :])
                        if cancel:
                            return "cancelled", 0.0  # leaving the block hangs up
            if events and events[-1] == "[DONE]":
                if any('"error"' in e for e in events):
                    json.loads(next(e for e in events if '"error"' in e))["error"]["message"]
                    return "failed_clear", 1.0
                json.loads(events[-2])["choices"]
                return "completed", 0.0
            raise ValueError(f"stream ended without [DONE] after {len(events)} events")
        post = asyncio.ensure_future(client.post(f"{self.url}/v1/completions", json=body))
        if cancel:
            done, _ = await asyncio.wait({post}, timeout=rng.uniform(0.2, 2.0))
            if not done:
                post.cancel()
                return "cancelled", 0.0
        r = await post
        if r.status_code != 200:
            return self._refusal(r.status_code, r.content, r.headers)
        r.json()["choices"][0]["text"]
        return "completed", 0.0

    @staticmethod
    def _refusal(status: int, content: bytes, headers) -> tuple[str, float]:
        """A clear failure is vLLM's error shape; pause as Retry-After says (at most 2 s)."""
        error = json.loads(content)["error"]
        if not error["message"] or error["code"] != status:
            raise ValueError(f"HTTP {status} without a clear error: {content[:200]!r}")
        return "failed_clear", min(2.0, float(headers.get("Retry-After", 0.5)))

    async def traffic(self, duration_s: float, workers: int, seed: int, deadline_s: float) -> None:
        end = time.monotonic() + duration_s

        async def worker(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            async with httpx.AsyncClient(timeout=httpx.Timeout(deadline_s, connect=10)) as client:
                while time.monotonic() < end:
                    pause = await self.request(client, rng, deadline_s)
                    await asyncio.sleep(pause)

        await asyncio.gather(*(worker(i) for i in range(workers)))

    async def killer(self, duration_s: float, gap_s: tuple[float, float], seed: int, max_kills: int | None) -> None:
        """SIGKILL the engine's API server or engine core at a random moment after each time it
        comes up (`gap_s` seconds of serving, drawn uniformly)."""
        rng = random.Random(seed)
        end = time.monotonic() + duration_s
        while time.monotonic() < end and (max_kills is None or len(self.kills) < max_kills):
            while time.monotonic() < end and self.gateway_metric("lcserve_engine_up") != 1:
                await asyncio.sleep(1)  # down or restarting: wait until it serves again
            await asyncio.sleep(rng.uniform(*gap_s))  # then let it serve a while
            if time.monotonic() >= end or self.gateway_metric("lcserve_engine_up") != 1:
                continue
            target = rng.choice(("server", "core"))
            pid = self.engine_processes().get(target)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                self.kills.append(f"{target} {pid} at {duration_s - (end - time.monotonic()):.0f} s")

    async def sampler(self, duration_s: float) -> None:
        end = time.monotonic() + duration_s
        while time.monotonic() < end:
            self.rss_kib.append(self.rss_kib_now())
            await asyncio.sleep(2)

    def run(
        self,
        duration_s: float,
        *,
        workers: int = 4,
        gap_s: tuple[float, float] = (20, 60),
        seed: int = 0,
        deadline_s: float = 300,
        max_kills: int | None = None,
        recover_timeout_s: float = 900,
    ) -> dict:
        """Traffic for `duration_s` with kills; then wait (bounded) for the engine to serve and go
        idle; the figures."""
        self.rss_kib.append(self.rss_kib_now())

        async def main():
            await asyncio.gather(
                self.traffic(duration_s, workers, seed, deadline_s),
                self.killer(duration_s, gap_s, seed, max_kills),
                self.sampler(duration_s),
            )

        started = time.monotonic()
        asyncio.run(main())
        traffic_s = time.monotonic() - started
        deadline = time.monotonic() + recover_timeout_s
        state = None
        while time.monotonic() < deadline:
            if self.gateway_metric("lcserve_engine_up") == 1:
                state = self.engine_state()
                if state is not None and state["running"] == state["waiting"] == state["kv_usage"] == 0:
                    break
            time.sleep(1)
        self.rss_kib.append(self.rss_kib_now())
        restarts = self.gateway_metric("lcserve_engine_restarts_total")
        return {
            "traffic_s": round(traffic_s, 1),
            "requests": sum(self.outcomes.values()),
            **{outcome: self.outcomes[outcome] for outcome in OUTCOMES},
            "lost_examples": self.lost_examples,
            "kills": self.kills,
            "restarts": None if restarts is None else int(restarts),
            "engine_at_end": state,
            "gateway_rss_mib": {
                "start": round(self.rss_kib[0] / 1024, 1),
                "end": round(self.rss_kib[-1] / 1024, 1),
                "max": round(max(self.rss_kib) / 1024, 1),
                "growth": round((self.rss_kib[-1] - self.rss_kib[0]) / 1024, 1),
            },
            "by_kind": {f"{kind} {outcome}": n for (kind, outcome), n in sorted(self.by_kind.items())},
        }


def warm_up(soak: Soak) -> None:
    """One request per model, so first-use allocations are not counted as growth."""
    for model in (BASE, ADAPTER):
        httpx.post(
            f"{soak.url}/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 2}, timeout=300
        ).raise_for_status()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="traffic time")
    parser.add_argument("--workers", type=int, default=4, help="clients in flight at once")
    parser.add_argument(
        "--kill-every",
        type=float,
        nargs=2,
        default=(20.0, 60.0),
        metavar=("MIN_S", "MAX_S"),
        help="seconds of serving between kills, drawn uniformly",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lcserve-soak-") as tmp:
        soak = Soak(Path(tmp), max_model_len=args.max_model_len)
        try:
            print(f"lcserve serve ready in {soak.start():.0f} s at {soak.url}", flush=True)
            warm_up(soak)
            figures = soak.run(args.minutes * 60, workers=args.workers, gap_s=tuple(args.kill_every), seed=args.seed)
        finally:
            code = soak.stop()
        figures["stopped_cleanly"] = code == 0
        text = json.dumps(figures, indent=2)
        print(text)
        if args.out:
            args.out.write_text(text + "\n")
        ok = figures["lost"] == figures["hung"] == 0 and figures["restarts"] == len(figures["kills"])
        sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
