"""A corpus of bad inputs, each refused cleanly: the right exit code or HTTP status, one error line
that names the problem and the fix, no traceback, and nothing modified on disk.

Groups: the CLI (root, embedded, serve, gateway), adapters (inspect / merge / verify / mount / load
on broken folders), the planner (`deploy plan`), the gateway (HTTP, in front of the named
fault-injection engine of test_gateway.py), the probe, and `serve_vllm.sh`. Each case runs in its
own folder (also its cwd and $LCSERVE_HOME) beside a tiny Gemma 3 base and a real PEFT adapter;
every file under both is hashed before and after, so a changed byte, a half-written --out or a
leftover `.NAME.tmp-*` sibling fails the case. Counts by group print at the end of the session.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from lcserve.cli import cli
from lcserve.serving import gateway as gw
from tests.unit.test_gateway import MAX_MODEL_LEN, FakeEngineForFaultInjection, Status

ROOT = Path(__file__).resolve().parents[2]
GROUPS = ("cli", "adapters", "planner", "gateway", "probe", "serve_vllm.sh")


# ---------------------------------------------------------------- shared inputs


@dataclass(frozen=True)
class Shared:
    root: Path  # hashed with every case: the base and the adapter must never change
    base: Path
    adapter: Path
    fake_url: str  # a vLLM-like server (test_gateway's fault-injection engine): serves "base", max_model_len 1000
    dead_url: str  # nothing listens there


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Shared:
    """A tiny Gemma 3 base (4096 positions) and a rank-4 PEFT LoRA on it, trained at 256 tokens."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    root = tmp_path_factory.mktemp("shared")
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=16,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    model = Gemma3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(root / "base")
    peft = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft.save_pretrained(root / "adapter")
    (root / "adapter" / "lcserve_adapter.json").write_text(json.dumps({"training_seq_len": 256}))
    fake = FakeEngineForFaultInjection()
    fake.start()
    yield Shared(root, root / "base", root / "adapter", fake.url, _dead_url())
    fake.stop()


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file and folder under `roots` (hidden ones too): sha256 of each file, "dir" for folders."""
    seen = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames:
                seen[os.path.join(dirpath, name)] = "dir"
            for name in filenames:
                path = os.path.join(dirpath, name)
                seen[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return seen


def changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(
        f"{'+' if p not in before else '-' if p not in after else '~'} {p}"
        for p in before.keys() | after.keys()
        if before.get(p) != after.get(p)
    )


# ---------------------------------------------------------------- broken inputs (built in the case's folder)


def copy_adapter(case: Path, shared: Shared, name: str = "a") -> Path:
    return Path(shutil.copytree(shared.adapter, case / name))


def edit_config(**fields) -> Callable:
    def setup(case: Path, shared: Shared) -> None:
        path = copy_adapter(case, shared) / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))

    return setup


def write_config(text: str) -> Callable:
    def setup(case: Path, shared: Shared) -> None:
        (copy_adapter(case, shared) / "adapter_config.json").write_text(text)

    return setup


def remove(name: str) -> Callable:
    def setup(case: Path, shared: Shared) -> None:
        (copy_adapter(case, shared) / name).unlink()

    return setup


def truncate_weights(size: int) -> Callable:
    """Cut adapter_model.safetensors to `size` bytes (4000 keeps its header, 1000 cuts into it)."""

    def setup(case: Path, shared: Shared) -> None:
        with open(copy_adapter(case, shared) / "adapter_model.safetensors", "r+b") as f:
            f.truncate(size)

    return setup


def edit_tensors(change: Callable) -> Callable:
    def setup(case: Path, shared: Shared) -> None:
        from safetensors.torch import load_file, save_file

        path = copy_adapter(case, shared) / "adapter_model.safetensors"
        tensors = load_file(path)
        change(tensors)
        save_file(tensors, path)

    return setup


def wrong_shape(tensors: dict) -> None:
    import torch

    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = torch.zeros(4, 48, dtype=tensors[key].dtype)  # the base's in-features are 32


def nan_values(tensors: dict) -> None:
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")


def pickle_only(case: Path, shared: Shared) -> None:
    import torch
    from safetensors.torch import load_file

    adapter = copy_adapter(case, shared)
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()


def files(**contents: str) -> Callable:
    """Write files (relative to the case folder), e.g. files(**{"m/config.json": "{"})."""

    def setup(case: Path, shared: Shared) -> None:
        for name, text in contents.items():
            (case / name).parent.mkdir(parents=True, exist_ok=True)
            (case / name).write_text(text)

    return setup


def config_only(case: Path, shared: Shared) -> None:
    """A model folder `cfg` with the base's config.json and no weights."""
    (case / "cfg").mkdir()
    shutil.copy(shared.base / "config.json", case / "cfg")


def folder(name: str) -> Callable:
    def setup(case: Path, shared: Shared) -> None:
        (case / name).mkdir()

    return setup


