"""Sending a probe's requests: the jobs in waves (the requests of a wave go out together), each
answer turned into a raw record and appended to records.jsonl as it lands.

A wave is what may share the engine without losing the prefix cache: one prompt for the base and
each adapter (they never share cached blocks, and their decodes batch), or the questions of one
style length once its first question has put the preamble in the cache.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, TextColumn

from lcserve.errors import ProbeError
from lcserve.progress import progress_bar

from .client import ProbeClient
from .plan import REPETITION_SAMPLING, REPETITION_WINDOW
from .scoring import rep_by_window, score_needle, score_passkey
from .style import Markers, score_answer
from .tasks import Cell, Prompt

MAX_WAVE = 16  # requests in flight at most, whatever the wave


@dataclass(frozen=True)
class Job:
    """One request of the run."""

    model: str
    task: str  # passkey | needle | control | loss | repetition | style
    length: int  # target context of the prompt (0 for the control)
    text: str  # the prompt (style: the question alone; the chat turn is in `messages`)
    tokens: int  # prompt tokens by the served tokenizer
    max_tokens: int
    est_s: float
    prompt: Prompt | None = None  # retrieval only
    wave: int = 0  # jobs of one wave are sent together (see the module docstring)
    messages: tuple = ()  # style only: the chat turn
    cell: str = ""  # style only: the question's id, the same for base and writer
    question: str = ""  # style only
    markers: Markers | None = None  # style only


def execute(
    client: ProbeClient,
    jobs: list[Job],
    concurrency: int | None,
    seed: int,
    console: Console | None,
    jsonl: Path | None,
) -> list[dict]:
    """Send the jobs wave by wave (`concurrency` None), or `concurrency` at a time in order; each
    record is appended to records.jsonl as it lands."""
    records: list[dict] = []
    lock = threading.Lock()
    sink = jsonl.open("w") if jsonl else None
    if console is not None:
        progress = progress_bar(console, TextColumn("{task.fields[done]}/{task.fields[requests]} requests"))
    else:
        progress = Progress(disable=True)
    bar = progress.add_task("probing", total=sum(j.est_s for j in jobs), done=0, requests=len(jobs))

    def one(job: Job) -> None:
        progress.update(bar, description=f"{job.task} {job.length or ''} {job.model}".replace("  ", " "))
        record = request(client, job, seed)
        with lock:
            records.append(record)
            if sink:
                sink.write(json.dumps(record) + "\n")
                sink.flush()
            progress.update(bar, advance=job.est_s, done=len(records))

    waves = [jobs] if concurrency else [list(w) for _, w in groupby(jobs, key=lambda j: j.wave)]
    try:
        with progress, ThreadPoolExecutor(max_workers=concurrency or MAX_WAVE) as pool:
            for wave in waves:
                futures = [pool.submit(one, job) for job in wave]
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


def request(client: ProbeClient, job: Job, seed: int) -> dict:
    """Send one job and turn the answer into a raw record (scored, for retrieval and style)."""
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
    elif job.task == "style":
        body = client.chat(job.model, list(job.messages), job.max_tokens)
    else:
        body = client.complete(job.model, job.text, job.max_tokens)
    elapsed = time.perf_counter() - start
    try:
        return record(client, job, body, elapsed)
    except (KeyError, IndexError, TypeError) as e:  # an OpenAI-like server that is not vLLM
        raise ProbeError(
            f"{client.url} answered a {job.task} request to '{job.model}' without vLLM's fields "
            f"({type(e).__name__}: {e}); point --url at vLLM or the lcserve gateway"
        ) from None


def record(client: ProbeClient, job: Job, body: dict, elapsed: float) -> dict:
    """The raw record of one answer."""
    choice = body["choices"][0]
    cell: Cell | None = job.prompt.cell if job.prompt else None
    text = (choice["message"]["content"] or "") if job.task == "style" else choice["text"]
    out = {
        "model": job.model,
        "task": job.task,
        "cell": cell.id if cell else job.cell or f"{job.task}:{job.length}",
        "length": job.length,
        "depth": cell.depth if cell else None,
        "depth_actual": job.prompt.depth_actual if job.prompt else None,
        "prompt_tokens": body["usage"]["prompt_tokens"],
        "sized_tokens": job.tokens,
        "prompt_sha256": hashlib.sha256(job.text.encode()).hexdigest(),
        "max_tokens": job.max_tokens,
        "output": text,
        "finish_reason": choice.get("finish_reason"),
        "elapsed_s": round(elapsed, 3),
    }
    if job.task == "loss":
        out["logprobs"] = [None] + [round(next(iter(d.values()))["logprob"], 5) for d in choice["prompt_logprobs"][1:]]
    elif job.task == "repetition":
        # the generated ids themselves: re-tokenizing the text merges pieces and undercounts
        tokens = choice.get("token_ids") or client.tokens(job.model, choice["text"])
        out.update(
            {
                "window": REPETITION_WINDOW,
                "output_tokens": len(tokens),
                "rep2": [round(x, 4) for x in rep_by_window(tokens, REPETITION_WINDOW, 2)],
                "rep4": [round(x, 4) for x in rep_by_window(tokens, REPETITION_WINDOW, 4)],
            }
        )
    elif job.task == "style":
        out.update({"question": job.question, **score_answer(text, job.markers)})
    else:
        score = (
            score_passkey(text, cell.gold)
            if job.task == "passkey"
            else score_needle(text, cell.gold, tuple(v for _, v, _ in cell.distractors))
        )
        out.update({"gold": cell.gold, "correct": score.correct, "empty": score.empty, "distractor": score.distractor})
    return out
