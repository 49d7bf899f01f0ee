"""Load and unload adapters in a running vLLM server (`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`).

vLLM exposes these only with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and without
authentication, so they belong behind the gateway; these are the client calls it will use.
vLLM validates the adapter while loading it, so a rejected adapter comes back as an
EngineError carrying vLLM's own reason.
"""

from __future__ import annotations

import httpx

from lcserve.errors import EngineError


def load_lora_adapter(base_url: str, name: str, path: str, api_key: str | None = None, timeout_s: float = 120) -> str:
    """Ask vLLM to load the adapter at `path` (a path on the server) under `name`; returns vLLM's message."""
    return _post(base_url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)}, api_key, timeout_s)


def unload_lora_adapter(base_url: str, name: str, api_key: str | None = None, timeout_s: float = 30) -> str:
    return _post(base_url, "/v1/unload_lora_adapter", {"lora_name": name}, api_key, timeout_s)


def _post(base_url: str, route: str, body: dict, api_key: str | None, timeout_s: float) -> str:
    url = base_url.rstrip("/") + route
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.post(url, json=body, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as e:
        raise EngineError(f"{url}: unreachable ({e}); is vLLM running?") from None
    if response.status_code == 404:
        raise EngineError(f"{url}: not found; start vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora")
    if response.status_code >= 400:
        raise EngineError(f"{url}: HTTP {response.status_code}: {_error_message(response)}")
    return response.text


def _error_message(response: httpx.Response) -> str:
    try:
        doc = response.json()
    except ValueError:
        return response.text.strip()[:500]
    error = doc.get("error", doc) if isinstance(doc, dict) else doc
    if isinstance(error, dict):
        return str(error.get("message") or error)[:500]
    return str(error)[:500]
