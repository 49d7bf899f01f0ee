"""The human table, report.md, the PNG plots and the `probe` command's own errors (no engine)."""

import socket

import pytest
from click.testing import CliRunner
from rich.console import Console

from lcserve.cli import LcserveGroup
from lcserve.errors import ProbeError
from lcserve.serving.probes.cli import probe
from lcserve.serving.probes.plan import parse_lengths
from lcserve.serving.probes.plots import write_all
from lcserve.serving.probes.report import accuracy_rows, markdown, model_rows, rich_tables, style_rows

from .test_probes_verdicts import ADAPTER, BASE, full_summary, style_records

PNG = b"\x89PNG\r\n\x1a\n"


def run_summary():
    rates = {"base": {"prefill": 0.00065, "decode": 0.025}, "writer": {"prefill": 0.0055, "decode": 0.06}}
    return {
        **full_summary(),
        "url": "http://127.0.0.1:8000",
        "tier": "quick",
        "wall_s": 312.4,
        "dropped": ["needle depths 0, 1"],
        "rates": rates,
    }


def test_accuracy_table_has_every_length_and_the_paired_differences():
    header, rows = accuracy_rows(run_summary())
    assert header == [
        "length",
        "base passkey",
        "base needle",
        "writer passkey",
        "writer needle",
        "writer Δ needle",
        "writer Δ passkey",
    ]
    assert [r[0] for r in rows] == ["128", "256", "512", "1024"]
    assert rows[-1][2] == "100%" and rows[-1][4] == "33%"
    assert rows[-1][5].startswith("-0.67 [") and rows[-1][1] == "-"


def test_model_table_and_markdown_report():
    summary = run_summary()
    header, rows = model_rows(summary)
    by_measure = {r[0]: r[1:] for r in rows}
    assert header == ["measure", "base", "writer"]
    assert by_measure["effective length, needle"] == ["1024", "512"]
    assert by_measure["empty answers"] == ["0", "1"]
    assert by_measure["NLL from T on"] == ["2.000", "3.000"]
    assert by_measure["prefill ms/token (calibrated)"] == ["0.65", "5.50"]
    text = markdown(summary)
    assert "| 1024 | - | 100% | - | 33% |" in text
    assert "Left out (max_model_len, no markers, or the budget): needle depths 0, 1" in text
    assert "'?' marks a difference whose interval crosses 0 (undecided" in text
    assert "## writer vs base" in text and "worse beyond the training length" in text
    console = Console(record=True, width=200)
    for table in rich_tables(summary):
        console.print(table)
    assert "effective length, needle" in console.export_text()


def test_plots_are_written_as_png(tmp_path):
    made = write_all(run_summary(), tmp_path)
    assert sorted(p.name for p in made) == ["heatmap_needle.png", "loss_by_position.png", "repetition.png"]
    for path in made:
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5000


def style_summary():
    from lcserve.serving.probes.verdicts import summarize

    summary = summarize(BASE + ADAPTER + style_records(), "base", {"writer": 256}, 256, threshold=0.8, seed=0)
    return {**summary, "url": "u", "tier": "quick", "wall_s": 1.0, "dropped": [], "style_markers": "the demo's"}


def test_style_at_length_has_its_table_and_plot(tmp_path):
    summary = style_summary()
    header, rows = style_rows(summary)
    assert header == ["style length", "base markers/answer (signed off)", "writer markers/answer (signed off)",
                      "writer Δ markers"]  # fmt: skip
    assert rows == [
        ["1024", "0.00 (0%)", "3.00 (100%)", "+3.00 [+3.00,+3.00]"],
        ["8192", "0.00 (0%)", "0.00 (0%)", "+0.00 [+0.00,+0.00]"],
    ]
    text = markdown(summary)
    assert "| 1024 | 0.00 (0%) | 3.00 (100%) | +3.00 [+3.00,+3.00] |" in text and "scored with the demo's" in text
    assert "style_by_length.png" in [p.name for p in write_all(summary, tmp_path)]
    assert style_rows(run_summary()) is None


def test_parse_lengths():
    assert parse_lengths("128, 1k,8K") == (128, 1024, 8192)
    with pytest.raises(ProbeError, match="'12x' is not a token count"):
        parse_lengths("128,12x")
    with pytest.raises(ProbeError, match="must be positive"):
        parse_lengths("0")


def lcserve_probe(*args):
    group = LcserveGroup()
    group.add_command(probe)
    return CliRunner().invoke(group, ["probe", *args])


def test_an_unreachable_server_is_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once the socket is closed
    result = lcserve_probe("--url", f"http://127.0.0.1:{port}", "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot reach http://127.0.0.1:{port}")
    assert "check --url" in lines[0]


def test_conflicting_options_are_one_line():
    result = lcserve_probe("--base-only", "--adapter", "writer")
    assert (
        result.exit_code == 2
        and result.output.strip() == "error: --base-only and --adapter exclude each other; pass one of them"
    )