LLAMA_70B = json.dumps(
    {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "torch_dtype": "bfloat16",
        "rope_theta": 500000.0,
    }
)


# ---------------------------------------------------------------- the command-line cases


@dataclass(frozen=True)
class Case:
    group: str
    name: str
    args: tuple[str, ...]  # `lcserve` arguments (serve_vllm.sh's for that group); {base} {adapter} {fake} {dead}
    exit_code: int
    fragments: tuple[str, ...]  # what the error line must say: the problem, and the fix
    setup: Callable | None = None
    xfail: str | None = None  # a known bad message, in a file this corpus does not own: what it needs

    def param(self):
        marks = [pytest.mark.xfail(strict=True, reason=self.xfail)] if self.xfail else []
        return pytest.param(self, id=f"{self.group}-{self.name}", marks=marks)


def case(group, name, args, exit_code, *fragments, setup=None, xfail=None) -> Case:
    return Case(
        group, name, tuple(args.split()) if isinstance(args, str) else tuple(args), exit_code, fragments, setup, xfail
    )


CASES = [
    # ---- cli: the root, the embedded default, serve and gateway
    case("cli", "unknown-command", "nosuchcmd", 2, "No such command 'nosuchcmd'"),
    case("cli", "embedded-path-unprepared", "embedded path", 2, "is not prepared", "run `lcserve embedded prepare`"),
    case(
        "cli",
        "train-adapter-unprepared",
        "embedded train-adapter",
        2,
        "is not prepared",
        "run `lcserve embedded prepare`",
    ),
    case(
        "cli",
        "serve-adapter-spec",
        "serve {base} --adapter bad --dry-run",
        2,
        "--adapter 'bad': expected NAME=DIR",
        "e.g. writer=",
    ),
    case(
        "cli",
        "serve-missing-model",
        "serve /nonexistent/model --dry-run",
        2,
        "model folder /nonexistent/model not found",
        "pass a folder with config.json",
    ),
    case(
        "cli",
        "serve-context-above-max",
        "serve {base} --max-model-len 99999 --dry-run",
        2,
        "--max-model-len 99999 is above the derived maximum 4096",
        "largest feasible: --max-model-len 4096",
    ),
    case(
        "cli",
        "serve-probe-without-gateway",
        "serve {base} --probe-on-start --no-gateway --dry-run",
        2,
        "publish through the gateway",
        "drop --no-gateway",
    ),
    case(
        "cli",
        "serve-adapter-on-hub-id",
        "serve org/model --adapter w={adapter} --dry-run",
        2,
        "org/model is not a local folder",
        "adapters need the base's folder",
    ),
    case(
        "cli",
        "serve-model-without-config",
        "serve m --dry-run",
        2,
        "m/config.json: missing",
        "pass a Hugging Face model folder",
        setup=folder("m"),
    ),
    case(
        "cli",
        "serve-wrong-shape-adapter",
        "serve {base} --adapter w=a --dry-run",
        2,
        "do not fit base weight",
        "--base",
        setup=edit_tensors(wrong_shape),
    ),
    case("cli", "serve-port-zero", "serve {base} --port 0 --dry-run", 2, "'--port': 0 is not in the range"),
    case(
        "cli",
        "serve-api-key-file-missing",
        "serve {base} --api-key-file nope --dry-run",
        2,
        "--api-key-file nope: cannot read it",
        "pass a readable file whose first line is the key",
    ),
    case(
        "cli",
        "serve-api-key-file-empty",
        "serve {base} --api-key-file key --dry-run",
        2,
        "--api-key-file key: the file is empty",
        "write the key on its first line",
        setup=files(key=""),
    ),
    case(
        "cli",
        "serve-allow-adapter-dir-missing",
        "serve {base} --allow-adapter-dir /nonexistent --dry-run",
        2,
        "--allow-adapter-dir /nonexistent: not a folder",
        "pass an existing folder",
    ),
    case(
        "cli",
        "gateway-training-length",
        "gateway --upstream {dead} --training-length writer=abc",
        2,
        "write MODEL=TOKENS",
    ),
    case("cli", "gateway-port", "gateway --upstream {dead} --port 70000", 2, "'--port': 70000 is not in the range"),
    case(
        "cli",
        "gateway-nothing-upstream",
        "gateway --upstream {dead} --port 0",
        2,
        "no healthy vLLM answers at",
        "start it first or fix the URL",
    ),
    # ---- adapters: inspect, merge, verify, mount-args, load/unload on broken folders
    case(
        "adapters",
        "inspect-missing-folder",
        "adapters inspect nope --base {base}",
        2,
        "nope: adapter folder not found",
        "pass the folder that holds adapter_config.json",
    ),
    case(
        "adapters",
        "inspect-missing-config",
        "adapters inspect a --base {base}",
        2,
        "a/adapter_config.json: missing",
        "save it with model.save_pretrained",
        setup=remove("adapter_config.json"),
    ),
    case(
        "adapters",
        "inspect-corrupt-config",
        "adapters inspect a --base {base}",
        2,
        "a/adapter_config.json: not valid JSON",
        "re-save the adapter",
        setup=write_config("{not json"),
    ),
    case(
        "adapters",
        "inspect-config-not-object",
        "adapters inspect a --base {base}",
        2,
        "a/adapter_config.json",
        "re-save the adapter",
        setup=write_config("[1, 2]"),
    ),
    case(
        "adapters",
        "inspect-rank-wrong-type",
        "adapters inspect a --base {base}",
        2,
        "field `r` is 'eight'",
        "must be a positive integer",
        setup=edit_config(r="eight"),
    ),
    case(
        "adapters",
        "inspect-truncated-weights",
        "adapters inspect a --base {base}",
        2,
        "truncated safetensors file",
        "re-create or re-download it",
        setup=truncate_weights(4000),
    ),
    case(
        "adapters",
        "inspect-corrupt-header",
        "adapters inspect a --base {base}",
        2,
        "corrupt safetensors header",
        "re-create or re-download it",
        setup=truncate_weights(1000),
    ),
    case(
        "adapters",
        "inspect-pickle-without-flag",
        "adapters inspect a --base {base}",
        2,
        "pickle weights are not read by default",
        "pass --allow-pickle",
        setup=pickle_only,
    ),
    case(
        "adapters",
        "inspect-wrong-shapes",
        "adapters inspect a --base {base}",
        1,  # a verdict, not an error
        "verdict: unusable",
        "do not fit base weight",
        setup=edit_tensors(wrong_shape),
    ),
    case(
        "adapters",
        "inspect-missing-base",
        "adapters inspect {adapter} --base nobase",
        2,
        "nobase: base model folder not found",
        "pass",
    ),
    case(
        "adapters",
        "merge-pickle-without-flag",
        "adapters merge a --base {base} --out out",
        2,
        "pickle weights are not read by default",
        "pass --allow-pickle",
        setup=pickle_only,
    ),
    case(
        "adapters",
        "merge-out-inside-base",
        "adapters merge {adapter} --base {base} --out {base}/merged",
        2,
        "is the base model folder (or contains it, or lies inside it)",
        "choose a new folder",
    ),
    case(
        "adapters",
        "merge-out-is-base",
        "adapters merge {adapter} --base {base} --out {base}",
        2,
        "lcserve never writes a base model",
        "choose a new folder",
    ),
    case(
        "adapters",
        "merge-out-inside-adapter",
        "adapters merge {adapter} --base {base} --out {adapter}/merged",
        2,
        "overlaps the adapter folder",
        "choose a new folder",
    ),
    case(
        "adapters",
        "merge-out-not-empty",
        "adapters merge {adapter} --base {base} --out out",
        2,
        "--out out: folder is not empty",
        "pass --force",
        setup=files(**{"out/keep.txt": "mine"}),
    ),
    case(
        "adapters",
        "merge-out-is-a-file",
        "adapters merge {adapter} --base {base} --out out",
        2,
        "--out out: exists and is not a folder",
        "choose",
        setup=files(out="a file"),
    ),
    case(
        "adapters",
        "merge-out-unwritable",
        "adapters merge {adapter} --base {base} --out /proc/merged",
        2,
        "cannot write a folder in /proc",
        "choose a writable location",
    ),
    case(
        "adapters",
        "scale-zero",
        "adapters scale {adapter} --scale 0 --out out",
        2,
        "--scale 0.0: must be in (0, 1]",
        "1 keeps the adapter as trained",
    ),
    case(
        "adapters",
        "scale-out-exists",
        "adapters scale {adapter} --scale 0.5 --out out",
        2,
        "--out out: already exists",
        "pass --force",
        setup=files(**{"out/keep.txt": "mine"}),
    ),
    case(
        "adapters",
        "scale-out-is-the-adapter",
        "adapters scale {adapter} --scale 0.5 --out {adapter} --force",
        2,
        "is or lies inside the adapter folder",
        "choose a new folder",
    ),
    case(
        "adapters",
        "merge-scale-above-one",
        "adapters merge {adapter} --base {base} --out out --scale 2",
        2,
        "--scale 2.0: must be in (0, 1]",
        "1 keeps the adapter as trained",
    ),
    case(
        "adapters",
        "merge-truncated-weights",
        "adapters merge a --base {base} --out out",
        2,
        "truncated safetensors file",
        "re-create or re-download it",
        setup=truncate_weights(4000),
    ),
    case(
        "adapters",
        "merge-nan-weights",
        "adapters merge a --base {base} --out out",
        2,
        "holds NaN/inf values",
        "re-train it",
        setup=edit_tensors(nan_values),
    ),
    case(
        "adapters",
        "merge-wrong-shapes",
        "adapters merge a --base {base} --out out",
        2,
        "do not fit base weight",
        "--base",
        setup=edit_tensors(wrong_shape),
    ),
    case(
        "adapters",
        "merge-bad-dtype",
        "adapters merge {adapter} --base {base} --out out --dtype int8",
        2,
        "'int8' is not one of",
    ),
    case(
        "adapters",
        "merge-base-without-weights",
        "adapters merge {adapter} --base cfg --out out",
        2,
        "no *.safetensors",
        setup=config_only,
    ),
    case(
        "adapters",
        "verify-missing-merged",
        "adapters verify nope --adapter {adapter} --base {base}",
        2,
        "nope: no config.json",
        "pass the merged model folder",
    ),
    case(
        "adapters",
        "verify-adapter-without-config",
        "adapters verify {base} --adapter a --base {base}",
        2,
        "a/adapter_config.json: missing",
        setup=remove("adapter_config.json"),
    ),
    case("adapters", "mount-args-spec", "adapters mount-args bad --base-name base", 2, "expected NAME=DIR", "e.g."),
    case("adapters", "load-unreachable", "adapters load w {adapter} --url {dead}", 2, "unreachable", "check --url"),
    case("adapters", "unload-unreachable", "adapters unload w --url {dead}", 2, "unreachable", "check --url"),
    # ---- planner: `deploy plan` with impossible values
    case(
        "planner",
        "context-above-max",
        "deploy plan --model {base} --profile h100-80gb --max-model-len 99999",
        2,
        "above the derived maximum 4096",
        "largest feasible: --max-model-len 4096",
        "--rope-scaling yarn",
    ),
    case(
        "planner",
        "context-zero",
        "deploy plan --model {base} --profile h100-80gb --max-model-len 0",
        2,
        "'--max-model-len' / '--context': 0 is not in the range x>=1",
    ),
    case(
        "planner",
        "unknown-profile",
        "deploy plan --model {base} --profile nosuch",
        2,
        "--profile nosuch: unknown profile",
        "choose one of",
    ),
    case(
        "planner",
        "profile-missing-fields",
        "deploy plan --model {base} --profile p.yaml",
        2,
        "p.yaml: missing field(s)",
        "see deploy/profiles/h100-80gb.yaml",
        setup=files(**{"p.yaml": "name: x\n"}),
    ),
    case(
        "planner",
        "profile-not-yaml",
        "deploy plan --model {base} --profile p.yaml",
        2,
        "p.yaml: unreadable profile",
        setup=files(**{"p.yaml": ": : :\n"}),
    ),
    case(
        "planner",
        "tensor-parallel-above-gpus",
        "deploy plan --model {base} --profile h100-80gb --tensor-parallel-size 3",
        2,
        "the profile has 1 GPU(s)",
        "largest feasible: --tensor-parallel-size 1",
    ),
    case(
        "planner",
        "full-context-requests-too-many",
        "deploy plan --model {base} --profile rtx-4090 --max-model-len 4096 --full-context-requests 100000000",
        2,
        "--full-context-requests 100000000",
        "largest feasible",
    ),
    case(
        "planner",
        "kv-cache-dtype",
        "deploy plan --model {base} --profile h100-80gb --kv-cache-dtype fp4",
        2,
        "'fp4' is not one of",
    ),
    case(
        "planner",
        "missing-model",
        "deploy plan --model /nonexistent --profile h100-80gb",
        2,
        "/nonexistent: not a folder",
        "pass a Hugging Face model folder",
    ),
    case(
        "planner",
        "config-not-object",
        "deploy plan --model m --profile h100-80gb",
        2,
        "m/config.json: expected a JSON object",
        "pass a Hugging Face model folder",
        setup=files(**{"m/config.json": "[1]"}),
    ),
    case(
        "planner",
        "config-missing-layers",
        "deploy plan --model m --profile h100-80gb",
        2,
        "field 'num_hidden_layers' is missing",
        "not a decoder LM",
        setup=files(**{"m/config.json": '{"model_type": "llama"}'}),
    ),
    case(
        "planner",
        "weights-fit-no-gpu",
        "deploy plan --model m --profile rtx-4090",
        2,
        "does not fit 1 x rtx-4090 at any context",
        "it fits from --gpus 8 --tensor-parallel-size 8",
        setup=files(**{"m/config.json": LLAMA_70B}),
    ),
    case(
        "planner",
        "missing-adapter",
        "deploy plan --model {base} --profile h100-80gb --adapter /nonexistent",
        2,
        "/nonexistent: adapter folder not found",
        "pass the folder that holds adapter_config.json",
    ),
    case(
        "planner",
        "config-out-missing-folder",
        "deploy plan --model {base} --profile h100-80gb --config-out nodir/vllm.yaml",
        2,
        "nodir",
        "create",
    ),
    case(
        "planner",
        "default-model-unprepared",
        "deploy plan --profile h100-80gb",
        2,
        "is not prepared",
        "run `lcserve embedded prepare`",
    ),
    case(
        "planner",
        "cpu-kv-cache-zero",
        "deploy plan --model {base} --profile cpu --kv-cache-gib 0",
        2,
        "--kv-cache-gib 0: must be from 1 to what RAM allows",
        "largest feasible",
    ),
    # ---- probe: unreachable and not-vLLM servers, impossible ladders, an --out it cannot own
    case("probe", "unreachable", "probe --url {dead} --out out", 2, "cannot reach", "check --url"),
    case("probe", "url-without-scheme", "probe --url nothttp --out out", 2, "missing an 'http://' or 'https://'"),
    case("probe", "url-bad-host", "probe --url http://256.1.1.1:80 --out out", 2, "256.1.1.1", "check --url"),
    case(
        "probe",
        "lengths-not-numbers",
        "probe --url {fake} --base base --lengths 128,12x --out out",
        2,
        "'12x' is not a token count",
        "write e.g. 128,1k,8k",
    ),
    case(
        "probe",
        "lengths-zero",
        "probe --url {fake} --base base --lengths 0 --out out",
        2,
        "--lengths: 0 must be positive",
    ),
    case(
        "probe",
        "budget-zero",
        "probe --url {fake} --base base --budget-minutes 0 --out out",
        2,
        "--budget-minutes must be positive",
    ),
    case(
        "probe",
        "base-only-and-adapter",
        "probe --url {fake} --base-only --adapter w --out out",
        2,
        "--base-only and --adapter exclude each other",
        "pass one of them",
    ),
    case(
        "probe",
        "unknown-base",
        "probe --url {fake} --base nope --out out",
        2,
        "does not serve a model named 'nope' (it serves: base)",
        "pass --base with one of those",
    ),
    case(
        "probe",
        "unknown-adapter",
        "probe --url {fake} --base base --adapter nope --out out",
        2,
        "does not serve an adapter named 'nope'",
        "pass --adapter with one of those",
    ),
    case(
        "probe",
        "lengths-above-max-model-len",
        "probe --url {fake} --base base --lengths 4k --out out",
        2,
        f"--lengths 4096 above the max_model_len {MAX_MODEL_LEN}",
        "drop them or restart vLLM with a larger",
    ),
    case(
        "probe",
        "concurrency-zero",
        "probe --url {fake} --concurrency 0 --out out",
        2,
        "'--concurrency': 0 is not in the range",
    ),
    case(
        "probe",
        "out-is-a-file",
        "probe --url {fake} --base base --out out",
        2,
        "--out out: exists and is not a folder",
        "pass a new folder",
        setup=files(out="mine"),
    ),
    case(
        "probe",
        "out-holds-other-files",
        "probe --url {fake} --base base --out out",
        2,
        "--out out: holds files that are not a probe's (notes.txt)",
        "pass a new or empty one",
        setup=files(**{"out/notes.txt": "mine"}),
    ),
    case(
        "probe",
        "server-not-vllm",
        "probe --url {fake} --base base --lengths 128 --out out",
        2,
        "without vLLM's fields",
        "point --url at vLLM or the lcserve gateway",
    ),  # the fake has no prompt_logprobs
    case(
        "probe",
        "training-length-negative",
        "probe --url {fake} --base base --training-length -5 --out out",
        2,
        "'--training-length': -5 is not in the range",
    ),
    # ---- serve_vllm.sh: positional arguments, its own options, model folders
    case("serve_vllm.sh", "port-zero", "embedded 0", 2, "PORT must be an integer from 1 to 65535, got '0'"),
    case(
        "serve_vllm.sh",
        "max-num-seqs-zero",
        "embedded 8000 0",
        2,
        "MAX_NUM_SEQS must be a positive integer or 'auto', got '0'",
    ),
    case(
        "serve_vllm.sh",
        "max-num-seqs-negative",
        "{base} 8000 -1 --dry-run",
        2,
        "MAX_NUM_SEQS must be a positive integer or 'auto', got '-1'",
    ),
    case(
        "serve_vllm.sh",
        "max-model-len-fraction",
        "embedded 8000 4 1.5",
        2,
        "MAX_MODEL_LEN must be a positive integer or 'auto', got '1.5'",
    ),
    case(
        "serve_vllm.sh",
        "gpu-mem-util-word",
        "embedded 8000 4 1024 most",
        2,
        "GPU_MEM_UTIL must be a number in (0, 1], like 0.90, got 'most'",
    ),
    case(
        "serve_vllm.sh",
        "missing-model-folder",
        "./nope",
        2,
        "MODEL './nope' is not a folder",
        "pass a model folder (config.json + *.safetensors)",
    ),
    case(
        "serve_vllm.sh",
        "profile-without-name",
        "{base} --profile",
        2,
        "--profile needs a NAME",
        "lcserve deploy profiles",
    ),
    case(
        "serve_vllm.sh",
        "full-context-requests-zero",
        "{base} 8000 --full-context-requests 0",
        2,
        "--full-context-requests needs a positive integer",
    ),
    case(
        "serve_vllm.sh",
        "unknown-profile",
        "{base} 8000 --profile nosuch --dry-run",
        2,
        "--profile nosuch: unknown profile",
        "choose one of",
    ),
    case(
        "serve_vllm.sh",
        "context-above-max",
        "{base} 8000 auto 99999 --dry-run",
        2,
        "MAX_MODEL_LEN 99999 is above the derived maximum 4096",
        "largest feasible: MAX_MODEL_LEN 4096",
    ),
]


