"""The embedded model's long-context checks and the safetensors header reader."""

import json
import struct

import pytest

from lcserve import embedded as emb
from lcserve.errors import ModelError
from lcserve.safetensors_header import read_header

EXPECTED = {
    "max_position_embeddings": 32768,
    "sliding_window": 512,
    "rope_theta": 1e6,
    "num_hidden_layers": 18,
    "num_key_value_heads": 1,
}
GOOD = {
    "max_position_embeddings": 32768,
    "sliding_window": 512,
    "num_hidden_layers": 18,
    "num_key_value_heads": 1,
    "rope_parameters": {"full_attention": {"rope_theta": 1e6}},
}


def test_check_config_accepts_faithful_conversion():
    emb.check_config(GOOD, EXPECTED)


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"max_position_embeddings": 8192}, "max_position_embeddings=8192"),
        ({"sliding_window": 4096}, "sliding_window=4096"),
        ({"rope_parameters": {"full_attention": {"rope_theta": 1e4}}}, "rope_theta=10000.0"),
        ({"quantization_config": {"quant_method": "gguf"}}, "quantization_config"),
    ],
)
def test_check_config_refuses_lost_long_context_fields(change, fragment):
    with pytest.raises(ModelError, match=fragment.replace("(", r"\(")):
        emb.check_config({**GOOD, **change}, EXPECTED)


def test_unprepared_embedded_model_says_how_to_prepare(tmp_path, monkeypatch):
    monkeypatch.setenv("LCSERVE_HOME", str(tmp_path))
    with pytest.raises(ModelError, match="lcserve embedded prepare"):
        emb.embedded_model_path()


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with emb.atomic_dir(target) as tmp:
            (tmp / "partial").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def _safetensors(path, header: dict, data: bytes):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_header_reader_reads_shapes_without_data(tmp_path):
    f = tmp_path / "a.safetensors"
    _safetensors(f, {"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]}}, b"\0" * 12)
    tensors, _ = read_header(f)
    assert tensors["w"].shape == (2, 3) and tensors["w"].nbytes == 12


def test_header_reader_names_truncated_and_corrupt_files(tmp_path):
    f = tmp_path / "t.safetensors"
    _safetensors(f, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)
    with pytest.raises(ModelError, match="truncated"):
        read_header(f)
    f.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(ModelError, match="corrupt safetensors header"):
        read_header(f)


def test_atomic_dir_result_has_ordinary_permissions(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        with emb.atomic_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700


def test_build_lock_lets_one_builder_at_a_time(tmp_path):
    import threading
    import time

    events = []

    def build(name):
        with emb.build_lock(tmp_path / "model"):
            events.append(f"{name} in")
            time.sleep(0.2)
            events.append(f"{name} out")

    threads = [threading.Thread(target=build, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert events[0][0] == events[1][0] and events[2][0] == events[3][0]  # never interleaved
