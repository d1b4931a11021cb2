"""`daemon.auth` against a real server on 127.0.0.1: an app with the API's route shapes and the auth
middleware, requested with `http.client` so that every path reaches the server exactly as written."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
from collections.abc import Iterator

import pytest
from aiohttp import web

import daemon.auth
from daemon.auth import auth_middleware, load_keys

API_KEY, API_KEY_2 = "sk-api-0123456789abcdef", "sk-api-fedcba9876543210"
ADMIN_KEY = "sk-admin-0123456789abcdef"
PUBLIC = frozenset({"/health", "/ready"})


async def ok(request: web.Request) -> web.Response:
    return web.json_response({"path": request.path})


def make_app(api_keys: list[str], admin_keys: list[str]) -> web.Application:
    app = web.Application(middlewares=[auth_middleware(api_keys, admin_keys, PUBLIC)])
    for path in ("/v1/models", "/health", "/ready", "/admin/workers", "/admin/{name}"):
        app.router.add_get(path, ok)
    app.router.add_post("/v1/completions", ok)
    return app


class Server:
    """An app served on an event loop in a thread; `get` sends one request with a raw target."""

    def __init__(self, app: web.Application) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner = web.AppRunner(app)
        self._run(self.runner.setup())
        self._run(web.TCPSite(self.runner, "127.0.0.1", 0).start())
        self.port: int = self.runner.addresses[0][1]

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def close(self) -> None:
        self._run(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def get(self, target: str, key: str | None = None, method: str = "GET",
            headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.putrequest(method, target, skip_accept_encoding=True)
            for name, value in ({"Authorization": f"Bearer {key}"} if key else {}).items():
                conn.putheader(name, value)
            for name, value in (headers or {}).items():
                conn.putheader(name, value)
            conn.putheader("Content-Length", "0")
            conn.endheaders()
            resp = conn.getresponse()
            body = resp.read()
            return resp.status, dict(resp.getheaders()), json.loads(body) if body.startswith(b"{") else {}
        finally:
            conn.close()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    srv = Server(make_app([API_KEY, API_KEY_2], [ADMIN_KEY]))
    yield srv
    srv.close()


def error(body: dict) -> tuple[str, str]:
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] is None
    return err["type"], err["code"]


def test_public_paths_need_no_key(server):
    assert server.get("/health")[0] == 200
    assert server.get("/ready")[0] == 200
    assert server.get("/health?probe=1")[0] == 200


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Basic " + API_KEY},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer "},
    {"Authorization": API_KEY},
    {"Authorization": "Bearer sk-api-wrong-key-00000"},
    {"Authorization": "Bearer " + API_KEY[:-1]},
])
def test_v1_without_a_valid_key_is_401_in_openai_shape(server, headers):
    status, resp_headers, body = server.get("/v1/models", headers=headers)
    assert status == 401
    assert resp_headers["WWW-Authenticate"] == "Bearer"
    assert error(body) == ("authentication_error", "invalid_api_key")
    assert API_KEY not in json.dumps(body)


def test_two_authorization_headers_are_refused(server):
    both = server.get("/v1/models", key=API_KEY, headers={"Authorization": f"Bearer {API_KEY_2}"})
    assert both[0] == 401


def test_v1_accepts_every_api_key_and_admin_keys(server):
    assert server.get("/v1/models", API_KEY)[0] == 200
    assert server.get("/v1/models", API_KEY_2)[0] == 200
    assert server.get("/v1/models", ADMIN_KEY)[0] == 200
    assert server.get("/v1/completions", API_KEY, method="POST")[0] == 200
    assert server.get("/v1/models", headers={"Authorization": f"bearer   {API_KEY}"})[0] == 200


def test_admin_needs_an_admin_key(server):
    status, headers, body = server.get("/admin/workers")
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    assert server.get("/admin/workers", "sk-admin-not-the-right-one")[0] == 401
    status, _, body = server.get("/admin/workers", API_KEY)
    assert status == 403 and error(body) == ("permission_error", "not_admin_key")
    status, _, body = server.get("/admin/workers", ADMIN_KEY)
    assert (status, body) == (200, {"path": "/admin/workers"})


def test_unknown_routes_are_401_without_a_key_and_404_with_one(server):
    for target in ("/nope", "/v1/nope", "/", "/metrics", "/ADMIN/workers", "/Health"):
        assert server.get(target)[0] == 401, target
        assert server.get(target, API_KEY)[0] == 404, target
    # a wrong method is not told apart from a missing route before the key is checked
    assert server.get("/v1/models", method="DELETE")[0] == 401
    assert server.get("/v1/models", API_KEY, method="DELETE")[0] == 405


@pytest.mark.parametrize("target", [
    "/v1/../admin/workers", "/health/../admin/workers", "/v1/%2e%2e/admin/workers", "/v1/%2E%2E/admin/workers",
    "/admin/%2e%2e/admin/workers", "/v1/..%2fadmin/workers", "/v1%2f..%2fadmin%2fworkers", "//admin/workers",
    "/admin//workers", "/admin/./workers", "/./admin/workers", "/health/.", "/health/..", "/v1\\..\\admin\\workers",
    "/admin/%2fworkers", "/health%2f..%2fadmin%2fworkers", "http://h/v1/../admin/workers",
])
def test_non_canonical_paths_are_400_whatever_the_key(server, target):
    for key in (None, API_KEY, ADMIN_KEY):
        status, _, body = server.get(target, key)
        assert status == 400, (target, key)
        assert error(body) == ("invalid_request_error", "invalid_path")


@pytest.mark.parametrize("target", ["/%61dmin/workers", "/admin/work%65rs", "http://h/admin/workers",
                                    "/admin/workers?x=/../../v1/models", "/admin/%252e%252e"])
def test_encoded_admin_paths_are_authorised_as_the_admin_route_they_reach(server, target):
    assert server.get(target, API_KEY)[0] == 403
    assert server.get(target, ADMIN_KEY)[0] == 200


def test_an_encoded_slash_into_admin_is_held_to_the_admin_rule(server):
    assert server.get("/admin%2Fworkers")[0] == 401
    assert server.get("/admin%2Fworkers", API_KEY)[0] == 403
    assert server.get("/admin%2Fworkers", ADMIN_KEY)[0] == 404  # aiohttp does not route it to /admin/workers


def test_every_key_is_compared_in_constant_time(server, monkeypatch):
    calls = []

    def compare_digest(a, b):
        calls.append((len(a), len(b)))
        return a == b

    monkeypatch.setattr(daemon.auth.hmac, "compare_digest", compare_digest)
    assert server.get("/v1/models", API_KEY)[0] == 200  # the first key: no early exit
    assert calls == [(32, 32)] * 3  # two API keys and the admin key, as same-length digests
    calls.clear()
    assert server.get("/admin/workers", "x" * 40)[0] == 401
    assert calls == [(32, 32)] * 4  # the admin key, then all three to tell 403 from 401


def test_the_admin_api_is_disabled_without_an_admin_key():
    srv = Server(make_app([API_KEY], []))
    try:
        for key in (None, API_KEY, ADMIN_KEY):
            status, _, body = srv.get("/admin/workers", key)
            assert status == 403 and error(body) == ("permission_error", "admin_api_disabled")
            assert "admin_keys" in body["error"]["message"]
        assert srv.get("/v1/models", API_KEY)[0] == 200
    finally:
        srv.close()


def test_without_api_keys_v1_is_open_but_admin_is_not():
    srv = Server(make_app([], [ADMIN_KEY]))
    try:
        assert srv.get("/v1/models")[0] == 200
        assert srv.get("/v1/models", "anything-at-all-here")[0] == 200
        assert srv.get("/nope")[0] == 404
        assert srv.get("/admin/workers")[0] == 401
        assert srv.get("/admin/workers", ADMIN_KEY)[0] == 200
        assert srv.get("/v1/../admin/workers")[0] == 400
    finally:
        srv.close()


@pytest.mark.parametrize("keys, match", [
    (["short-key"], "#1 .* 9 characters"),
    ([API_KEY, "has a space 0123456789"], "#2 .*visible ASCII"),
    (["ключ-0123456789abcdef"], "visible ASCII"),
])
def test_unusable_keys_are_refused_at_construction(keys, match):
    with pytest.raises(ValueError, match=match):
        auth_middleware(keys, [], PUBLIC)
    with pytest.raises(ValueError, match=match):
        auth_middleware([], keys, PUBLIC)
    with pytest.raises(ValueError, match=match):
        load_keys(keys, [])


def test_load_keys_reads_files_and_the_environment(tmp_path, monkeypatch, caplog):
    good = tmp_path / "keys"
    good.write_text(f"# the clients' keys\n\n  {API_KEY_2}  \n#{API_KEY}\n{API_KEY}\n")
    good.chmod(0o600)
    monkeypatch.setenv("NIMBUS_API_KEY", ADMIN_KEY)
    assert load_keys([API_KEY], [good], env_var="NIMBUS_API_KEY") == [API_KEY, API_KEY_2, ADMIN_KEY]
    assert "readable by other users" not in caplog.text
    monkeypatch.delenv("NIMBUS_API_KEY")
    assert load_keys([], [str(good)], env_var="NIMBUS_API_KEY") == [API_KEY_2, API_KEY]
    assert load_keys([], []) == []

    good.chmod(0o644)
    load_keys([], [good])
    assert "readable by other users" in caplog.text

    bad = tmp_path / "bad"
    bad.write_text(f"{API_KEY}\ntoo-short\n")
    with pytest.raises(ValueError, match=f"{bad}:2") as exc:
        load_keys([], [bad])
    assert "too-short" not in str(exc.value)  # a key never appears in an error
    with pytest.raises(ValueError, match="cannot read the key file"):
        load_keys([], [tmp_path / "missing"])
    monkeypatch.setenv("NIMBUS_API_KEY", "short")
    with pytest.raises(ValueError, match=r"\$NIMBUS_API_KEY"):
        load_keys([], [], env_var="NIMBUS_API_KEY")
