"""API keys and route scopes, in process through httpx.ASGITransport, against a fake node.

Every route of the app is listed in ROUTES with its scope, and a test checks
that the list and the app's routes are the same, so a new route cannot
escape these tests.
"""

import contextlib
import logging

import httpx
import orjson
import pytest
import pytest_asyncio

from sollol.app import create_app
from sollol.auth import ROUTE_SCOPES, RouteScope, scope_of
from sollol.config import NodeConfig, NodeKind, Settings
from sollol.history import create_history_engine
from sollol.keys import KeyStore
from sollol.openapi import route_operations
from tests.support.fake_node import FakeOpenAINode

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}

# (method, path, JSON body or None, scope). Bodies are valid, so an accepted
# key gets the route's normal answer.
ROUTES = [
    ("POST", "/v1/chat/completions", CHAT, RouteScope.CLIENT),
    ("POST", "/v1/completions", {"model": "tiny", "prompt": "hi"}, RouteScope.CLIENT),
    ("POST", "/v1/embeddings", {"model": "tiny", "input": "hi"}, RouteScope.CLIENT),
    ("GET", "/v1/models", None, RouteScope.CLIENT),
    ("GET", "/v1/models/tiny", None, RouteScope.CLIENT),
    ("GET", "/openapi.json", None, RouteScope.CLIENT),
    ("GET", "/", None, RouteScope.CLIENT),
    ("GET", "/api/version", None, RouteScope.CLIENT),
    ("GET", "/api/tags", None, RouteScope.CLIENT),
    ("GET", "/api/ps", None, RouteScope.CLIENT),
    ("POST", "/api/show", {"model": "tiny"}, RouteScope.CLIENT),
    ("POST", "/api/chat", {**CHAT, "stream": False}, RouteScope.CLIENT),
    (
        "POST",
        "/api/generate",
        {"model": "tiny", "prompt": "hi", "stream": False},
        RouteScope.CLIENT,
    ),
    ("POST", "/api/embed", {"model": "tiny", "input": "hi"}, RouteScope.CLIENT),
    ("POST", "/api/embeddings", {"model": "tiny", "prompt": "hi"}, RouteScope.CLIENT),
    ("GET", "/sollol/route?model=tiny", None, RouteScope.ADMIN),
    ("POST", "/sollol/policy/reload", None, RouteScope.ADMIN),
    ("GET", "/sollol/keys", None, RouteScope.ADMIN),
    ("POST", "/sollol/keys", {"name": "made-by-test"}, RouteScope.ADMIN),
    ("DELETE", "/sollol/keys/999", None, RouteScope.ADMIN),
    ("GET", "/sollol/usage", None, RouteScope.ADMIN),
    ("GET", "/sollol/nodes", None, RouteScope.ADMIN),
    # Port 9 (discard) on loopback: the probe of the added node is refused.
    (
        "POST",
        "/sollol/nodes",
        {"url": "http://127.0.0.1:9", "kind": "openai", "name": "added-by-test"},
        RouteScope.ADMIN,
    ),
    ("DELETE", "/sollol/nodes/ghost", None, RouteScope.ADMIN),
    ("POST", "/sollol/nodes/ghost/drain", None, RouteScope.ADMIN),
    ("GET", "/metrics", None, RouteScope.ADMIN),
    ("GET", "/dashboard/state", None, RouteScope.ADMIN),
    # Never ends when accepted, so only rejections are sent to it.
    ("GET", "/dashboard/events", None, RouteScope.ADMIN),
    ("POST", "/dashboard/session", None, RouteScope.ADMIN),
    ("GET", "/health", None, RouteScope.OPEN),
    ("GET", "/dashboard", None, RouteScope.OPEN),
]
GUARDED = [route for route in ROUTES if route[3] is not RouteScope.OPEN]
# What an admin key gets where it is not 200: no learned model to load, a
# new key, no key 999.
ADMIN_STATUS = {
    ("POST", "/sollol/policy/reload"): 409,
    ("POST", "/sollol/keys"): 201,
    ("DELETE", "/sollol/keys/999"): 404,
    ("POST", "/sollol/nodes"): 201,
    ("DELETE", "/sollol/nodes/ghost"): 404,
    ("POST", "/sollol/nodes/ghost/drain"): 404,
}


@pytest.fixture(scope="module")
def fake_node():
    with FakeOpenAINode(models=("tiny", "other")) as node:
        yield node


@pytest.fixture
def database_url(tmp_path):
    return f"sqlite:///{tmp_path / 'history.db'}"


@pytest.fixture
def keys(database_url):
    """Secrets of an admin key, a client key limited to 'tiny' and a revoked key, and the store."""
    store = KeyStore(create_history_engine(database_url))
    _, admin_secret = store.create("ops", admin=True)
    _, client_secret = store.create("team", models=["tiny"])
    revoked, revoked_secret = store.create("gone")
    store.revoke(revoked.id)
    return {
        "admin": admin_secret,
        "client": client_secret,
        "revoked": revoked_secret,
        "store": store,
    }


