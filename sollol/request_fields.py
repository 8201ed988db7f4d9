"""Field rules for OpenAI request bodies, shared by the request checks and the OpenAPI description.

Each table maps a body field to a JSON Schema fragment. ``check_fields``
enforces the fragments, and ``sollol.openapi`` publishes the same fragments,
so the description cannot promise a check the router does not make. The
fragments use only ``type``, ``minimum``, ``maximum`` and ``items`` with a
``type``, which is all ``check_fields`` reads.

Ranges are checked only where a value outside them has no useful meaning:
llama-server, for one, reads a negative ``max_tokens`` as "generate until
the context is full". Other limits, such as OpenAI's ``temperature`` range,
are left to the node, since llama.cpp and Ollama accept wider ones.

Fields that are not listed here, llama-server's ``cache_prompt`` for one,
pass to the node unchecked.
"""

from typing import Any

from .errors import InvalidRequestError

JsonSchema = dict[str, Any]

# orjson reads a JSON integer beyond 64 bits as a float, so integer fields end there.
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
# llama.cpp keeps token ids in an int32_t (llama_token).
MAX_TOKEN_ID = 2**31 - 1
# llama-server reads the number of tokens to generate into an int32 as well.
# A larger value came back as a negative one in its error message.
MAX_TOKEN_COUNT = 2**31 - 1


def _nullable(*types: str, **constraints: Any) -> JsonSchema:
    return {"type": [*types, "null"], **constraints}


def _integer(minimum: int = INT64_MIN, maximum: int = INT64_MAX) -> JsonSchema:
    return _nullable("integer", minimum=minimum, maximum=maximum)


# A function the model may call, and a call it made. check_fields reads only
# the item type; check_tools and check_tool_calls check the rest, which the
# OpenAPI document publishes from here.
_FUNCTION_NAME: JsonSchema = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string"}},
}
TOOL: JsonSchema = {
    "type": "object",
    "required": ["function"],
    "properties": {"function": _FUNCTION_NAME},
}
TOOL_CALL: JsonSchema = {
    "type": "object",
    "required": ["function"],
    "properties": {
        "function": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}},
        }
    },
}

# Fields of both /v1/chat/completions and /v1/completions.
SAMPLING_FIELDS: dict[str, JsonSchema] = {
    "max_tokens": _integer(minimum=0, maximum=MAX_TOKEN_COUNT),
    "n": _integer(minimum=1),
    "temperature": _nullable("number"),
    "top_p": _nullable("number"),
    "presence_penalty": _nullable("number"),
    "frequency_penalty": _nullable("number"),
    "seed": _integer(),
    "stop": _nullable("string", "array", items={"type": "string"}),
    "logit_bias": _nullable("object"),
    "user": _nullable("string"),
}

CHAT_FIELDS: dict[str, JsonSchema] = {
    **SAMPLING_FIELDS,
    "max_completion_tokens": _integer(minimum=0, maximum=MAX_TOKEN_COUNT),
    "logprobs": _nullable("boolean"),
    "top_logprobs": _integer(minimum=0),
    "tools": _nullable("array", items=TOOL),
    "tool_choice": _nullable("string", "object"),
    "parallel_tool_calls": _nullable("boolean"),
    "response_format": _nullable("object"),
}

COMPLETION_FIELDS: dict[str, JsonSchema] = {
    **SAMPLING_FIELDS,
    # On /v1/completions, logprobs is the number of most likely tokens to return.
    "logprobs": _integer(minimum=0),
    "echo": _nullable("boolean"),
    "suffix": _nullable("string"),
    "best_of": _integer(minimum=1),
}

EMBEDDING_FIELDS: dict[str, JsonSchema] = {
    "dimensions": _integer(minimum=1),
    "user": _nullable("string"),
}