@dataclass
class Outcome:
    exit_code: int
    stdout: str
    stderr: str
    crashed: str | None  # the exception a real run would print as a traceback


def run_case(c: Case, folder: Path, shared: Shared) -> Outcome:
    args = [
        a.format(base=shared.base, adapter=shared.adapter, fake=shared.fake_url, dead=shared.dead_url) for a in c.args
    ]
    env = {"LCSERVE_HOME": str(folder / "home")}
    if c.group == "serve_vllm.sh":
        r = subprocess.run(
            [str(ROOT / "serve_vllm.sh"), *args],
            cwd=folder,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=300,
        )
        return Outcome(r.returncode, r.stdout, r.stderr, None)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        r = CliRunner().invoke(cli, args, env=env)
    finally:
        os.chdir(cwd)
    crashed = None if r.exception is None or isinstance(r.exception, SystemExit) else repr(r.exception)
    return Outcome(r.exit_code, r.stdout, r.stderr, crashed)


ERROR_PREFIXES = ("error:", "serve_vllm.sh:")


def error_lines(stderr: str) -> list[str]:
    """The lines that report an error: lcserve's `error: ...`, click's `Error: ...`, the script's own."""
    return [line for line in stderr.splitlines() if line.lower().startswith(ERROR_PREFIXES)]


