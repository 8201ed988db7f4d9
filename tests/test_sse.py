import orjson
import pytest

from sollol.sse import LineParser, SSEParser

STREAM = (
    'data: {"delta": "caf\u00e9 \u2603"}\n\n'
    ": keep-alive\n\n"
    "event: note\ndata: line one\ndata: line two\n\n"
    "data: [DONE]\n\n"
).encode()


def parse_all(pieces):
    parser = SSEParser()
    events = []
    for piece in pieces:
        events.extend(parser.feed(piece))
    return events, parser


def test_whole_stream():
    events, parser = parse_all([STREAM])
    assert [event.data for event in events] == [
        '{"delta": "caf\u00e9 \u2603"}'.encode(),
        None,
        b"line one\nline two",
        b"[DONE]",
    ]
    assert events[1].raw == b": keep-alive\n\n"
    assert parser.pending == b""


@pytest.mark.parametrize("split_at", range(1, len(STREAM)))
def test_split_anywhere_gives_same_events(split_at):
    # Splits fall inside lines, inside "\n\n" and inside multi-byte UTF-8 characters.
    whole, _ = parse_all([STREAM])
    pieces, _ = parse_all([STREAM[:split_at], STREAM[split_at:]])
    assert pieces == whole


def test_one_byte_at_a_time():
    whole, _ = parse_all([STREAM])
    pieces, _ = parse_all([STREAM[i : i + 1] for i in range(len(STREAM))])
    assert pieces == whole


@pytest.mark.parametrize("newline", [b"\r\n", b"\r"])
def test_other_line_endings(newline):
    stream = STREAM.replace(b"\n", newline)
    for split_at in range(1, len(stream)):
        events, parser = parse_all([stream[:split_at], stream[split_at:]])
        events += parser.finish()
        assert [event.data for event in events] == [event.data for event in parse_all([STREAM])[0]]


def test_unfinished_event_stays_pending():
    events, parser = parse_all([b"data: 1\n\ndata: 2\n"])
    assert [event.data for event in events] == [b"1"]
    assert parser.pending == b"data: 2\n"


def test_finish_without_held_cr_adds_nothing():
    _, parser = parse_all([b"data: 1\n\n"])
    assert parser.finish() == []


def test_data_without_space():
    events, _ = parse_all([b"data:x\n\n"])
    assert events[0].data == b"x"


# -- newline-delimited JSON (Ollama's streams) ---------------------------------------

NDJSON = (
    "".join(
        orjson.dumps({"message": {"content": piece}, "done": False}).decode() + "\n"
        for piece in ("héllo", " wörld", " ✓")
    ).encode()
    + b'{"done": true}\n'
)


@pytest.mark.parametrize("split_at", range(len(NDJSON)))
def test_ndjson_split_anywhere_gives_same_lines(split_at):
    # Includes splits inside the two-byte and three-byte UTF-8 sequences.
    parser = LineParser()
    events = parser.feed(NDJSON[:split_at]) + parser.feed(NDJSON[split_at:])
    assert [orjson.loads(event.data) for event in events] == [
        orjson.loads(line) for line in NDJSON.splitlines()
    ]
    assert parser.pending == b""


def test_ndjson_last_line_without_newline_counts_at_finish():
    parser = LineParser()
    [first] = parser.feed(b'{"a": 1}\n\n{"b"')  # the empty line is skipped
    assert first.data == b'{"a": 1}'
    assert parser.pending == b'{"b"'
    assert parser.feed(b": 2}") == []
    [last] = parser.finish()
    assert last.data == b'{"b": 2}'
    assert last.raw == b'{"b": 2}\n'
