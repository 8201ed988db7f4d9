"""The OpenAPI 3.1 description of the router's HTTP API, served at ``GET /openapi.json``.

The document is built from the app's route table on each request. Every
route needs an entry in ``OPERATIONS`` and every entry a route, or building
fails, so the description cannot list a route the app lacks or leave one out.
Request body fields come from ``sollol.request_fields``, the same tables the
request checks enforce. Bodies are open (``additionalProperties: true``)
because fields the router does not know pass through to the node.
"""

import re
from collections.abc import Iterable, Iterator
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from . import __version__
from .openai_api import TASKS
from .request_fields import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    EMBEDDING_FIELDS,
    MAX_TOKEN_ID,
    TOOL_CALL,
    JsonSchema,
)
from .routing.layout import ROUTING_POLICIES

OPENAPI_PATH = "/openapi.json"


def _ref(name: str) -> JsonSchema:
    return {"$ref": f"#/components/schemas/{name}"}


def _response_ref(name: str) -> JsonSchema:
    return {"$ref": f"#/components/responses/{name}"}


def _json(schema: JsonSchema, description: str, **extra: Any) -> JsonSchema:
    return {
        "description": description,
        "content": {"application/json": {"schema": schema}},
        **extra,
    }


_TOKEN_ID = {"type": "integer", "minimum": 0, "maximum": MAX_TOKEN_ID}
_TOKEN_IDS = {"type": "array", "minItems": 1, "items": _TOKEN_ID}
TEXT_OR_TOKENS: JsonSchema = {
    "description": "A string, an array of strings, an array of token ids or an array of those.",
    "anyOf": [
        {"type": "string"},
        {"type": "array", "minItems": 1, "items": {"type": "string"}},
        _TOKEN_IDS,
        {"type": "array", "minItems": 1, "items": _TOKEN_IDS},
    ],
}

# The fields every generating route reads itself, checked in sollol.openai_api.
_ROUTER_FIELDS: dict[str, JsonSchema] = {
    "model": {
        "type": "string",
        "minLength": 1,
        "description": "A model that GET /v1/models lists.",
    },
    "priority": {
        "type": "integer",
        "minimum": 1,
        "maximum": 10,
        "description": "SOLLOL's queue priority: 1 batch, 5 normal (default), 10 critical. "
        "Removed before the body reaches a node; wins over x-sollol-priority.",
    },
}
_STREAM_FIELDS: dict[str, JsonSchema] = {
    "stream": {"type": ["boolean", "null"]},
    "stream_options": {
        "type": ["object", "null"],
        "properties": {"include_usage": {"type": "boolean"}},
    },
}


def _request_body(required: dict[str, JsonSchema], fields: dict[str, JsonSchema]) -> JsonSchema:
    return {
        "type": "object",
        "required": ["model", *required],
        "properties": {**_ROUTER_FIELDS, **required, **fields},
        "additionalProperties": True,
    }


SCHEMAS: dict[str, JsonSchema] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "null"]},
                },
            }
        },
    },
    "ContentPart": {
        "type": "object",
        "required": ["type"],
        "properties": {"type": {"type": "string"}},
        "additionalProperties": True,
    },
    "Message": {
        "type": "object",
        "required": ["role"],
        "properties": {
            "role": {"type": "string"},
            "content": {"type": ["string", "array", "null"], "items": _ref("ContentPart")},
            "tool_calls": {"type": ["array", "null"], "items": TOOL_CALL},
        },
        "additionalProperties": True,
    },
    "ChatCompletionRequest": _request_body(
        {"messages": {"type": "array", "minItems": 1, "items": _ref("Message")}},
        {**_STREAM_FIELDS, **CHAT_FIELDS},
    ),
    "CompletionRequest": _request_body(
        {"prompt": TEXT_OR_TOKENS}, {**_STREAM_FIELDS, **COMPLETION_FIELDS}
    ),
    "EmbeddingRequest": _request_body(
        {"input": TEXT_OR_TOKENS},
        {"encoding_format": {"enum": ["float", "base64", None]}, **EMBEDDING_FIELDS},
    ),
    # Replies are the node's, with ``model`` set to the requested name, so
    # only their outline is given.
    "NodeReply": {
        "type": "object",
        "description": "The node's OpenAI reply; `model` is the name the client requested.",
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string"},
            "model": {"type": "string"},
            "choices": {"type": "array"},
            "data": {"type": "array"},
            "usage": {"type": ["object", "null"]},
        },
        "additionalProperties": True,
    },
    "Model": {
        "type": "object",
        "required": ["id", "object", "created", "owned_by"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "model"},
            "created": {"type": "integer"},
            "owned_by": {"type": "string"},
        },
    },
    "ModelList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": _ref("Model")},
        },
    },
    "Health": {
        "type": "object",
        "required": ["status", "queued", "nodes"],
        "properties": {
            "status": {"enum": ["ok", "unavailable"]},
            "queued": {"type": "integer", "description": "Requests waiting for a free node."},
            "nodes": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "kind", "url", "healthy", "models"],
                    "properties": {
                        "name": {"type": "string"},
                        "kind": {"enum": ["llamacpp", "ollama", "openai"]},
                        "url": {"type": "string"},
                        "healthy": {"type": "boolean"},
                        "models": {"type": "array", "items": {"type": "string"}},
                    },
                    "additionalProperties": True,
                },
            },
        },
    },
    "PolicyReload": {
        "type": "object",
        "required": ["loaded", "path", "message"],
        "properties": {
            "loaded": {"type": "boolean", "description": "True when the new model is in use."},
            "path": {"type": ["string", "null"]},
            "message": {"type": "string"},
        },
    },
    "RouteExplanation": {
        "type": "object",
        "required": ["model", "policy", "chosen", "candidates", "lower_score_wins"],
        "properties": {
            "model": {"type": "string"},
            "policy": {"type": "string"},
            "chosen": {"type": ["string", "null"]},
            "candidates": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["node", "score", "signals"],
                    "properties": {
                        "node": {"type": "string"},
                        "score": {
                            "type": ["number", "null"],
                            "description": "A cost, lower wins; null when the node cannot "
                            "take the request.",
                        },
                        "signals": {"type": "object"},
                    },
                },
            },
            "lower_score_wins": {"const": True},
        },
    },
}

