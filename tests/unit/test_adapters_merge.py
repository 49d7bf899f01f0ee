"""Streaming merge + verify on tiny random bases (Gemma 3 text and GPT-2) with real PEFT adapters.

Tiny models (and a 512-token BPE tokenizer trained here on the shipped corpus) keep this
fast; `verify` runs its real prompt set on them. The same checks on the real Gemma 3 270M
are integration tests.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel

from lcserve.adapters.inspection import Verdict, inspect_adapter
from lcserve.adapters.merge import PROVENANCE, long_context_fields, merge_adapter
from lcserve.adapters.reader import read_adapter
from lcserve.adapters.style import corpus_examples
from lcserve.adapters.verify import FLOOR_MARGIN, MIN_TOLERANCE, verify_merge
from lcserve.embedded import CHAT_TEMPLATE
from lcserve.errors import AdapterError, LcserveError
from lcserve.paths import OUTPUT_MARKER

VOCAB = 512
LONG = 300  # long prompt for verify on tiny models (> their sliding window of 16)


def _save_tokenizer(model_dir: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
    )
    bpe.train_from_iterator([r["response"] for r in corpus_examples("train")], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model_dir)
    return model_dir


def _gemma(path: Path, hidden: int = 32, shard: str | None = None) -> Path:
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
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
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return _save_tokenizer(path)


def _gpt2(path: Path) -> Path:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=1024))
    model.to(torch.bfloat16).save_pretrained(path)
    return _save_tokenizer(path)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: thread hand-offs cost more than the work (and stall on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {
        "gemma": _gemma(root / "gemma"),
        "gpt2": _gpt2(root / "gpt2"),
        "gemma-sharded": _gemma(root / "gemma-sharded", shard="20KB"),
        "gemma-wide": _gemma(root / "gemma-wide", hidden=48),
    }


def make_adapter(base: Path, out: Path, seq_len: int | None = 128, **lora) -> Path:
    """A real PEFT adapter with random, non-zero weights (so a merge is never an identity)."""
    torch.manual_seed(1)
    cls = GPT2LMHeadModel if "gpt2" in base.name else Gemma3ForCausalLM
    model = get_peft_model(
        cls.from_pretrained(base, dtype=torch.float32), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora)
    )
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:  # LoRA A/B, DoRA magnitudes, modules_to_save copies, trained biases
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(out)
    if seq_len:
        (out / "lcserve_adapter.json").write_text(json.dumps({"training_seq_len": seq_len}))
    return out


CASES = {
    "lora": (
        "gemma",
        dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        Verdict.MOUNT,
    ),
    "rslora": ("gemma", dict(target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True), Verdict.MOUNT),
    "patterns": (
        "gemma",
        dict(
            target_modules=["q_proj", "v_proj", "up_proj"],
            rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 8},
            alpha_pattern={"up_proj": 3},
        ),
        Verdict.MOUNT,
    ),
    "dora": ("gemma", dict(target_modules=["q_proj", "o_proj", "gate_proj"], use_dora=True), Verdict.MERGE),
    "modules_to_save": (
        "gemma",
        dict(target_modules=["k_proj"], modules_to_save=["post_attention_layernorm"]),
        Verdict.MERGE,
    ),
    "embedding": ("gemma", dict(target_modules=["embed_tokens", "q_proj"]), Verdict.MERGE),
    "sharded": ("gemma-sharded", dict(target_modules=["q_proj", "down_proj"]), Verdict.MOUNT),
    "fan_in_fan_out+bias": (
        "gpt2",
        dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, bias="all"),
        Verdict.MERGE,
    ),
    "dora+fan_in_fan_out": ("gpt2", dict(target_modules=["c_attn"], fan_in_fan_out=True, use_dora=True), Verdict.MERGE),
    "lora_bias": ("gpt2", dict(target_modules=["c_attn"], fan_in_fan_out=True, lora_bias=True), Verdict.MERGE),
}


@pytest.mark.parametrize("case", list(CASES))
def test_merge_equals_peft(case, bases, tmp_path):
    base_name, lora, verdict = CASES[case]
    base = bases[base_name]
    adapter = read_adapter(make_adapter(base, tmp_path / "adapter", **lora))
    assert inspect_adapter(adapter, base).verdict == verdict

    exact = merge_adapter(adapter, base, tmp_path / "fp32", dtype="fp32")
    result = verify_merge(exact.out_dir, adapter, base, long_tokens=LONG)
    assert result.passed, result
    assert result.max_abs_diff < 1e-4  # fp32 merge: PEFT's function up to float error
    assert result.adapter_effect > 100 * max(result.max_abs_diff, 1e-6)  # ... and the adapter does change it
    assert result.long_prompt_tokens == LONG > 128  # past the recorded training length

    stored = merge_adapter(adapter, base, tmp_path / "as-base")  # default: the base's dtype (bf16)
    rounded = verify_merge(stored.out_dir, adapter, base, long_tokens=LONG)
    assert rounded.merged_dtype == "BF16" and rounded.passed, rounded
    assert rounded.tolerance == max(MIN_TOLERANCE, FLOOR_MARGIN * rounded.rounding_floor)
    assert rounded.rounding_floor < result.adapter_effect / 10  # PEFT's forward, not another function


def test_merged_folder_keeps_base_config_tokenizer_and_records_provenance(bases, tmp_path):
    base = bases["gemma-sharded"]
    adapter = make_adapter(base, tmp_path / "adapter", seq_len=256, target_modules=["q_proj"])
    out = merge_adapter(read_adapter(adapter), base, tmp_path / "merged").out_dir
    base_config, config = (json.loads((d / "config.json").read_text()) for d in (base, out))
    assert long_context_fields(config) == long_context_fields(base_config) != {}
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes()
    base_index = json.loads((base / "model.safetensors.index.json").read_text())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"] and len(set(index["weight_map"].values())) > 1
    provenance = json.loads((out / PROVENANCE).read_text())
    assert provenance["adapter_training_seq_len"] == 256
    assert set(provenance["base_safetensors_sha256"]) == set(base_index["weight_map"].values())
    assert len(provenance["adapter_sha256"]) == 64 and provenance["merged_modules"] == 2


def test_tied_embedding_lora_unties_lm_head(bases, tmp_path):
    """PEFT applies an embedding LoRA to the input side only: the merged model gets its own lm_head."""
    base = bases["gemma"]
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["embed_tokens"])
    out = merge_adapter(read_adapter(adapter), base, tmp_path / "merged", dtype="fp32").out_dir
    weights = load_file(out / "model.safetensors")
    base_weights = load_file(base / "model.safetensors")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert torch.equal(weights["lm_head.weight"], base_weights["model.embed_tokens.weight"].float())
    assert not torch.equal(weights["model.embed_tokens.weight"], weights["lm_head.weight"])


# ---------------------------------------------------------------- bad input: one clear line, nothing written


def _snapshot(folder: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.fixture
def good_adapter(bases, tmp_path) -> Path:
    return make_adapter(bases["gemma"], tmp_path / "good", target_modules=["q_proj", "v_proj"])


def _truncate(adapter: Path) -> None:
    path = adapter / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _poison(value: float):
    def damage(adapter: Path) -> None:
        path = adapter / "adapter_model.safetensors"
        tensors = load_file(path)
        key = next(k for k in tensors if "lora_B" in k)
        tensors[key][0, 0] = value
        save_file(tensors, path)

    return damage


BAD_INPUTS = {
    "missing config": (lambda a: (a / "adapter_config.json").unlink(), "adapter_config.json: missing"),
    "corrupt config": (lambda a: (a / "adapter_config.json").write_text("{not json"), "not valid JSON"),
    "config without r": (lambda a: (a / "adapter_config.json").write_text(json.dumps({"lora_alpha": 8})), "`r`"),
    "truncated safetensors": (_truncate, "truncated safetensors"),
    "NaN weights": (_poison(math.nan), "NaN/inf"),
    "inf weights": (_poison(math.inf), "NaN/inf"),
    "pickle only": (lambda a: (a / "adapter_model.safetensors").rename(a / "adapter_model.bin"), "--allow-pickle"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_adapter_is_refused_and_nothing_is_written(case, good_adapter, bases, tmp_path):
    damage, message = BAD_INPUTS[case]
    damage(good_adapter)
    base, out = bases["gemma"], tmp_path / "out"
    before = _snapshot(base)
    with pytest.raises(LcserveError) as err:
        merge_adapter(read_adapter(good_adapter), base, out)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
    assert _snapshot(base) == before


def test_adapter_that_does_not_fit_the_base(bases, tmp_path):
    adapter = read_adapter(make_adapter(bases["gemma-wide"], tmp_path / "wide", target_modules=["q_proj"]))
    report = inspect_adapter(adapter, bases["gemma"])
    assert report.verdict == "unusable" and "do not fit base weight" in report.reasons[0]
    with pytest.raises(AdapterError, match="do not fit base weight"):
        merge_adapter(adapter, bases["gemma"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_adapter_for_another_architecture(bases, tmp_path):
    adapter = read_adapter(
        make_adapter(bases["gpt2"], tmp_path / "gpt2-adapter", target_modules=["c_attn"], fan_in_fan_out=True)
    )
    with pytest.raises(AdapterError, match="trained for another architecture"):
        merge_adapter(adapter, bases["gemma"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_output_folder_rules(good_adapter, bases, tmp_path):
    base, adapter = bases["gemma"], read_adapter(good_adapter)
    before = _snapshot(base)
    for out in (base, base / "sub", base.parent):
        with pytest.raises(AdapterError, match="never writes a base model"):
            merge_adapter(adapter, base, out, force=True)
    assert _snapshot(base) == before
    with pytest.raises(AdapterError, match="overlaps the adapter"):
        merge_adapter(adapter, base, good_adapter, force=True)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    for force in (False, True):  # --force replaces only what lcserve wrote (the marker), never the user's files
        with pytest.raises(LcserveError, match="holds files lcserve did not write"):
            merge_adapter(adapter, base, busy, force=force)
    assert (busy / "keep.txt").exists()
    merge_adapter(adapter, base, tmp_path / "merged")
    with pytest.raises(LcserveError, match="pass --force"):
        merge_adapter(adapter, base, tmp_path / "merged")
    merge_adapter(adapter, base, tmp_path / "merged", force=True)
    assert (tmp_path / "merged" / PROVENANCE).exists() and (tmp_path / "merged" / OUTPUT_MARKER).exists()


def test_cli_prints_one_line_and_exits_2(good_adapter, bases, tmp_path):
    from lcserve.cli import cli

    (good_adapter / "adapter_config.json").write_text("{")
    result = CliRunner().invoke(
        cli, ["adapters", "merge", str(good_adapter), "--base", str(bases["gemma"]), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "adapter_config.json" in lines[0]


def on_a_small_disk(size: str, script: str, disk: Path) -> subprocess.CompletedProcess:
    """`script` (sh) run with a real tmpfs of `size` mounted at `disk`, in a mount namespace of its own: a disk
    that really fills, seen only by this process."""
    disk.mkdir()
    mount = f"mount -t tmpfs -o size={size} lcserve-test {shlex.quote(str(disk))} && {script}; rc=$?; ls -A {disk}"
    return subprocess.run(
        ["unshare", "--mount", "--map-root-user", "sh", "-c", mount + "; exit $rc"], capture_output=True, text=True
    )


def test_merge_onto_a_disk_too_small_is_refused_before_writing(good_adapter, bases, tmp_path):
    lcserve = Path(sys.executable).parent / "lcserve"
    argv = [str(lcserve), "adapters", "merge", str(good_adapter), "--base", str(bases["gemma"])]
    merge = shlex.join([*argv, "--out", str(tmp_path / "disk" / "merged")])
    small = on_a_small_disk("64k", merge, tmp_path / "disk")
    assert small.returncode == 2, small.stderr
    one_line = (
        r"error: --out \S+: the merged model needs \d+ KiB and its disk has \d+ KiB free; free some space or pick .*\n"
    )
    assert re.fullmatch(one_line, small.stderr), small.stderr
    assert small.stdout == ""  # nothing left on the disk, not even a hidden temporary folder
    large = on_a_small_disk("4m", merge, tmp_path / "disk2")  # the check can pass: the same merge fits on 4 MiB
    assert large.returncode == 0, large.stderr


def test_a_disk_that_fills_midway_leaves_nothing_and_says_so(tmp_path):
    """The check before a merge cannot see other writers: a folder whose disk fills while it is written is
    removed whole, and the error says how much is free."""
    write = (
        "from pathlib import Path; from lcserve.paths import atomic_dir\n"
        f"with atomic_dir(Path({str(tmp_path / 'disk' / 'out')!r})) as tmp:\n"
        "    (tmp / 'weights').write_bytes(bytes(2**21))"
    )
    result = on_a_small_disk("1m", shlex.join([sys.executable, "-c", write]), tmp_path / "disk")
    assert result.returncode == 1
    assert "the disk filled while writing it (1.0 MiB free now); nothing was kept" in result.stderr, (
        result.stderr
    )  # given back
    assert result.stdout == ""


def test_verify_refuses_a_model_not_merged_from_this_base(good_adapter, bases):
    with pytest.raises(AdapterError, match="merged from this base"):
        verify_merge(bases["gemma-wide"], read_adapter(good_adapter), bases["gemma"])


# ---------------------------------------------------------------- verify can fail


def with_alpha(adapter: Path, out: Path, factor: float) -> Path:
    """A copy of the adapter whose lora_alpha is off by `factor`: merging it gives a slightly wrong model."""
    shutil.copytree(adapter, out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["lora_alpha"] *= factor
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def unmerge_one(merged: Path, base: Path, name: str) -> None:
    """Put the base's value of one merged tensor back: a merge that forgot one module."""
    path = merged / "model.safetensors"
    tensors = load_file(path)
    original = load_file(base / "model.safetensors")[name]
    assert not torch.equal(tensors[name], original)
    tensors[name] = original
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("case", ["lora", "dora", "embedding"])
def test_bf16_check_tells_an_exact_merge_from_a_slightly_wrong_one(case, bases, tmp_path):
    """The bf16 tolerance is 1.5x the rounding floor (what PEFT's own merge, rounded once, differs
    by), not a fixed 1.0 logit that a merge with lora_alpha 10% off stays well inside. The floor is
    small here (0.001 to 0.04 logits on these tiny models); for the tied embedding LoRA it was 320
    before the floor's PEFT merge stopped writing through the tied lm_head."""
    base_name, lora, _ = CASES[case]
    base = bases[base_name]
    good = make_adapter(base, tmp_path / "adapter", **lora)
    adapter = read_adapter(good)
    exact = verify_merge(merge_adapter(adapter, base, tmp_path / "exact").out_dir, adapter, base, long_tokens=LONG)
    off = read_adapter(with_alpha(good, tmp_path / "alpha", 1.1))
    wrong = verify_merge(merge_adapter(off, base, tmp_path / "wrong").out_dir, adapter, base, long_tokens=LONG)
    assert exact.merged_dtype == wrong.merged_dtype == "BF16"
    assert exact.rounding_floor == wrong.rounding_floor < 0.05
    assert exact.passed and exact.max_abs_diff <= 1.1 * exact.rounding_floor, exact
    assert not wrong.passed and wrong.max_abs_diff > 2 * wrong.tolerance, wrong
    assert wrong.max_abs_diff < 1.0  # the old fixed bf16 allowance passed this merge


