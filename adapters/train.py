"""Train the demo LoRA adapter: PEFT on the embedded Gemma 3 270M, at a SHORT sequence length.

The kit exists for adapters trained at 256 to 4096 tokens and served at 32k; the demo
adapter is such an adapter, trained at 256 tokens on the shipped lighthouse-keeper corpus
(`data/writer_corpus.jsonl`), in a few minutes on 2 CPU cores. The examples are packed end to
end into rows of exactly 256 tokens, so every position up to the training length is trained
(`training_seq_len` == `longest_row_tokens` in its metadata). Only the answer tokens are
scored, and the vocabulary projection (262144 rows) runs only at those positions, which is
most of the saving. Deterministic: fixed seed, fixed example order.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lcserve import __version__
from lcserve.embedded import embedded_model_path
from lcserve.errors import AdapterError
from lcserve.paths import atomic_dir, build_lock, demo_adapter_dir

from .style import corpus_bytes, corpus_examples
from .training_length import LCSERVE_METADATA

FORMAT_VERSION = 1


@dataclass(frozen=True)
class TrainConfig:
    seq_len: int = 256
    rank: int = 8
    alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    learning_rate: float = 1e-3  # 2e-3 is as stylish but breaks passkey retrieval even at 128 tokens
    batch_size: int = 8
    epochs: int = 1
    warmup_steps: int = 4
    seed: int = 0
    # N > 0 (the demo recipe: 1024): examples packed end to end into rows of exactly seq_len tokens,
    # N // seq_len rows per step: every seq_len gets the same data, steps and tokens per step, and only
    # the positions it trains on differ. 0: one example per row, cut at seq_len (UNPACKED_RECIPE, the
    # demo recipe before: its longest row is 94 tokens, so it never trained a position past that).
    packed_tokens_per_step: int = 1024


# The first demo recipe, one example per row; docs/findings.md's `writer` arm (benchmarks/bench_adapter_length.py).
UNPACKED_RECIPE = TrainConfig(packed_tokens_per_step=0)


def is_trained(adapter_dir: Path | None = None, config: TrainConfig = TrainConfig()) -> bool:
    """True when the folder holds an adapter trained from this corpus with this recipe."""
    adapter_dir = adapter_dir or demo_adapter_dir()
    try:
        meta = json.loads((adapter_dir / LCSERVE_METADATA).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (
        meta.get("format_version") == FORMAT_VERSION
        and (adapter_dir / "adapter_model.safetensors").exists()
        and meta.get("corpus_sha256") == corpus_sha256()
        and meta.get("train_config") == _config_json(config)
    )


def corpus_sha256() -> str:
    return hashlib.sha256(corpus_bytes()).hexdigest()


def train_demo_adapter(
    out_dir: Path | None = None,
    base_dir: Path | None = None,
    force: bool = False,
    config: TrainConfig = TrainConfig(),
    progress=None,
) -> Path:
    """Train (or reuse) the demo adapter; returns its folder. Written atomically, metadata last: a
    killed run leaves no folder that `is_trained` accepts, so the next run trains again."""
    out_dir = Path(out_dir or demo_adapter_dir())
    if is_trained(out_dir, config) and not force:
        return out_dir
    base_dir = Path(base_dir or embedded_model_path())  # before the lock: a missing base leaves nothing behind
    with build_lock(out_dir):
        if is_trained(out_dir, config) and not force:  # another process trained it while we waited
            return out_dir
        return _train(out_dir, base_dir, config, progress)


def _train(out_dir: Path, base_dir: Path, config: TrainConfig, progress) -> Path:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    examples = _tokenize(tokenizer, corpus_examples("train"), None if config.packed_tokens_per_step else config.seq_len)
    if not examples:
        raise AdapterError("the demo corpus has no training rows; reinstall lcserve")
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    model = get_peft_model(
        model,
        LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,
            target_modules=list(config.target_modules),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        ),
    )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    batches = _packed_batches(examples, config) if config.packed_tokens_per_step else _batches(examples, config)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / config.warmup_steps) * max(0.0, 1 - s / len(batches))
    )
    task = progress.add_task("training demo adapter", total=len(batches)) if progress else None

    decoder, lm_head = model.base_model.model.model, model.base_model.model.lm_head
    started, losses = time.monotonic(), []
    for input_ids, attention, labels in batches:
        hidden = decoder(input_ids=input_ids, attention_mask=attention).last_hidden_state
        scored = labels[:, 1:] != -100
        logits = lm_head(hidden[:, :-1][scored]).float()
        loss = torch.nn.functional.cross_entropy(logits, labels[:, 1:][scored])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if progress:
            progress.update(task, advance=1, description=f"training demo adapter (loss {loss.item():.3f})")

    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "README.md").unlink(missing_ok=True)
        (tmp / LCSERVE_METADATA).write_text(
            json.dumps(
                {
                    "format_version": FORMAT_VERSION,
                    "training_seq_len": config.seq_len,
                    "corpus_sha256": corpus_sha256(),
                    "corpus": "lcserve/adapters/data/writer_corpus.jsonl",
                    "base_model": str(base_dir),
                    "seed": config.seed,
                    "lcserve_version": __version__,
                    "train_config": _config_json(config),
                    "steps": len(batches),
                    "longest_row_tokens": max(ids.shape[1] for ids, _, _ in batches),
                    "examples": len(examples),
                    "loss_first": round(losses[0], 4),
                    "loss_last": round(losses[-1], 4),
                    "train_seconds": round(time.monotonic() - started, 1),
                    "torch_threads": torch.get_num_threads(),
                },
                indent=2,
            )
            + "\n"
        )
    return out_dir


def _config_json(config: TrainConfig) -> dict:
    """The recipe's identity; an unpacked recipe leaves the packing field out, so adapters trained
    before it existed stay valid."""
    fields = asdict(config)
    if not fields["packed_tokens_per_step"]:
        del fields["packed_tokens_per_step"]
    return json.loads(json.dumps(fields))


def _tokenize(tokenizer, rows: list[dict], seq_len: int | None) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) per example, cut at seq_len (None: whole)."""
    out = []
    for row in rows:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}], add_generation_prompt=True, tokenize=True
        )["input_ids"]
        answer = tokenizer(row["response"] + "<end_of_turn>", add_special_tokens=False)["input_ids"]
        ids = (list(prompt) + answer + [tokenizer.eos_token_id])[: seq_len or None]
        if len(ids) > len(prompt):
            out.append((ids, len(prompt)))
    return out


