"""No figure in docs/findings.md is typed by hand: every table is re-rendered from its committed
result file and must equal what the page shows; a tampered result or table is caught."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from benchmarks.findings import FINDINGS, ROOT, TABLES, render

README = ROOT / "README.md"


def test_every_table_equals_its_result_file():
    text = FINDINGS.read_text()
    assert sorted(set(re.findall(r"<!-- table: (\S+) -->", text))) == sorted(TABLES)  # none skipped, none unknown
    assert render(text)[1] == []


def tampered_root(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "docs" / "findings", tmp_path / "docs" / "findings")
    return tmp_path


def test_a_tampered_kv_result_is_caught(tmp_path):
    root = tampered_root(tmp_path)
    path = root / "docs" / "findings" / "kv_claim.json"
    doc = json.loads(path.read_text())
    doc["rows"][-1]["vllm_bytes"] *= 2
    path.write_text(json.dumps(doc))
    assert render(FINDINGS.read_text(), root)[1] == ["docs/findings/kv_claim.json"]


def test_a_tampered_probe_result_is_caught(tmp_path):
    root = tampered_root(tmp_path)
    path = root / "docs" / "findings" / "rope_tiling.json"
    doc = json.loads(path.read_text())
    cell = doc["arms"]["tiled"]["accuracy"]["passkey"][str(doc["lengths"][-1])]
    cell["correct"] = cell["n"] - cell["correct"]
    doc["arms"]["tiled"]["loss"]["within"] += 1
    path.write_text(json.dumps(doc))
    assert render(FINDINGS.read_text(), root)[1] == [
        "docs/findings/rope_tiling.json",
        "docs/findings/rope_tiling.json#loss",
    ]


def test_a_tampered_adapter_result_is_caught(tmp_path):
    root = tampered_root(tmp_path)
    path = root / "docs" / "findings" / "adapter_length.json"
    doc = json.loads(path.read_text())
    cell = doc["arms"]["writer"]["accuracy"][str(doc["lengths"][-1])]
    cell["correct"] = cell["n"] - cell["correct"] if cell["n"] != 2 * cell["correct"] else cell["correct"] + 1
    path.write_text(json.dumps(doc))
    # `writer` is a row of both tables: the training-length one and the scale one
    assert render(FINDINGS.read_text(), root)[1] == [
        "docs/findings/adapter_length.json",
        "docs/findings/adapter_length.json#scale",
    ]


def test_a_figure_edited_in_the_page_is_caught():
    text = FINDINGS.read_text()
    edited = text.replace("| 32768 | 8 |", "| 32768 | 9 |", 1)
    assert edited != text
    assert render(edited)[1] == ["docs/findings/kv_claim.json"]


def test_plots_are_committed_small_and_readme_links_the_page():
    plots = re.findall(r"\]\((findings/[\w.-]+\.png)\)", FINDINGS.read_text())
    assert plots
    for plot in plots:
        assert (FINDINGS.parent / plot).stat().st_size < 100_000, plot
    assert "(docs/findings.md)" in README.read_text()
