"""`lcserve serve --dry-run` pinned byte for byte: the vLLM command, environment, notes and plan.

The launch description is what users see and what reaches vLLM, so a refactor must leave it
exactly as it was. Machine-specific parts (the python path, the model home, temporary folders
and the engine's private socket) are replaced by placeholders; the hardware is a fixed CPU profile
file so that the machine's free RAM does not move the figures.

Regenerate after an intended change with LCSERVE_UPDATE_GOLDEN=1 (the run rewrites and fails), review the
diff, and run again without it.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from lcserve.cli import cli

GOLDEN = Path(__file__).parent / "golden"
PINNED_CPU = {
    "name": "cpu-pinned",
    "display_name": "pinned CPU for tests",
    "kind": "cpu",
    "memory_mib": 16384,
    "count": 1,
    "cores": 2,
    "bf16": True,
    "fp8": False,
    "amx": False,
    "interconnect": "none",
    "block_size": 128,
    "mla_block_size": 16,
    "default_concurrency": 4,
}


def normalized(text: str, replacements: dict[str, str]) -> str:
    doc = json.loads(text)
    cmd = doc["command"]
    socket = cmd[cmd.index("--uds") + 1]  # behind the gateway, vLLM's one address: a fresh private socket
    replacements = {**replacements, socket: "<engine-socket>"}
    text = json.dumps(doc, indent=2) + "\n"
    for real, placeholder in sorted(replacements.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(real, placeholder)
    return text


def dry_run(tmp_path: Path, *args: str, replacements: dict[str, str]) -> str:
    profile = tmp_path / "cpu-pinned.yaml"
    profile.write_text(yaml.safe_dump(PINNED_CPU))
    env = {k: None for k in ("VLLM_CPU_KVCACHE_SPACE", "LCSERVE_CPU_LORA_OPS", "VLLM_CPU_OMP_THREADS_BIND")}
    r = CliRunner().invoke(cli, ["serve", *args, "--profile", str(profile), "--dry-run"], env=env)
    assert r.exit_code == 0, r.output
    home = os.environ.get("LCSERVE_HOME") or str(Path.home() / ".cache" / "lcserve")
    return normalized(r.stdout, {sys.executable: "<python>", home: "<home>", str(tmp_path): "<tmp>", **replacements})


def check(name: str, text: str, golden: Path = GOLDEN) -> None:
    """`text` must equal the pinned file. LCSERVE_UPDATE_GOLDEN=1 rewrites the file and fails, so a run
    with the variable set never passes by comparing the new text with itself."""
    path = golden / name
    if os.environ.get("LCSERVE_UPDATE_GOLDEN"):
        changed = not path.exists() or path.read_text() != text
        path.write_text(text)
        pytest.fail(
            f"{name}: {'rewritten' if changed else 'unchanged'}; review `git diff {path}`, then run without "
            "LCSERVE_UPDATE_GOLDEN"
        )
    assert text == path.read_text(), f"{name} changed; diff against {path} (LCSERVE_UPDATE_GOLDEN=1 rewrites it)"


def test_the_pin_fails_on_a_change_and_never_passes_while_rewriting(tmp_path, monkeypatch):
    monkeypatch.delenv("LCSERVE_UPDATE_GOLDEN", raising=False)
    (tmp_path / "pinned.json").write_text("old\n")
    check("pinned.json", "old\n", golden=tmp_path)
    with pytest.raises(AssertionError, match="pinned.json changed"):
        check("pinned.json", "new\n", golden=tmp_path)
    monkeypatch.setenv("LCSERVE_UPDATE_GOLDEN", "1")
    with pytest.raises(pytest.fail.Exception, match="rewritten"):
        check("pinned.json", "new\n", golden=tmp_path)
    assert (tmp_path / "pinned.json").read_text() == "new\n"


def test_dry_run_of_the_embedded_default_is_pinned(tmp_path, embedded_model_dir, demo_adapter):
    check("serve_dry_run_embedded.json", dry_run(tmp_path, replacements={}))


def test_dry_run_with_two_adapters_is_pinned(tmp_path, embedded_model_dir, demo_adapter, lora_adapter_dir):
    text = dry_run(
        tmp_path,
        str(embedded_model_dir),
        "--adapter",
        f"writer={demo_adapter}",
        "--adapter",
        f"extra={lora_adapter_dir}",
        replacements={str(lora_adapter_dir): "<extra-adapter>"},
    )
    check("serve_dry_run_two_adapters.json", text)


def test_the_pin_can_fail(tmp_path, embedded_model_dir, demo_adapter):
    """A different context window must not match the golden file."""
    text = dry_run(tmp_path, "--max-model-len", "4096", replacements={})
    with pytest.raises(AssertionError):
        assert text == (GOLDEN / "serve_dry_run_embedded.json").read_text()
