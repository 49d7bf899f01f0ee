"""Load and unload adapters in a running server (vLLM's `/v1/load_lora_adapter` and
`/v1/unload_lora_adapter`), for `lcserve adapters load` and `unload`.

vLLM exposes these only with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and without authentication,
so lcserve's gateway serves them only behind its API key (LCSERVE_API_KEY, `--api-key-file`), and
loads only from the folders the operator allows (`--allow-adapter-dir`), after inspecting the
adapter itself. `load_adapter` inspects the adapter first when its folder is on this machine,
so what vLLM would refuse or mis-serve is refused here with the reason and the fix. vLLM checks
the adapter again while loading it, and its own rejection comes back as an EngineError carrying
vLLM's reason.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from lcserve.errors import AdapterError, EngineError
from lcserve.options import API_KEY_ENV

from .inspection import Verdict, inspect_adapter
from .reader import read_adapter


@dataclass(frozen=True)
class LoadedAdapter:
    name: str
    path: str  # as sent to the server, which reads it
    verdict: Verdict | None  # None: the folder is not on this machine, so only the server checked it
    message: str  # the server's answer

    def to_json(self) -> dict:
        return asdict(self)


def load_adapter(url: str, name: str, adapter_dir: str | Path, api_key: str | None = None) -> LoadedAdapter:
    """Inspect the adapter when its folder is on this machine (it must mount as it is), then ask
    the server at `url` to load it as `name`."""
    local, verdict, path = Path(adapter_dir).expanduser(), None, str(adapter_dir)
    if local.is_dir():
        report = inspect_adapter(read_adapter(local))
        if report.verdict == Verdict.MERGE:
            raise AdapterError(
                f"{local}: vLLM cannot load it as it is ({'; '.join(report.reasons)}); serve it merged "
                f"instead: lcserve serve BASE --adapter {name}={local} --mode merge"
            )
        if report.verdict == Verdict.UNUSABLE:
            raise AdapterError(f"{local}: cannot be served ({'; '.join(report.reasons)}); re-train or re-export it")
        verdict, path = report.verdict, str(local.resolve())  # the server does not share our working directory
    message = load_lora_adapter(url, name, path, api_key)
    return LoadedAdapter(name, path, verdict, message)


def load_lora_adapter(base_url: str, name: str, path: str, api_key: str | None = None, timeout_s: float = 120) -> str:
    """Ask the server to load the adapter at `path` (a path on the server) as `name`; returns its message."""
    return _post(base_url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)}, api_key, timeout_s)


def unload_lora_adapter(base_url: str, name: str, api_key: str | None = None, timeout_s: float = 30) -> str:
    """Ask the server to unload the adapter served as `name`; returns its message."""
    return _post(base_url, "/v1/unload_lora_adapter", {"lora_name": name}, api_key, timeout_s)


def _post(base_url: str, route: str, body: dict, api_key: str | None, timeout_s: float) -> str:
    import httpx  # here, not at import: `lcserve --help` loads this module

    from lcserve.engine import bearer

    url = base_url.rstrip("/") + route
    try:
        response = httpx.post(url, json=body, headers=bearer(api_key), timeout=timeout_s)
    except httpx.HTTPError as e:
        raise EngineError(
            f"{url}: unreachable ({e}); check --url: is `lcserve serve` (or vLLM) running there?"
        ) from None
    if response.status_code >= 400:
        raise EngineError(f"{url}: {refusal(response.status_code, response.text, sent_key=bool(api_key))}")
    return response.text


def refusal(status: int, body: str, sent_key: bool) -> str:
    """Why the server refused a load or unload, and the fix, from its answer (pure)."""
    reason = _error_message(body)
    if status == 401:
        problem = "the API key is wrong" if sent_key else "the server needs an API key"
        return f"HTTP 401: {problem}; set {API_KEY_ENV} to the key the gateway was started with"
    if status == 403 and reason is not None and "API key" not in reason:  # the gateway's folder rules
        return f"HTTP 403: {reason}"
    if status == 403:
        return (
            f"HTTP 403: the gateway was started without an API key, so it does not expose adapter load/unload; "
            f"restart it with {API_KEY_ENV} set and set the same key here"
        )
    if status == 404 and reason is None:  # no such route (vLLM's own 404s carry an error message)
        return (
            "HTTP 404: the server does not allow runtime LoRA updating; start vLLM with "
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (lcserve serve does when given an API key and "
            "--allow-adapter-dir)"
        )
    return f"HTTP {status}: {reason or ' '.join(body.split())[:500] or 'no reason given'}"


def _error_message(body: str) -> str | None:
    """The message of vLLM's (and the gateway's) error document {"error": {"message": ...}}, on one line."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    error = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(error, dict):
        error = error.get("message")
    return " ".join(str(error).split())[:500] if error else None
