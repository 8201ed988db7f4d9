"""Translation between Ollama's native API and the OpenAI API, field by field."""

import math

import orjson

from sollol.ollama_wire import (
    ReplyBuilder,
    chat_request,
    generate_request,
    normalized,
)


def test_chat_request_maps_options_format_and_stream():
    body = {
        "model": "llama3.2",
        "messages": [{"role": "user", "content": "hi"}],
        "options": {
            "num_predict": 7,
            "temperature": 0.2,
            "top_k": 5,
            "seed": 3,
            "stop": ["\n"],
            "num_ctx": 8192,
        },
        "format": "json",
        "keep_alive": "5m",
    }
    out = chat_request(body, "tiny")
    assert out["model"] == "tiny"
    assert out["max_tokens"] == 7
    assert (out["temperature"], out["top_k"], out["seed"], out["stop"]) == (0.2, 5, 3, ["\n"])
    assert out["response_format"] == {"type": "json_object"}
    # Ollama streams by default, and usage is requested for the history.
    assert out["stream"] is True
    assert out["stream_options"] == {"include_usage": True}
    # No per-request equivalent on llama-server.
    assert "num_ctx" not in out
    assert "keep_alive" not in out


def test_unlimited_num_predict_sets_no_max_tokens():
    out = chat_request({"messages": [], "options": {"num_predict": -1}, "stream": False}, "m")
    assert "max_tokens" not in out
    assert out["stream"] is False
    assert "stream_options" not in out


def test_json_schema_format_becomes_response_format():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    out = chat_request({"messages": [], "format": schema}, "m")
    assert out["response_format"]["type"] == "json_schema"
    assert out["response_format"]["json_schema"]["schema"] == schema


def test_tool_call_arguments_object_becomes_string():
    message = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"function": {"name": "add", "arguments": {"a": 1, "b": 2}}}],
    }
    out = chat_request({"messages": [message]}, "m")
    call = out["messages"][0]["tool_calls"][0]
    assert call["type"] == "function"
    assert call["function"]["name"] == "add"
    assert orjson.loads(call["function"]["arguments"]) == {"a": 1, "b": 2}


def test_images_become_data_url_parts():
    out = chat_request({"messages": [{"role": "user", "content": "what", "images": ["QUJD"]}]}, "m")
    parts = out["messages"][0]["content"]
    assert parts[0] == {"type": "text", "text": "what"}
    assert parts[1]["image_url"]["url"] == "data:image/png;base64,QUJD"


def test_generate_uses_chat_template_unless_raw():
    route, out = generate_request({"prompt": "p", "system": "s"}, "m")
    assert route == "/v1/chat/completions"
    assert out["messages"] == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "p"},
    ]
    route, out = generate_request({"prompt": "p", "raw": True}, "m")
    assert route == "/v1/completions"
    assert out["prompt"] == "p"


def test_whole_reply_becomes_final_line_with_counters():
    builder = ReplyBuilder(model="tiny", chat=True, started=0.0)
    reply = {
        "choices": [{"message": {"content": "hello"}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2},
        "timings": {"prompt_ms": 1.5, "predicted_ms": 4.0},
    }
    line = builder.whole(reply)
    assert line["message"] == {"role": "assistant", "content": "hello"}
    assert line["done"] is True
    assert line["done_reason"] == "length"
    assert (line["prompt_eval_count"], line["eval_count"]) == (9, 2)
    assert (line["prompt_eval_duration"], line["eval_duration"]) == (1_500_000, 4_000_000)
    assert isinstance(line["total_duration"], int)


def test_streamed_tool_call_fragments_join_into_one_object():
    builder = ReplyBuilder(model="m", chat=True, started=0.0)
    fragments = ['{"a"', ": 1}"]
    first = {"index": 0, "id": "call_1", "function": {"name": "add", "arguments": fragments[0]}}
    second = {"index": 0, "function": {"arguments": fragments[1]}}
    for call in (first, second):
        assert builder.piece({"choices": [{"delta": {"tool_calls": [call]}}]}) is None
    builder.piece({"choices": [{"delta": {}, "finish_reason": "tool_calls"}]})
    final = builder.final()
    assert final["done_reason"] == "stop"
    [call] = final["message"]["tool_calls"]
    assert call["id"] == "call_1"
    assert call["function"] == {"index": 0, "name": "add", "arguments": {"a": 1}}


def test_stream_piece_carries_text_only():
    builder = ReplyBuilder(model="m", chat=False, started=0.0)
    assert builder.piece({"choices": [{"text": ""}]}) is None
    line = builder.piece({"choices": [{"text": "ab"}]})
    assert line is not None
    assert (line["response"], line["done"]) == ("ab", False)
    assert builder.piece({"choices": [], "usage": {"prompt_tokens": 1}}) is None


def test_normalized_cuts_then_scales_to_unit_length():
    vector = normalized([3.0, 4.0, 12.0], dimensions=2)
    assert vector == [0.6, 0.8]
    assert math.isclose(sum(value * value for value in normalized([1.0, 2.0, 2.0])), 1.0)
    assert normalized([0.0, 0.0]) == [0.0, 0.0]
