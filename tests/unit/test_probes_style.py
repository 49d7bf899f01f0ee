"""Style at length without an engine: the markers file, the preamble sizing, the scoring, the demo
writer's detection, and the one-line errors of the style and embedding checks."""

import http.server
import json
import threading
from contextlib import contextmanager

import pytest
from click.testing import CliRunner

from lcserve.adapters.style import CORPUS_FILE, corpus_bytes, is_demo_writer
from lcserve.adapters.training_length import LCSERVE_METADATA
from lcserve.cli import LcserveGroup
from lcserve.errors import ProbeError
from lcserve.serving.probes.cli import probe, refuse_generation_options
from lcserve.serving.probes.client import ProbeClient, ServedModel
from lcserve.serving.probes.runner import ProbeConfig, _plan_run, refuse_embedding, run_probe
from lcserve.serving.probes.sizing import Filler
from lcserve.serving.probes.style import (
    DEMO_MARKERS,
    load_markers,
    messages,
    questions,
    score_answer,
    size_preamble,
)
from lcserve.serving.probes.tasks import load_document


def test_markers_file_one_phrase_a_line(tmp_path):
    path = tmp_path / "markers.txt"
    path.write_text("# my writer\nIndeed\n\n  my dear reader \n")
    markers = load_markers(path)
    assert markers.phrases == ("indeed", "my dear reader") and markers.sign_off is None
    assert score_answer("Indeed, MY DEAR READER, tea.", markers) == {
        "markers": ["indeed", "my dear reader"],
        "signed_off": None,
    }


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"", "holds no marker; write one style phrase per line"),
        (b"# only a comment\n\n", "holds no marker"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "is not a UTF-8 text file"),
        (b"ahoy\x00there", "is not a UTF-8 text file"),
    ],
)
def test_a_markers_file_that_is_empty_or_not_text_is_one_clear_line(tmp_path, content, fragment):
    path = tmp_path / "markers.txt"
    path.write_bytes(content)
    with pytest.raises(ProbeError, match=fragment):
        load_markers(path)
    group = LcserveGroup()
    group.add_command(probe)
    # checked before any request: the URL is never reached
    result = CliRunner().invoke(group, ["probe", "--url", "http://127.0.0.1:9", "--style-markers", str(path)])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and fragment in lines[0], result.output


def test_demo_markers_score_the_corpus_answers():
    row = json.loads(corpus_bytes().decode().splitlines()[0])
    scored = score_answer(row["response"], DEMO_MARKERS)
    assert scored["signed_off"] is True and "ahoy" in scored["markers"] and "shipshape" in scored["markers"]
    assert score_answer("Keep bread in a box.", DEMO_MARKERS) == {"markers": [], "signed_off": False}


def test_questions_are_the_held_out_prompts():
    rows = [json.loads(line) for line in corpus_bytes().decode().splitlines() if line.strip()]
    held_out = [r["prompt"] for r in rows if r["split"] == "heldout"]
    trained = {r["prompt"] for r in rows if r["split"] == "train"}
    assert questions(6) == held_out[:6] and not trained & set(questions(24))


def word_count(chat):
    """A deterministic stand-in tokenizer: one token per word of the chat, plus 4 a turn for the template."""
    return sum(len(turn["content"].split()) + 4 for turn in chat)


def test_the_preamble_fits_every_question_and_the_answer_budget():
    filler = Filler(load_document())
    asked = questions(6)
    preamble, words = size_preamble(filler, word_count, 1024, 96, asked)
    assert all(word_count(messages(preamble, q)) <= 1024 - 96 for q in asked)
    assert max(word_count(messages(filler.prefix(words + 1), q)) for q in asked) > 1024 - 96  # the longest that fits
    chat = messages(preamble, asked[0])
    assert [t["role"] for t in chat] == ["user", "assistant", "user"] and chat[-1]["content"] == asked[0]
    assert chat[0]["content"].endswith(preamble) and messages(preamble, asked[1])[:2] == chat[:2]  # one prefix
    with pytest.raises(ProbeError, match="style length 40 is too short for a question and a 96-token answer"):
        size_preamble(filler, word_count, 40, 96, asked)