_RETRY_AFTER = {"Retry-After": {"schema": {"type": "string"}, "description": "Seconds to wait."}}
_ERROR = _ref("Error")

RESPONSES: dict[str, JsonSchema] = {
    "BadRequest": _json(_ERROR, "Malformed JSON, or a missing or invalid field."),
    "ModelNotFound": _json(_ERROR, "No node serves the model; `code` is `model_not_found`."),
    "PayloadTooLarge": _json(_ERROR, "The body is larger than the router's max_body_bytes."),
    "QueueFull": _json(
        _ERROR,
        "Too many requests wait for the model; `code` is `queue_full`.",
        headers=_RETRY_AFTER,
    ),
    "BadGateway": _json(_ERROR, "Every node tried failed or could not be reached."),
    "NoNodeAvailable": _json(
        _ERROR,
        "No healthy node serves the model, or none became free within queue_timeout_s.",
        headers=_RETRY_AFTER,
    ),
    "NodeError": _json(_ERROR, "Another 4xx error that a node returned, with the node's status."),
}

_ROUTING_HEADERS = [
    {
        "name": "x-sollol-policy",
        "in": "header",
        "required": False,
        "description": "Routing policy for this request; empty means the configured default.",
        "schema": {"enum": ["", *sorted(ROUTING_POLICIES)]},
    },
    {
        "name": "x-sollol-priority",
        "in": "header",
        "required": False,
        "description": "Queue priority from 1 to 10 when the body has no `priority` field.",
        "schema": {"type": "integer", "minimum": 1, "maximum": 10},
    },
]
_REPLY_HEADERS = {
    "x-sollol-node": {"schema": {"type": "string"}, "description": "The node that replied."},
    "x-sollol-policy": {"schema": {"type": "string"}, "description": "The policy that chose it."},
}


def _generating_operation(summary: str, body_schema: str, *, streams: bool) -> JsonSchema:
    content: JsonSchema = {"application/json": {"schema": _ref("NodeReply")}}
    if streams:
        # One server-sent event, the way schemathesis reads a schema for
        # text/event-stream; OpenAPI 3.2 calls this the itemSchema.
        content["text/event-stream"] = {
            "schema": {
                "type": "object",
                "required": ["data"],
                "properties": {
                    "data": {
                        "type": "string",
                        "description": "A chunk as JSON; the last event's data is [DONE].",
                    }
                },
            },
        }
    return {
        "summary": summary,
        "parameters": _ROUTING_HEADERS,
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _ref(body_schema)}},
        },
        "responses": {
            "200": {
                "description": "The node's reply.",
                "headers": _REPLY_HEADERS,
                "content": content,
            },
            "400": _response_ref("BadRequest"),
            "404": _response_ref("ModelNotFound"),
            "413": _response_ref("PayloadTooLarge"),
            "429": _response_ref("QueueFull"),
            "502": _response_ref("BadGateway"),
            "503": _response_ref("NoNodeAvailable"),
            "4XX": _response_ref("NodeError"),
        },
    }