def _batches(examples: list[tuple[list[int], int]], config: TrainConfig) -> list:
    """Padded (input_ids, attention_mask, labels) batches in a seeded order, epoch by epoch."""
    import torch

    rng = random.Random(config.seed)
    batches = []
    for _ in range(config.epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order), config.batch_size):
            chunk = [examples[i] for i in order[start : start + config.batch_size]]
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.zeros(len(chunk), width, dtype=torch.long)
            attention = torch.zeros(len(chunk), width, dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            for row, (ids, prompt_len) in enumerate(chunk):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention[row, : len(ids)] = 1
                labels[row, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
            batches.append((input_ids, attention, labels))
    return batches


def pack(examples: list[tuple[list[int], int]], seq_len: int, order: list[int]) -> list[tuple[list[int], list[bool]]]:
    """Examples in `order`, end to end, cut into rows of exactly seq_len tokens (the last, shorter
    row dropped): (token ids, scored) per row, scored marking answer tokens. Pure."""
    ids, scored = [], []
    for i in order:
        tokens, prompt_len = examples[i]
        ids += tokens
        scored += [False] * prompt_len + [True] * (len(tokens) - prompt_len)
    return [(ids[s : s + seq_len], scored[s : s + seq_len]) for s in range(0, len(ids) - seq_len + 1, seq_len)]


def _packed_batches(examples: list[tuple[list[int], int]], config: TrainConfig) -> list:
    """Packed rows of seq_len tokens, packed_tokens_per_step // seq_len per step, in a seeded order;
    attention runs across example boundaries, as in plain packing, so every position up to
    seq_len is trained."""
    import torch

    if config.packed_tokens_per_step < config.seq_len:
        raise AdapterError(
            f"packed_tokens_per_step {config.packed_tokens_per_step} is below seq_len {config.seq_len}; "
            "a step must hold at least one row"
        )
    rng = random.Random(config.seed)
    rows_per_step = config.packed_tokens_per_step // config.seq_len
    batches = []
    for _ in range(config.epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        rows = pack(examples, config.seq_len, order)
        for start in range(0, len(rows), rows_per_step):
            chunk = rows[start : start + rows_per_step]
            input_ids = torch.tensor([ids for ids, _ in chunk])
            labels = torch.where(torch.tensor([s for _, s in chunk]), input_ids, -100)
            batches.append((input_ids, torch.ones_like(input_ids), labels))
    return batches
