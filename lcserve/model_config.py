"""Read a model folder the way vLLM sees it: `config.json` and safetensors headers only.

Never loads weights. The planner needs the KV layout per layer (full, sliding window,
MLA), the derived maximum length (with vLLM's RoPE rules), and the weight bytes; the
adapters code needs the linear shapes. A folder without the weights (planned before a
download) gets them from model.safetensors.index.json or from config.json arithmetic
(model_weights.py), and says which source it used. The attention-layout rules follow the
transformers config classes (which write `layer_types`) and vLLM's reading of them
(`engine/arg_utils.py`: a model without `layer_types` applies `sliding_window` to every
layer), so old and new config.json files give the same answer vLLM does.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelError
from .model_facts import config_dtype, rope_parameters, text_config, tied_embeddings
from .model_weights import WEIGHTS_FROM_HEADERS, model_weights
from .rope_check import served_model_findings
from .state_layers import StateDims, hybrid_layers

# vLLM `derive_max_model_len_and_key`: the smallest of these keys is the derived maximum.
MAX_LEN_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "model_max_length",
    "max_target_positions",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)
# RoPE types whose max_position_embeddings is already the scaled length (vLLM does not multiply).
PRESCALED_ROPE_TYPES = ("su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling")
DEFAULT_MAX_LEN = 2048  # vLLM's assumption when config.json states no length at all


@dataclass(frozen=True)
class LayerAttention:
    """One layer's KV kind: "full", "sliding" (with `window`), "mla", a hybrid's state kind ("mamba2",
    "mamba1", "gated_delta_net"; "none" for a layer without cache: lcserve.state_layers), or another
    raw layer type (for example "linear_attention" outside those families) that the planner refuses."""

    kind: str
    window: int | None = None

    def __str__(self) -> str:
        return f"sliding({self.window})" if self.kind == "sliding" else self.kind


@dataclass(frozen=True)
class MLADims:
    """Multi-head latent attention: one compressed latent plus the RoPE part per token."""

    kv_lora_rank: int
    qk_rope_head_dim: int

    @property
    def latent_dim(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclass(frozen=True)
class PoolingInfo:
    """An embedding model as vLLM's pooling runner serves it: sentence-transformers' pooling,
    normalization and max_seq_length, and the length it was trained at (with where that came from)."""

    pooling_mode: str  # mean, cls, max, lasttoken, ... (sentence-transformers' names, without `pooling_mode_`)
    normalize: bool
    max_seq_length: int | None  # sentence_bert_config.json: vLLM caps max_model_len here
    dimension: int | None
    training_len: int | None
    training_len_source: str
    sentence_transformers: bool  # modules.json present (else an encoder recognised by its config alone)


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    architecture: str
    model_type: str
    dtype: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    layers: tuple[LayerAttention, ...]
    mla: MLADims | None
    max_position_embeddings: int | None
    rope_parameters: dict
    derived_max_len: int
    derived_max_len_reason: str
    param_bytes_by_dtype: dict[str, int]
    param_count: int
    quantization: dict | None
    tie_word_embeddings: bool
    linear_shapes: dict[str, tuple[int, int]]
    weights_source: str = WEIGHTS_FROM_HEADERS  # one of WEIGHTS_FROM_*
    weights_source_reason: str = ""  # for people: why this source, and what it read
    pooling: PoolingInfo | None = None  # an embedding model (sentence-transformers folder or encoder)
    rope_findings: tuple[str, ...] = ()  # positions/RoPE that differ from the recorded base (lcserve.rope_check)
    state: StateDims | None = None  # a hybrid's recurrent-state dimensions (lcserve.state_layers)
    moe: tuple[int, int, int] = ()  # MoE: (routed experts, experts per token, expert intermediate size); () dense

    @property
    def weight_bytes(self) -> int:
        return sum(self.param_bytes_by_dtype.values())

    @property
    def has_weights(self) -> bool:
        """The safetensors files are in the folder (serving needs them; planning does not)."""
        return self.weights_source == WEIGHTS_FROM_HEADERS

    @property
    def attention_summary(self) -> dict[str, int]:
        """Layer count per kind, e.g. {"sliding(512)": 15, "full": 3}."""
        return dict(Counter(str(layer) for layer in self.layers))

    @property
    def rope_scaling(self) -> dict | None:
        """The RoPE parameters when any layer type uses scaling, else None."""
        scaled = {k: v for k, v in self.rope_parameters.items() if v.get("rope_type", "default") != "default"}
        return scaled or None

    @property
    def is_hybrid(self) -> bool:
        return len({(layer.kind, layer.window) for layer in self.layers}) > 1


def read_model(model_dir: str | Path) -> ModelInfo:
    """Read `config.json` (+ tokenizer_config.json) and the safetensors headers of a model folder."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise ModelError(f"{model_dir}: not a folder; pass a Hugging Face model folder (config.json + *.safetensors)")
    if not config_path.exists():
        raise ModelError(f"{config_path}: missing; pass a Hugging Face model folder (config.json + *.safetensors)")
    config = _read_json(config_path)
    text = text_config(config)

    def need(key: str, *alternatives: str) -> int:
        return positive_field(text, config_path, key, *alternatives)

    blocks = text.get("layers_block_type")  # NemotronH as transformers 5 writes it: no num_hidden_layers
    listed = isinstance(blocks, list) and text.get("num_hidden_layers") is None
    num_layers = len(blocks) if listed else need("num_hidden_layers", "n_layer", "num_layers")
    hidden = need("hidden_size", "n_embd", "d_model")
    heads = need("num_attention_heads", "n_head")
    kv_heads = need("num_key_value_heads") if text.get("num_key_value_heads") is not None else heads
    check_heads(config_path, hidden, heads, kv_heads, text.get("head_dim"))
    head_dim = int(text.get("head_dim") or hidden // heads)
    mla = None
    if text.get("kv_lora_rank") is not None:
        mla = MLADims(int(text["kv_lora_rank"]), int(text.get("qk_rope_head_dim") or 0))

    weights = model_weights(model_dir, config)
    rope = rope_parameters(text)
    derived, reason = derived_max_len(text, rope, _tokenizer_max_len(model_dir))
    pooling = read_pooling(model_dir, config)
    if pooling is not None and pooling.max_seq_length is not None:  # vLLM: encoder_config wins (config/model.py)
        derived = pooling.max_seq_length
        reason = f"max_seq_length={derived} in sentence_bert_config.json (vLLM caps an embedding model there)"
    quant = config.get("quantization_config")
    hybrid = hybrid_layers(text, num_layers)  # Mamba / gated-delta-net hybrids: their own layer kinds
    layers = tuple(map(LayerAttention, hybrid[0])) if hybrid else layer_attention(text, num_layers, mla is not None)
    return ModelInfo(
        path=model_dir,
        architecture=(config.get("architectures") or [config.get("model_type", "unknown")])[0],
        model_type=str(text.get("model_type") or config.get("model_type") or "unknown"),
        dtype=config_dtype(config),
        num_layers=num_layers,
        hidden_size=hidden,
        intermediate_size=int(text.get("intermediate_size") or 4 * hidden),
        vocab_size=need("vocab_size"),
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        layers=layers,
        mla=mla,
        max_position_embeddings=text.get("max_position_embeddings"),
        rope_parameters=rope,
        derived_max_len=derived,
        derived_max_len_reason=reason,
        param_bytes_by_dtype=weights.bytes_by_dtype,
        param_count=weights.param_count,
        quantization=(
            {"method": quant.get("quant_method"), "bits": quant.get("bits") or quant.get("w_bit")}
            if isinstance(quant, dict)
            else None
        ),
        tie_word_embeddings=tied_embeddings(config),
        linear_shapes=weights.linear_shapes,
        rope_findings=tuple(f.message for f in served_model_findings(model_dir)),
        weights_source=weights.source,
        weights_source_reason=weights.reason,
        pooling=pooling,
        state=hybrid[1] if hybrid else None,
        moe=moe_facts(text),
    )


def moe_facts(text: dict) -> tuple[int, int, int]:
    """(routed experts, experts per token, expert intermediate size) of a MoE config; () when dense."""
    experts = int(next((text[k] for k in ("num_local_experts", "num_experts", "n_routed_experts") if text.get(k)), 0))
    inter = int(text.get("moe_intermediate_size") or text.get("intermediate_size") or 0)
    return (experts, int(text.get("num_experts_per_tok") or 0), inter) if experts else ()


# Encoder families vLLM's pooling runner embeds with; a folder without modules.json is recognised by these.
ENCODER_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "nomic_bert", "modernbert", "new", "gte")
# The model card's statement of the training length, e.g. "The sequence length was limited to 128 tokens."
_CARD_TRAINING_LEN = re.compile(
    r"sequence length (?:was |is )?(?:limited|truncated|set|fixed|capped) to (\d+) (?:tokens|word ?pieces)",
    re.IGNORECASE,
)
EMBEDDING_METADATA = "lcserve_embedding.json"  # {"training_seq_len": N}, written by whoever trained it