def _query(name: str, schema: JsonSchema, description: str, required: bool = False) -> JsonSchema:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "description": description,
        "schema": schema,
    }


_NON_NEGATIVE = {"type": "number", "minimum": 0}

OPERATIONS: dict[tuple[str, str], JsonSchema] = {
    ("/health", "GET"): {
        "summary": "Nodes with their health, models and routing signals",
        "responses": {
            "200": _json(_ref("Health"), "At least one node is healthy."),
            "503": _json(_ref("Health"), "No node is healthy."),
        },
    },
    ("/sollol/policy/reload", "POST"): {
        "summary": "Load the learned model's artifact now; the previous model stays on failure",
        "responses": {
            "200": _json(_ref("PolicyReload"), "The new model is in use."),
            "409": _json(_ERROR, "Missing or incompatible; nothing changed."),
        },
    },
    ("/sollol/route", "GET"): {
        "summary": "The node the router would choose now, without sending anything",
        "parameters": [
            _query("model", {"type": "string", "minLength": 1}, "Model to route.", True),
            _query(
                "policy", {"enum": ["", *sorted(ROUTING_POLICIES)]}, "Empty: the default policy."
            ),
            _query("task", {"enum": list(TASKS)}, "Kind of request (default chat)."),
            _query("prompt_tokens", _NON_NEGATIVE, "Prompt length in tokens (default 0)."),
            _query("max_tokens", _NON_NEGATIVE, "Output limit (default 256, 0 for embedding)."),
            _query("priority", {"type": "integer", "minimum": 1, "maximum": 10}, "Default 5."),
        ],
        "responses": {
            "200": _json(_ref("RouteExplanation"), "The choice and every candidate's score."),
            "400": _response_ref("BadRequest"),
            "404": _response_ref("ModelNotFound"),
        },
    },
    ("/v1/chat/completions", "POST"): _generating_operation(
        "Chat completion, streamed or not", "ChatCompletionRequest", streams=True
    ),
    ("/v1/completions", "POST"): _generating_operation(
        "Text completion, streamed or not", "CompletionRequest", streams=True
    ),
    ("/v1/embeddings", "POST"): _generating_operation(
        "Embeddings as floats or base64", "EmbeddingRequest", streams=False
    ),
    ("/v1/models", "GET"): {
        "summary": "Models of the healthy nodes",
        "responses": {"200": _json(_ref("ModelList"), "The models.")},
    },
    ("/v1/models/{model}", "GET"): {
        "summary": "One model of the healthy nodes",
        "parameters": [
            {
                "name": "model",
                "in": "path",
                "required": True,
                "description": "Model id; it may contain '/'.",
                "schema": {"type": "string", "minLength": 1},
            }
        ],
        "responses": {
            "200": _json(_ref("Model"), "The model."),
            "404": _response_ref("ModelNotFound"),
        },
    },
    (OPENAPI_PATH, "GET"): {
        "summary": "This description",
        "responses": {"200": _json({"type": "object"}, "The OpenAPI 3.1 document.")},
    },
}


_OLLAMA_ERROR: JsonSchema = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}},
}
_OLLAMA_REQUEST: JsonSchema = {
    "type": "object",
    "required": ["model"],
    "properties": {"model": {"type": "string", "minLength": 1}},
    "additionalProperties": True,
}


def _ollama_operation(summary: str, *, body: bool = True, streams: bool = False) -> JsonSchema:
    """Describe an operation of Ollama's native API, whose errors are ``{"error": "<text>"}``."""
    ok: JsonSchema = {"application/json": {"schema": {"type": "object"}}}
    if streams:
        ok["application/x-ndjson"] = {"schema": {"type": "string"}}
    operation: JsonSchema = {
        "summary": summary,
        "tags": ["ollama"],
        "responses": {
            "200": {"description": "Ollama's reply.", "content": ok},
            "400": _json(_OLLAMA_ERROR, "A bad request, in Ollama's error shape."),
            "404": _json(_OLLAMA_ERROR, "No node serves the model."),
            "413": _json(_OLLAMA_ERROR, "The body is larger than max_body_bytes."),
            "429": _json(_OLLAMA_ERROR, "Too many requests wait for the model."),
            "502": _json(_OLLAMA_ERROR, "Every node tried failed."),
            "503": _json(_OLLAMA_ERROR, "No node can take the request now."),
            "504": _json(_OLLAMA_ERROR, "No node answered within first_token_timeout_s."),
        },
    }
    if body:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _OLLAMA_REQUEST}},
        }
    return operation


