"""Run a probe against a served endpoint: resolve the models, plan, calibrate, size the
prompts, send the requests (progress bar with time left), and write records.jsonl,
summary.json, report.md and the plots. `run_probe(config)` is also what the gateway calls.

The output folder appears whole or not at all: it is built in a hidden temporary sibling
(records.jsonl grows there as answers land) and renamed when summary.json is written, so a
stopped or killed run never leaves a folder that reads as a finished report.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from functools import lru_cache
from itertools import count as count_from
from pathlib import Path

from rich.console import Console

from lcserve.embedded import SERVED_NAME
from lcserve.errors import ProbeError
from lcserve.paths import check_output, output_dir

from . import report
from .client import ProbeClient, ServedModel
from .plan import (
    REPETITION_PROMPT_TOKENS,
    TIERS,
    Plan,
    Rates,
    Tier,
    estimate_s,
    fit_style_lengths,
    ladder,
    ladder_top,
    make_plan,
    trim,
)
from .send import Job, execute
from .sizing import Filler, repeated
from .style import DEMO_MARKERS, Markers, load_markers, messages, questions, size_preamble
from .tasks import (
    ANSWER_TOKENS,
    Prompt,
    control_cells,
    control_prompts,
    document_prefix,
    load_document,
    needle_cells,
    passkey_cells,
    size_cells,
)
from .verdicts import summarize

DEFAULT_BASE = SERVED_NAME  # the embedded default (Gemma 3 270M)
DEFAULT_REFERENCE = 256  # ladder reference when only the base is probed: 128, 256, 512, ...


@dataclass
class ProbeConfig:
    url: str = "http://127.0.0.1:8000"
    base: str = DEFAULT_BASE
    adapters: tuple[str, ...] | None = None  # None: every adapter the server mounts on the base
    tier: str = "quick"
    lengths: tuple[int, ...] | None = None  # None: the ladder from the training length
    budget_minutes: float | None = None  # None: the tier's default (quick: 9, full: none)
    out_dir: Path | None = None  # None: write no files
    training_length: int | None = None  # overrides the adapters' own metadata
    threshold: float = 0.8
    seed: int = 0
    concurrency: int | None = None  # None: wave by wave (base and adapters side by side on one prompt)
    repetition: bool = True  # the long continuation (rep-n); False leaves it out
    style: bool = True  # style at length for the writers (adapters whose style markers are known)
    style_markers: Path | None = None  # the user's markers file: every adapter is a writer
    style_lengths: tuple[int, ...] | None = None  # None: the tier's, capped by max_model_len
    console: Console | None = field(default=None, repr=False)  # progress and notes; None: silent
    api_key: str | None = field(default=None, repr=False)  # the gateway's, when --url is a gateway with a key


def run_probe(config: ProbeConfig) -> dict:
    """Probe base and adapters; returns the summary (also written to config.out_dir)."""
    if config.out_dir:
        check_out_dir(Path(config.out_dir))
    client = ProbeClient(config.url, api_key=config.api_key)
    try:
        return _run(client, config)
    finally:
        client.close()


OUT_FILES = ("records.jsonl", "summary.json", "report.md")


def check_out_dir(out_dir: Path) -> None:
    """Refuse, before any request, an --out the finished run could not replace whole: a file, the
    working directory, or a folder lcserve did not write (an earlier probe's is replaced)."""
    check_output(out_dir, force=True)


def resolve_models(
    served: dict[str, ServedModel], url: str, base: str, adapters: tuple[str, ...] | None, training_length: int | None
) -> dict[str, int]:
    """The adapters to probe and the training length of each; ProbeError for a name not served
    or a training length that cannot be found."""
    names = ", ".join(sorted(served)) or "nothing"
    if base not in served:
        raise ProbeError(
            f"{url} does not serve a model named '{base}' (it serves: {names}); pass --base with one of those"
        )
    if adapters is None:
        adapters = tuple(sorted(m.name for m in served.values() if m.parent == base))
    result = {}
    for name in adapters:
        if name not in served:
            raise ProbeError(
                f"{url} does not serve an adapter named '{name}' (it serves: {names}); pass --adapter with one of those"
            )
        result[name] = training_length or _training_length(served[name])
    return result


def _training_length(model: ServedModel) -> int:
    """From the adapter's own folder, when the server runs on this machine (vLLM lists it as `root`)."""
    if model.root and Path(model.root).is_dir():
        from lcserve.adapters.training_length import training_seq_len

        length = training_seq_len(Path(model.root))
        if length:
            return length
    raise ProbeError(
        f"the training length of adapter '{model.name}' is unknown (no lcserve_adapter.json, axolotl YAML or "
        f"training_args beside {model.root or 'its files'}); pass --training-len"
    )


def check_lengths(lengths: tuple[int, ...], max_model_len: int, url: str) -> list[int]:
    too_long = [n for n in lengths if n > max_model_len]
    if too_long:
        raise ProbeError(
            f"--lengths {', '.join(map(str, too_long))} above the max_model_len {max_model_len} of {url}; "
            f"drop them or restart vLLM with a larger --max-model-len"
        )
    return sorted(set(lengths))


CALIBRATION_REQUESTS = 5  # per model
# Retrieval prompts of one task and length sent together (each with the base and every adapter): their
# 16-token answers decode as one batch, and a wave's prompts share the haystack before their needles
# with the deeper ones of the wave before it.
WAVE_PROMPTS = 4
BUDGET_MARGIN = 0.9


def calibrate(client: ProbeClient, models: tuple[str, ...], document: str) -> dict[str, Rates]:
    """Seconds per prefill, prompt-logprob and decode token of each model, from five small
    requests (prompts of about 250 and 1000 tokens give the growth with length). A fresh
    first line defeats the prefix cache; the first request also loads a LoRA."""
    rates = {}
    for model in models:
        nonce = f"{time.time_ns()} {model}\n"
        client.complete(model, nonce, 1)
        short_s, short = _seconds_per_prompt_token(client, model, nonce + document[20000:21150])
        long_s, long = _seconds_per_prompt_token(client, model, nonce + document[40000:44600])
        growth = max(0.0, (long_s - short_s) / (long - short))
        logprob_s, logprob = _seconds_per_prompt_token(client, model, nonce + document[30000:31150], prompt_logprobs=0)
        start = time.perf_counter()
        client.complete(model, nonce + "Chapter 1\n\n", 32, ignore_eos=True)
        rates[model] = Rates(
            prefill=short_s - growth * short,
            growth=growth,
            decode=(time.perf_counter() - start) / 32,
            logprob=logprob_s - growth * logprob,
        )
    return rates


def _seconds_per_prompt_token(client: ProbeClient, model: str, text: str, **extra) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = client.complete(model, text, 1, **extra)["usage"]["prompt_tokens"]
    return (time.perf_counter() - start) / tokens, tokens


def _note(config: ProbeConfig, text: str) -> None:
    if config.console:
        config.console.print(text, highlight=False)


@dataclass(frozen=True)
class Setup:
    """What the server serves, made into a plan."""

    tier: Tier
    adapters: dict[str, int]  # adapter -> training length
    max_model_len: int
    reference: int
    plan: Plan
    markers: Markers | None  # the writers' style markers (None: no style at length)
    notes: list[str]  # what the tier leaves out on this server, and why


def _run(client: ProbeClient, config: ProbeConfig) -> dict:
    """Plan, calibrate, size and send the requests; the summary records how long each phase took."""
    started = time.time()
    setup = _plan_run(client, config)
    document = load_document()
    count = lru_cache(maxsize=None)(lambda text: client.count(config.base, text))
    document_tokens = count(document)
    plan = replace(setup.plan, loss_tokens=min(setup.plan.loss_tokens, document_tokens))
    for note in setup.notes:
        _note(config, f"left out: {note}")
    _note(
        config, f"probing {', '.join(plan.models)} at {config.url} (max_model_len {setup.max_model_len}); calibrating"
    )
    timings = {"setup_s": time.time() - started}
    mark = time.time()
    rates = calibrate(client, plan.models, document)
    timings["calibrate_s"] = time.time() - mark
    plan, dropped = _fit_budget(config, setup.tier, plan, rates, started)

    mark = time.time()
    jobs = _jobs(plan, config.seed, document, document_tokens, count, rates)
    jobs += _style_jobs(client, plan, setup.markers, document, document_tokens, rates)
    timings["sizing_s"] = time.time() - mark
    estimate = sum(j.est_s for j in jobs)
    _note(
        config,
        f"{len(jobs)} requests (planned {plan.requests()}), lengths {', '.join(map(str, plan.lengths))}; "
        f"estimated {estimate / 60:.1f} min of engine time",
    )

    with output_dir(Path(config.out_dir), force=True) if config.out_dir else nullcontext() as out_dir:
        mark = time.time()
        jsonl = out_dir / "records.jsonl" if out_dir else None
        records = execute(client, jobs, config.concurrency, config.seed, config.console, jsonl)
        timings["requests_s"] = time.time() - mark

        summary = summarize(records, config.base, setup.adapters, setup.reference, config.threshold, config.seed)
        summary.update(
            {
                "url": config.url,
                "tier": config.tier,
                "started": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
                "wall_s": round(time.time() - started, 1),
                "estimate_s": round(estimate, 1),
                "max_model_len": setup.max_model_len,
                "lengths": list(plan.lengths),
                "plan": asdict(plan),
                "planned_requests": plan.requests(),
                "dropped": setup.notes + dropped,
                "answer_tokens": ANSWER_TOKENS,
                "style_markers": setup.markers.source if setup.markers and plan.style_models else None,
                "requests": len(records),
                "rates": {m: asdict(r) for m, r in rates.items()},
                "timings": {k: round(v, 1) for k, v in timings.items()},
            }
        )
        _write_reports(summary, out_dir, started)
    return summary


def _plan_run(client: ProbeClient, config: ProbeConfig) -> Setup:
    """The plan from what the server serves; ProbeError for an unknown tier, an embedding model or a
    server that does not state its max_model_len."""
    if config.tier not in TIERS:
        raise ProbeError(f"--tier {config.tier} is unknown; use one of: {', '.join(TIERS)}")
    tier = TIERS[config.tier]
    served = client.models()
    adapters = resolve_models(served, config.url, config.base, config.adapters, config.training_length)
    max_model_len = served[config.base].max_model_len
    if not max_model_len:
        raise ProbeError(
            f"{config.url}/v1/models does not state max_model_len for '{config.base}'; is --url a vLLM endpoint?"
        )
    refuse_embedding(served[config.base], config.url)
    models = (config.base, *adapters)
    reference = min(adapters.values(), default=config.training_length or DEFAULT_REFERENCE)
    if config.lengths:
        lengths = check_lengths(config.lengths, max_model_len, config.url)
    else:
        lengths = ladder(reference, ladder_top(tier, reference, max_model_len))
    markers, writers, notes = _writers(config, served, tuple(adapters))
    style_lengths, over = fit_style_lengths(
        config.style_lengths or tier.style_lengths, max_model_len, config.url, config.style_lengths is not None
    )
    style_models = (config.base, *writers) if writers and tier.style_prompts else ()
    plan = make_plan(tier, models, lengths, reference, max_model_len, style_models, style_lengths)
    if not config.repetition:
        plan = replace(plan, generation_tokens=0)
    return Setup(tier, adapters, max_model_len, reference, plan, markers, notes + (over if style_models else []))


def refuse_embedding(model: ServedModel, url: str) -> None:
    """One line for the generative probes against an embedding model (on this machine: vLLM's `root`)."""
    from lcserve.model_config import is_embedding_model

    if model.root and Path(model.root).is_dir() and is_embedding_model(Path(model.root)):
        raise ProbeError(
            f"'{model.name}' at {url} is an embedding model: passkey, needle, loss, repetition and style at "
            "length need text generation; run `lcserve probe --url URL` without generation options for its retrieval probe"
        )


def _writers(config: ProbeConfig, served: dict[str, ServedModel], adapters: tuple[str, ...]):
    """(markers, the adapters whose style is scored, notes): every adapter with the user's markers, else
    the adapters trained on the shipped writer corpus with the demo writer's markers."""
    from lcserve.adapters.style import is_demo_writer

    if not config.style or not adapters:
        return None, (), []
    if config.style_markers:
        return load_markers(config.style_markers), adapters, []
    writers = tuple(a for a in adapters if served[a].root and is_demo_writer(Path(served[a].root)))
    others = [a for a in adapters if a not in writers]
    notes = [f"style at length for {', '.join(others)} (no style markers known; pass --style-markers FILE)"]
    return (DEMO_MARKERS if writers else None), writers, notes if others else []


def _fit_budget(
    config: ProbeConfig, tier: Tier, plan: Plan, rates: dict[str, Rates], started: float
) -> tuple[Plan, list[str]]:
    """The plan trimmed to what is left of the budget (--budget-minutes, else the tier's), and what
    was dropped; ProbeError when even the smallest plan misses an explicit budget."""
    dropped: list[str] = []
    explicit = config.budget_minutes is not None
    budget = config.budget_minutes if explicit else tier.budget_minutes
    if budget is None:
        return plan, dropped
    # what is left of the budget, less a margin for sizing, the estimate's error and the plots
    left_s = (budget * 60 - (time.time() - started)) * BUDGET_MARGIN
    # the tier's own budget never costs a rung, a depth or a prompt: its statistical power is its point
    plan, dropped, fits = trim(plan, rates, left_s, keep_power=not explicit)
    if dropped:
        _note(config, f"budget {budget:g} min: dropped {'; '.join(dropped)}")
    if not fits and explicit:
        raise ProbeError(
            f"--budget-minutes {budget:g} is too small: even the smallest plan ({', '.join(map(str, plan.lengths))} "
            f"tokens, one depth) needs about {estimate_s(plan, rates) / 60:.1f} minutes of engine time; "
            f"raise the budget or pass shorter --lengths"
        )
    if not fits:
        _note(
            config,
            f"this engine is slower than the {tier.name} tier's {budget:g}-minute budget allows (see the calibrated "
            f"ms/token in the report); running the whole plan anyway, so that every length can be decided",
        )
    return plan, dropped


def _write_reports(summary: dict, out_dir: Path | None, started: float) -> None:
    """The plots, report.md and summary.json into out_dir (None: no files), after the final wall time."""
    if out_dir:
        # matplotlib loads here, not at import: the gateway imports the runner and starts without it
        from . import plots

        mark = time.time()
        summary["files"] = [p.name for p in plots.write_all(summary, out_dir)] + list(OUT_FILES)
        summary["timings"]["plots_s"] = round(time.time() - mark, 1)
    summary["wall_s"] = round(time.time() - started, 1)
    if out_dir:
        (out_dir / "report.md").write_text(report.markdown(summary))
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")


def _jobs(plan: Plan, seed: int, document: str, document_tokens: int, count, rates: dict[str, Rates]) -> list[Job]:
    """Size every prompt once (with the base's tokenizer) and list the requests of every model.

    Order: lengths ascending; within a task and length, one haystack and the needles from deepest to
    shallowest, so each prompt's text before its needle is already in the prefix cache; base and
    adapters answer WAVE_PROMPTS prompts at a time side by side (one wave).
    """
    doc_filler = Filler(document)
    words_per_token = doc_filler.words / document_tokens
    haystack = Filler(repeated(document, math.ceil(max(plan.lengths) / document_tokens) + 1))
    waves = count_from(1)

    def retrieval(prompts: list[Prompt]) -> list[Job]:
        jobs, wave = [], 0
        for i, p in enumerate(sorted(prompts, key=lambda p: -(p.cell.depth or 0))):
            cached = int((p.cell.depth or 0) * p.tokens) if i else 0
            wave = next(waves) if i % WAVE_PROMPTS == 0 else wave
            for m in plan.models:
                est = rates[m].extend_s(cached, p.tokens) + ANSWER_TOKENS * rates[m].decode / WAVE_PROMPTS
                jobs.append(Job(m, p.cell.task, p.cell.length, p.text, p.tokens, ANSWER_TOKENS, est, p, wave))
        return jobs

    jobs: list[Job] = []
    for length in plan.lengths:
        passkey = passkey_cells(length, plan.passkey_depths, seed)
        needle = needle_cells(length, plan.needle_depths, plan.distractors, seed, plan.needle_per_depth)
        jobs += retrieval(size_cells(passkey, haystack, count, words_per_token))
        jobs += retrieval(size_cells(needle, haystack, count, words_per_token))
    jobs += retrieval(control_prompts(control_cells(plan.controls, seed), count))
    if plan.loss_tokens:
        text, tokens = document_prefix(doc_filler, count, plan.loss_tokens - 1, words_per_token)
        wave = next(waves)
        jobs += [
            Job(m, "loss", plan.loss_tokens, text, tokens, 1, rates[m].prompt_s(tokens, logprobs=True), wave=wave)
            for m in plan.models
        ]
    if plan.generation_tokens:
        text, tokens = document_prefix(doc_filler, count, REPETITION_PROMPT_TOKENS, words_per_token)
        wave, total = next(waves), tokens + plan.generation_tokens
        for m in plan.models:
            est = rates[m].prompt_s(tokens) + plan.generation_tokens * rates[m].decode
            jobs.append(Job(m, "repetition", total, text, tokens, plan.generation_tokens, est, wave=wave))
    return jobs


def _style_jobs(
    client: ProbeClient, plan: Plan, markers: Markers | None, document: str, document_tokens: int, rates
) -> list[Job]:
    """Style at length: per length, one preamble sized for the longest question; the first question
    alone (it puts the preamble in the prefix cache), then the others together, base and writers alike."""
    if not plan.style_models:
        return []
    asked = questions(plan.style_prompts)
    filler = Filler(repeated(document, math.ceil(max(plan.style_lengths) / document_tokens) + 1))
    jobs: list[Job] = []
    for n, length in enumerate(plan.style_lengths):
        preamble, _ = size_preamble(
            filler, lambda m: client.count_chat(plan.style_models[0], m), length, plan.style_tokens, asked
        )
        for i, question in enumerate(asked):
            turn = messages(preamble, question)
            tokens = client.count_chat(plan.style_models[0], turn)
            for m in plan.style_models:
                r = rates[m]
                est = (r.prompt_s(tokens) if i == 0 else 0.0) + plan.style_tokens * r.decode / (1 if i == 0 else 4)
                jobs.append(
                    Job(
                        m,
                        "style",
                        length,
                        json.dumps(turn),
                        tokens,
                        plan.style_tokens,
                        est,
                        wave=-(2 * n + (i > 0)) - 1,
                        messages=tuple(turn),
                        cell=f"style:{length}:{i}",
                        question=question,
                        markers=markers,
                    )  # fmt: skip
                )
    return jobs