def read_pooling(model_dir: Path, config: dict) -> PoolingInfo | None:
    """The embedding facts of a folder (None for a generative model): sentence-transformers'
    modules.json, 1_Pooling/config.json and sentence_bert_config.json, else an encoder's config.json."""
    modules_path = model_dir / "modules.json"
    architecture = str((config.get("architectures") or [""])[0])
    if not modules_path.exists():
        if config.get("model_type") not in ENCODER_MODEL_TYPES or architecture.endswith(("ForMaskedLM", "LMHeadModel")):
            return None
        training, source = embedding_training_len(model_dir)
        return PoolingInfo("cls", False, None, config.get("hidden_size"), training, source, False)
    modules = _read_json_any(modules_path)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ModelError(f"{modules_path}: expected a JSON list of modules; re-create or re-download the model folder")
    kinds = {str(m.get("type", "")).rsplit(".", 1)[-1]: m for m in modules}
    mode, dimension = "cls", config.get("hidden_size")
    if "Pooling" in kinds:
        pooling_path = model_dir / str(kinds["Pooling"].get("path", "")) / "config.json"
        pooling = _read_json(pooling_path) if pooling_path.exists() else {}
        on = [
            k.removeprefix("pooling_mode_") for k, v in pooling.items() if k.startswith("pooling_mode_") and v is True
        ]
        mode = "+".join(on) or "cls"
        dimension = pooling.get("word_embedding_dimension", dimension)
    st_config = model_dir / "sentence_bert_config.json"
    max_seq = _read_json(st_config).get("max_seq_length") if st_config.exists() else None
    training, source = embedding_training_len(model_dir)
    return PoolingInfo(
        pooling_mode=mode.replace("_tokens", "").replace("_token", ""),
        normalize="Normalize" in kinds,
        max_seq_length=int(max_seq) if isinstance(max_seq, int) else None,
        dimension=dimension,
        training_len=training,
        training_len_source=source,
        sentence_transformers=True,
    )


