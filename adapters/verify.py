"""Verify a merged model against what was trained: base + adapter in PEFT, in fp32.

Same prompts through both, logits compared position by position: the largest absolute
difference and the share of positions whose top-1 token agrees. One prompt is longer than
the adapter's training length (and than the sliding window), since serving past that length
is the point of the kit. The adapter's own effect (PEFT vs the plain base) is reported too:
a tolerance far below it shows the check would catch a merge that lost the adapter.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from lcserve.errors import AdapterError
from lcserve.model_config import is_embedding_model
from lcserve.model_facts import TORCH_NAMES, MergeProvenance, read_merge_provenance
from lcserve.safetensors_header import read_model_tensors

from .inspection import Verdict, inspect_adapter
from .merge import OUT_DTYPES
from .reader import LoraAdapter
from .style import corpus_examples

# Largest |logit difference| accepted. An fp32 merge computes PEFT's function up to float error
# (MIN_TOLERANCE). A bf16/fp16 merge rounds every touched weight once, as PEFT's own merge cast to
# that dtype does; how far that alone moves the logits (the "rounding floor") is measured on the
# same prompts, and the merge may differ by FLOOR_MARGIN x that. Measured: an exact merge lands at
# 0.4-1.03x the floor (tiny models and Gemma 3 270M), one with lora_alpha 10% off at 3-10x; the
# fixed 1.0-logit bf16 allowance this replaces passed the latter on adapters with a small floor.
MIN_TOLERANCE = 1e-3
FLOOR_MARGIN = 1.5
# The dtypes a merge stores its weights in (`merge --dtype`): the only ones `merged_dtype` reports
# (F64, which merge can keep "as base", is not one verify has a floor for). FP32 is exact; the
# others round every merged weight once.
MERGE_DTYPES = tuple(OUT_DTYPES.values())
ROUNDING_DTYPES = ("BF16", "F16")
MIN_TOP1_AGREEMENT = 0.95
COMPARED_POSITIONS = 64
SHORT_PROMPTS = (
    "The lighthouse keeper wrote in his log that",
    "Question: How do I keep bread fresh?\nAnswer:",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
)
CHAT_PROMPT = "How can I make my mornings calmer?"


@dataclass
class PromptCheck:
    name: str
    tokens: int
    positions: int
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    adapter_effect: float  # max |PEFT - base| on this prompt


@dataclass
class VerifyResult:
    merged_dir: str
    adapter_dir: str
    base_dir: str
    merged_dtype: str
    training_seq_len: int | None
    long_prompt_tokens: int
    tolerance: float
    min_top1_agreement: float
    rounding_floor: float  # max |logit diff| of an exact merge rounded once to merged_dtype (0 for fp32)
    max_abs_diff: float
    top1_agreement: float
    adapter_effect: float
    passed: bool
    prompts: list[PromptCheck] = field(default_factory=list)
    # "logits"; or for an embedding model "cosine distance": max_abs_diff and adapter_effect are then
    # 1 - cosine(PEFT, merged) and 1 - cosine(PEFT, base), and top1_agreement the lowest cosine
    compared: str = "logits"

    def to_json(self) -> dict:
        return asdict(self)


def verify_merge(
    merged_dir: Path,
    adapter: LoraAdapter,
    base_dir: Path,
    tolerance: float | None = None,
    long_tokens: int | None = None,
    progress=None,
    allow_pickle: bool = False,
) -> VerifyResult:
    """Compare the merged model with base + adapter (PEFT, fp32) on a fixed prompt set."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_dir, base_dir = Path(merged_dir), Path(base_dir)
    _check_inputs(merged_dir, adapter, base_dir, allow_pickle)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    if is_embedding_model(base_dir):
        return verify_embedding_merge(merged_dir, adapter, base_dir, tolerance)
    trained = adapter.training_seq_len
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    prompts = prompt_set(tokenizer, long_tokens or max(2 * (trained or 512), 600))
    dtype = merged_dtype(merged_dir)
    rounded = TORCH_NAMES[dtype] if dtype in ROUNDING_DTYPES else None
    task = progress.add_task("verifying", total=(4 if rounded else 3) * len(prompts)) if progress else None
    run = _logits_runner(prompts, progress, task)
    reference, plain, floor = _peft_logits(run, adapter, base_dir, merged_dir, rounded)
    tol = max(MIN_TOLERANCE, FLOOR_MARGIN * floor) if tolerance is None else tolerance
    merged_model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    merged_model.eval()
    merged = run(merged_model)
    del merged_model
    checks = _prompt_checks(prompts, reference, merged, plain)
    positions = sum(c.positions for c in checks)
    agreement = sum(c.top1_agreement * c.positions for c in checks) / positions
    worst = max(c.max_abs_diff for c in checks)
    return VerifyResult(
        merged_dir=str(merged_dir),
        adapter_dir=str(adapter.path),
        base_dir=str(base_dir),
        merged_dtype=dtype,
        training_seq_len=trained,
        long_prompt_tokens=max(len(ids) for _, ids in prompts),
        tolerance=tol,
        min_top1_agreement=MIN_TOP1_AGREEMENT,
        rounding_floor=floor,
        max_abs_diff=worst,
        top1_agreement=agreement,
        adapter_effect=max(c.adapter_effect for c in checks),
        passed=worst <= tol and agreement >= MIN_TOP1_AGREEMENT,
        prompts=checks,
    )