def settings_for(database_url: str, node_url: str, **options) -> Settings:
    node = NodeConfig(url=node_url, kind=NodeKind.OPENAI, name="fake", models=("tiny", "other"))
    return Settings(
        database_url=database_url,
        nodes=(node,),
        keys_refresh_interval_s=0,
        learned_model_path="",
        **options,
    )


@contextlib.asynccontextmanager
async def running(settings: Settings):
    app = create_app(settings, probe_nodes=False)
    async with app.router.lifespan_context(app):
        cluster = app.state.cluster
        for node in cluster.nodes:
            node.health.probe_ok()
        cluster._rebuild_candidates()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


@pytest_asyncio.fixture
async def client(database_url, fake_node, keys):
    async with running(settings_for(database_url, fake_node.url)) as client:
        yield client


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def send(client, method, path, body, headers=None):
    content = None if body is None else orjson.dumps(body)
    return await client.request(method, path, content=content, headers=headers or {})


def assert_error_shape(response: httpx.Response, path: str) -> str:
    body = orjson.loads(response.content)
    if path.startswith("/api/"):
        assert set(body) == {"error"}
        assert isinstance(body["error"], str)
        return body["error"]
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]["message"]


def test_table_lists_every_route():
    app = create_app(Settings(database_url="sqlite:///:memory:"), probe_nodes=False)
    listed = {(path.split("?")[0], method) for method, path, _, _ in ROUTES}
    routed = set(route_operations(app.routes))
    routed = {(path.replace("{model}", "tiny").replace("{key_id}", "999"), m) for path, m in routed}
    routed = {(path.replace("{name}", "ghost"), m) for path, m in routed}
    assert listed == routed


@pytest.mark.parametrize(("method", "path", "body", "scope"), ROUTES)
def test_scope_table_matches(method, path, body, scope):
    assert scope_of(path.split("?")[0]) is scope


def test_sollol_prefix_is_admin():
    # A route added later under /sollol/ (node registration) needs no auth change.
    assert scope_of("/sollol/nodes") is RouteScope.ADMIN
    assert scope_of("/sollol/nodes/box-1") is RouteScope.ADMIN
    assert ("/sollol/*", RouteScope.ADMIN) in ROUTE_SCOPES


@pytest.mark.parametrize(("method", "path", "body", "scope"), GUARDED)
async def test_missing_key_is_401(client, method, path, body, scope):
    response = await send(client, method, path, body)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert "API key" in assert_error_shape(response, path)


@pytest.mark.parametrize(("method", "path", "body", "scope"), GUARDED)
async def test_wrong_key_is_401(client, method, path, body, scope):
    response = await send(client, method, path, body, bearer("sollol-not-a-real-key"))
    assert response.status_code == 401
    assert_error_shape(response, path)


@pytest.mark.parametrize(("method", "path", "body", "scope"), GUARDED)
async def test_revoked_key_is_401(client, keys, method, path, body, scope):
    response = await send(client, method, path, body, bearer(keys["revoked"]))
    assert response.status_code == 401
    assert_error_shape(response, path)


@pytest.mark.parametrize(("method", "path", "body", "scope"), GUARDED)
async def test_client_key_by_scope(client, keys, method, path, body, scope):
    response = await send(client, method, path, body, bearer(keys["client"]))
    if scope is RouteScope.ADMIN:
        assert response.status_code == 403
        assert "admin key" in assert_error_shape(response, path)
    else:
        assert response.status_code == 200, response.text


@pytest.mark.parametrize(("method", "path", "body", "scope"), GUARDED)
async def test_admin_key_everywhere(client, keys, method, path, body, scope):
    if path == "/dashboard/events":
        return  # an accepted event stream never ends, and ASGITransport waits for the end
    response = await send(client, method, path, body, bearer(keys["admin"]))
    assert response.status_code == ADMIN_STATUS.get((method, path), 200), response.text


@pytest.mark.parametrize("path", ["/health", "/dashboard"])
async def test_open_routes_need_no_key(client, path):
    response = await client.get(path)
    assert response.status_code == 200


async def test_malformed_authorization_is_401(client):
    response = await client.get("/v1/models", headers={"Authorization": "Basic dXNlcjpwdw=="})
    assert response.status_code == 401
    assert "Bearer" in assert_error_shape(response, "/v1/models")


async def test_allow_list_hides_models(client, keys):
    headers = bearer(keys["client"])
    listed = (await client.get("/v1/models", headers=headers)).json()
    assert [model["id"] for model in listed["data"]] == ["tiny"]
    tags = (await client.get("/api/tags", headers=headers)).json()
    assert [model["name"] for model in tags["models"]] == ["tiny:latest"]
    ps = (await client.get("/api/ps", headers=headers)).json()
    assert {model["name"] for model in ps["models"]} == {"tiny:latest"}
    admin_listed = (await client.get("/v1/models", headers=bearer(keys["admin"]))).json()
    assert [model["id"] for model in admin_listed["data"]] == ["other", "tiny"]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/chat/completions", {**CHAT, "model": "other"}),
        ("POST", "/v1/embeddings", {"model": "other", "input": "hi"}),
        ("GET", "/v1/models/other", None),
        ("POST", "/api/chat", {**CHAT, "model": "other", "stream": False}),
        ("POST", "/api/generate", {"model": "other", "prompt": ""}),
        ("POST", "/api/show", {"model": "other"}),
        ("POST", "/api/embed", {"model": "other", "input": []}),
    ],
)
async def test_disallowed_model_is_404(client, keys, fake_node, method, path, body):
    sent_before = len(fake_node.received)
    response = await send(client, method, path, body, bearer(keys["client"]))
    assert response.status_code == 404
    assert "other" in assert_error_shape(response, path)
    assert len(fake_node.received) == sent_before


