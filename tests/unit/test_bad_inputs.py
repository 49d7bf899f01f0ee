"""A corpus of bad inputs, each refused cleanly: the right exit code or HTTP status, one error line
that names the problem and the fix, no traceback, and nothing modified on disk.

Groups: the CLI (root, embedded, serve, gateway), environment variables (named as the user set
them), adapters (inspect / merge / scale / verify / mount / load on broken folders), the planner
(`deploy plan`, model configs, profile files), `deploy render` and `deploy check` (refused before
any engine starts), the embedding commands, the gateway (HTTP, in front of the named
fault-injection engine of test_gateway.py), the probe, and `serve_vllm.sh`. The `--force` cases
hold the user's own files where an output would go: `--force` replaces only a folder lcserve
marked as its own. Each case runs in its own folder (also its cwd and $LCSERVE_HOME) beside a tiny
Gemma 3 base, a real PEFT adapter and a tiny embedding model; every file under them is hashed
(sha256) before and after, so a changed byte, a half-written --out or a leftover `.NAME.tmp-*`
sibling fails the case. Counts by group print at the end of the session.
"""

from __future__ import annotations

import hashlib
import io
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
from rich.console import Console

from lcserve.cli import cli
from lcserve.serving import gateway as gw
from tests.unit.test_gateway import MAX_MODEL_LEN, FakeEngineForFaultInjection, Status

ROOT = Path(__file__).resolve().parents[2]
GROUPS = ("cli", "env", "adapters", "planner", "render", "check", "embedding", "gateway", "probe", "serve_vllm.sh")


# ---------------------------------------------------------------- shared inputs


@dataclass(frozen=True)
class Shared:
    root: Path  # hashed with every case: the base and the adapter must never change
    base: Path
    adapter: Path
    fake_url: str  # a vLLM-like server (test_gateway's fault-injection engine): serves "base", max_model_len 1000
    dead_url: str  # nothing listens there
    embedding: Path  # a tiny sentence-transformers model (BERT, mean pooling), trained at 64 tokens


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
    tiny_embedding_model(root / "embedding")
    fake = FakeEngineForFaultInjection()
    fake.start()
    yield Shared(root, root / "base", root / "adapter", fake.url, _dead_url(), root / "embedding")
    fake.stop()


def tiny_embedding_model(folder: Path) -> None:
    """A BERT encoder with sentence-transformers' module files, as all-MiniLM-L6-v2 lays them out."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128,
    )  # fmt: skip
    BertModel(config).save_pretrained(folder)
    modules = [
        {"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
        for i, (path, kind) in enumerate([("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")])
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True})
    )
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": False}))
    (folder / "lcserve_embedding.json").write_text(json.dumps({"training_seq_len": 64}))


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
    env: tuple[tuple[str, str], ...] = ()  # environment variables the user set
    absent: tuple[str, ...] = ()  # what the error line must not say (a flag the user never typed)

    def param(self):
        marks = [pytest.mark.xfail(strict=True, reason=self.xfail)] if self.xfail else []
        return pytest.param(self, id=f"{self.group}-{self.name}", marks=marks)


def case(group, name, args, exit_code, *fragments, setup=None, xfail=None, env=None, absent=()) -> Case:
    args = tuple(args.split()) if isinstance(args, str) else tuple(args)
    return Case(group, name, args, exit_code, fragments, setup, xfail, tuple((env or {}).items()), tuple(absent))


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
        "--out out: holds files lcserve did not write",
        "remove the folder yourself or pick a new --out",
        setup=files(**{"out/keep.txt": "mine"}),
    ),
    case(
        "adapters",
        "merge-out-is-a-file",
        "adapters merge {adapter} --base {base} --out out",
        2,
        "--out out: exists and is not a folder",
        "pick a new --out",
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
        "--out out: holds files lcserve did not write",
        "remove the folder yourself or pick a new --out",
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
        "'--max-model-len': 0 is not in the range x>=1",
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
        "pick a new --out",
        setup=files(out="mine"),
    ),
    case(
        "probe",
        "out-holds-other-files",
        "probe --url {fake} --base base --out out",
        2,
        "--out out: holds files lcserve did not write",
        "remove the folder yourself or pick a new --out",
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
        "'--training-len': -5 is not in the range",
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


# ---------------------------------------------------------------- more broken inputs (issue 22)


def model_config(**fields) -> Callable:
    """A model folder `m` whose config.json is LLAMA_70B's with `fields` changed (None removes one)."""

    def setup(case: Path, shared: Shared) -> None:
        config = {**json.loads(LLAMA_70B), **fields}
        (case / "m").mkdir()
        (case / "m" / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))

    return setup


