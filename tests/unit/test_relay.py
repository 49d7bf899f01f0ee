"""The relay's pure parts: asking vLLM for a stream's `usage`, and taking it out again."""

from lcserve.serving.relay import take_usage, with_stream_usage


def test_take_usage_strips_only_the_usage_chunk():
    block = (
        b'data: {"choices":[{"text":"a"}]}\n\n'
        b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":3,"total_tokens":5}}\n\n'
    )
    kept, usage = take_usage(block, strip=True)
    assert usage == {"prompt_tokens": 3, "total_tokens": 5}
    assert kept == b'data: {"choices":[{"text":"a"}]}\n\n'
    kept, _ = take_usage(block, strip=False)
    assert kept == block


def test_take_usage_keeps_a_chunk_with_choices_and_usage():
    """vLLM's continuous_usage_stats puts usage on every chunk: those carry text and must stay."""
    block = b'data: {"choices":[{"text":"a"}],"usage":{"prompt_tokens":3,"total_tokens":4}}\n\n'
    kept, usage = take_usage(block, strip=True)
    assert kept == block and usage == {"prompt_tokens": 3, "total_tokens": 4}


def test_with_stream_usage_asks_only_when_the_client_did_not():
    body = {"model": "m", "prompt": "hi", "stream": True, "stream_options": {"continuous_usage_stats": False}}
    asking = with_stream_usage(body)
    assert asking == {**body, "stream_options": {"continuous_usage_stats": False, "include_usage": True}}
    assert "include_usage" not in body["stream_options"]  # the client's body is left as it was
    assert list(with_stream_usage({"stream": True, "model": "m"})) == ["stream", "model", "stream_options"]
    assert with_stream_usage({**body, "stream_options": {"include_usage": True}}) is None
    assert with_stream_usage({"model": "m", "prompt": "hi"}) is None
    assert with_stream_usage({"model": "m", "prompt": "hi", "stream": False}) is None
