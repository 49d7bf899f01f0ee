"""The model catalog: limits from `/v1/models` entries, and when it reads `/v1/models` again."""

import asyncio
import json
import socket
from pathlib import Path

import pytest

from lcserve.serving.adapter_metrics import LoadedAdapter
from lcserve.serving.catalog import ModelCatalog, model_limits
from lcserve.serving.metrics import ModelLimits
from lcserve.serving.upstream import Upstream
from tests.unit.test_gateway import MAX_MODEL_LEN, FakeEngineForFaultInjection, Status


@pytest.fixture
def engine():
    fake = FakeEngineForFaultInjection()
    fake.start()
    yield fake
    fake.stop()


def test_model_limits_from_folders(tmp_path: Path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 32768}}))
    adapter = tmp_path / "writer"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}))
    (adapter / "lcserve_adapter.json").write_text(json.dumps({"training_seq_len": 256}))
    entries = [
        {"id": "base", "root": str(base), "parent": None, "max_model_len": 8192},
        {"id": "writer", "root": str(adapter), "parent": "base", "max_model_len": 8192},
    ]
    assert [model_limits(e, {}) for e in entries] == [
        ModelLimits("base", 32768, 8192),
        ModelLimits("writer", 256, 8192, adapter=LoadedAdapter("writer", "base", "mount", 8)),  # r from its config
    ]
    assert model_limits(entries[1], {"writer": 512}).training_len == 512
    assert model_limits({"id": "hub/model", "root": "hub/model", "max_model_len": 4096}, {}).training_len is None


def test_catalog_rereads_after_a_restart_or_an_adapter_change(engine):
    status = Status(engine.url)
    writer = {"id": "writer", "object": "model", "root": None, "parent": "base", "max_model_len": MAX_MODEL_LEN}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{s.getsockname()[1]}"

    async def scenario():
        upstream = Upstream(status)
        await upstream.open()
        catalog = ModelCatalog(upstream, training_lengths={"base": 8})
        try:
            assert await catalog.model(None) == ModelLimits("base", 8, MAX_MODEL_LEN)  # vLLM's default: the base
            assert await catalog.model("writer") is None
            assert engine.calls["models"] == 1  # read once per engine generation

            engine.models = [*engine.models, writer]
            catalog.mark_stale()  # an adapter was loaded
            mounted = LoadedAdapter("writer", "base", "mount", None)  # no folder here: rank unknown
            assert await catalog.model("writer") == ModelLimits("writer", None, MAX_MODEL_LEN, adapter=mounted)
            assert engine.calls["models"] == 2

            engine.models = engine.models[:1]
            status.generation += 1  # the engine restarted, without the runtime adapter
            assert await catalog.model("writer") is None
            assert engine.calls["models"] == 3

            status.url, status.generation = dead_url, status.generation + 1  # restarting, not answering yet
            assert list(await catalog.models()) == ["base"]  # the last list read
            status.url = engine.url
            assert (
                list(await catalog.models()) == ["base"] and engine.calls["models"] == 4
            )  # read again once it answers
        finally:
            await upstream.close()

    asyncio.run(scenario())