OPERATIONS.update(
    {
        ("/metrics", "GET"): {
            "summary": "Prometheus metrics in the text exposition format",
            "responses": {
                "200": {
                    "description": "The metrics.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        },
        ("/dashboard", "GET"): {
            "summary": "The live dashboard: an HTML page that reads /dashboard/events",
            "responses": {
                "200": {
                    "description": "The page.",
                    "content": {"text/html": {"schema": {"type": "string"}}},
                }
            },
        },
        ("/dashboard/state", "GET"): {
            "summary": "The dashboard's data once: nodes, recent requests, percentiles",
            "responses": {
                "200": {
                    "description": "The state.",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            },
        },
        ("/dashboard/events", "GET"): {
            "summary": "The dashboard's data as server-sent events, one state per interval",
            "responses": {
                "200": {
                    "description": "An endless stream of `data: <state JSON>` events.",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}},
                },
                "503": _json(_ERROR, "Too many dashboards are open."),
            },
        },
        ("/", "GET"): {
            "summary": "Ollama's liveness check: 'Ollama is running'",
            "tags": ["ollama"],
            "responses": {
                "200": {
                    "description": "The router is up.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        },
        ("/api/version", "GET"): _ollama_operation("The Ollama API version served", body=False),
        ("/api/tags", "GET"): _ollama_operation("Models across all nodes, with tags", body=False),
        ("/api/ps", "GET"): _ollama_operation(
            "Loaded models and the node holding each", body=False
        ),
        ("/api/show", "POST"): _ollama_operation("Details of one model"),
        ("/api/chat", "POST"): _ollama_operation(
            "Chat, streamed as NDJSON by default", streams=True
        ),
        ("/api/generate", "POST"): _ollama_operation("Generate from a prompt", streams=True),
        ("/api/embed", "POST"): _ollama_operation("Normalised embeddings of one or more texts"),
        ("/api/embeddings", "POST"): _ollama_operation("Legacy: the embedding of one prompt"),
    }
)

_OBJECT: JsonSchema = {"type": "object"}
_KEY_ID: JsonSchema = {
    "name": "key_id",
    "in": "path",
    "required": True,
    "description": "The key's id, as `GET /sollol/keys` lists it.",
    "schema": {"type": "integer"},
}

_NODE_NAME: JsonSchema = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "The node's name, as `GET /sollol/nodes` lists it.",
    "schema": {"type": "string"},
}

# Key management, usage and nodes; admin-only when authentication is on.
_AUTH_ERRORS: JsonSchema = {
    "401": _json(_ERROR, "Authentication is on and the request has no valid API key."),
    "403": _json(_ERROR, "The API key is not an admin key."),
}
OPERATIONS.update(
    {
        ("/sollol/keys", "GET"): {
            "summary": "Every API key, revoked ones included, without secrets",
            "responses": {"200": _json(_OBJECT, "The keys."), **_AUTH_ERRORS},
        },
        ("/sollol/keys", "POST"): {
            "summary": "Create an API key; the reply's `key` is the only copy of the secret",
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {
                                "name": {"type": "string", "minLength": 1, "maxLength": 128},
                                "admin": {"type": ["boolean", "null"]},
                                "models": {
                                    "type": ["array", "null"],
                                    "items": {"type": "string", "minLength": 1},
                                },
                                "rpm": {"type": ["integer", "null"], "minimum": 1},
                                "tpm": {"type": ["integer", "null"], "minimum": 1},
                                "quota_tokens": {"type": ["integer", "null"], "minimum": 1},
                                "quota_period": {"enum": ["day", "month", None]},
                            },
                            "additionalProperties": False,
                        }
                    }
                },
            },
            "responses": {
                "201": _json(_OBJECT, "The new key with its secret."),
                "400": _response_ref("BadRequest"),
                **_AUTH_ERRORS,
            },
        },
        ("/sollol/keys/{key_id}", "DELETE"): {
            "summary": "Revoke an API key",
            "parameters": [_KEY_ID],
            "responses": {
                "200": _json(_OBJECT, "The revoked key."),
                "404": _json(_ERROR, "No key has this id."),
                **_AUTH_ERRORS,
            },
        },
        ("/sollol/usage", "GET"): {
            "summary": "Tokens and cost per API key, model and node, from the history",
            "parameters": [
                _query(
                    "since",
                    {
                        "anyOf": [
                            {"type": "string", "pattern": "^[0-9]{1,6}[smhd]$"},
                            {"type": "string", "format": "date"},
                            {"type": "string", "format": "date-time"},
                        ]
                    },
                    "A duration back (24h, 7d) or an ISO date.",
                ),
                _query(
                    "key_id",
                    {"type": "integer", "minimum": 1, "maximum": 2**31 - 1},
                    "Only this key's requests.",
                ),
            ],
            "responses": {
                "200": _json(_OBJECT, "Rows per key, model and node, and totals per key."),
                "400": _response_ref("BadRequest"),
                **_AUTH_ERRORS,
            },
        },
        ("/sollol/nodes", "GET"): {
            "summary": "The cluster's nodes with their source, state and health",
            "responses": {"200": _json(_OBJECT, "The nodes."), **_AUTH_ERRORS},
        },
        ("/sollol/nodes", "POST"): {
            "summary": "Add a node; without `kind` the router detects it from the URL",
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["url"],
                            "properties": {
                                "url": {"type": "string", "format": "uri"},
                                "kind": {"enum": ["llamacpp", "ollama", "openai"]},
                                "name": {
                                    "type": "string",
                                    "maxLength": 256,
                                    "pattern": "^[^/]*$",
                                },
                                "models": {
                                    "type": ["array", "null"],
                                    "items": {"type": "string", "minLength": 1},
                                },
                            },
                            "additionalProperties": False,
                        }
                    }
                },
            },
            "responses": {
                "201": _json(_OBJECT, "The node, added or back in rotation."),
                "400": _response_ref("BadRequest"),
                "409": _json(_ERROR, "Another node has this name."),
                **_AUTH_ERRORS,
            },
        },
        ("/sollol/nodes/{name}", "DELETE"): {
            "summary": "Remove a node; its requests in flight finish",
            "parameters": [_NODE_NAME],
            "responses": {
                "200": _json(_OBJECT, "The removed node."),
                "404": _json(_ERROR, "No node has this name."),
                **_AUTH_ERRORS,
            },
        },
        ("/sollol/nodes/{name}/drain", "POST"): {
            "summary": "Send a node no new requests; its requests in flight finish",
            "parameters": [_NODE_NAME],
            "responses": {
                "200": _json(_OBJECT, "The draining node."),
                "404": _json(_ERROR, "No node has this name."),
                **_AUTH_ERRORS,
            },
        },
        ("/dashboard/session", "POST"): {
            "summary": "Trade an admin key for the dashboard's session cookie",
            "responses": {
                "200": _json(_OBJECT, "The cookie is set when auth is on."),
                **_AUTH_ERRORS,
            },
        },
    }
)