def raw_file(name: str, data: bytes) -> Callable:
    def setup(case: Path, shared: Shared) -> None:
        (case / name).parent.mkdir(parents=True, exist_ok=True)
        (case / name).write_bytes(data)

    return setup


def sharded_base(missing: bool = True) -> Callable:
    """A copy `sb` of the base whose weights an index names as two shards; the second is absent."""

    def setup(case: Path, shared: Shared) -> None:
        from safetensors import safe_open

        target = Path(shutil.copytree(shared.base, case / "sb"))
        (target / "model.safetensors").rename(target / "model-00001-of-00002.safetensors")
        with safe_open(target / "model-00001-of-00002.safetensors", "pt") as f:
            names = sorted(f.keys())
        weight_map = {n: "model-00001-of-00002.safetensors" for n in names}
        weight_map["model.norm.extra"] = "model-00002-of-00002.safetensors"
        (target / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map})
        )

    return setup


def output_folder(name: str = "out", marked: bool = False, **contents: str) -> Callable:
    """A folder holding the user's own files (thesis, notes, a src/ tree), or lcserve's marked output."""
    from lcserve.paths import OUTPUT_MARKER, mark_output

    def setup(case: Path, shared: Shared) -> None:
        folder = case / name
        for rel, text in (contents or {"thesis.tex": "\\section{mine}", "src/main.c": "int main;"}).items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_text(text)
        if marked:
            mark_output(folder)
            assert (folder / OUTPUT_MARKER).is_file()

    return setup


def marked_base(case: Path, shared: Shared) -> None:
    """`mb`: a copy of the base that an earlier lcserve run wrote (it carries the marker)."""
    from lcserve.paths import mark_output

    mark_output(shutil.copytree(shared.base, case / "mb"))


def adapter_inside_marked_output(case: Path, shared: Shared) -> None:
    """`o`: an earlier lcserve output that holds the adapter the command reads (`o/a`)."""
    from lcserve.paths import mark_output

    (case / "o").mkdir()
    mark_output(case / "o")
    shutil.copytree(shared.adapter, case / "o" / "a")


def embedding_model(case: Path, shared: Shared, name: str = "e") -> Path:
    """A tiny sentence-transformers folder `e` (BERT, mean pooling, normalized, trained at 64 tokens)."""
    return Path(shutil.copytree(shared.embedding, case / name))


def edit_embedding(name: str, text: str | None) -> Callable:
    def setup(case: Path, shared: Shared) -> None:
        path = embedding_model(case, shared) / name
        path.unlink() if text is None else path.write_text(text)

    return setup


def profile_file(**fields) -> Callable:
    """`p.yaml`: the h100-80gb profile with `fields` changed."""

    def setup(case: Path, shared: Shared) -> None:
        import yaml

        data = yaml.safe_load((ROOT / "deploy" / "profiles" / "h100-80gb.yaml").read_text())
        (case / "p.yaml").write_text(yaml.safe_dump({**data, **fields}))

    return setup


def user_profile(case: Path, shared: Shared) -> None:
    """A broken profile in $LCSERVE_HOME/profiles, which every profile lookup reads."""
    (case / "home" / "profiles").mkdir(parents=True)
    (case / "home" / "profiles" / "mine.yaml").write_text(
        "name: mine\nkind: gpu\nmemory_mib: 1000\ncount: two\nblock_size: 16\n"
    )