def problems(c: Case, out: Outcome, modified: list[str]) -> list[str]:
    """What is wrong with how the command took the bad input (empty: refused cleanly)."""
    traceback = out.crashed or ("Traceback" in out.stdout + out.stderr and "a traceback")
    found = [f"traceback: {traceback}"] if traceback else []
    found += [f"changed on disk: {m}" for m in modified]
    if out.exit_code != c.exit_code:
        found.append(f"exit code {out.exit_code}, expected {c.exit_code}")
    if c.exit_code == 1:  # a verdict (adapters inspect), printed as the report (rich wraps its lines)
        text = " ".join(out.stdout.split())
    else:
        lines = error_lines(out.stderr)
        text = lines[0] if lines else ""
        if out.stdout:
            found.append(f"stdout is not empty: {out.stdout[:200]!r}")
        if len(lines) != 1:
            found.append(f"{len(lines)} error lines, expected one")
        elif out.stderr.strip().splitlines()[-1] != text:
            found.append("the error goes on past its line")
    found += [f"{fragment!r} not in {text!r}" for fragment in c.fragments if fragment not in text]
    return found


@pytest.mark.parametrize("c", [c.param() for c in CASES])
def test_bad_input_is_refused_cleanly(c: Case, shared, tmp_path):
    folder = tmp_path / "case"
    folder.mkdir()
    if c.setup:
        c.setup(folder, shared)
    before = snapshot(folder, shared.root)
    out = run_case(c, folder, shared)
    modified = changes(before, snapshot(folder, shared.root))
    found = problems(c, out, modified)
    TALLY.add(c, any(p.startswith("traceback") for p in found), modified)
    assert not found, "\n".join(found) + f"\n--- stderr:\n{out.stderr[-3000:]}"


