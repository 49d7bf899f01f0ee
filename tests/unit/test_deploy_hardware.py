"""Hardware profiles: the shipped files, user files, detection and its fallback."""

from __future__ import annotations

import os
import sys
import types

import pytest

from lcserve.deploy import hardware
from lcserve.deploy.hardware import GIB, MIB, detect, list_profiles, load_profile_file, resolve_profile
from lcserve.errors import PlanError

SHIPPED = {"rtx-4090", "rtx-5090", "l4", "l40s", "a10g", "a100-40gb", "a100-80gb", "h100-80gb", "h200", "b200", "cpu"}


def test_shipped_profiles_have_every_field():
    profiles = {p.name: p for p in list_profiles()}
    assert set(profiles) >= SHIPPED
    for name in SHIPPED - {"cpu"}:
        p = profiles[name]
        assert p.kind == "gpu" and p.memory_bytes > 16 * GIB and p.count == 1
        assert p.memory_bandwidth_gbs and p.interconnect and p.block_size == 16 and p.nvml_match
    assert profiles["h100-80gb"].fp8 and not profiles["a100-80gb"].fp8 and profiles["a10g"].bf16


def test_cpu_profile_is_filled_from_this_machine():
    cpu = resolve_profile("cpu")
    assert cpu.is_cpu and cpu.cores == len(os.sched_getaffinity(0))
    assert 0 < cpu.memory_bytes <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert cpu.block_size == 128 and cpu.default_concurrency >= 1


def test_auto_falls_back_to_cpu_without_nvidia_ml_py(monkeypatch):
    # Fault injection: the package is missing (import fails).
    monkeypatch.setitem(sys.modules, "pynvml", None)
    auto = detect()
    assert auto.name == "cpu" and "no NVIDIA GPU" in auto.source


def test_auto_falls_back_to_cpu_when_nvml_fails(monkeypatch):
    # Fault injection: the package is there but the driver library is not (as on this CPU machine).
    pynvml = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def no_library():
        raise NVMLError("NVML Shared Library Not Found")

    pynvml.NVMLError, pynvml.nvmlInit = NVMLError, no_library
    monkeypatch.setitem(sys.modules, "pynvml", pynvml)
    assert hardware._nvml_devices() == [] and detect().name == "cpu"


def test_nvml_names_map_to_shipped_profiles(monkeypatch):
    # Fake NVML answers (no GPU here): the name decides the profile, NVML the memory and count.
    monkeypatch.setattr(hardware, "_nvml_devices", lambda: [("NVIDIA H100 80GB HBM3", 81559 * MIB, 70000 * MIB)] * 8)
    p = detect()
    assert (p.name, p.count, p.free_bytes, p.fp8) == ("h100-80gb", 8, 70000 * MIB, True)
    monkeypatch.setattr(hardware, "_nvml_devices", lambda: [("NVIDIA L40S", 46068 * MIB, 46000 * MIB)])
    assert detect().name == "l40s"
    monkeypatch.setattr(hardware, "_nvml_devices", lambda: [("NVIDIA L4", 23034 * MIB, 23000 * MIB)])
    assert detect().name == "l4"
    monkeypatch.setattr(hardware, "_nvml_devices", lambda: [("Tesla T4", 15360 * MIB, 15000 * MIB)])
    unknown = detect()
    assert (unknown.name, unknown.memory_bytes, unknown.kind) == ("detected-gpu", 15360 * MIB, "gpu")


def test_user_profile_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LCSERVE_HOME", str(tmp_path))
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "my-box.yaml").write_text(
        "name: my-box\nkind: gpu\nmemory_mib: 49152\ncount: 2\nblock_size: 16\nbf16: true\nfp8: false\n"
    )
    p = resolve_profile("my-box")
    assert (p.memory_bytes, p.count, p.mla_block_size) == (48 * GIB, 2, 16)
    assert "my-box" in {q.name for q in list_profiles()}
    assert resolve_profile(str(tmp_path / "profiles" / "my-box.yaml")).name == "my-box"


@pytest.mark.parametrize(
    "text,message",
    [
        ("name: x\nkind: gpu\ncount: 1\nblock_size: 16\n", "needs memory_mib"),
        ("name: x\nkind: tpu\nmemory_mib: 1\ncount: 1\nblock_size: 16\n", "kind must be"),
        ("name: x\nkind: gpu\nmemory_mib: 1\n", "missing field"),
        ("- a list\n", "YAML mapping"),
        ("name: [unclosed\n", "unreadable profile"),
    ],
)
def test_bad_profile_files(tmp_path, text, message):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(PlanError, match=message):
        load_profile_file(path)


def test_unknown_profile_and_gpu_count():
    with pytest.raises(PlanError, match="unknown profile; choose one of .*h100-80gb"):
        resolve_profile("h100")
    assert resolve_profile("a100-80gb", gpus=4).count == 4
    with pytest.raises(PlanError, match="--gpus 2: the CPU profile"):
        resolve_profile("cpu", gpus=2)
