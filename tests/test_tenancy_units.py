"""Pure units of tenancy: limits, quota periods, prices, start times and node URL checks."""

from datetime import UTC, datetime

import httpx
import orjson
import pytest

from sollol.config import ConfigError, load_settings, validate_node_url
from sollol.costs import CostTable, Price
from sollol.errors import RateLimitError
from sollol.history import create_history_engine
from sollol.keys import ApiKey, ApiKeyError, KeyStore, hash_secret
from sollol.quotas import KeyLimits, period_bounds
from sollol.usage import parse_since
from tests.support.fake_node import FakeOpenAINode
from tests.test_auth import CHAT, bearer, running, settings_for


def key(**limits) -> ApiKey:
    return ApiKey(id=1, name="k", prefix="sollol-abcdef", **limits)


def utc(*parts: int) -> float:
    return datetime(*parts, tzinfo=UTC).timestamp()


class FakeClock:
    def __init__(self, now_s: float) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def test_rpm_allows_exactly_limit():
    limits = KeyLimits()
    limited = key(rpm=3)
    for _ in range(3):
        limits.admit(limited, 10)
    with pytest.raises(RateLimitError) as caught:
        limits.admit(limited, 10)
    assert caught.value.code == "rate_limit_requests"
    assert 1 <= int(caught.value.headers["Retry-After"]) <= 60


def test_tpm_counts_reservations_in_flight():
    limits = KeyLimits()
    limited = key(tpm=100)
    first = limits.admit(limited, 40)
    second = limits.admit(limited, 40)
    with pytest.raises(RateLimitError) as caught:
        limits.admit(limited, 40)  # 80 reserved + 40 > 100
    assert caught.value.code == "rate_limit_tokens"
    limits.settle(limited, limited.id, first, 10)
    limits.settle(limited, limited.id, second, 10)
    assert limits.reserved(limited.id) == 0
    limits.admit(limited, 40)  # 20 used + 40 fits


def test_tpm_charges_real_counts():
    limits = KeyLimits()
    limited = key(tpm=100)
    reserved = limits.admit(limited, 10)
    limits.settle(limited, limited.id, reserved, 95)  # the reply was longer than estimated
    with pytest.raises(RateLimitError):
        limits.admit(limited, 10)


def test_lone_request_over_limit_runs_once():
    limits = KeyLimits()
    limited = key(tpm=100)
    reserved = limits.admit(limited, 500)  # nothing used, nothing in flight
    with pytest.raises(RateLimitError):
        limits.admit(limited, 1)  # the 500 are reserved
    limits.settle(limited, limited.id, reserved, 300)
    with pytest.raises(RateLimitError):
        limits.admit(limited, 1)  # the window is full


def test_rejected_request_reserves_nothing():
    limits = KeyLimits()
    limited = key(tpm=100, rpm=1)
    limits.admit(limited, 10)
    with pytest.raises(RateLimitError):
        limits.admit(limited, 10)
    assert limits.reserved(limited.id) == 10


def test_quota_until_period_end():
    clock = FakeClock(utc(2026, 3, 31, 23, 0))
    limits = KeyLimits(clock=clock)
    limited = key(quota_tokens=100, quota_period="day")
    reserved = limits.admit(limited, 50)
    limits.settle(limited, limited.id, reserved, 100)
    with pytest.raises(RateLimitError) as caught:
        limits.admit(limited, 1)
    assert caught.value.code == "quota_exceeded"
    assert caught.value.headers["Retry-After"] == "3600"
    clock.now_s = utc(2026, 4, 1, 0, 0, 1)
    limits.admit(limited, 1)  # a new day


def test_quota_base_from_history():
    clock = FakeClock(utc(2026, 2, 10))
    limits = KeyLimits(clock=clock)
    limited = key(quota_tokens=100, quota_period="month")
    assert limits.needs_quota_base(limited) == utc(2026, 2, 1)
    limits.set_quota_base(limited.id, utc(2026, 2, 1), 100)
    assert limits.needs_quota_base(limited) is None
    with pytest.raises(RateLimitError):
        limits.admit(limited, 1)
    clock.now_s = utc(2026, 3, 1)
    assert limits.quota_used(limited) == 0


@pytest.mark.parametrize(
    ("period", "now", "start", "end"),
    [
        ("day", (2026, 5, 17, 13, 5), (2026, 5, 17), (2026, 5, 18)),
        ("month", (2026, 2, 28, 23, 59), (2026, 2, 1), (2026, 3, 1)),
        ("month", (2024, 12, 31, 12, 0), (2024, 12, 1), (2025, 1, 1)),
    ],
)
def test_period_bounds(period, now, start, end):
    assert period_bounds(period, utc(*now)) == (utc(*start), utc(*end))


def test_price_per_million_tokens():
    costs = CostTable(by_node={"box": Price(1.0, 2.0)}, by_model={"cloud": Price(10.0, 20.0)})
    assert costs.cost("tiny", "box", 1_000_000, 500_000) == pytest.approx(2.0)
    assert costs.cost("cloud", "box", 1000, 1000) == pytest.approx(0.03)
    assert costs.cost("tiny", "other", 1000, 1000) is None


def test_costs_from_config(tmp_path):
    path = tmp_path / "sollol.toml"
    path.write_text(
        '[costs]\ncurrency = "EUR"\n'
        '[costs.nodes."box-1"]\nprompt_per_million_tokens = 0.5\n'
        '[costs.models."llama3:latest"]\ncompletion_per_million_tokens = 2\n',
        encoding="utf-8",
    )
    costs = load_settings(path, environ={}).costs
    assert costs is not None
    assert costs.currency == "EUR"
    assert costs.by_node["box-1"] == Price(0.5, 0.0)
    assert costs.by_model["llama3"] == Price(0.0, 2.0)