def test_the_checks_fail_on_what_they_must_catch(shared, tmp_path):
    """Each check, fed an input it must reject: a command that writes, a traceback, an error that
    spans lines, a wrong exit code, a missing fragment."""
    folder = tmp_path / "case"
    folder.mkdir()
    merge = case("adapters", "a-merge-that-works", "adapters merge {adapter} --base {base} --out out", 2, "x")
    before = snapshot(folder, shared.root)
    out = run_case(merge, folder, shared)
    found = problems(merge, out, changes(before, snapshot(folder, shared.root)))
    assert any(p.startswith("changed on disk: + ") and p.endswith("/case/out") for p in found), found
    assert "exit code 0, expected 2" in found and "0 error lines, expected one" in found

    crash = Outcome(1, "", "", "AttributeError('boom')")
    assert problems(case("cli", "crash", "x", 2), crash, [])[0] == "traceback: AttributeError('boom')"
    printed = Outcome(2, "", "Traceback (most recent call last):\nerror: boom\n", None)
    assert problems(case("cli", "printed", "x", 2), printed, []) == ["traceback: a traceback"]
    multi = Outcome(2, "", "error: p.yaml: unreadable profile (while parsing\n  in line 1\n", None)
    assert problems(case("cli", "multi", "x", 2, "p.yaml"), multi, []) == ["the error goes on past its line"]
    two = Outcome(2, "", "Error: one\nerror: two\n", None)
    assert problems(case("cli", "two", "x", 2), two, []) == ["2 error lines, expected one"]
    fix = Outcome(2, "", "error: nobase: base model folder not found\n", None)
    assert problems(case("cli", "fix", "x", 2, "not found", "pass --base"), fix, []) == [
        "'pass --base' not in 'error: nobase: base model folder not found'"
    ]


