"""Admin routes for keys and usage, under ``/sollol/`` and so admin-only (see ``sollol.auth``).

- ``GET /sollol/keys``: every key, revoked ones included, never a secret.
- ``POST /sollol/keys``: create a key from ``{"name", "admin", "models", "rpm",
  "tpm", "quota_tokens", "quota_period"}``; 201 with the secret in ``key``,
  the only time it is shown.
- ``DELETE /sollol/keys/{id}``: revoke a key.
- ``GET /sollol/usage?since=24h&key_id=ID``: tokens and cost per key, model and
  node, and the totals per key.
"""

import asyncio
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .errors import InvalidRequestError, SollolError
from .keys import QUOTA_PERIODS, ApiKey, ApiKeyError, KeyStore
from .openai_api import read_json_body
from .tenancy import Tenancy
from .usage import parse_since, totals_by_key, usage_report

MAX_ADMIN_BODY_BYTES = 64 * 1024
# Key ids are database INTEGERs, 32-bit signed on PostgreSQL.
MAX_KEY_ID = 2**31 - 1


class KeyNotFoundError(SollolError):
    status_code = 404
    error_type = "not_found_error"


def key_json(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "name": key.name,
        "prefix": key.prefix,
        "admin": key.admin,
        "models": None if key.models is None else sorted(key.models),
        "rpm": key.rpm,
        "tpm": key.tpm,
        "quota_tokens": key.quota_tokens,
        "quota_period": key.quota_period,
        "created_at": key.created_at,
        "revoked_at": key.revoked_at,
    }


class AdminRoutes:
    def __init__(self, tenancy: Tenancy) -> None:
        self._tenancy = tenancy
        self._store = KeyStore(tenancy.engine)

    def routes(self) -> list[Route]:
        return [
            Route("/sollol/keys", self.list_keys, methods=["GET"]),
            Route("/sollol/keys", self.create_key, methods=["POST"]),
            Route("/sollol/keys/{key_id:int}", self.revoke_key, methods=["DELETE"]),
            Route("/sollol/usage", self.usage, methods=["GET"]),
        ]

    async def list_keys(self, request: Request) -> Response:
        keys = await asyncio.to_thread(self._store.list)
        return _json({"keys": [key_json(key) for key in keys]})

    async def create_key(self, request: Request) -> Response:
        body = await read_json_body(request, MAX_ADMIN_BODY_BYTES)
        options = _key_options(body)
        try:
            key, secret = await asyncio.to_thread(self._store.create, **options)
        except ApiKeyError as exc:
            raise InvalidRequestError(str(exc)) from None
        await asyncio.to_thread(self._tenancy.keys.refresh)
        return _json({**key_json(key), "key": secret}, status_code=201)

    async def revoke_key(self, request: Request) -> Response:
        key_id = request.path_params["key_id"]
        if not 1 <= key_id <= MAX_KEY_ID:
            raise KeyNotFoundError(f"no API key with id {key_id}", param="key_id")
        try:
            key = await asyncio.to_thread(self._store.revoke, key_id)
        except ApiKeyError as exc:
            raise KeyNotFoundError(str(exc), param="key_id") from None
        await asyncio.to_thread(self._tenancy.keys.refresh)
        return _json(key_json(key))

    async def usage(self, request: Request) -> Response:
        params = request.query_params
        for name in ("since", "key_id"):
            if len(params.getlist(name)) > 1:
                raise InvalidRequestError(
                    f"query parameter '{name}' given more than once", param=name
                )
        since_s = None
        if "since" in params:
            try:
                since_s = parse_since(params["since"])
            except ValueError as exc:
                raise InvalidRequestError(str(exc), param="since") from None
        key_id = None
        if "key_id" in params:
            key_id = _parse_key_id(params["key_id"])
        rows = await asyncio.to_thread(
            usage_report, self._tenancy.engine, since_s=since_s, key_id=key_id
        )
        costs = self._tenancy.costs
        return _json(
            {
                "since": since_s,
                "currency": costs.currency if costs else "",
                "rows": [row.to_json() for row in rows],
                "totals": [row.to_json() for row in totals_by_key(rows)],
            }
        )


def _parse_key_id(text: str) -> int:
    try:
        key_id = int(text)
    except ValueError:
        key_id = 0
    if not 1 <= key_id <= MAX_KEY_ID:
        raise InvalidRequestError(
            f"'key_id' must be an integer from 1 to {MAX_KEY_ID}, got {text!r}", param="key_id"
        )
    return key_id


def _key_options(body: dict[str, Any]) -> dict[str, Any]:
    known = {"name", "admin", "models", "rpm", "tpm", "quota_tokens", "quota_period"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise InvalidRequestError(f"unknown fields: {', '.join(unknown)}", param=unknown[0])
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequestError("'name' must be a non-empty string", param="name")
    admin = body.get("admin")
    admin = False if admin is None else admin
    if not isinstance(admin, bool):
        raise InvalidRequestError("'admin' must be true or false", param="admin")
    models = body.get("models")
    if models is not None and (
        not isinstance(models, list) or not all(isinstance(m, str) and m for m in models)
    ):
        raise InvalidRequestError("'models' must be an array of model names", param="models")
    options: dict[str, Any] = {"name": name, "admin": admin, "models": models}
    for field in ("rpm", "tpm", "quota_tokens"):
        value = body.get(field)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise InvalidRequestError(f"'{field}' must be an integer", param=field)
        options[field] = value
    period = body.get("quota_period")
    if period is not None and period not in QUOTA_PERIODS:
        raise InvalidRequestError(
            f"'quota_period' must be one of {', '.join(QUOTA_PERIODS)}", param="quota_period"
        )
    options["quota_period"] = period
    return options


def _json(body: dict[str, Any], status_code: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status_code, media_type="application/json")
