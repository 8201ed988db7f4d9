"""API keys: create, list and revoke them in the history database, and look them up.

A key is ``sollol-`` followed by 43 URL-safe characters from ``secrets``
(256 random bits). The database stores its SHA-256 and a short visible
prefix, never the key itself, and ``create`` returns the key only once.

A plain SHA-256 is enough here. A slow password hash (bcrypt, Argon2) makes
guessing a low-entropy password costly, but a 256-bit random secret cannot be
guessed whatever the hash speed. A fast hash also keeps the per-request
lookup a dictionary access.
"""

import hashlib
import secrets
import time
from dataclasses import dataclass

import orjson
from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Engine

from .cluster import model_key
from .config import ConfigError
from .history import api_keys_table

KEY_PREFIX = "sollol-"
# Characters of the key kept in clear, enough to tell keys apart in a list.
VISIBLE_PREFIX_CHARS = len(KEY_PREFIX) + 6
QUOTA_PERIODS = ("day", "month")


class ApiKeyError(ConfigError):
    """An invalid key option or an unknown key id, reported by ``sollol keys``."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: int
    name: str
    prefix: str
    admin: bool = False
    # Model keys (``cluster.model_key`` form) the key may use; None: every model.
    models: frozenset[str] | None = None
    rpm: int | None = None  # requests per minute
    tpm: int | None = None  # tokens (prompt + completion) per minute
    quota_tokens: int | None = None
    quota_period: str | None = None  # "day" or "month", UTC calendar
    created_at: float = 0.0
    revoked_at: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def allows_model(self, model_key: str) -> bool:
        return self.models is None or model_key in self.models


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class KeyStore:
    """The ``api_keys`` table of one history database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(
        self,
        name: str,
        *,
        admin: bool = False,
        models: list[str] | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
        quota_tokens: int | None = None,
        quota_period: str | None = None,
    ) -> tuple[ApiKey, str]:
        """Store a new key and return it with its secret, which is not stored anywhere."""
        _check_options(name, rpm, tpm, quota_tokens, quota_period)
        secret = new_secret()
        values = {
            "name": name,
            "prefix": secret[:VISIBLE_PREFIX_CHARS],
            "secret_sha256": hash_secret(secret),
            "admin": admin,
            "models": None if models is None else _models_json(models),
            "rpm": rpm,
            "tpm": tpm,
            "quota_tokens": quota_tokens,
            "quota_period": quota_period if quota_tokens is not None else None,
            "created_at": time.time(),
            "revoked_at": None,
        }
        with self.engine.begin() as connection:
            result = connection.execute(insert(api_keys_table).values(**values))
            key_id = result.inserted_primary_key[0]
        return _key_from_row({**values, "id": key_id}), secret

    def list(self) -> list[ApiKey]:
        with self.engine.connect() as connection:
            rows = connection.execute(select(api_keys_table).order_by(api_keys_table.c.id))
            return [_key_from_row(row._mapping) for row in rows]

    def revoke(self, key_id: int) -> ApiKey:
        """Mark a key revoked; revoking a revoked key keeps its first revocation time."""
        table = api_keys_table
        with self.engine.begin() as connection:
            connection.execute(
                update(table)
                .where(table.c.id == key_id, table.c.revoked_at.is_(None))
                .values(revoked_at=time.time())
            )
            row = connection.execute(select(table).where(table.c.id == key_id)).first()
        if row is None:
            raise ApiKeyError(f"no API key with id {key_id}; `sollol keys list` shows the ids")
        return _key_from_row(row._mapping)

    def load(self) -> tuple[dict[str, ApiKey], int]:
        """Return the active keys by secret hash, and the count of keys ever created.

        The count includes revoked keys, so that revoking the last key does
        not turn authentication off.
        """
        table = api_keys_table
        with self.engine.connect() as connection:
            total = connection.execute(select(func.count()).select_from(table)).scalar_one()
            rows = connection.execute(select(table).where(table.c.revoked_at.is_(None)))
            active = {row.secret_sha256: _key_from_row(row._mapping) for row in rows}
        return active, int(total)


def _check_options(
    name: str,
    rpm: int | None,
    tpm: int | None,
    quota_tokens: int | None,
    quota_period: str | None,
) -> None:
    if not name or len(name) > 128:
        raise ApiKeyError(f"key name must be 1 to 128 characters, got {len(name)}")
    # The columns are 32-bit INTEGER (rpm, tpm) and 64-bit BIGINT (quota_tokens).
    bounds = (
        ("rpm", rpm, 2**31 - 1),
        ("tpm", tpm, 2**31 - 1),
        ("quota_tokens", quota_tokens, 2**63 - 1),
    )
    for option, value, maximum in bounds:
        if value is not None and not 1 <= value <= maximum:
            raise ApiKeyError(f"{option} must be from 1 to {maximum}, got {value}")
    if quota_tokens is not None and quota_period not in QUOTA_PERIODS:
        raise ApiKeyError(
            f"quota_period must be one of {', '.join(QUOTA_PERIODS)} when a token quota is set, "
            f"got {quota_period!r}"
        )


def _models_json(models: list[str]) -> str:
    keys = sorted({model_key(model.strip()) for model in models if model.strip()})
    if not keys:
        raise ApiKeyError("the model allow-list is empty; leave it out to allow every model")
    return orjson.dumps(keys).decode()


def _key_from_row(row: object) -> ApiKey:
    values = dict(row)  # type: ignore[call-overload]
    models = values.get("models")
    return ApiKey(
        id=int(values["id"]),
        name=values["name"],
        prefix=values["prefix"],
        admin=bool(values["admin"]),
        models=None if models is None else frozenset(orjson.loads(models)),
        rpm=values.get("rpm"),
        tpm=values.get("tpm"),
        quota_tokens=values.get("quota_tokens"),
        quota_period=values.get("quota_period"),
        created_at=float(values["created_at"]),
        revoked_at=values.get("revoked_at"),
    )