# ---------------------------------------------------------------- the gateway over HTTP


class VllmLikeEngine(FakeEngineForFaultInjection):
    """The fault-injection engine, answering what it does not serve or cannot parse as vLLM 0.32 does
    (404 NotFoundError for an unknown model, 400 for a field of the wrong type), so the cases see
    whether the gateway passes the engine's own refusal through."""

    async def _complete(self, request):
        from aiohttp import web

        self.calls["seen"] += 1
        body = await request.json()
        served = {m["id"] for m in self.models}
        if body.get("model") not in served:
            self.calls["refused"] += 1
            return web.json_response(
                {
                    "error": {
                        "message": f"The model `{body.get('model')}` does not exist.",
                        "type": "NotFoundError",
                        "param": "model",
                        "code": 404,
                    }
                },
                status=404,
            )
        if not isinstance(body.get("max_tokens", 1), int):
            self.calls["refused"] += 1
            return web.json_response(
                {
                    "error": {
                        "message": "[{'type': 'int_parsing', 'loc': ('body', 'max_tokens'), 'msg': 'Input should be a valid "
                        "integer, unable to parse string as an integer', 'input': 'ten'}]",
                        "type": "BadRequestError",
                        "param": None,
                        "code": 400,
                    }
                },
                status=400,
            )
        return await super()._complete(request)