def positive_field(text: dict, path: Path, key: str, *alternatives: str) -> int:
    """The first of these config fields present, as a positive integer; ModelError naming it otherwise
    (a zero, a word or a negative would divide by zero or plan nonsense further on)."""
    for k in (key, *alternatives):
        value = text.get(k)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value) or value < 1:
            raise ModelError(
                f"{path}: field {k!r} is {value!r}; it must be a positive integer: fix config.json or "
                "re-download the model folder"
            )
        return int(value)
    raise ModelError(f"{path}: field {key!r} is missing; the model folder is incomplete or not a decoder LM")


def check_heads(path: Path, hidden: int, heads: int, kv_heads: int, head_dim) -> None:
    """ModelError for attention heads vLLM cannot split: KV heads that do not divide the query heads,
    or a hidden size the heads do not divide when no head_dim says otherwise."""
    if heads % kv_heads:
        raise ModelError(
            f"{path}: num_key_value_heads {kv_heads} does not divide num_attention_heads {heads}; "
            "fix config.json or re-download the model folder"
        )
    if head_dim is None and hidden % heads:
        raise ModelError(
            f"{path}: hidden_size {hidden} is not a multiple of num_attention_heads {heads} and no head_dim "
            "is given; fix config.json (set head_dim) or re-download the model folder"
        )
    if head_dim is not None:
        positive_field({"head_dim": head_dim}, path, "head_dim")


def is_embedding_model(model_dir: Path) -> bool:
    """Whether a folder holds an embedding model (never raises: the gateway asks it of served folders)."""
    try:
        return read_pooling(Path(model_dir), _read_json(Path(model_dir) / "config.json")) is not None
    except (ModelError, OSError):
        return False


def embedding_training_len(model_dir: Path) -> tuple[int | None, str]:
    """An embedding model's training length and its source: lcserve_embedding.json, else the model
    card (README.md); (None, why) when neither states it (pass --training-len)."""
    meta = model_dir / EMBEDDING_METADATA
    if meta.exists():
        value = _read_json(meta).get("training_seq_len")
        if isinstance(value, int) and value > 0:
            return value, f"training_seq_len={value} in {EMBEDDING_METADATA}"
    card = model_dir / "README.md"
    found = _CARD_TRAINING_LEN.search(card.read_text(errors="replace")) if card.exists() else None
    if found:
        return int(found[1]), f'the model card (README.md: "{found[0]}")'
    return None, f"neither {EMBEDDING_METADATA} nor the model card (README.md) states it; pass --training-len"