def _check_inputs(merged_dir: Path, adapter: LoraAdapter, base_dir: Path, allow_pickle: bool) -> None:
    """Refuse, before any model loads, folders that are not models, an adapter that does not fit
    the base, and a merged model whose tensors are not the base's."""
    for path, what in ((merged_dir, "merged model"), (base_dir, "base model")):
        if not (path / "config.json").exists():
            raise AdapterError(f"{path}: no config.json; pass the {what} folder")
    report = inspect_adapter(adapter, base_dir, allow_pickle=allow_pickle)
    if report.verdict == Verdict.UNUSABLE:
        raise AdapterError(f"{adapter.path}: does not fit {base_dir}: {'; '.join(report.reasons)}")
    _check_same_layout(merged_dir, base_dir)


def _logits_runner(prompts: list[tuple[str, list[int]]], progress, task):
    """A function that runs a model over the prompts: the last COMPARED_POSITIONS logits of each, in fp32."""
    import torch

    def run(model) -> list:
        out = []
        with torch.inference_mode():
            for _, ids in prompts:
                logits = model(input_ids=torch.tensor([ids]), logits_to_keep=COMPARED_POSITIONS).logits[0].float()
                out.append(logits)
                if progress:
                    progress.advance(task)
        return out

    return run


def _peft_logits(run, adapter: LoraAdapter, base_dir: Path, merged_dir: Path, rounded: str | None):
    """(reference, plain, floor): base + adapter in PEFT (fp32, at the merge's scale), the base alone,
    and the rounding floor (how far an exact merge rounded once to `rounded` moves the logits; 0 without)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = scaled_as_merged(PeftModel.from_pretrained(base_model, adapter.path), merged_dir)
    peft_model.eval()
    reference = run(peft_model)
    with peft_model.disable_adapter():
        plain = run(peft_model)
    floor = 0.0
    if rounded:
        _untie(peft_model)
        exact = peft_model.merge_and_unload().to(getattr(torch, rounded)).to(torch.float32)
        floor = max(float((ref - got).abs().max()) for ref, got in zip(reference, run(exact)))
        del exact
    del peft_model, base_model
    return reference, plain, floor


def _prompt_checks(prompts, reference: list, merged: list, plain: list) -> list[PromptCheck]:
    """Per prompt: the merged model's logits against PEFT's, and PEFT's against the plain base."""
    checks = []
    for (name, ids), ref, got, base in zip(prompts, reference, merged, plain):
        diff = (ref - got).abs()
        checks.append(
            PromptCheck(
                name=name,
                tokens=len(ids),
                positions=ref.shape[0],
                max_abs_diff=float(diff.max()),
                mean_abs_diff=float(diff.mean()),
                top1_agreement=float((ref.argmax(-1) == got.argmax(-1)).float().mean()),
                adapter_effect=float((ref - base).abs().max()),
            )
        )
    return checks


# An fp32 merge of an embedding model moves its vectors by float error only: 1 - cosine stays near
# 1e-7; a merge at the wrong scale moves them by about the adapter's own effect.
EMBEDDING_TOLERANCE = 1e-5