# Ollama's native API (/api/chat, /api/generate, /api/embed): the fields the
# router reads or translates. Ollama's num_predict: -1 means no limit, -2
# fill the context.
OLLAMA_FIELDS: dict[str, JsonSchema] = {
    "stream": _nullable("boolean"),
    "raw": _nullable("boolean"),
    "system": _nullable("string"),
    "options": _nullable("object"),
    "format": _nullable("string", "object"),
    "keep_alive": _nullable("string", "number"),
    "tools": _nullable("array", items=TOOL),
    "images": _nullable("array", items={"type": "string"}),
    "dimensions": _integer(minimum=1),
}
OLLAMA_OPTIONS: dict[str, JsonSchema] = {
    "num_predict": _integer(minimum=-2, maximum=MAX_TOKEN_COUNT),
    "num_ctx": _integer(minimum=1, maximum=MAX_TOKEN_COUNT),
    "temperature": _nullable("number"),
    "top_p": _nullable("number"),
    "top_k": _integer(),
    "min_p": _nullable("number"),
    "typical_p": _nullable("number"),
    "seed": _integer(),
    "stop": _nullable("array", items={"type": "string"}),
    "repeat_penalty": _nullable("number"),
    "repeat_last_n": _integer(),
    "presence_penalty": _nullable("number"),
    "frequency_penalty": _nullable("number"),
}
OLLAMA_MESSAGE: dict[str, JsonSchema] = {
    "role": {"type": "string"},
    "content": _nullable("string"),
    "images": _nullable("array", items={"type": "string"}),
    "tool_calls": _nullable("array", items={"type": "object"}),
    "tool_call_id": _nullable("string"),
    "tool_name": _nullable("string"),
}

TYPE_NAMES = {
    "integer": "an integer",
    "number": "a number",
    "boolean": "a boolean",
    "string": "a string",
    "object": "an object",
    "array": "an array",
    "null": "null",
}


def json_type_of(value: Any) -> str:
    """Return the JSON Schema type name of a value parsed from JSON."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _matches_type(value: Any, types: list[str]) -> bool:
    value_type = json_type_of(value)
    # Every integer is a number. A float with an integral value, such as
    # 2.0, is not an integer here, because the body goes to the node as
    # parsed and a node may read 2.0 as a float.
    return value_type in types or (value_type == "integer" and "number" in types)


def describe(schema: JsonSchema) -> str:
    """Return the accepted values of a fragment in words, e.g. 'an integer >= 0 or null'."""
    types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    names = []
    for type_name in types:
        name = TYPE_NAMES[type_name]
        if type_name in ("integer", "number"):
            name += _describe_range(schema.get("minimum"), schema.get("maximum"))
        if type_name == "array" and "items" in schema:
            item_name = TYPE_NAMES[schema["items"]["type"]].split(" ", 1)[1]
            name += f" of {item_name}s"
        names.append(name)
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " or " + names[-1]


def _describe_range(minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f" from {minimum} to {maximum}"
    if minimum is not None:
        return f" >= {minimum}"
    if maximum is not None:
        return f" <= {maximum}"
    return ""


def short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_fields(body: dict[str, Any], fields: dict[str, JsonSchema]) -> None:
    """Raise InvalidRequestError naming the first field of ``body`` that breaks its rule."""
    for name, schema in fields.items():
        if name not in body:
            continue
        value = body[name]
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        valid = _matches_type(value, types)
        if valid and json_type_of(value) in ("integer", "number"):
            valid = schema.get("minimum", value) <= value <= schema.get("maximum", value)
        if valid and isinstance(value, list) and "items" in schema:
            valid = all(_matches_type(item, [schema["items"]["type"]]) for item in value)
        if not valid:
            raise InvalidRequestError(
                f"'{name}' must be {describe(schema)}, got {short_repr(value)}", param=name
            )


def check_tool_calls(calls: Any, param: str, *, arguments_as_string: bool) -> None:
    """Check ``tool_calls`` of one message: objects whose ``function`` has a string name.

    OpenAI sends ``arguments`` as a JSON string, Ollama as an object. Nodes
    reject a malformed tool call with a 500 of their own, so it is caught here.
    """
    if calls is None:
        return
    if not isinstance(calls, list):
        raise InvalidRequestError(f"'{param}' must be an array of objects", param=param)
    for index, call in enumerate(calls):
        where = f"{param}[{index}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequestError(
                f"'{where}' must be an object whose 'function' has a string 'name'", param=where
            )
        arguments = function.get("arguments")
        expected = str if arguments_as_string else (dict, str)
        if arguments is not None and not isinstance(arguments, expected):
            kind = "a JSON string" if arguments_as_string else "an object"
            raise InvalidRequestError(
                f"'{where}.function.arguments' must be {kind}", param=f"{where}.function.arguments"
            )


def check_tools(tools: Any) -> None:
    """Check that each object in ``tools`` has a ``function`` with a string name."""
    if tools is None:
        return
    for index, tool in enumerate(tools if isinstance(tools, list) else []):
        if not isinstance(tool, dict):
            continue  # the type check of the field table reports it
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            where = f"tools[{index}]"
            raise InvalidRequestError(
                f"'{where}' must be an object whose 'function' has a string 'name'", param=where
            )