@dataclass(frozen=True)
class HttpCase:
    name: str
    path: str
    body: object  # bytes are sent as they are, anything else as JSON
    status: int
    fragments: tuple[str, ...]
    headers: dict = field(default_factory=dict)
    api_key: str | None = None
    engine_up: bool = True
    reaches_engine: bool = False  # refused by the engine (relayed), not by the gateway
    xfail: str | None = None

    def param(self):
        marks = [pytest.mark.xfail(strict=True, reason=self.xfail)] if self.xfail else []
        return pytest.param(self, id=f"gateway-{self.name}", marks=marks)


LONG = "w " * 996  # 997 tokens by the fake's tokenizer: with max_tokens 4, over max_model_len 1000

HTTP_CASES = [
    HttpCase("not-json", "/v1/completions", b"{not json", 400, ("not valid JSON", "send one JSON object")),
    HttpCase(
        "json-array", "/v1/completions", b"[1, 2]", 400, ("is an array, not a JSON object", "send one JSON object")
    ),
    HttpCase("invalid-utf8", "/v1/completions", b"\xff\xfe{}", 400, ("not valid UTF-8", "send JSON encoded as UTF-8")),
    HttpCase(
        "prompt-too-long",
        "/v1/completions",
        {"model": "base", "prompt": LONG, "max_tokens": 4},
        400,
        ("serves at most max_model_len=1000 tokens", "shorten the prompt by at least 1 tokens"),
    ),
    HttpCase(
        "chat-too-long",
        "/v1/chat/completions",
        {"model": "base", "messages": [{"role": "user", "content": "w " * 990}], "max_tokens": 20},
        400,
        ("serves at most max_model_len=1000", "lower max_tokens"),
    ),
    HttpCase(
        "missing-key",
        "/v1/completions",
        {"model": "base", "prompt": "hi"},
        401,
        ("missing or wrong API key", "Authorization: Bearer <key>"),
        api_key="s3cret",
    ),
    HttpCase(
        "wrong-key",
        "/v1/completions",
        {"model": "base", "prompt": "hi"},
        401,
        ("missing or wrong API key", "--api-key"),
        api_key="s3cret",
        headers={"Authorization": "Bearer nope"},
    ),
    HttpCase(
        "adapter-load-without-key",
        "/v1/load_lora_adapter",
        {"lora_name": "w", "lora_path": "/etc"},
        403,
        ("needs an API key", "--api-key"),
    ),
    HttpCase(
        "engine-down",
        "/v1/completions",
        {"model": "base", "prompt": "hi"},
        503,
        ("down or restarting", "retry in 5 s"),
        engine_up=False,
    ),
    HttpCase(
        "probe-results-shape", "/lcserve/probe_results", {"samples": 5}, 400, ("probe results must be", "samples")
    ),
    HttpCase(
        "unknown-model",
        "/v1/completions",
        {"model": "nope", "prompt": "hi"},
        404,
        ("The model `nope` does not exist.",),
        reaches_engine=True,
    ),
    HttpCase(
        "max-tokens-wrong-type",
        "/v1/completions",
        {"model": "base", "prompt": "w " * 600, "max_tokens": "ten"},
        400,
        ("max_tokens", "valid integer"),
        reaches_engine=True,
    ),
    HttpCase(
        "model-wrong-type",
        "/v1/completions",
        {"model": ["base"], "prompt": LONG},
        400,
        ('`model` is ["base"]', "must be a string naming a served model"),
    ),
    HttpCase(  # the embedding model's own refusals: tests/unit/test_embedding.py, tests/integration/test_embedding_engine.py
        "embeddings-to-a-generative-model",
        "/v1/embeddings",
        {"model": "base", "input": "hi"},
        400,
        ("model 'base' is a generative model", "name an embedding model"),
    ),
]