def test_the_demo_writer_is_known_by_its_corpus_hash(tmp_path):
    import hashlib

    meta = {"corpus_sha256": hashlib.sha256(corpus_bytes()).hexdigest(), "corpus": CORPUS_FILE}
    (tmp_path / LCSERVE_METADATA).write_text(json.dumps(meta))
    assert is_demo_writer(tmp_path)
    (tmp_path / LCSERVE_METADATA).write_text(json.dumps({**meta, "corpus_sha256": "0" * 64}))
    assert not is_demo_writer(tmp_path)
    assert not is_demo_writer(tmp_path / "missing")


def test_a_generation_probe_against_an_embedding_model_is_one_clear_line(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 32})
    )
    with pytest.raises(
        ProbeError, match=r"'e5' at http://x is an embedding model: passkey, needle, .* need text generation"
    ):
        refuse_embedding(ServedModel("e5", 512, None, str(tmp_path)), "http://x")
    refuse_embedding(ServedModel("gemma", 8192, None, str(tmp_path / "elsewhere")), "http://x")  # not local: no claim
    with pytest.raises(
        ProbeError,
        match=r"embedding model, which gets the retrieval probe: --style-markers applies to the generative probes only; drop it",
    ):
        refuse_generation_options("e5", "http://x", ["--style-markers"])
    refuse_generation_options("e5", "http://x", [])


@contextmanager
def models_server(listing: dict, seen: list):
    """A server that answers `/v1/models` with `listing` (what vLLM lists), noting each path asked."""

    class Models(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)
            body = json.dumps(listing).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Models)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


def test_the_probe_command_refuses_generation_options_for_an_embedding_model(tmp_path):
    """Through `lcserve probe`: a server whose model folder is an encoder (what `/v1/models` lists as
    its root) gets the retrieval probe, so a generation option is one line, before any probe request."""
    folder = tmp_path / "e5"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 32})
    )
    listing = {"data": [{"id": "e5", "root": str(folder), "max_model_len": 512, "parent": None}]}
    seen = []
    with models_server(listing, seen) as url:
        group = LcserveGroup()
        group.add_command(probe)
        result = CliRunner().invoke(
            group, ["probe", "--url", url, "--base", "e5", "--style-lengths", "1k", "--no-repetition"]
        )
        # the generative probes called directly (`lcserve serve --probe-on-start` does): one line too
        with pytest.raises(ProbeError, match="'e5' at .* is an embedding model: passkey, needle, loss"):
            run_probe(ProbeConfig(url=url, base="e5"))
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0] == (
        f"error: 'e5' at {url} is an embedding model, which gets the retrieval probe: --no-repetition, "
        "--style-lengths apply to the generative probes only; drop them"
    )
    assert seen == ["/v1/models", "/v1/models"]


def test_style_at_length_scores_the_demo_writer_or_every_adapter_with_the_users_markers(tmp_path):
    """Which adapters are writers, from what the server lists: the demo writer by its corpus hash,
    any adapter with --style-markers; another adapter without markers is left out with a note."""
    import hashlib

    writer, other = tmp_path / "writer", tmp_path / "other"
    for folder in (writer, other):
        folder.mkdir()
    meta = {"training_seq_len": 256, "corpus_sha256": hashlib.sha256(corpus_bytes()).hexdigest()}
    (writer / LCSERVE_METADATA).write_text(json.dumps(meta))
    (other / LCSERVE_METADATA).write_text(json.dumps({"training_seq_len": 512}))
    listing = {
        "data": [
            {"id": "base", "root": str(tmp_path / "base"), "max_model_len": 8192, "parent": None},
            {"id": "writer", "root": str(writer), "max_model_len": 8192, "parent": "base"},
            {"id": "other", "root": str(other), "max_model_len": 8192, "parent": "base"},
        ]
    }
    markers = tmp_path / "markers.txt"
    markers.write_text("indeed\n")
    with models_server(listing, []) as url:
        client = ProbeClient(url)
        demo = _plan_run(client, ProbeConfig(url=url, base="base"))
        mine = _plan_run(client, ProbeConfig(url=url, base="base", style_markers=markers))
        none = _plan_run(client, ProbeConfig(url=url, base="base", style=False))
        client.close()
    assert demo.plan.style_models == ("base", "writer") and demo.markers == DEMO_MARKERS
    assert demo.plan.style_lengths == (1024, 4096, 8192)
    assert demo.notes == [
        "style at length for other (no style markers known; pass --style-markers FILE)",
        "style at length 16384 (above max_model_len 8192)",
    ]
    assert mine.plan.style_models == ("base", "other", "writer") and mine.markers.phrases == ("indeed",)
    assert none.plan.style_models == () and none.plan.requests() < demo.plan.requests()