def verify_embedding_merge(
    merged_dir: Path, adapter: LoraAdapter, base_dir: Path, tolerance: float | None = None
) -> VerifyResult:
    """An embedding model's merge against base + adapter in PEFT: the vectors sentence-transformers
    makes (its pooling and normalization), compared by cosine, on short texts and one longer than
    the training length (up to max_seq_length, where sentence-transformers cuts)."""
    import numpy as np
    import torch
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer

    def encode(model, texts):
        return np.asarray(model.encode(texts, normalize_embeddings=True, convert_to_numpy=True), dtype=np.float64)

    reference_model = SentenceTransformer(str(base_dir), device="cpu")
    transformer = reference_model[0]
    slot = "model" if "model" in transformer._modules else "auto_model"  # sentence-transformers >= 6: `model`
    peft_model = scaled_as_merged(
        PeftModel.from_pretrained(getattr(transformer, slot).float(), adapter.path), merged_dir
    )
    setattr(transformer, slot, peft_model)
    reference_model.eval()
    trained = adapter.training_seq_len
    limit = reference_model.max_seq_length or 256
    document = " ".join(f"Q: {row['prompt']} A: {row['response']}" for row in corpus_examples("train"))
    tokenizer = reference_model.tokenizer
    long_ids = tokenizer(document, add_special_tokens=False)["input_ids"][: limit - 2]
    texts = [*SHORT_PROMPTS, CHAT_PROMPT, tokenizer.decode(long_ids)]
    names = [*(f"short-{i + 1}" for i in range(len(SHORT_PROMPTS))), "chat", f"long-{len(long_ids) + 2}"]
    with torch.inference_mode():
        reference = encode(reference_model, texts)
        with peft_model.disable_adapter():
            plain = encode(reference_model, texts)
    merged = encode(SentenceTransformer(str(merged_dir), device="cpu"), texts)
    cos = (reference * merged).sum(axis=1)
    effect = (reference * plain).sum(axis=1)
    tol = EMBEDDING_TOLERANCE if tolerance is None else tolerance
    checks = [
        PromptCheck(
            name=name,
            tokens=len(tokenizer(text)["input_ids"]),
            positions=1,
            max_abs_diff=float(abs(1 - c)),
            mean_abs_diff=float(np.abs(r - m).max()),
            top1_agreement=float(c),
            adapter_effect=float(1 - e),
        )
        for name, text, c, e, r, m in zip(names, texts, cos, effect, reference, merged)
    ]
    return VerifyResult(
        merged_dir=str(merged_dir),
        adapter_dir=str(adapter.path),
        base_dir=str(base_dir),
        merged_dtype=merged_dtype(merged_dir),
        training_seq_len=trained,
        long_prompt_tokens=max(c.tokens for c in checks),
        tolerance=tol,
        min_top1_agreement=1 - tol,
        rounding_floor=0.0,
        max_abs_diff=max(c.max_abs_diff for c in checks),
        top1_agreement=float(cos.min()),
        adapter_effect=max(c.adapter_effect for c in checks),
        passed=bool(max(c.max_abs_diff for c in checks) <= tol),
        prompts=checks,
        compared="cosine distance",
    )


def scaled_as_merged(peft_model, merged_dir: Path):
    """The PEFT reference at the LoRA scale the merge recorded (`adapters merge --scale`), so a scaled
    merge is compared with the adapter at that scale; the model itself, changed in place."""
    scale = (read_merge_provenance(merged_dir) or MergeProvenance()).lora_scale
    for module in peft_model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "scale_layer"):
            module.scale_layer(scale)
    return peft_model


def _untie(model) -> None:
    """Give every module that shares its weight with an earlier one (a tied lm_head) a copy of its own.

    PEFT's merge_and_unload writes through the shared matrix, so an embedding LoRA (or token rows
    given to embed_tokens alone) would reach lm_head too, while PEFT's forward, the reference here,
    changes the input side only: the "exact merge" of the rounding floor would then be another
    function (on a tiny tied Gemma with an embedding LoRA it put the floor at 320 logits). A tied
    token adapter still writes its rows to both copies, as PEFT's forward uses them on both sides.
    """
    import torch

    seen = set()
    for module in model.modules():
        weight = module._parameters.get("weight")
        if weight is None:
            continue
        if id(weight) in seen:
            module.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=False)
        seen.add(id(weight))


def prompt_set(tokenizer, long_tokens: int) -> list[tuple[str, list[int]]]:
    """(name, token ids): short plain prompts, a chat turn, and one long document of `long_tokens`."""
    prompts = [(f"short-{i + 1}", tokenizer(text)["input_ids"]) for i, text in enumerate(SHORT_PROMPTS)]
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": CHAT_PROMPT}], add_generation_prompt=True, tokenize=True
    )["input_ids"]
    prompts.append(("chat", list(chat)))
    document, ids = [], []
    for row in corpus_examples("train"):
        document.append(f"Q: {row['prompt']}\nA: {row['response']}\n")
        ids = tokenizer("".join(document))["input_ids"]
        if len(ids) >= long_tokens:
            break
    prompts.append((f"long-{long_tokens}", ids[:long_tokens]))
    return prompts


def _check_same_layout(merged_dir: Path, base_dir: Path) -> None:
    """A merged model has every base tensor, with the base's shape (a merge may add an lm_head)."""
    merged, base = read_model_tensors(merged_dir), read_model_tensors(base_dir)
    for name, info in base.items():
        if name not in merged or merged[name].shape != info.shape:
            raise AdapterError(
                f"{merged_dir}: tensor {name} is missing or has another shape than in {base_dir}; "
                "pass the folder merged from this base"
            )


def merged_dtype(model_dir: Path) -> str:
    """The dtype most of a model's floating-point weights are stored in (from headers)."""
    sizes: dict[str, int] = {}
    for info in read_model_tensors(model_dir).values():
        sizes[info.dtype] = sizes.get(info.dtype, 0) + info.nbytes
    floats = {k: v for k, v in sizes.items() if k in MERGE_DTYPES}
    return max(floats, key=floats.get) if floats else "BF16"
