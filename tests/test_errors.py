import orjson
import pytest

from sollol.errors import upstream_error_from_reply


def test_llama_server_error_shape():
    body = orjson.dumps(
        {"error": {"code": 400, "message": "context too long", "type": "exceed_context_size_error"}}
    )
    error = upstream_error_from_reply(400, body, "node-a")
    assert error.status_code == 400
    assert orjson.loads(error.to_body()) == {
        "error": {
            "message": "context too long",
            "type": "exceed_context_size_error",
            "param": None,
            "code": None,
        }
    }


def test_ollama_native_error_text():
    error = upstream_error_from_reply(404, b'{"error":"model \'x\' not found"}', "node-a")
    assert error.status_code == 404
    assert error.message == "model 'x' not found"
    assert error.error_type == "invalid_request_error"


def test_unavailable_node_stays_503_and_may_be_retried():
    error = upstream_error_from_reply(503, b"server busy", "node-a")
    assert error.status_code == 503
    assert "node-a" in error.message
    assert "x-should-retry" not in error.headers


@pytest.mark.parametrize("status", [500, 501, 502])
def test_server_errors_become_bad_gateway(status):
    error = upstream_error_from_reply(status, b"boom", "node-a")
    assert error.status_code == 502
    assert "node-a" in error.message
    assert "boom" in error.message
    assert error.headers["x-should-retry"] == "false"


def test_non_json_body_is_kept_as_text():
    error = upstream_error_from_reply(422, b"plain words", "node-a")
    assert error.message == "plain words"