def port_in_use(case: Path, shared: Shared) -> None:
    """Hold the port `port` names: a listening socket the case's command meets (closed by the GC)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    HELD_SOCKETS.append(s)
    (case / "port").write_text(str(s.getsockname()[1]))


HELD_SOCKETS: list[socket.socket] = []
KV_ENV = "VLLM_CPU_KVCACHE_SPACE"
NOT_KV_FLAG = ("--kv-cache-gib",)  # serve has no such flag: an error must name the variable instead
LLAMA = "deploy plan --model m --profile h100-80gb"
RENDER = "deploy render --model {base} --profile h100-80gb --target k8s"
USERS = "remove the folder yourself or pick a new --out"  # the way on, for a folder lcserve did not write

MORE_CASES = [
    # ---- environment variables, named as the user set them (the CPU profile: the variable sizes its KV cache)
    case("env", "kvcache-word", "serve {base} --profile cpu --dry-run", 2, f"{KV_ENV}='abc'", "whole number of GiB",
         "unset it", env={KV_ENV: "abc"}, absent=NOT_KV_FLAG),
    case("env", "kvcache-zero", "serve {base} --profile cpu --dry-run", 2, f"{KV_ENV}='0'", "at least 1", env={KV_ENV: "0"},
         absent=NOT_KV_FLAG),
    case("env", "kvcache-negative", "serve {base} --profile cpu --dry-run", 2, f"{KV_ENV}='-2'", env={KV_ENV: "-2"},
         absent=NOT_KV_FLAG),
    case("env", "kvcache-fraction", "serve {base} --profile cpu --dry-run", 2, f"{KV_ENV}='1.5'", env={KV_ENV: "1.5"},
         absent=NOT_KV_FLAG),
    case("env", "kvcache-above-ram", "serve {base} --profile cpu --dry-run", 2, f"{KV_ENV} 100000: must be from 1",
         "largest feasible", env={KV_ENV: "100000"}, absent=NOT_KV_FLAG),
    case("env", "kvcache-word-with-adapter", "serve {base} --profile cpu --adapter w={adapter} --dry-run", 2, f"{KV_ENV}='4GB'",
         env={KV_ENV: "4GB"}, absent=NOT_KV_FLAG),
    case("env", "cpu-lora-ops-bogus", "serve {base} --profile cpu --adapter w={adapter} --dry-run", 2,
         "LCSERVE_CPU_LORA_OPS='bogus'", "segmented or stock", env={"LCSERVE_CPU_LORA_OPS": "bogus"}),
    case("env", "cpu-lora-ops-case", "serve {base} --profile cpu --dry-run", 2, "LCSERVE_CPU_LORA_OPS='Segmented'",
         "set it to segmented or stock", env={"LCSERVE_CPU_LORA_OPS": "Segmented"}),
    case("serve_vllm.sh", "kvcache-word", "{base} 8000 --profile cpu --dry-run", 2, f"{KV_ENV}='abc'", "unset it",
         env={KV_ENV: "abc"}, absent=NOT_KV_FLAG),
    case("serve_vllm.sh", "kvcache-zero", "{base} 8000 --profile cpu --dry-run", 2, f"{KV_ENV}='0'", env={KV_ENV: "0"},
         absent=NOT_KV_FLAG),
    case("serve_vllm.sh", "cpu-lora-ops-bogus", "{base} 8000 --profile cpu --dry-run", 2, "LCSERVE_CPU_LORA_OPS='bogus'",
         env={"LCSERVE_CPU_LORA_OPS": "bogus"}),
    # ---- adapter configs
    case("adapters", "rank-zero", "adapters inspect a --base {base}", 2, "field `r` is 0",
         "must be a positive integer", setup=edit_config(r=0)),
    case("adapters", "rank-negative", "adapters inspect a --base {base}", 2, "field `r` is -4",
         "must be a positive integer", setup=edit_config(r=-4)),
    case("adapters", "alpha-negative", "adapters inspect a --base {base}", 2, "field `lora_alpha` is -8",
         "must be a positive number", setup=edit_config(lora_alpha=-8)),
    case("adapters", "alpha-zero", "adapters inspect a --base {base}", 2, "field `lora_alpha` is 0",
         "must be a positive number", setup=edit_config(lora_alpha=0)),
    case("adapters", "target-modules-empty", "adapters inspect a --base {base}", 2,
         "field `target_modules` is missing or empty", "re-save the adapter", setup=edit_config(target_modules=[])),
    case("adapters", "target-modules-numbers", "adapters inspect a --base {base}", 2,
         "field `target_modules` is [1, 2]", "re-save the adapter", setup=edit_config(target_modules=[1, 2])),
    case("adapters", "peft-type-other", "adapters inspect a --base {base}", 2, "peft_type is IA3",
         "LoRA adapters only", setup=edit_config(peft_type="IA3")),
    case("adapters", "weights-missing", "adapters inspect a --base {base}", 2, "no adapter_model.safetensors",
         "save the adapter with safe_serialization=True", setup=remove("adapter_model.safetensors")),
    case("adapters", "weights-zero-bytes", "adapters inspect a --base {base}", 2, "adapter_model.safetensors",
         "re-create or re-download it", setup=truncate_weights(0)),
    case("adapters", "merge-rank-zero", "adapters merge a --base {base} --out out", 2, "field `r` is 0",
         setup=edit_config(r=0)),
    case("adapters", "merge-weights-zero-bytes", "adapters merge a --base {base} --out out", 2,
         "adapter_model.safetensors", "re-create or re-download it", setup=truncate_weights(0)),
    case("adapters", "scale-alpha-negative", "adapters scale a --scale 0.5 --out out", 2,
         "field `lora_alpha` is -8", setup=edit_config(lora_alpha=-8)),
    case("adapters", "scale-weights-missing", "adapters scale a --scale 0.5 --out out", 2,
         "adapter_model.safetensors", setup=remove("adapter_model.safetensors")),
    case("cli", "serve-adapter-rank-zero", "serve {base} --adapter w=a --dry-run", 2, "field `r` is 0",
         setup=edit_config(r=0)),
    case("cli", "serve-adapter-weights-zero-bytes", "serve {base} --adapter w=a --dry-run", 2,
         "adapter_model.safetensors", setup=truncate_weights(0)),
    case("planner", "adapter-target-modules-empty", "deploy plan --model {base} --profile h100-80gb --adapter a", 2,
         "field `target_modules` is missing or empty", setup=edit_config(target_modules=[])),
    # ---- model configs
    case("planner", "config-not-json", LLAMA, 2, "m/config.json: unreadable JSON", "re-create or re-download",
         setup=files(**{"m/config.json": "this is not JSON at all"})),
    case("planner", "config-empty-file", LLAMA, 2, "m/config.json: unreadable JSON", setup=files(**{"m/config.json": ""})),
    case("planner", "config-not-utf8", LLAMA, 2, "m/config.json", "re-create or re-download",
         setup=raw_file("m/config.json", b"\xff\xfe{\x00")),
    case("planner", "heads-zero", LLAMA, 2, "num_attention_heads", "0", "fix config.json",
         setup=model_config(num_attention_heads=0)),
    case("planner", "kv-heads-zero", LLAMA, 2, "num_key_value_heads", "fix config.json",
         setup=model_config(num_key_value_heads=0)),
    case("planner", "kv-heads-do-not-divide", LLAMA, 2, "num_key_value_heads 3", "divide num_attention_heads 64",
         "fix config.json", setup=model_config(num_key_value_heads=3)),
    case("planner", "hidden-not-divisible-by-heads", LLAMA, 2, "hidden_size 8100", "num_attention_heads 64",
         "head_dim", setup=model_config(hidden_size=8100)),
    case("planner", "layers-zero", LLAMA, 2, "num_hidden_layers", "fix config.json",
         setup=model_config(num_hidden_layers=0)),
    case("planner", "heads-a-word", LLAMA, 2, "num_attention_heads", "'many'", "fix config.json",
         setup=model_config(num_attention_heads="many")),
    case("planner", "hidden-negative", LLAMA, 2, "hidden_size", "-8192", setup=model_config(hidden_size=-8192)),
    case("planner", "sharded-index-missing-shard", "deploy plan --model sb --profile h100-80gb", 2,
         "model-00002-of-00002.safetensors", "re-download", setup=sharded_base()),
    case("cli", "serve-sharded-index-missing-shard", "serve sb --dry-run", 2, "model-00002-of-00002.safetensors",
         "re-download", setup=sharded_base()),
    case("adapters", "merge-base-missing-shard", "adapters merge {adapter} --base sb --out out", 2,
         "model-00002-of-00002.safetensors", setup=sharded_base()),
    case("cli", "serve-config-not-json", "serve m --dry-run", 2, "m/config.json: unreadable JSON",
         setup=files(**{"m/config.json": "not json"})),
    case("cli", "serve-heads-zero", "serve m --dry-run", 2, "num_attention_heads", setup=model_config(num_attention_heads=0)),
    # ---- serve
    case("cli", "serve-duplicate-adapter-names", "serve {base} --adapter w={adapter} --adapter w=a --dry-run", 2,
         "--adapter w", "twice", setup=copy_adapter),
    case("cli", "serve-adapter-named-like-base", "serve {base} --adapter base={adapter} --dry-run", 2,
         "--adapter base", "served model", "--served-model-name"),
    case("cli", "serve-adapter-named-like-served-name",
         "serve {base} --served-model-name w --adapter w={adapter} --dry-run", 2, "--adapter w", "served model"),
    # the port: checked on the real launch path, before vLLM starts (a dry run plans, it binds nothing); the
    # unknown vLLM flag makes a launch that got past the check fail in seconds instead of serving
    case("cli", "serve-port-in-use", "serve {base} --base-only --port {port} -- --lcserve-no-such-flag", 2,
         "--port {port}: 127.0.0.1:{port} is in use", "pick another --port", setup=port_in_use),
    case("cli", "serve-port-in-use-no-gateway", "serve {base} --port {port} --no-gateway -- --lcserve-no-such-flag",
         2, "is in use", "pick another --port", setup=port_in_use),
    case("serve_vllm.sh", "port-in-use", "{base} {port} -- --lcserve-no-such-flag", 2,
         "PORT {port}: 127.0.0.1:{port} is in use", "pick another PORT", setup=port_in_use),
    case("cli", "serve-mode-merge-two-adapters", "serve {base} --mode merge --adapter w={adapter} --adapter v=a --dry-run",
         2, "merge", setup=copy_adapter),
    # ---- deploy render
    case("render", "unknown-target", "deploy render --model {base} --profile h100-80gb --target helm --out out", 2,
         "--target helm: unknown target", "choose one of"),
    case("render", "lws-on-one-node", "deploy render --model {base} --profile h100-80gb --target lws --out out", 2,
         "--target lws is for plans across nodes", "render --target k8s"),
    case("render", "k8s-across-nodes", "deploy render --model m --profile h100-80gb --gpus 8 --nodes 2 --target k8s "
         "--out out", 2, "runs one node per replica", "render --target lws", setup=files(**{"m/config.json": LLAMA_70B})),
    case("render", "missing-model", "deploy render --model /nonexistent --profile h100-80gb --target k8s --out out",
         2, "/nonexistent: not a folder"),
    case("render", "context-above-max", RENDER + " --max-model-len 99999 --out out", 2,
         "above the derived maximum 4096", "largest feasible"),
    case("render", "out-exists-users", RENDER + " --out out", 2, "--out out: holds files lcserve did not write",
         USERS, setup=output_folder()),
    case("render", "force-users-folder", RENDER + " --out out --force", 2, "--force replaces only lcserve's own",
         USERS, setup=output_folder()),
    case("render", "force-regular-file", RENDER + " --out out --force", 2, "--out out: exists and is not a folder",
         "pick a new --out", setup=files(out="my notes")),
    case("render", "force-working-directory", RENDER + " --out . --force", 2,
         "--out .: is the working directory or a folder above it", "pick a new --out", setup=files(notes="mine")),
    case("render", "force-folder-above", RENDER + " --out .. --force", 2,
         "--out ..: is the working directory or a folder above it"),
    case("render", "working-directory-without-force", RENDER + " --out .", 2, "is the working directory"),
    case("render", "force-model-folder", "deploy render --model mb --profile h100-80gb --target k8s --out mb --force",
         2, "is the model folder", "an input of this command", setup=marked_base),
    case("render", "force-adapter-folder", RENDER + " --adapter {adapter} --out {adapter} --force", 2,
         "is the adapter folder", "an input of this command"),
    case("render", "marked-without-force", RENDER + " --out out", 2, "holds an earlier lcserve output",
         "pass --force", setup=output_folder(marked=True)),
    case("render", "bad-profile", "deploy render --model {base} --profile p.yaml --target k8s --out out", 2,
         "p.yaml: missing field(s)", setup=files(**{"p.yaml": "name: x\n"})),
    # ---- --force everywhere else: merge, scale, probe
    case("adapters", "merge-force-users-folder", "adapters merge {adapter} --base {base} --out out --force", 2,
         "--out out: holds files lcserve did not write", USERS, setup=output_folder()),
    case("adapters", "merge-force-regular-file", "adapters merge {adapter} --base {base} --out out --force", 2,
         "--out out: exists and is not a folder", setup=files(out="mine")),
    case("adapters", "merge-force-working-directory", "adapters merge {adapter} --base {base} --out . --force", 2,
         "is the working directory", setup=files(notes="mine")),
    case("adapters", "merge-force-folder-above", "adapters merge {adapter} --base {base} --out .. --force", 2,
         "is the working directory or a folder above it"),
    case("adapters", "merge-force-marked-base", "adapters merge {adapter} --base mb --out mb --force", 2,
         "lcserve never writes a base model", setup=marked_base),
    case("adapters", "merge-marked-without-force", "adapters merge {adapter} --base {base} --out out", 2,
         "holds an earlier lcserve output", "pass --force", setup=output_folder(marked=True)),
    case("adapters", "scale-force-users-folder", "adapters scale {adapter} --scale 0.5 --out out --force", 2,
         "--out out: holds files lcserve did not write", USERS, setup=output_folder()),
    case("adapters", "scale-force-regular-file", "adapters scale {adapter} --scale 0.5 --out out --force", 2,
         "exists and is not a folder", setup=files(out="mine")),
    case("adapters", "scale-force-working-directory", "adapters scale {adapter} --scale 0.5 --out . --force", 2,
         "is the working directory", setup=files(notes="mine")),
    case("adapters", "scale-force-marked-output-holding-the-adapter", "adapters scale o/a --scale 0.5 --out o --force",
         2, "is the adapter folder", "an input of this command", setup=adapter_inside_marked_output),
    case("probe", "out-working-directory", "probe --url {fake} --base base --out .", 2, "is the working directory",
         setup=files(notes="mine")),
    case("probe", "out-folder-above", "probe --url {fake} --base base --out ..", 2, "is the working directory"),
    case("probe", "out-users-folder-with-probe-names", "probe --url {fake} --base base --out out", 2,
         "holds files lcserve did not write", USERS, setup=output_folder(**{"report.md": "my report"})),
    # ---- deploy check: refused before any engine starts
    case("check", "missing-model", "deploy check --model /nonexistent --profile cpu", 2, "/nonexistent: not a folder"),
    case("check", "unknown-profile", "deploy check --model {base} --profile nosuch", 2, "--profile nosuch: unknown profile"),
    case("check", "context-above-max", "deploy check --model {base} --profile cpu --max-model-len 99999", 2,
         "above the derived maximum 4096"),
    case("check", "config-only-model", "deploy check --model cfg --profile cpu", 2, "cfg", "weights",
         setup=config_only),
    case("check", "timeout-zero", "deploy check --model {base} --profile cpu --timeout 0", 2, "--timeout"),
    case("check", "kv-cache-gib-zero", "deploy check --model {base} --profile cpu --kv-cache-gib 0", 2,
         "--kv-cache-gib 0: must be from 1"),
    # ---- a user's profile file
    case("planner", "profile-count-word", "deploy plan --model {base} --profile p.yaml", 2, "p.yaml", "count",
         "'two'", setup=profile_file(count="two")),
    case("planner", "profile-count-zero", "deploy plan --model {base} --profile p.yaml", 2, "p.yaml", "count",
         setup=profile_file(count=0)),
    case("planner", "profile-memory-negative", "deploy plan --model {base} --profile p.yaml", 2, "p.yaml",
         "memory_mib", setup=profile_file(memory_mib=-5)),
    case("planner", "profile-block-size-word", "deploy plan --model {base} --profile p.yaml", 2, "p.yaml",
         "block_size", setup=profile_file(block_size="big")),
    case("planner", "profile-kind-other", "deploy plan --model {base} --profile p.yaml", 2,
         "kind must be 'gpu' or 'cpu'", setup=profile_file(kind="tpu")),
    case("planner", "profile-a-list", "deploy plan --model {base} --profile p.yaml", 2,
         "a profile must be a YAML mapping", setup=files(**{"p.yaml": "- 1\n- 2\n"})),
    case("planner", "profile-file-missing", "deploy plan --model {base} --profile nope.yaml", 2, "nope.yaml"),
    case("planner", "profile-broken-in-home", "deploy plan --model {base} --profile h100-80gb", 2, "mine.yaml",
         "count", setup=user_profile),
    # ---- the embedding commands
    case("embedding", "plan-format-yaml", "deploy plan --model e --profile h100-80gb --format yaml", 2,
         "an embedding model's plan prints as --format table, json or args", setup=embedding_model),
    case("embedding", "plan-config-out", "deploy plan --model e --profile h100-80gb --config-out c.yaml", 2,
         "an embedding model's plan prints as", setup=embedding_model),
    case("embedding", "serve-policy-unknown", "serve e --embedding-policy nope --dry-run", 2,
         "'nope' is not one of", setup=embedding_model),
    case("embedding", "serve-training-len-zero", "serve e --training-len 0 --dry-run", 2, "--training-len",
         setup=embedding_model),
    case("embedding", "serve-modules-not-a-list", "serve e --dry-run", 2, "modules.json: expected a JSON list",
         setup=edit_embedding("modules.json", "{}")),
    case("embedding", "plan-modules-not-json", "deploy plan --model e --profile h100-80gb", 2, "modules.json",
         "re-create or re-download", setup=edit_embedding("modules.json", "not json")),
    case("embedding", "serve-sentence-config-not-json", "serve e --dry-run", 2, "sentence_bert_config.json",
         setup=edit_embedding("sentence_bert_config.json", "{")),
    case("embedding", "serve-context-above-max", "serve e --max-model-len 99999 --dry-run", 2,
         "--max-model-len 99999 is beyond the 128 positions of e", "serve at most 128", setup=embedding_model),
    case("embedding", "serve-adapter-on-embedding-model", "serve e --adapter w={adapter} --dry-run", 2, "w",
         setup=embedding_model),
    case("probe", "training-length-zero", "probe --url {fake} --training-length 0 --out out", 2,
         "'--training-len': 0 is not in the range"),
]  # fmt: skip


CASES += MORE_CASES


@dataclass
class Outcome:
    exit_code: int
    stdout: str
    stderr: str
    crashed: str | None  # the exception a real run would print as a traceback


def run_case(c: Case, folder: Path, shared: Shared) -> Outcome:
    port = (folder / "port").read_text() if (folder / "port").exists() else ""
    args = [
        a.format(base=shared.base, adapter=shared.adapter, fake=shared.fake_url, dead=shared.dead_url, port=port)
        for a in c.args
    ]
    env = {"LCSERVE_HOME": str(folder / "home"), **dict(c.env)}
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


def problems(c: Case, out: Outcome, modified: list[str], port: str = "") -> list[str]:
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
    fragments = [f.replace("{port}", port) for f in c.fragments]  # a case's held port (see port_in_use)
    found += [f"{fragment!r} not in {text!r}" for fragment in fragments if fragment not in text]
    return found + [f"{word!r} in {text!r}" for word in c.absent if word in text]


@pytest.mark.parametrize("c", [c.param() for c in CASES])
def test_bad_input_is_refused_cleanly(c: Case, shared, tmp_path):
    folder = tmp_path / "case"
    folder.mkdir()
    if c.setup:
        c.setup(folder, shared)
    before = snapshot(folder, shared.root)
    out = run_case(c, folder, shared)
    modified = changes(before, snapshot(folder, shared.root))
    found = problems(c, out, modified, (folder / "port").read_text() if (folder / "port").exists() else "")
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


def test_force_replaces_what_lcserve_wrote(shared, tmp_path):
    """The other side of the --force cases: each command's own output carries the marker and a second
    run with --force replaces it (and only it); the serve merge cache, from an older lcserve without
    the marker, is merged again."""
    from lcserve.adapters.cache import ensure_merged
    from lcserve.adapters.reader import read_adapter
    from lcserve.paths import OUTPUT_MARKER

    commands = {
        "merged": f"adapters merge {shared.adapter} --base {shared.base} --out merged",
        "scaled": f"adapters scale {shared.adapter} --scale 0.5 --out scaled",
        "k8s": f"deploy render --model {shared.base} --profile h100-80gb --target k8s --out k8s",
    }
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for out, command in commands.items():
            for extra in ([], ["--force"]):
                r = CliRunner().invoke(cli, command.split() + extra, env={"LCSERVE_HOME": str(tmp_path / "home")})
                assert r.exit_code == 0, r.output
                assert (tmp_path / out / OUTPUT_MARKER).is_file()
            (tmp_path / out / "mine.txt").write_text("the user's")  # still lcserve's folder: replaced whole
            r = CliRunner().invoke(cli, command.split() + ["--force"], env={"LCSERVE_HOME": str(tmp_path / "home")})
            assert r.exit_code == 0 and not (tmp_path / out / "mine.txt").exists(), r.output
    finally:
        os.chdir(cwd)
    old_cache = tmp_path / "home" / "merged" / "w-old"
    old_cache.mkdir(parents=True)
    (old_cache / "config.json").write_text("{}")  # an older lcserve's cache: no marker, no provenance
    ensure_merged(read_adapter(shared.adapter), shared.base, old_cache, Console(file=io.StringIO()))
    assert (old_cache / OUTPUT_MARKER).is_file() and (old_cache / "lcserve_merge.json").is_file()
    assert list(tmp_path.rglob(".*.tmp-*")) == []  # no temporary siblings left


def test_a_refused_rename_leaves_the_old_output_whole(tmp_path, monkeypatch):
    """When the system refuses to put the new folder in place (EBUSY: a mount point, a busy folder),
    the old output is moved back, one error line says so, and no temporary sibling is left."""
    import errno

    from lcserve.errors import LcserveError
    from lcserve.paths import atomic_dir

    target = tmp_path / "out"
    target.mkdir()
    (target / "report.md").write_text("the earlier output")
    before = snapshot(tmp_path)
    rename = Path.rename

    def busy(self, new):
        if self.name.startswith(".out.tmp-") and not self.name.endswith(".old") and Path(new) == target:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        return rename(self, new)

    monkeypatch.setattr(Path, "rename", busy)
    with pytest.raises(LcserveError, match="out: cannot replace it \\(Device or resource busy\\); nothing was changed"):
        with atomic_dir(target) as tmp:
            (tmp / "report.md").write_text("the new output")
    assert snapshot(tmp_path) == before


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
    method: str = "POST"

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


CHAT = "/v1/chat/completions"
TEXT = {"Content-Type": "text/plain"}
HTTP_CASES += [
    HttpCase("empty-body", "/v1/completions", b"", 400, ("the request body is empty", "send one JSON object")),
    HttpCase("blank-body", CHAT, b"  \n", 400, ("the request body is empty", "send one JSON object")),
    HttpCase("embeddings-empty-body", "/v1/embeddings", b"", 400, ("the request body is empty",)),
    HttpCase("max-tokens-zero", "/v1/completions", {"model": "base", "prompt": "hi", "max_tokens": 0}, 400,
             ("`max_tokens` is 0", "must be at least 1")),
    HttpCase("max-tokens-negative", "/v1/completions", {"model": "base", "prompt": "hi", "max_tokens": -5}, 400,
             ("`max_tokens` is -5", "must be at least 1")),
    HttpCase("chat-max-tokens-zero", CHAT, {"model": "base", "messages": [], "max_tokens": 0}, 400,
             ("`max_tokens` is 0",)),
    HttpCase("chat-max-completion-tokens-negative", CHAT,
             {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -1}, 400,
             ("`max_completion_tokens` is -1", "must be at least 1")),
    HttpCase("chat-without-messages", CHAT, {"model": "base", "max_tokens": 4}, 400,
             ("the chat request has no `messages`", '"messages": [{"role": "user"')),
    HttpCase("chat-messages-a-string", CHAT, {"model": "base", "messages": "hi"}, 400,
             ('`messages` is "hi"', "send a list")),
    HttpCase("completion-without-prompt", "/v1/completions", {"model": "base", "max_tokens": 4}, 400,
             ("the completion request has no `prompt`", 'send "prompt"')),
    HttpCase("wrong-method-get", "/v1/completions", b"", 405, ("GET /v1/completions: method not allowed",
             "allowed: POST"), method="GET"),
    HttpCase("wrong-method-put", CHAT, {"model": "base"}, 405, ("PUT /v1/chat/completions: method not allowed",
             "allowed: POST"), method="PUT"),
    HttpCase("wrong-method-delete-models", "/v1/models", b"", 405, ("method not allowed", "allowed: GET"),
             method="DELETE"),
    HttpCase("content-type-text", "/v1/completions", {"model": "base", "prompt": "hi"}, 400,
             ("Content-Type text/plain is not accepted", "Content-Type: application/json"), headers=TEXT),
    HttpCase("content-type-form", CHAT, b"model=base", 400, ("application/x-www-form-urlencoded is not accepted",),
             headers={"Content-Type": "application/x-www-form-urlencoded"}),
    HttpCase("embeddings-content-type-text", "/v1/embeddings", {"model": "base", "input": "hi"}, 400,
             ("Content-Type text/plain is not accepted",), headers=TEXT),
    HttpCase("unknown-route", "/v1/nothing", {"model": "base"}, 404, ("/v1/nothing: no such route",)),
]  # fmt: skip


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
            r = httpx.request(
                c.method,
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


def test_the_traceback_detectors_fire_on_planted_crashes(shared, tmp_path, monkeypatch, caplog):
    """Each traceback detector meets a real crash, planted: a command whose code raises (the CLI
    detector), a Python process that dies printing its traceback (the printed-text detector), and a
    gateway handler that raises (the log detector). Disable a detector and this test fails."""
    import sys

    import lcserve.adapters.cli as adapters_cli

    def planted(*_args, **_kwargs):
        raise KeyError("planted")

    folder = tmp_path / "case"
    folder.mkdir()
    inspect = case("adapters", "planted-crash", "adapters inspect {adapter} --base {base}", 2, "x")
    with monkeypatch.context() as m:
        m.setattr(adapters_cli, "read_adapter", planted)
        out = run_case(inspect, folder, shared)
    assert out.crashed == "KeyError('planted')"
    assert problems(inspect, out, [])[0] == "traceback: KeyError('planted')"

    died = subprocess.run([sys.executable, "-c", "raise KeyError('planted')"], capture_output=True, text=True)
    printed = Outcome(2, "", died.stderr + "error: planted\n", None)
    assert problems(case("cli", "printed", "x", 2), printed, [])[0] == "traceback: a traceback"

    monkeypatch.setattr(gw.Admission, "check_request", planted)
    crash = HttpCase("planted-crash", "/v1/completions", {"model": "base", "prompt": "hi"}, 500, ())
    r, logged, seen = send(crash, caplog)
    assert r.status_code == 500 and seen == 0
    assert http_problems(crash, r, logged, seen)[0].startswith("traceback: the gateway logged"), logged


def test_the_gateway_checks_fail_on_what_they_must_catch(caplog):
    """A request the gateway accepts, checked as if it had to be refused: every check but the log
    check reports it (that one meets a planted crash in the test above)."""
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


def test_the_corpus_covers_every_group_with_at_least_160_cases():
    counts = Counter(c.group for c in CASES) + Counter("gateway" for _ in HTTP_CASES)
    assert set(counts) == set(GROUPS) and min(counts.values()) >= 6, counts
    assert sum(counts.values()) >= 160, counts
    forced = [c for c in CASES if "--force" in c.args]
    assert {c.args[0] if c.args[0] != "adapters" else c.args[1] for c in forced} >= {"deploy", "merge", "scale"}