def send(c: HttpCase, caplog) -> tuple[httpx.Response, str | None, int]:
    """Send the case to a fresh gateway in front of a fresh engine: the response, the first error
    the gateway logged (a handler's traceback), and how many generation requests the engine saw."""
    engine = VllmLikeEngine()
    engine.start()
    status = Status(engine.url)
    status.up = c.engine_up
    gateway = gw.Gateway(status, api_key=c.api_key, training_lengths={"base": 8})
    gateway.start("127.0.0.1", 0)
    try:
        with caplog.at_level(logging.ERROR):
            content = c.body if isinstance(c.body, bytes) else json.dumps(c.body).encode()
            r = httpx.post(
                gateway.url + c.path,
                content=content,
                timeout=10,
                headers={"Content-Type": "application/json", **c.headers},
            )
    finally:
        gateway.stop()
        engine.stop()
    logged = next((rec.getMessage() for rec in caplog.records if rec.exc_info or rec.levelno >= logging.ERROR), None)
    return r, logged, engine.calls["seen"]


def http_problems(c: HttpCase, r: httpx.Response, logged: str | None, seen: int) -> list[str]:
    found = [f"traceback: the gateway logged {logged!r}"] if logged else []
    if seen != (1 if c.reaches_engine else 0):
        found.append(f"changed: the engine saw {seen} request(s), expected {int(c.reaches_engine)}")
    if r.status_code != c.status:
        found.append(f"HTTP {r.status_code}, expected {c.status}")
    try:
        error = r.json()["error"]
        message = error["message"]
    except (ValueError, KeyError, TypeError):
        return [*found, f"not vLLM's error shape: {r.text[:200]!r}"]
    if error.get("code") != c.status:
        found.append(f"error code {error.get('code')}, expected {c.status}")
    if "\n" in message:
        found.append("the message spans lines")
    return found + [f"{fragment!r} not in {message!r}" for fragment in c.fragments if fragment not in message]


@pytest.mark.parametrize("c", [c.param() for c in HTTP_CASES])
def test_bad_request_is_refused_cleanly_by_the_gateway(c: HttpCase, caplog):
    r, logged, seen = send(c, caplog)
    found = http_problems(c, r, logged, seen)
    TALLY.add(c, logged, [p for p in found if p.startswith("changed")], group="gateway")
    assert not found, "\n".join(found)


def test_the_gateway_checks_fail_on_what_they_must_catch(caplog):
    """A request the gateway accepts, checked as if it had to be refused: every check reports it. (The
    log check meets a real crash in the xfail-marked case model-wrong-type.)"""
    ok = HttpCase("accepted", "/v1/completions", {"model": "base", "prompt": "hi", "max_tokens": 2}, 400, ("refused",))
    r, logged, seen = send(ok, caplog)
    assert http_problems(ok, r, logged, seen) == [
        "changed: the engine saw 1 request(s), expected 0",
        "HTTP 200, expected 400",
        f"not vLLM's error shape: {r.text[:200]!r}",
    ]


# ---------------------------------------------------------------- the count by group


class Tally:
    """What the cases found, printed at the end of the session: cases by group, tracebacks and
    modified files (the xfail-marked cases apart: they are known and reported)."""

    def __init__(self):
        self.rows: list[tuple[str, bool, bool, bool]] = []

    def add(self, c, traceback, modified, group: str | None = None) -> None:
        self.rows.append((group or c.group, bool(traceback), bool(modified), bool(c.xfail)))

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.rows:
            return
        by_group = Counter(group for group, *_ in self.rows)
        known = [r for r in self.rows if r[3]]
        rest = [r for r in self.rows if not r[3]]
        terminalreporter.write_sep("-", "bad-input corpus")
        terminalreporter.write_line(
            f"{len(self.rows)} cases by group: "
            + ", ".join(f"{g} {by_group[g]}" for g in GROUPS if by_group[g])
            + f"; {sum(r[1] for r in rest)} tracebacks, {sum(r[2] for r in rest)} modified files"
            + f" (xfail-marked, known: {len(known)} cases, {sum(r[1] for r in known)} tracebacks, "
            f"{sum(r[2] for r in known)} modified)"
        )


TALLY = Tally()


@pytest.fixture(scope="module", autouse=True)
def report_the_tally(request):
    if not request.config.pluginmanager.is_registered(TALLY):
        request.config.pluginmanager.register(TALLY, "lcserve-bad-input-tally")
    yield


def test_the_corpus_covers_every_group_with_at_least_40_cases():
    counts = Counter(c.group for c in CASES) + Counter("gateway" for _ in HTTP_CASES)
    assert set(counts) == set(GROUPS) and min(counts.values()) >= 8, counts
    assert sum(counts.values()) >= 40, counts
