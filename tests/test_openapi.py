"""The OpenAPI description: it matches the route table, and the router conforms under fuzzing.

The fuzz tests run schemathesis in process against an app whose only node is
a fake that answers every request at once, so every valid request can be
served and any 5xx is the router's own.
"""

import time

import hypothesis
import orjson
import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.python import asgi
from starlette.routing import Route

from sollol.app import create_app
from sollol.config import NodeConfig, NodeKind, Settings
from sollol.openapi import OPENAPI_PATH, OPERATIONS, openapi_document, route_operations
from tests.support.fake_node import FakeOpenAINode

MODELS = ("tiny", "embed", "org/tiny")
EXAMPLES_PER_OPERATION = 40
# Operations without input that schemathesis can make invalid: two take no
# parameters, and any string in the path is a valid model id or node name.
WITHOUT_INVALID_INPUT = {
    ("/health", "GET"),
    ("/v1/models", "GET"),
    ("/v1/models/{model}", "GET"),
    ("/", "GET"),
    ("/api/version", "GET"),
    ("/api/tags", "GET"),
    ("/api/ps", "GET"),
    ("/metrics", "GET"),
    ("/dashboard/session", "POST"),
    ("/sollol/keys", "GET"),
    ("/dashboard", "GET"),
    ("/dashboard/state", "GET"),
    ("/sollol/policy/reload", "POST"),
    ("/sollol/nodes", "GET"),
    ("/sollol/nodes/{name}", "DELETE"),
    ("/sollol/nodes/{name}/drain", "POST"),
}

# Schemathesis leaves out the operation that serves the schema itself.
LOADED = sorted(key for key in OPERATIONS if key != (OPENAPI_PATH, "GET"))
# The dashboard's event stream never ends, so no example of it could finish.
FUZZED = [key for key in LOADED if key != ("/dashboard/events", "GET")]


@pytest.fixture(scope="module")
def fake_node():
    with FakeOpenAINode(models=MODELS) as node:
        yield node


def router_settings(database_path, node_url: str) -> Settings:
    node = NodeConfig(url=node_url, kind=NodeKind.OPENAI, name="fake", models=MODELS)
    return Settings(database_url=f"sqlite:///{database_path}", nodes=(node,))


@pytest.fixture
def router_schema(fake_node, tmp_path):
    """The schema loaded from the app's own /openapi.json, with the app's lifespan running.

    Loading the schema starts the lifespan, which probes the fake node. The
    schemathesis pytest plugin ends every lifespan after each test, and an
    app's lifespan cannot start twice, so each test gets its own app.
    """
    app = create_app(router_settings(tmp_path / "history.db", fake_node.url))
    schema = schemathesis.openapi.from_asgi(OPENAPI_PATH, app)
    try:
        yield schema
    finally:
        asgi.shutdown_lifespans()


def test_document_lists_every_route_once():
    app = create_app(Settings(database_url="sqlite:///:memory:"), probe_nodes=False)
    document = openapi_document(app.routes)
    documented = {
        (path, method.upper()) for path, item in document["paths"].items() for method in item
    }
    routed = set(route_operations(app.routes))
    assert documented == routed
    assert routed == set(OPERATIONS)


def test_document_rejects_undescribed_route():
    routes = [Route(path, lambda request: None, methods=[method]) for path, method in OPERATIONS]
    with pytest.raises(LookupError, match="DELETE /v1/models"):
        openapi_document([*routes, Route("/v1/models", lambda request: None, methods=["DELETE"])])


def test_document_rejects_missing_route():
    routes = [
        Route(path, lambda request: None, methods=[method])
        for path, method in OPERATIONS
        if path != "/v1/embeddings"
    ]
    with pytest.raises(LookupError, match="POST /v1/embeddings"):
        openapi_document(routes)


def test_schema_loads_as_openapi_31(router_schema):
    assert router_schema.raw_schema["openapi"] == "3.1.0"
    operations = {
        (result.ok().path, result.ok().method.upper())
        for result in router_schema.get_all_operations()
    }
    assert operations == set(LOADED)


def _integral_floats_to_ints(value):
    """Write 2.0 as 2: JSON Schema calls both integers, but the router takes only the second."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_integral_floats_to_ints(item) for item in value]
    if isinstance(value, dict):
        return {key: _integral_floats_to_ints(item) for key, item in value.items()}
    return value


def _use_model(case, model: str) -> None:
    """Point a generated valid request at a model the fake node serves."""
    if "model" in case.path_parameters:
        case.path_parameters["model"] = model
    elif case.query and "model" in case.query:
        case.query["model"] = model
    elif isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = model


def assert_ollama_error(response) -> None:
    body = orjson.loads(response.content)
    assert isinstance(body, dict), body
    assert set(body) == {"error"}, body
    assert isinstance(body["error"], str), body
    assert body["error"], body


def assert_openai_error(response) -> None:
    body = orjson.loads(response.content)
    assert isinstance(body, dict), body
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error.get("message"), str), error
    assert error["message"], error
    assert isinstance(error.get("type"), str), error
    assert error.get("param") is None or isinstance(error["param"], str), error
    assert error.get("code") is None or isinstance(error["code"], str), error


FUZZ_CASES = [
    pytest.param(path, method, mode, id=f"{method} {path} {mode.value}")
    for path, method in FUZZED
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE or (path, method) not in WITHOUT_INVALID_INPUT
]


@pytest.mark.parametrize(("path", "method", "mode"), FUZZ_CASES)
def test_fuzz_operation(router_schema, fake_node, path, method, mode):
    operation = router_schema[path][method]
    statuses: dict[int, int] = {}
    # Valid requests name a served model two times in three, so most reach the node.
    models = st.sampled_from([*MODELS[:2], None])

    @hypothesis.given(case=operation.as_strategy(mode), model=models)
    @hypothesis.settings(
        max_examples=EXAMPLES_PER_OPERATION,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[hypothesis.HealthCheck.too_slow],
    )
    def check(case, model):
        if mode is GenerationMode.POSITIVE:
            if isinstance(case.body, dict | list):
                case.body = _integral_floats_to_ints(case.body)
            if model is not None:
                _use_model(case, model)
        # The router probes the URL it is given, and tests send traffic to this
        # machine only: every string URL becomes the fake node's.
        body = case.body
        if path == "/sollol/nodes" and isinstance(body, dict) and isinstance(body.get("url"), str):
            body["url"] = fake_node.url
        response = case.call()
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code < 500, response.text
        if response.status_code >= 400 and path.startswith("/api/"):
            assert_ollama_error(response)
        elif response.status_code >= 400:
            assert_openai_error(response)
        case.validate_response(response)

    started = time.perf_counter()
    check()
    print(f"{method} {path} {mode.value}: {statuses} in {time.perf_counter() - started:.1f} s")