def route_operations(routes: Iterable[BaseRoute]) -> Iterator[tuple[str, str]]:
    """Yield (OpenAPI path, method) for each method of each route.

    Starlette adds HEAD to every GET route; it is left out of the description.
    """
    for route in routes:
        if not isinstance(route, Route):
            raise TypeError(f"cannot describe route {route!r}: only plain Routes are supported")
        # "/v1/models/{model:path}" becomes "/v1/models/{model}".
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)
        for method in sorted((route.methods or set()) - {"HEAD"}):
            yield path, method


def openapi_document(routes: Iterable[BaseRoute]) -> dict[str, Any]:
    """Build the OpenAPI document for ``routes``.

    Raises LookupError when a route has no entry in ``OPERATIONS`` or an entry
    has no route.
    """
    paths: dict[str, dict[str, JsonSchema]] = {}
    described = set()
    for path, method in route_operations(routes):
        operation = OPERATIONS.get((path, method))
        if operation is None:
            raise LookupError(f"route {method} {path} has no entry in sollol.openapi.OPERATIONS")
        paths.setdefault(path, {})[method.lower()] = operation
        described.add((path, method))
    unrouted = sorted(set(OPERATIONS) - described)
    if unrouted:
        listed = ", ".join(f"{method} {path}" for path, method in unrouted)
        raise LookupError(f"sollol.openapi.OPERATIONS describes routes the app lacks: {listed}")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "SOLLOL",
            "version": __version__,
            "description": "An OpenAI- and Ollama-compatible router in front of llama.cpp "
            "and Ollama nodes. Error replies have the OpenAI shape "
            '{"error": {"message", "type", "param", "code"}}, except on Ollama\'s '
            'routes (/api/...), where they are {"error": "<text>"} as in Ollama.',
        },
        "paths": paths,
        "components": {"schemas": SCHEMAS, "responses": RESPONSES},
    }


def openapi_route() -> Route:
    """Return the ``GET /openapi.json`` route, which describes the app it is mounted in."""

    async def openapi(request: Request) -> Response:
        document = openapi_document(request.app.routes)
        return Response(orjson.dumps(document), media_type="application/json")

    return Route(OPENAPI_PATH, openapi, methods=["GET"])