def require_weights(model: ModelInfo) -> None:
    """Serving loads the weights: refuse a model planned from its index or config.json alone."""
    if not model.has_weights:
        raise ModelError(
            f"{model.path}: no *.safetensors weights (sized from {model.weights_source} only); "
            "download the weights into the folder before serving (lcserve reads safetensors only)"
        )


def base_training_len(model_dir: Path) -> int | None:
    """A base model's training length: `max_position_embeddings` of its config.json (text_config
    for multimodal configs); None when the folder has no readable config. Never raises: the
    gateway asks this of every served model's folder."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    if (Path(model_dir) / "modules.json").exists():  # an embedding model: its model card or metadata
        try:
            trained, _ = embedding_training_len(Path(model_dir))
        except ModelError:
            trained = None
        if trained:
            return trained
    value = text_config(config).get("max_position_embeddings") or config.get("max_position_embeddings")
    return value if isinstance(value, int) else None


def layer_attention(text: dict, num_layers: int, is_mla: bool) -> tuple[LayerAttention, ...]:
    """Per-layer KV kind, by the rules transformers and vLLM apply to config.json."""
    if is_mla:
        return (LayerAttention("mla"),) * num_layers
    window = text.get("sliding_window") or None  # vLLM treats 0 as "no sliding window"
    types = text.get("layer_types")
    if not types:
        types = _implicit_layer_types(text, num_layers, window)
    if len(types) != num_layers:
        raise ModelError(f"config.json: layer_types has {len(types)} entries for {num_layers} layers; fix the config")
    out = []
    for t in types:
        if t == "sliding_attention" and window:
            out.append(LayerAttention("sliding", int(window)))
        elif t in ("full_attention", "sliding_attention"):
            out.append(LayerAttention("full"))
        else:
            out.append(LayerAttention(str(t)))
    return tuple(out)


def _implicit_layer_types(text: dict, num_layers: int, window: int | None) -> list[str]:
    """Layer types of configs written before transformers stored `layer_types`."""
    model_type = str(text.get("model_type", ""))
    if "use_sliding_window" in text:  # Qwen2 family: sliding only when enabled, from max_window_layers on
        first = int(text.get("max_window_layers") or 0)
        on = bool(text["use_sliding_window"]) and window
        return ["sliding_attention" if on and i >= first else "full_attention" for i in range(num_layers)]
    if model_type.startswith("gemma2"):
        return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)]
    if model_type.startswith("gemma3"):
        pattern = int(text.get("sliding_window_pattern") or text.get("_sliding_window_pattern") or 6)
        return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
    # vLLM applies a model-level sliding_window to every layer when layer_types is absent.
    return ["sliding_attention" if window else "full_attention"] * num_layers


def derived_max_len(text: dict, rope: dict, tokenizer_max: int | None) -> tuple[int, str]:
    """vLLM's derived max_model_len (config/model.py `_get_and_verify_max_len`) and why."""
    found = {k: int(text[k]) for k in MAX_LEN_KEYS if isinstance(text.get(k), (int, float))}
    if "model_max_length" in found:
        key, value = "model_max_length", found["model_max_length"]
    elif found:
        key = min(found, key=found.get)
        value = found[key]
    else:
        key, value = None, DEFAULT_MAX_LEN
    reason = f"{key}={value} in config.json" if key else f"no length key in config.json, vLLM assumes {value}"
    if tokenizer_max is not None and tokenizer_max < value:
        value, reason = tokenizer_max, f"model_max_length={tokenizer_max} in tokenizer_config.json"
    factor = 1.0
    if "gemma3" not in str(text.get("model_type", "")):
        for p in rope.values():
            if p.get("rope_type", "default") not in PRESCALED_ROPE_TYPES and p.get("factor"):
                factor = float(p["factor"])
    if factor != 1.0:
        value = int(value * factor)
        reason += f", x RoPE factor {factor:g}"
    return int(value), reason


def _tokenizer_max_len(model_dir: Path) -> int | None:
    path = model_dir / "tokenizer_config.json"
    if not path.exists():
        return None
    value = _read_json(path).get("model_max_length")
    return int(value) if isinstance(value, (int, float)) and value < 1e12 else None


def _read_json_any(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: invalid JSON, or bytes that are not UTF-8
        raise ModelError(f"{path}: unreadable JSON ({e}); re-create or re-download the model folder") from None


def _read_json(path: Path) -> dict:
    data = _read_json_any(path)
    if not isinstance(data, dict):
        raise ModelError(
            f"{path}: expected a JSON object; pass a Hugging Face model folder (config.json + *.safetensors)"
        )
    return data