WRONG_MERGES = {
    "exact": (0, "PASS"),
    "lora_alpha 10% high": (1, "FAIL"),
    "one tensor not merged": (1, "FAIL"),
}


@pytest.mark.parametrize("case", list(WRONG_MERGES))
def test_cli_verify_passes_the_merge_and_fails_a_wrong_one(case, bases, tmp_path):
    """`lcserve adapters verify` on a bf16 merge (the default: the base's dtype): exit 0 and PASS for
    the merge lcserve wrote, exit 1 and FAIL for one that is slightly off."""
    from lcserve.cli import cli

    base = bases["gemma"]
    good = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj", "down_proj"])
    merged = tmp_path / "merged"
    if case == "lora_alpha 10% high":
        merge_adapter(read_adapter(with_alpha(good, tmp_path / "alpha", 1.1)), base, merged)
    else:
        merge_adapter(read_adapter(good), base, merged)
    if case == "one tensor not merged":
        unmerge_one(merged, base, "model.layers.1.mlp.down_proj.weight")
    result = CliRunner().invoke(
        cli,
        ["adapters", "verify", str(merged), "--adapter", str(good), "--base", str(base), "--long-tokens", str(LONG)],
    )
    code, word = WRONG_MERGES[case]
    assert result.exit_code == code, result.output
    assert f"{word}: max |diff|" in result.stdout and "Traceback" not in result.output
