"""The long-input policies of an embedding model, as pure functions the gateway applies.

An embedding model trained at T tokens (all-MiniLM-L6-v2: 128) may be served with a larger
max_model_len (256, or 512 with vLLM's override). What to do with an input longer than that is the
operator's choice, made per model at serve time (`lcserve serve --embedding-policy`):

- `reject`: inputs up to max_model_len go as they are; a longer one gets a 400 that says by how much.
- `truncate`: every input is cut to the window (the training length) by vLLM's own
  `truncate_prompt_tokens` (the pooling runner keeps the first tokens).
- `chunk`: an input longer than the window is split at token boundaries into windows of at most
  the window's length, overlapping by a quarter, each with the model's own special tokens; the
  windows are embedded in one batch and pooled by a token-weighted mean, then normalized. vLLM 0.32
  has a chunked mode of its own (`--pooler-config enable_chunked_processing`), but it cuts at
  max_model_len, without overlap or per-window special tokens, and for every model of the engine.

A request may ask for another policy with the header `X-Lcserve-Embedding-Policy`; the response
says which one applied in the same header.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass

import numpy as np

POLICIES = ("reject", "truncate", "chunk")
DEFAULT_POLICY = "reject"
POLICY_HEADER = "X-Lcserve-Embedding-Policy"
MAX_INPUTS = 2048  # OpenAI's limit for one embeddings request
MAX_WINDOWS = 1024  # windows of all chunked inputs of one request (a 2000-token input makes about 20)
OVERLAP_SHARE = 0.25  # of each window's content repeated from the previous window


class BadInput(ValueError):
    """An embeddings request whose `input` cannot be embedded; the message names the problem and the fix."""


def embedding_inputs(body: dict) -> list[str | list[int]]:
    """The request's inputs as a list (one string or token-id list each), or BadInput."""
    if "input" not in body:
        raise BadInput('the request has no `input`; send {"model": ..., "input": "text"} or a list of texts')
    value = body["input"]
    if isinstance(value, str):
        value = [value]
    elif isinstance(value, list) and value and all(_is_token(t) for t in value):
        value = [value]  # one input given as token ids
    if not isinstance(value, list):
        raise BadInput(f"`input` is {type(value).__name__}; send a string, a list of strings, or token ids")
    if not value:
        raise BadInput("`input` is an empty list; send at least one text")
    if len(value) > MAX_INPUTS:
        raise BadInput(f"`input` holds {len(value)} inputs; send at most {MAX_INPUTS} per request (split the batch)")
    kinds = set()
    for i, item in enumerate(value):
        if isinstance(item, str):
            if not item.strip():
                raise BadInput(
                    f"input[{i}] is an empty string; remove it or give it text (its vector would mean nothing)"
                )
            kinds.add("text")
        elif isinstance(item, list) and all(_is_token(t) for t in item):
            if not item:
                raise BadInput(f"input[{i}] is an empty token list; remove it or give it token ids")
            kinds.add("tokens")
        else:
            raise BadInput(f"input[{i}] is neither a string nor a list of token ids; send texts or token-id lists")
    if len(kinds) > 1:
        raise BadInput("`input` mixes texts and token-id lists; send one kind per request")
    return value


def _is_token(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


def choose_policy(served: str, asked: str | None) -> str:
    """The request's policy: the header's when it names one, else the model's; BadInput for an unknown name."""
    if asked is None:
        return served
    asked = asked.strip().lower()
    if asked not in POLICIES:
        raise BadInput(f"header {POLICY_HEADER}: {asked!r} is not a policy; use one of {', '.join(POLICIES)}")
    return asked


def window_len(training_len: int | None, max_model_len: int | None) -> int | None:
    """The window truncate and chunk cut to: the training length, within max_model_len."""
    known = [n for n in (training_len, max_model_len) if n]
    return min(known) if known else None


@dataclass(frozen=True)
class Action:
    """What a policy does with one input: "as_is", "truncated", "chunked" or "rejected" (with why)."""

    kind: str
    message: str | None = None


def decide(policy: str, index: int, tokens: int, model: str, max_model_len: int | None, window: int | None) -> Action:
    """One input's fate under a policy (pure)."""
    if policy == "reject" or window is None:
        if max_model_len is not None and tokens > max_model_len:
            return Action(
                "rejected",
                f"input[{index}] has {tokens} tokens, but model '{model}' embeds at most max_model_len={max_model_len} "
                f"tokens per input and its long-input policy is reject: shorten it by at least "
                f"{tokens - max_model_len} tokens, or serve with --embedding-policy truncate or chunk "
                f"(or send the header {POLICY_HEADER}: chunk)",
            )
        return Action("as_is")
    if tokens <= window:
        return Action("as_is")
    return Action("truncated" if policy == "truncate" else "chunked")


def special_wrap(with_special: list[int], plain: list[int]) -> tuple[list[int], list[int]]:
    """The tokens the tokenizer adds around a text (BERT: [CLS] before, [SEP] after), found by
    comparing the text's ids with and without special tokens."""
    extra = len(with_special) - len(plain)
    for start in range(extra + 1):
        if with_special[start : start + len(plain)] == plain:
            return with_special[:start], with_special[start + len(plain) :]
    return [], []  # the tokenizer changed the text's own ids: add nothing


def chunk_windows(
    content: list[int],
    window: int,
    prefix: list[int] = (),
    suffix: list[int] = (),
    overlap_share: float = OVERLAP_SHARE,
) -> list[list[int]]:
    """Windows of at most `window` tokens, each `prefix + a slice of content + suffix`; consecutive
    slices overlap by `overlap_share` of a slice, and together they cover every content token."""
    body = window - len(prefix) - len(suffix)
    if body < 1:
        raise ValueError(
            f"a window of {window} tokens leaves no room beside {len(prefix) + len(suffix)} special tokens"
        )
    overlap = min(int(body * overlap_share), body - 1)
    stride = body - overlap
    starts = list(range(0, max(len(content) - overlap, 1), stride))
    return [[*prefix, *content[s : s + body], *suffix] for s in starts]


def pool(vectors: list[list[float]], weights: list[int], normalize: bool = True) -> list[float]:
    """The token-weighted mean of the windows' vectors, normalized (to unit length) when the model normalizes."""
    v = np.asarray(vectors, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    mean = (v * w[:, None]).sum(axis=0) / w.sum()
    if normalize:
        norm = float(np.linalg.norm(mean))
        mean = mean / norm if norm > 0 and math.isfinite(norm) else mean
    return mean.tolist()


def encode_vector(vector: list[float], encoding_format: str | None):
    """A vector as the client asked: floats, or base64 of little-endian float32 (OpenAI's "base64")."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
    return vector
