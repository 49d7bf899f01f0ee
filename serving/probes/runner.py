"""Run a probe against a served endpoint: resolve the models, plan, calibrate, size the
prompts, send the requests (progress bar with time left), and write records.jsonl,
summary.json, report.md and the plots. `run_probe(config)` is also what the gateway calls.

The output folder appears whole or not at all: it is built in a hidden temporary sibling
(records.jsonl grows there as answers land) and renamed when summary.json is written, so a
stopped or killed run never leaves a folder that reads as a finished report.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, TextColumn

from lcserve.embedded import SERVED_NAME
from lcserve.errors import ProbeError
from lcserve.paths import check_output, output_dir
from lcserve.progress import progress_bar

from . import plots, report
from .client import ProbeClient, ServedModel
from .plan import (
    REPETITION_PROMPT_TOKENS,
    REPETITION_SAMPLING,
    REPETITION_WINDOW,
    TIERS,
    Plan,
    Rates,
    Tier,
    estimate_s,
    ladder,
    make_plan,
    trim,
)
from .scoring import rep_by_window, score_needle, score_passkey
from .sizing import Filler, repeated
from .tasks import (
    ANSWER_TOKENS,
    Cell,
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
    concurrency: int = 1
    repetition: bool = True  # the long continuation (rep-n); False leaves it out
    console: Console | None = field(default=None, repr=False)  # progress and notes; None: silent


@dataclass(frozen=True)
class Job:
    """One request of the run."""

    model: str
    task: str  # passkey | needle | control | loss | repetition
    length: int  # target context of the prompt (0 for the control)
    text: str
    tokens: int  # prompt tokens by the served tokenizer
    max_tokens: int
    est_s: float
    prompt: Prompt | None = None  # retrieval only


def run_probe(config: ProbeConfig) -> dict:
    """Probe base and adapters; returns the summary (also written to config.out_dir)."""
    if config.out_dir:
        check_out_dir(Path(config.out_dir))
    client = ProbeClient(config.url)
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


def _run(client: ProbeClient, config: ProbeConfig) -> dict:
    """Plan, calibrate, size and send the requests; the summary records how long each phase took."""
    started = time.time()
    tier, adapters, max_model_len, reference, plan = _plan_run(client, config)
    document = load_document()
    count = lru_cache(maxsize=None)(lambda text: client.count(config.base, text))
    document_tokens = count(document)
    plan = replace(plan, loss_tokens=min(plan.loss_tokens, document_tokens))
    _note(config, f"probing {', '.join(plan.models)} at {config.url} (max_model_len {max_model_len}); calibrating")
    timings = {"setup_s": time.time() - started}
    mark = time.time()
    rates = calibrate(client, plan.models, document)
    timings["calibrate_s"] = time.time() - mark
    plan, dropped = _fit_budget(config, tier, plan, rates, started)

    mark = time.time()
    jobs = _jobs(plan, config.seed, document, document_tokens, count, rates)
    timings["sizing_s"] = time.time() - mark
    estimate = sum(j.est_s for j in jobs)
    _note(
        config,
        f"{len(jobs)} requests, lengths {', '.join(map(str, plan.lengths))}; estimated {estimate / 60:.1f} min of engine time",
    )

    with output_dir(Path(config.out_dir), force=True) if config.out_dir else nullcontext() as out_dir:
        mark = time.time()
        records = _execute(client, jobs, config, out_dir / "records.jsonl" if out_dir else None)
        timings["requests_s"] = time.time() - mark

        summary = summarize(records, config.base, adapters, reference, config.threshold, config.seed)
        summary.update(
            {
                "url": config.url,
                "tier": config.tier,
                "started": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
                "wall_s": round(time.time() - started, 1),
                "estimate_s": round(estimate, 1),
                "max_model_len": max_model_len,
                "lengths": list(plan.lengths),
                "plan": asdict(plan),
                "dropped": dropped,
                "answer_tokens": ANSWER_TOKENS,
                "requests": len(records),
                "rates": {m: asdict(r) for m, r in rates.items()},
                "timings": {k: round(v, 1) for k, v in timings.items()},
            }
        )
        _write_reports(summary, out_dir, started)
    return summary


def _plan_run(client: ProbeClient, config: ProbeConfig) -> tuple[Tier, dict[str, int], int, int, Plan]:
    """(tier, adapters with their training lengths, max_model_len, ladder reference, plan) from what
    the server serves; ProbeError for an unknown tier or a server that does not state its max_model_len."""
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
    models = (config.base, *adapters)
    reference = min(adapters.values(), default=config.training_length or DEFAULT_REFERENCE)
    if config.lengths:
        lengths = check_lengths(config.lengths, max_model_len, config.url)
    else:
        lengths = ladder(reference, min(max_model_len, tier.max_length or max_model_len))
    plan = make_plan(tier, models, lengths, reference, max_model_len)
    if not config.repetition:
        plan = replace(plan, generation_tokens=0)
    return tier, adapters, max_model_len, reference, plan


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
    # the tier's own budget never costs a rung of the ladder: the lengths are the point of the tier
    plan, dropped, fits = trim(plan, rates, left_s, keep_lengths=not explicit)
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
            f"this engine is slower than the {tier.name} tier's {budget:g}-minute budget allows even with one "
            f"depth (see the calibrated ms/token in the report); running the whole ladder anyway",
        )
    return plan, dropped


def _write_reports(summary: dict, out_dir: Path | None, started: float) -> None:
    """The plots, report.md and summary.json into out_dir (None: no files), after the final wall time."""
    if out_dir:
        mark = time.time()
        summary["files"] = [p.name for p in plots.write_all(summary, out_dir)] + list(OUT_FILES)
        summary["timings"]["plots_s"] = round(time.time() - mark, 1)
    summary["wall_s"] = round(time.time() - started, 1)
    if out_dir:
        (out_dir / "report.md").write_text(report.markdown(summary))
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")


def _jobs(plan: Plan, seed: int, document: str, document_tokens: int, count, rates: dict[str, Rates]) -> list[Job]:
    """Size every prompt once (with the base's tokenizer) and list the requests of every model.

    Order: lengths ascending, so a budget cut drops the longest rungs; within a task and length,
    needles from deepest to shallowest, so each prompt's text before its needle is already
    in the prefix cache; base and adapters take turns on the same prompt.
    """
    doc_filler = Filler(document)
    words_per_token = doc_filler.words / document_tokens
    haystack = Filler(repeated(document, math.ceil(max(plan.lengths) / document_tokens) + 1))

    def retrieval(prompts: list[Prompt]) -> list[Job]:
        ordered = sorted(prompts, key=lambda p: -(p.cell.depth or 0))
        return [
            Job(
                m,
                p.cell.task,
                p.cell.length,
                p.text,
                p.tokens,
                ANSWER_TOKENS,
                rates[m].prompt_s(p.tokens) + ANSWER_TOKENS * rates[m].decode,
                p,
            )
            for p in ordered
            for m in plan.models
        ]

    jobs: list[Job] = []
    for length in plan.lengths:
        jobs += retrieval(
            size_cells(passkey_cells(length, plan.passkey_depths, seed), haystack, count, words_per_token)
        )
        jobs += retrieval(
            size_cells(
                needle_cells(length, plan.needle_depths, plan.distractors, seed), haystack, count, words_per_token
            )
        )
    jobs += retrieval(control_prompts(control_cells(plan.controls, seed), count))
    if plan.loss_tokens:
        text, tokens = document_prefix(doc_filler, count, plan.loss_tokens - 1, words_per_token)
        jobs += [
            Job(m, "loss", plan.loss_tokens, text, tokens, 1, rates[m].prompt_s(tokens, logprobs=True))
            for m in plan.models
        ]
    if plan.generation_tokens:
        text, tokens = document_prefix(doc_filler, count, REPETITION_PROMPT_TOKENS, words_per_token)
        jobs += [
            Job(
                m,
                "repetition",
                tokens + plan.generation_tokens,
                text,
                tokens,
                plan.generation_tokens,
                rates[m].prompt_s(tokens) + plan.generation_tokens * rates[m].decode,
            )
            for m in plan.models
        ]
    return jobs


def _execute(client: ProbeClient, jobs: list[Job], config: ProbeConfig, jsonl: Path | None) -> list[dict]:
    """Send the jobs (config.concurrency at a time), appending each record to records.jsonl as it lands."""
    records: list[dict] = []
    lock = threading.Lock()
    sink = jsonl.open("w") if jsonl else None
    if config.console is not None:
        progress = progress_bar(config.console, TextColumn("{task.fields[done]}/{task.fields[requests]} requests"))
    else:
        progress = Progress(disable=True)
    bar = progress.add_task("probing", total=sum(j.est_s for j in jobs), done=0, requests=len(jobs))

    def one(job: Job) -> None:
        progress.update(bar, description=f"{job.task} {job.length or ''} {job.model}".replace("  ", " "))
        record = _request(client, job, config.seed)
        with lock:
            records.append(record)
            if sink:
                sink.write(json.dumps(record) + "\n")
                sink.flush()
            progress.update(bar, advance=job.est_s, done=len(records))

    try:
        with progress, ThreadPoolExecutor(max_workers=max(1, config.concurrency)) as pool:
            futures = [pool.submit(one, job) for job in jobs]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in done if f.exception()]
            if failed:
                for f in futures:
                    f.cancel()
                raise failed[0].exception()
    finally:
        if sink:
            sink.close()
    return records


def _request(client: ProbeClient, job: Job, seed: int) -> dict:
    """Send one job and turn the answer into a raw record (scored, for retrieval)."""
    start = time.perf_counter()
    if job.task == "loss":
        body = client.complete(job.model, job.text, 1, prompt_logprobs=0)
    elif job.task == "repetition":
        body = client.complete(
            job.model,
            job.text,
            job.max_tokens,
            ignore_eos=True,
            return_token_ids=True,
            **REPETITION_SAMPLING,
            seed=seed,
        )
    else:
        body = client.complete(job.model, job.text, job.max_tokens)
    elapsed = time.perf_counter() - start
    try:
        return _record(client, job, body, elapsed)
    except (KeyError, IndexError, TypeError) as e:  # an OpenAI-like server that is not vLLM
        raise ProbeError(
            f"{client.url} answered a {job.task} request to '{job.model}' without vLLM's fields "
            f"({type(e).__name__}: {e}); point --url at vLLM or the lcserve gateway"
        ) from None


def _record(client: ProbeClient, job: Job, body: dict, elapsed: float) -> dict:
    """The raw record of one answer."""
    choice = body["choices"][0]
    cell: Cell | None = job.prompt.cell if job.prompt else None
    record = {
        "model": job.model,
        "task": job.task,
        "cell": cell.id if cell else f"{job.task}:{job.length}",
        "length": job.length,
        "depth": cell.depth if cell else None,
        "depth_actual": job.prompt.depth_actual if job.prompt else None,
        "prompt_tokens": body["usage"]["prompt_tokens"],
        "sized_tokens": job.tokens,
        "prompt_sha256": hashlib.sha256(job.text.encode()).hexdigest(),
        "max_tokens": job.max_tokens,
        "output": choice["text"],
        "finish_reason": choice.get("finish_reason"),
        "elapsed_s": round(elapsed, 3),
    }
    if job.task == "loss":
        record["logprobs"] = [None] + [
            round(next(iter(d.values()))["logprob"], 5) for d in choice["prompt_logprobs"][1:]
        ]
    elif job.task == "repetition":
        # the generated ids themselves: re-tokenizing the text merges pieces and undercounts
        tokens = choice.get("token_ids") or client.tokens(job.model, choice["text"])
        record.update(
            {
                "window": REPETITION_WINDOW,
                "output_tokens": len(tokens),
                "rep2": [round(x, 4) for x in rep_by_window(tokens, REPETITION_WINDOW, 2)],
                "rep4": [round(x, 4) for x in rep_by_window(tokens, REPETITION_WINDOW, 4)],
            }
        )
    else:
        score = (
            score_passkey(choice["text"], cell.gold)
            if job.task == "passkey"
            else score_needle(choice["text"], cell.gold, tuple(v for _, v, _ in cell.distractors))
        )
        record.update(
            {"gold": cell.gold, "correct": score.correct, "empty": score.empty, "distractor": score.distractor}
        )
    return record