def test_costs_reject_negative_price(tmp_path):
    path = tmp_path / "sollol.toml"
    path.write_text("[costs.nodes.a]\nprompt_per_million_tokens = -1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="prompt_per_million_tokens"):
        load_settings(path, environ={})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90m", 1_000_000.0 - 5400),
        ("24h", 1_000_000.0 - 86400),
        ("7d", 1_000_000.0 - 7 * 86400),
        ("2026-01-31", utc(2026, 1, 31)),
        ("2026-01-31T12:00:00+02:00", utc(2026, 1, 31, 10)),
    ],
)
def test_parse_since(text, expected):
    assert parse_since(text, now_s=1_000_000.0) == expected


def test_parse_since_rejects_words():
    with pytest.raises(ValueError, match="duration"):
        parse_since("yesterday")


def test_store_keeps_only_hash(tmp_path):
    url = f"sqlite:///{tmp_path / 'history.db'}"
    store = KeyStore(create_history_engine(url))
    created, secret = store.create("team", models=["a", "b:latest"], rpm=5)
    assert secret.startswith(created.prefix)
    assert len(secret) >= 40
    assert created.models == frozenset({"a", "b"})
    # SQLite in WAL mode keeps recent writes in history.db-wal.
    content = b"".join(path.read_bytes() for path in tmp_path.glob("history.db*"))
    assert secret.encode() not in content
    assert hash_secret(secret).encode() in content
    active, total = store.load()
    assert set(active) == {hash_secret(secret)}
    assert total == 1


def test_store_rejects_unknown_id(tmp_path):
    store = KeyStore(create_history_engine(f"sqlite:///{tmp_path / 'history.db'}"))
    with pytest.raises(ApiKeyError, match="no API key with id 7"):
        store.revoke(7)


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8080", "https://gpu-box-1.lan:9000/", "http://[::1]:11434", "http://node"],
)
def test_node_url_accepted(url):
    assert validate_node_url(url) == url.rstrip("/")


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://127.0.0.1:21", "scheme"),
        ("127.0.0.1:8080", "scheme"),
        ("http://user:secret@127.0.0.1:8080", "user name or password"),
        ("http://127.0.0.1:8080/v1", "path"),
        ("http://127.0.0.1:8080?x=1", "query"),
        ("http://127.0.0.1:8080#top", "fragment"),
        ("http://127.0.0.1:99999", "port"),
        ("http://127.0.0.1:0", "port"),
        ("http://bad_host:80", "host name"),
        ("http://-bad.lan:80", "host name"),
        ("http://10.0.0.300:80", "IPv4"),
        ("http://[::zz]:80", "host"),
        ("http://0.0.0.0:80", "unspecified"),
        ("http://127.0.0.1:80\r\nX: y", "control"),
        ("", "expected"),
    ],
)
def test_node_url_rejected(url, reason):
    with pytest.raises(ConfigError, match=reason) as caught:
        validate_node_url(url)
    assert "secret" not in str(caught.value)


@pytest.fixture(scope="module")
def fake_node():
    with FakeOpenAINode(models=("tiny", "other")) as node:
        yield node


async def test_limit_is_429_in_both_shapes(tmp_path, fake_node):
    url = f"sqlite:///{tmp_path / 'history.db'}"
    _, secret = KeyStore(create_history_engine(url)).create("slow", rpm=2)
    async with running(settings_for(url, fake_node.url)) as client:
        headers = bearer(secret)
        assert (await client.post("/v1/chat/completions", json=CHAT, headers=headers)).is_success
        ollama = {**CHAT, "stream": False}
        assert (await client.post("/api/chat", json=ollama, headers=headers)).is_success
        openai_reply = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
        ollama_reply = await client.post("/api/chat", json=ollama, headers=headers)
    assert openai_reply.status_code == 429
    assert 1 <= int(openai_reply.headers["retry-after"]) <= 60
    error = orjson.loads(openai_reply.content)["error"]
    assert error["type"] == "rate_limit_error"
    assert error["code"] == "rate_limit_requests"
    assert ollama_reply.status_code == 429
    assert "retry-after" in ollama_reply.headers
    assert set(orjson.loads(ollama_reply.content)) == {"error"}


async def test_openai_sdk_sees_rate_limit(tmp_path, fake_node):
    import openai

    url = f"sqlite:///{tmp_path / 'history.db'}"
    _, secret = KeyStore(create_history_engine(url)).create("slow", rpm=1)
    async with running(settings_for(url, fake_node.url)) as client:
        transport = httpx.ASGITransport(app=client.app)
        http_client = httpx.AsyncClient(transport=transport, base_url="http://router")
        sdk = openai.AsyncOpenAI(
            api_key=secret, base_url="http://router/v1", http_client=http_client, max_retries=0
        )
        await sdk.chat.completions.create(model="tiny", messages=CHAT["messages"])
        with pytest.raises(openai.RateLimitError):
            await sdk.chat.completions.create(model="tiny", messages=CHAT["messages"])
        bad = openai.AsyncOpenAI(
            api_key="sollol-wrong", base_url="http://router/v1", http_client=http_client
        )
        with pytest.raises(openai.AuthenticationError):
            await bad.models.list()
        await http_client.aclose()
