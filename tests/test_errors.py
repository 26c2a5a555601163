"""The one error path: every failure a client sees is shaped, with its proper status.

In process (a real aiohttp server with swapd's error middleware) for the shapes and the
catch-all; against a real swapd process for the inputs that used to end in aiohttp's
plain-text "500 Internal Server Error" (issue 11, item 7).
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from structlog.testing import capture_logs

from swapd.errors import ApiError
from tests.support import Swapd, fake_cmd, gate_middleware, http, model, raw_request

SECRET = "sk-live-0123456789abcdef"


# -- the shapes, in process ---------------------------------------------------------------------


async def _raise_busy(request: web.Request) -> web.StreamResponse:
    raise ApiError("model m is loading", status=503, code="loading", retry_after=2.2)


async def _raise_bug(request: web.Request) -> web.StreamResponse:
    raise RuntimeError(f"the upstream said Authorization: Bearer {SECRET}")


async def _raise_after_start(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse()
    await resp.prepare(request)
    await resp.write(b"data: first\n\n")
    raise RuntimeError("broke mid-response")


@pytest.fixture
async def client() -> AsyncIterator[TestClient[web.Request, web.Application]]:
    app = web.Application(middlewares=[gate_middleware()])
    for path in ("/v1/chat/completions", "/v1/messages", "/v1/messages/count_tokens"):
        app.router.add_post(path, _raise_busy)
        app.router.add_get(path + "/bug", _raise_bug)
    app.router.add_get("/started", _raise_after_start)
    async with TestClient(TestServer(app)) as c:
        yield c


async def test_api_error_is_openai_shaped_with_retry_after(
    client: TestClient[web.Request, web.Application],
) -> None:
    resp = await client.post("/v1/chat/completions")
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "3"  # rounded up, never 0
    assert resp.content_type == "application/json"
    # llama-swap's fields beside OpenAI's: `param` and `src` (who answered: swapd, not an engine).
    assert await resp.json() == {
        "error": {"message": "model m is loading", "type": "server_error", "param": None,
                  "code": "loading"},
        "src": "swapd",
    }


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
async def test_anthropic_routes_get_anthropic_shape(
    client: TestClient[web.Request, web.Application], path: str
) -> None:
    resp = await client.post(path)
    assert resp.status == 503 and resp.headers["Retry-After"] == "3"
    assert await resp.json() == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "model m is loading"},
    }
    # aiohttp's own answers take the route's shape too.
    resp = await client.get(path)
    assert resp.status == 405 and "POST" in resp.headers["Allow"]
    doc = await resp.json()
    assert doc["type"] == "error" and doc["error"]["type"] == "invalid_request_error"


async def test_no_route_and_wrong_method_are_shaped(
    client: TestClient[web.Request, web.Application],
) -> None:
    resp = await client.get("/v1/nothing-here")
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "not_found"
    resp = await client.get("/v1/chat/completions")
    assert resp.status == 405 and resp.headers["Allow"] == "POST"
    assert (await resp.json())["error"]["code"] == "method_not_allowed"
    resp = await client.get("/v1/messages/nothing-here")
    assert resp.status == 404
    assert (await resp.json())["error"]["type"] == "not_found_error"


@pytest.mark.parametrize(
    ("path", "shape"),
    [("/v1/chat/completions/bug", "openai"), ("/v1/messages/bug", "anthropic")],
)
async def test_unexpected_exception_is_a_shaped_500_without_its_text(
    client: TestClient[web.Request, web.Application], path: str, shape: str
) -> None:
    with capture_logs() as logs:
        resp = await client.get(path)
        text = await resp.text()
    assert resp.status == 500 and resp.content_type == "application/json"
    assert SECRET not in text and "Bearer" not in text
    doc = json.loads(text)
    if shape == "anthropic":
        assert doc["type"] == "error" and doc["error"]["type"] == "api_error"
        message = doc["error"]["message"]
    else:
        assert doc["error"]["type"] == "server_error" and doc["error"]["code"] == "internal_error"
        message = doc["error"]["message"]
    # The client gets an id; the log has the traceback under it.
    [event] = [e for e in logs if e["event"] == "unexpected error answering a request"]
    assert event["log_level"] == "error" and event["path"] == path
    assert event["error_id"] in message and "RuntimeError" in message
    assert isinstance(event["exc_info"], RuntimeError)


async def test_an_error_after_the_response_started_cuts_it_no_second_status_line(
    client: TestClient[web.Request, web.Application],
) -> None:
    resp = await client.get("/started")
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()


# -- bad input against a real swapd (issue 11, item 7) ------------------------------------------


def is_shaped(doc: Any, code: str) -> bool:
    return isinstance(doc, dict) and doc.get("error", {}).get("code") == code and bool(
        doc["error"].get("message")
    )


def recipe_daemon(start_swapd: Callable[..., Swapd], tmp_path: Path, **extra: Any) -> Swapd:
    (tmp_path / "recipes").mkdir(exist_ok=True)
    return start_swapd({"include": "recipes/*.yaml",
                        "models": {"m": model(fake_cmd(name="m"))}, **extra})


def test_recipe_ids_with_nul_or_too_long_are_400(
    start_swapd: Callable[..., Swapd], tmp_path: Path
) -> None:
    daemon = recipe_daemon(start_swapd, tmp_path)
    entry = {"cmd": fake_cmd(name="x")}
    for bad in ("a%00b", "x" * 300, "%1b%5b31m", "%c3%a9" * 100):
        for method, body in (("PUT", entry), ("GET", None), ("DELETE", None)):
            code, doc = http(method, f"{daemon.url}/admin/recipes/{bad}", body)
            assert code == 400 and is_shaped(doc, "invalid_id"), (bad, method, code, doc)
    assert sorted(p.name for p in (tmp_path / "recipes").iterdir()) == []
    # A long id within the limit still works.
    ok = "r" * 100
    assert http("PUT", f"{daemon.url}/admin/recipes/{ok}", {"cmd": fake_cmd(name=ok)})[0] == 201


def test_recipe_file_that_is_not_a_mapping_is_422_with_the_file_named(
    start_swapd: Callable[..., Swapd], tmp_path: Path
) -> None:
    daemon = recipe_daemon(start_swapd, tmp_path)
    folder = tmp_path / "recipes"
    # Edited by hand after swapd loaded the folder (no reload since).
    for name, text in (("list", "- 1\n- 2\n"), ("scalar", "just text\n"),
                       ("models-list", "models: [1, 2]\n")):
        (folder / f"{name}.yaml").write_text(text)
        code, doc = daemon.get(f"/admin/recipes/{name}")
        assert code == 422 and is_shaped(doc, "bad_recipe_file"), (name, doc)
        assert f"{name}.yaml" in doc["error"]["message"] and "mapping" in doc["error"]["message"]
    # A PUT body that is not a mapping is the client's error.
    for body, ctype in (("- 1\n- 2\n", "application/yaml"), ("just text", "application/yaml"),
                        ("[1, 2]", "application/json"), ('"s"', "application/json")):
        code, doc = http("PUT", f"{daemon.url}/admin/recipes/r", body,
                         headers={"Content-Type": ctype})
        assert code == 400 and doc["error"]["code"] in ("invalid_recipe", "bad_recipe"), doc
        assert "models.r" in doc["error"]["message"] or "parse" in doc["error"]["message"]
    assert daemon.get("/health")[0] == 200


def test_deeply_nested_json_and_yaml_are_400(
    start_swapd: Callable[..., Swapd], tmp_path: Path
) -> None:
    daemon = recipe_daemon(start_swapd, tmp_path)
    deep = 200_000
    for body in (b"[" * deep, b'{"model": "m", "x": ' + b"[" * deep + b"]" * deep + b"}",
                 b'{"a":' * deep + b"1" + b"}" * deep):
        for path in ("/v1/chat/completions", "/v1/messages"):
            code, doc = http("POST", daemon.url + path, body,
                             headers={"Content-Type": "application/json"})
            assert code == 400, (path, code, str(doc)[:200])
            if path == "/v1/messages":
                assert doc["type"] == "error" and doc["error"]["type"] == "invalid_request_error"
            else:
                assert is_shaped(doc, "bad_json")
            assert "nested too deeply" in json.dumps(doc), doc
    for body, ctype in ((b"[" * deep, "application/json"), (b"[" * deep, "application/yaml"),
                        (b"a:\n" + b"[" * deep, "application/yaml")):
        code, doc = http("PUT", f"{daemon.url}/admin/recipes/deep", body,
                         headers={"Content-Type": ctype})
        assert code == 400 and is_shaped(doc, "bad_recipe"), (ctype, code, str(doc)[:200])
    assert not (tmp_path / "recipes" / "deep.yaml").exists()
    assert daemon.get("/health")[0] == 200


@pytest.mark.parametrize(
    "header",
    [b"x-api-key: \xff\xfe\x80", b"Authorization: Bearer \xff\xfe\x80",
     b"Authorization: \xc3\x28", b"x-api-key: k\xe9y"],
)
def test_non_utf8_keys_are_401_not_500(
    start_swapd: Callable[..., Swapd], tmp_path: Path, header: bytes
) -> None:
    daemon = start_swapd({"apiKeys": ["client-key"], "adminKeys": ["admin-key"],
                          "models": {"m": model(fake_cmd(name="m"))}})
    for request in (b"GET /v1/models HTTP/1.1\r\n", b"GET /status HTTP/1.1\r\n"):
        raw = raw_request(daemon.port, request + b"Host: 127.0.0.1\r\n" + header
                          + b"\r\nConnection: close\r\n\r\n")
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 401"), raw[:300]
        assert json.loads(body)["error"]["code"] in ("invalid_api_key", "invalid_admin_key")
    # The right key still works: nothing was left in a bad state.
    assert daemon.get("/v1/models", headers={"Authorization": "Bearer client-key"})[0] == 200


def test_proxy_url_credentials_go_upstream_instead_of_the_clients_authorization(
    start_swapd: Callable[..., Swapd], tmp_path: Path
) -> None:
    daemon = start_swapd({
        "apiKeys": ["client-key"],
        "models": {"m": {"cmd": fake_cmd(name="m"),
                         "proxy": "http://engine:p%40ss@127.0.0.1:${PORT}"}},
    })
    auth = {"Authorization": "Bearer client-key"}
    code, doc = daemon.post("/v1/chat/completions", {"model": "m", "messages": []}, headers=auth)
    assert code == 200 and doc["x_served_by"] == "m", doc
    code, doc = daemon.post("/upstream/m/echo", {"x": 1}, headers=auth)
    assert code == 200, doc
    # The engine was sent the credentials of its proxy URL, never the client's key.
    assert doc["headers"]["authorization"] == "Basic " + base64.b64encode(b"engine:p@ss").decode()
    assert "client-key" not in json.dumps(doc)
