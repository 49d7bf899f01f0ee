"""HTTP client for an OpenAI-compatible vLLM endpoint (vLLM itself or the lcserve gateway).

Only the calls the probes need: `/v1/models`, `/tokenize` (vLLM's exact count with the served
tokenizer), `/v1/completions`, `/v1/chat/completions` and `/metrics`. Every failure a user can cause becomes one
ProbeError line that names the URL and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from lcserve.engine import bearer, engine_client
from lcserve.errors import ProbeError
from lcserve.options import API_KEY_ENV


@dataclass(frozen=True)
class ServedModel:
    name: str
    max_model_len: int | None
    parent: str | None  # set for a LoRA adapter: the base it is mounted on
    root: str | None  # for a LoRA adapter: the folder vLLM loaded it from


class ProbeClient:
    """Thread-safe (one httpx.Client shared by the worker threads)."""

    def __init__(self, url: str, timeout_s: float = 1800.0, api_key: str | None = None):
        self.url = url.rstrip("/")
        try:
            # engine_client: `lcserve serve` probes its engine on the Unix socket (unix:/path/vllm.sock)
            timeout = httpx.Timeout(timeout_s, connect=10.0)
            self._http = engine_client(self.url, timeout=timeout, headers=bearer(api_key))
        except httpx.InvalidURL as e:
            raise ProbeError(f"--url {url} is not a valid URL ({e}); check --url") from None

    def close(self) -> None:
        self._http.close()

    def models(self) -> dict[str, ServedModel]:
        body = self._request("GET", "/v1/models")
        return {
            m["id"]: ServedModel(m["id"], m.get("max_model_len"), m.get("parent"), m.get("root"))
            for m in body.get("data", [])
        }

    def count(self, model: str, text: str) -> int:
        """Prompt length in tokens as the server will see it (BOS included)."""
        return int(self._request("POST", "/tokenize", {"model": model, "prompt": text})["count"])

    def count_chat(self, model: str, messages: list[dict]) -> int:
        """A chat prompt's length in tokens, the model's chat template and generation prompt applied."""
        body = {"model": model, "messages": messages, "add_generation_prompt": True}
        return int(self._request("POST", "/tokenize", body)["count"])

    def tokens(self, model: str, text: str) -> list[int]:
        """Token ids of a generated text (no BOS), for n-gram statistics."""
        body = {"model": model, "prompt": text, "add_special_tokens": False}
        return list(self._request("POST", "/tokenize", body)["tokens"])

    def complete(self, model: str, prompt: str, max_tokens: int, **extra) -> dict:
        """A completion, greedy unless `extra` sets sampling; returns the JSON body (choices[0].text, usage, ...)."""
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, **extra}
        return self._request("POST", "/v1/completions", body)

    def chat(self, model: str, messages: list[dict], max_tokens: int) -> dict:
        """A greedy chat completion (the model's chat template, as an adapter trained on chats is served)."""
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0}
        return self._request("POST", "/v1/chat/completions", body)

    def metrics(self) -> str:
        response = self._send("GET", "/metrics")
        if response.status_code != 200:
            raise ProbeError(
                f"{self.url}/metrics answered HTTP {response.status_code}; the engine's own timings need vLLM's /metrics"
            )
        return response.text

    def _send(self, method: str, path: str, body: dict | None = None) -> httpx.Response:
        try:
            return self._http.request(method, path, json=body)
        except httpx.ConnectError as e:
            raise ProbeError(
                f"cannot reach {self.url} ({_reason(e)}); check --url and that vLLM or the lcserve gateway is running there"
            ) from None
        except httpx.TimeoutException:
            raise ProbeError(f"{self.url}{path} did not answer in time; the server is overloaded or stuck") from None
        except httpx.HTTPError as e:
            raise ProbeError(f"request to {self.url}{path} failed: {_reason(e)}") from None

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        response = self._send(method, path, body)
        if response.status_code == 404 and path == "/tokenize":
            raise ProbeError(
                f"{self.url} has no /tokenize endpoint, which exact prompt sizing needs; point --url at vLLM or the lcserve gateway"
            )
        if response.status_code != 200:
            raise ProbeError(
                f"{self.url}{path} answered HTTP {response.status_code}: {_server_message(response)}{key_hint(response)}"
            )
        try:
            return response.json()
        except ValueError:
            raise ProbeError(
                f"{self.url}{path} did not answer JSON; is --url an OpenAI-compatible vLLM endpoint?"
            ) from None


def key_hint(response: httpx.Response) -> str:
    """What to do about a 401: the gateway wants its key, which the probe reads from the environment."""
    return f"; give the probe the gateway's key in {API_KEY_ENV}" if response.status_code == 401 else ""


def _reason(error: Exception) -> str:
    text = str(error) or type(error).__name__
    return text.splitlines()[0]


def _server_message(response: httpx.Response) -> str:
    """vLLM's error text (`{"error": {"message": ...}}` or `{"message": ...}`), on one line."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip().splitlines()[0][:300] if response.text.strip() else "(empty body)"
    error = body.get("error", body) if isinstance(body, dict) else body
    message = error.get("message", error) if isinstance(error, dict) else error
    return " ".join(str(message).split())[:300]