async def test_dashboard_session_cookie(client, keys):
    opened = await client.post("/dashboard/session", headers=bearer(keys["admin"]))
    assert opened.status_code == 200
    cookie = opened.headers["set-cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie
    assert "Path=/dashboard" in cookie
    assert keys["admin"] not in cookie
    assert (await client.get("/dashboard/state")).status_code == 200
    # The cookie is only for the dashboard's own GET routes.
    client.cookies.set("sollol_dashboard", client.cookies["sollol_dashboard"], path="/")
    assert (await client.get("/metrics")).status_code == 401
    assert (await client.get("/v1/models")).status_code == 401


async def test_dashboard_session_ends_with_key(client, keys):
    store = keys["store"]
    extra, secret = store.create("dash-admin", admin=True)
    await asyncio_refresh(client)
    await client.post("/dashboard/session", headers=bearer(secret))
    assert (await client.get("/dashboard/state")).status_code == 200
    store.revoke(extra.id)
    await asyncio_refresh(client)
    assert (await client.get("/dashboard/state")).status_code == 401


async def asyncio_refresh(client) -> None:
    """Read the api_keys table now, as the refresh loop does every keys_refresh_interval_s."""
    client.app.state.tenancy.keys.refresh()


async def test_admin_api_creates_and_revokes(client, keys):
    admin = bearer(keys["admin"])
    created = await client.post(
        "/sollol/keys", json={"name": "new", "models": ["tiny:latest"], "rpm": 5}, headers=admin
    )
    assert created.status_code == 201
    body = created.json()
    assert body["models"] == ["tiny"]
    assert body["key"].startswith(body["prefix"])
    assert (await client.get("/v1/models", headers=bearer(body["key"]))).status_code == 200
    listed = (await client.get("/sollol/keys", headers=admin)).json()["keys"]
    assert all("key" not in key and "secret_sha256" not in key for key in listed)
    revoked = await client.delete(f"/sollol/keys/{body['id']}", headers=admin)
    assert revoked.status_code == 200
    assert revoked.json()["revoked_at"] is not None
    assert (await client.get("/v1/models", headers=bearer(body["key"]))).status_code == 401


async def test_admin_api_rejects_bad_key_options(client, keys):
    admin = bearer(keys["admin"])
    for options in (
        {"name": ""},
        {"name": "x", "rpm": 0},
        {"name": "x", "quota_tokens": 10},
        {"name": "x", "quota_period": "week"},
        {"name": "x", "models": []},
        {"name": "x", "colour": "red"},
    ):
        response = await client.post("/sollol/keys", json=options, headers=admin)
        assert response.status_code == 400, (options, response.text)


async def test_auth_off_without_keys(database_url, fake_node):
    async with running(settings_for(database_url, fake_node.url)) as client:
        assert (await client.get("/sollol/keys")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_auth_required_without_keys(database_url, fake_node):
    settings = settings_for(database_url, fake_node.url, auth="required")
    async with running(settings) as client:
        assert (await client.get("/v1/models")).status_code == 401
        assert (await client.get("/health")).status_code == 200


async def test_revoking_last_key_keeps_auth_on(database_url, fake_node):
    store = KeyStore(create_history_engine(database_url))
    only, _ = store.create("only", admin=True)
    store.revoke(only.id)
    async with running(settings_for(database_url, fake_node.url)) as client:
        assert (await client.get("/v1/models")).status_code == 401


async def test_requests_record_key_id(client, keys, database_url):
    response = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(keys["client"]))
    assert response.status_code == 200
    history = client.app.state.history
    history._write_buffered()
    engine = create_history_engine(database_url)
    with engine.connect() as connection:
        rows = connection.exec_driver_sql("SELECT key_id, prompt_tokens FROM requests").all()
    client_id = next(key.id for key in keys["store"].list() if key.name == "team")
    assert rows == [(client_id, 1)]


async def test_secrets_never_logged(client, keys, caplog):
    caplog.set_level(logging.DEBUG)
    for secret in (keys["client"], keys["admin"], keys["revoked"], "sollol-wrong"):
        await client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
        await client.get("/sollol/keys", headers=bearer(secret))
        await client.post("/api/chat", json={**CHAT, "stream": False}, headers=bearer(secret))
    assert "status=401" in caplog.text
    assert "status=403" in caplog.text
    for secret in (keys["client"], keys["admin"], keys["revoked"]):
        assert secret not in caplog.text
        assert secret[len("sollol-") :] not in caplog.text
