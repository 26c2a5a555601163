"""Issue 11's attacks, replayed against a real swapd process over real sockets: a web page
(DNS rebinding, cross-site requests), a recipe that replaces the main config, unbounded
parsing, secrets leaking, a trickling client (docs/security.md)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from swapd.config.loader import load_config
from swapd.config.nodes import ConfigError
from swapd.config.recipes import RecipeError, recipe_path
from swapd.http.origins import foreign_origin, host_allowed, same_origin, split_host
from swapd.redact import MASK, clean_line, redact_argv, redact_text
from tests.support import (
    FAKE_ENGINE,
    PY,
    Swapd,
    fake_cmd,
    free_port,
    http,
    model,
    port_block,
    wait_healthy,
    wait_until,
    write_config,
)

JSON = {"Content-Type": "application/json"}
# A process that idles until killed (two minutes at most).
IDLE_SCRIPT = "import signal; signal.alarm(120); signal.pause()"
YAML = {"Content-Type": "application/yaml"}


@pytest.fixture
def start(start_swapd):
    def run(config: dict[str, Any], **kw: Any) -> Swapd:
        return start_swapd({"startPort": port_block(), **config}, **kw)

    return run


def recipes_config(tmp_path: Path, include: str = "recipes/*.yaml", **extra: Any) -> dict[str, Any]:
    (tmp_path / "recipes").mkdir(exist_ok=True)
    return {"include": include, "models": {"base": model(fake_cmd(name="base"), gpu=False)},
            **extra}


def chat(daemon: Swapd, name: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    return daemon.post("/v1/chat/completions", {"model": name, "messages": []}, headers=headers)


def running(daemon: Swapd) -> list[str]:
    return [m for m, s in daemon.status()["models"].items() if s["pid"]]


# -- 1. a web page: DNS rebinding and cross-site requests ------------------------------------


def test_rebinding_request_with_a_foreign_host_is_refused_before_routing(start, tmp_path):
    """Issue 11 attack 1: PUT /admin/recipes/x with Host: attacker.example, a foreign Origin
    and text/plain was answered 201 and the next request ran its cmd."""
    daemon = start(recipes_config(tmp_path))
    marker = tmp_path / "pwned"
    evil = {"cmd": f"/bin/sh -c 'touch {marker}'", "gpu": False}
    attack = {"Host": f"attacker.example:{daemon.port}", "Origin": "http://attacker.example",
              "Content-Type": "text/plain"}
    code, body = http("PUT", daemon.url + "/admin/recipes/x", yaml.safe_dump(evil), attack)
    assert code == 421, body
    assert body["error"]["code"] == "host_not_allowed"
    assert "allowedHosts" in body["error"]["message"]
    # Before routing: every route, known or not, open or not.
    for method, path in (("GET", "/v1/models"), ("GET", "/health"), ("GET", "/unload"),
                         ("POST", "/v1/chat/completions"), ("GET", "/no/such/route")):
        code, body = http(method, daemon.url + path, headers={"Host": "attacker.example"})
        assert code == 421 and body["error"]["type"] == "invalid_request_error", (path, body)
    assert not list((tmp_path / "recipes").iterdir())
    assert chat(daemon, "x")[0] == 404 and not marker.exists()

    # The names a LAN or local client uses keep working.
    for host in (f"127.0.0.1:{daemon.port}", f"localhost:{daemon.port}", "[::1]:28080",
                 "swapd.localhost", socket.gethostname(), f"{socket.gethostname()}:80",
                 "192.168.1.20:28080"):
        assert http("GET", daemon.url + "/health", headers={"Host": host})[0] == 200, host


def test_allowed_hosts_adds_names(start, tmp_path):
    daemon = start(recipes_config(tmp_path, allowedHosts=["llm.example.com", ".lab.internal"]))
    for host, code in (("llm.example.com", 200), ("LLM.example.com.:443", 200),
                       ("spark.lab.internal", 200), ("lab.internal", 200),
                       ("evil.example.com", 421), ("lab.internal.evil", 421)):
        assert http("GET", daemon.url + "/health", headers={"Host": host})[0] == code, host


def test_foreign_origin_cannot_change_state(start, tmp_path):
    """Issue 11 attack 1: GET /unload with a foreign Origin unloaded everything; POST
    /models/x/load worked the same way; a form post could carry a recipe."""
    daemon = start(recipes_config(tmp_path))
    assert chat(daemon, "base")[0] == 200
    foreign = {"Origin": "http://attacker.example"}
    attempts: list[tuple[str, str, Any, dict[str, str]]] = [
        ("GET", "/unload", None, foreign),
        ("POST", "/unload", None, foreign),
        ("POST", "/models/base/unload", None, foreign),
        ("POST", "/models/base/load", None, foreign),
        ("PUT", "/admin/recipes/r", {"cmd": fake_cmd(name="r")}, foreign),
        ("DELETE", "/admin/recipes/r", None, foreign),
        # A page on another port of this machine is another origin too.
        ("GET", "/unload", None, {"Origin": "http://127.0.0.1:3000"}),
        ("GET", "/unload", None, {"Origin": "null"}),
        # An <img src=…/unload> carries no Origin, but the browser says where it came from.
        ("GET", "/unload", None, {"Sec-Fetch-Site": "cross-site"}),
        ("GET", "/unload", None, {"Sec-Fetch-Site": "same-site"}),
    ]
    for method, path, body, headers in attempts:
        code, answer = http(method, daemon.url + path, body, headers)
        assert code == 403, (method, path, headers, answer)
        assert answer["error"]["code"] == "cross_origin_forbidden"
    assert running(daemon) == ["base"]
    assert not (tmp_path / "recipes" / "r.yaml").exists()

    # The same origin (the status page at /ui), curl, and a typed URL all work.
    same = {"Origin": f"http://127.0.0.1:{daemon.port}", "Sec-Fetch-Site": "same-origin"}
    assert http("GET", daemon.url + "/status", headers=same)[0] == 200
    assert http("GET", daemon.url + "/status", headers={"Sec-Fetch-Site": "none"})[0] == 200
    code, answer = http("PUT", daemon.url + "/admin/recipes/r",
                        {"cmd": fake_cmd(name="r"), "gpu": False}, {**same, **JSON})
    assert code == 201, answer
    assert http("GET", daemon.url + "/unload", headers=same)[0] == 200
    wait_until(lambda: not running(daemon), message="models unloaded")


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded",
                                   "multipart/form-data; boundary=x", None])
def test_recipe_body_must_be_json_or_yaml(start, tmp_path, ctype):
    """A form can post text/plain, urlencoded or multipart without a CORS preflight."""
    daemon = start(recipes_config(tmp_path))
    headers = {"Content-Type": ctype} if ctype else {}
    body = json.dumps({"cmd": fake_cmd(name="r"), "gpu": False}).encode()
    if ctype is None:
        # urllib would add a form Content-Type; send none at all.
        answer = raw_request(daemon.port, b"PUT /admin/recipes/r HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        assert answer.startswith(b"HTTP/1.1 415"), answer
    else:
        code, answer = http("PUT", daemon.url + "/admin/recipes/r", body, headers)
        assert code == 415 and answer["error"]["code"] == "unsupported_media_type", answer
    assert not (tmp_path / "recipes" / "r.yaml").exists()
    for ok in ("application/json", "application/yaml; charset=utf-8", "application/x-yaml",
               "text/yaml"):
        code, answer = http("PUT", daemon.url + "/admin/recipes/r", body, {"Content-Type": ok})
        assert code in (200, 201), (ok, answer)


# -- 2. CORS on purpose -----------------------------------------------------------------------


def preflight(daemon: Swapd, path: str, origin: str) -> tuple[int, dict[str, str]]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
    try:
        conn.request("OPTIONS", path, headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        resp = conn.getresponse()
        resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def post_with_headers(daemon: Swapd, path: str, body: Any,
                      headers: dict[str, str]) -> tuple[int, dict[str, str], Any]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=30)
    try:
        conn.request("POST", path, body=json.dumps(body),
                     headers={"Content-Type": "application/json", **headers})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, json.loads(data)
    finally:
        conn.close()


def test_cors_default_lets_browser_chat_clients_in_but_not_on_admin_routes(start, tmp_path):
    daemon = start(recipes_config(tmp_path, apiKeys=["k-123456"]))
    code, headers = preflight(daemon, "/v1/chat/completions", "https://chat.example")
    assert code == 204, headers
    assert headers["access-control-allow-origin"] == "*"
    assert "authorization" in headers["access-control-allow-headers"].lower()
    assert "POST" in headers["access-control-allow-methods"]
    code, headers, body = post_with_headers(
        daemon, "/v1/chat/completions", {"model": "base", "messages": []},
        {"Origin": "https://chat.example", "Authorization": "Bearer k-123456"})
    assert code == 200 and headers["access-control-allow-origin"] == "*", body
    # An error answer carries them too, so the browser client can read it.
    code, headers, body = post_with_headers(
        daemon, "/v1/chat/completions", {"model": "base"}, {"Origin": "https://chat.example"})
    assert code == 401 and headers["access-control-allow-origin"] == "*"

    for path in ("/admin/recipes/r", "/unload", "/models/base/load", "/status", "/logs",
                 "/upstream/base/v1/chat/completions"):
        code, headers = preflight(daemon, path, "https://chat.example")
        assert code == 403, path
        assert not any(h.startswith("access-control-") for h in headers), (path, headers)
    assert running(daemon) == ["base"]  # the /upstream preflight started nothing new
    # With the default "*", a page may use the inference API, not the raw passthrough.
    code, headers, body = post_with_headers(daemon, "/upstream/base/echo", {},
                                            {"Origin": "https://chat.example",
                                             "Authorization": "Bearer k-123456"})
    assert code == 403 and body["error"]["code"] == "cross_origin_forbidden"


def test_cors_allow_origins_list(start, tmp_path):
    daemon = start(recipes_config(tmp_path, cors={"allowOrigins": ["https://chat.example"]}))
    code, headers = preflight(daemon, "/v1/models", "https://chat.example")
    assert code == 204 and headers["access-control-allow-origin"] == "https://chat.example"
    assert "origin" in headers["vary"].lower()
    code, headers = preflight(daemon, "/v1/chat/completions", "https://other.example")
    assert code == 403 and "access-control-allow-origin" not in headers
    # Its request is refused, not only its reading of the answer: it would start a model.
    code, headers, body = post_with_headers(daemon, "/v1/chat/completions",
                                            {"model": "base", "messages": []},
                                            {"Origin": "https://other.example"})
    assert code == 403 and body["error"]["code"] == "cors_forbidden"
    assert "access-control-allow-origin" not in headers
    assert not running(daemon)
    code, headers, body = post_with_headers(daemon, "/upstream/base/echo", {},
                                            {"Origin": "https://other.example"})
    assert code == 403 and not running(daemon)
    code, headers, body = post_with_headers(daemon, "/upstream/base/echo", {},
                                            {"Origin": "https://chat.example"})
    assert code == 200 and body["x_served_by"] == "base"


# -- 3. recipes in a folder of their own --------------------------------------------------------


def test_recipe_put_cannot_replace_the_main_config(start, tmp_path):
    """Issue 11 attack 4: with include: "*.yaml", PUT /admin/recipes/config overwrote
    config.yaml and the reload dropped apiKeys, adminKeys and every model."""
    daemon = start(recipes_config(tmp_path, include="*.yaml", adminKeys=["adm-123456"]))
    admin = {"Authorization": "Bearer adm-123456", **JSON}
    before = daemon.config_path.read_bytes()
    code, body = http("PUT", daemon.url + "/admin/recipes/config",
                      {"cmd": fake_cmd(name="config"), "gpu": False}, admin)
    assert code == 409 and body["error"]["code"] == "no_recipe_folder", body
    assert "folder of their own" in body["error"]["message"]
    assert daemon.config_path.read_bytes() == before
    assert http("GET", daemon.url + "/status")[0] == 401  # adminKeys still in force


def test_recipe_ids_the_glob_would_not_load_are_refused(tmp_path):
    def config(include: str) -> Any:
        main = tmp_path / "config.yaml"
        main.write_text(yaml.safe_dump({"include": include, "models": {}}))
        return load_config(main).config

    folder = tmp_path / "recipes"
    cases = [
        ("recipes/*.yml", "r", folder / "r.yml"),
        ("recipes/qwen-*.yaml", "qwen-7b", folder / "qwen-7b.yaml"),
        ("recipes/qwen-*.yaml", "llama", None),
        ("recipes/**/*.yaml", "r", folder / "r.yaml"),  # never a folder named `**`
        ("recipes/*/x.yaml", "r", None),
        ("recipes.yaml", "r", None),
        ("*.yaml", "r", None),
        ("./*.yml", "r", None),
    ]
    for include, recipe, want in cases:
        if want is None:
            with pytest.raises(RecipeError) as info:
                recipe_path(config(include), recipe)
            assert info.value.status == 409, include
        else:
            assert recipe_path(config(include), recipe) == want, include


@pytest.mark.parametrize(("include", "recipe", "file"), [
    ("recipes/*.yml", "r", "recipes/r.yml"),
    ("recipes/qwen-*.yaml", "qwen-7b", "recipes/qwen-7b.yaml"),
    ("recipes/**/*.yaml", "r", "recipes/r.yaml"),
])
def test_recipes_are_written_where_the_glob_loads_them(start, tmp_path, include, recipe, file):
    """Issue 11 attack 4: these globs answered 201 and the recipe was never loaded."""
    daemon = start(recipes_config(tmp_path, include=include))
    code, body = http("PUT", f"{daemon.url}/admin/recipes/{recipe}",
                      {"cmd": fake_cmd(name=recipe), "gpu": False})
    assert code == 201 and body["path"] == str(tmp_path / file), body
    assert chat(daemon, recipe)[1]["x_served_by"] == recipe
    assert not (tmp_path / "recipes" / "**").exists()
    if "qwen" in include:
        code, body = http("PUT", f"{daemon.url}/admin/recipes/llama",
                          {"cmd": fake_cmd(name="llama")})
        assert code == 409 and body["error"]["code"] == "id_not_included", body
        assert "qwen-*.yaml" in body["error"]["message"]


def test_files_swapd_did_not_write_are_not_replaced(start, tmp_path):
    cfg = recipes_config(tmp_path)
    hand = tmp_path / "recipes" / "hand.yaml"
    hand.write_text(yaml.safe_dump({"models": {"hand": model(fake_cmd(name="hand"))}}))
    (tmp_path / "recipes" / "link.yaml").symlink_to(tmp_path / "config.yaml")
    daemon = start(cfg)
    before = hand.read_bytes()
    for recipe in ("hand", "link"):
        for method in ("PUT", "DELETE"):
            body = {"cmd": fake_cmd(name=recipe)} if method == "PUT" else None
            code, answer = http(method, f"{daemon.url}/admin/recipes/{recipe}", body)
            assert code == 409 and answer["error"]["code"] == "not_a_recipe", (recipe, answer)
    assert hand.read_bytes() == before
    assert (tmp_path / "recipes" / "link.yaml").is_symlink()
    # GET reads a hand-written recipe; a recipe swapd writes is marked as its own.
    assert http("GET", f"{daemon.url}/admin/recipes/hand", headers={"Accept": "json"})[0] == 200
    assert http("PUT", f"{daemon.url}/admin/recipes/mine", {"cmd": fake_cmd(name="m")})[0] == 201
    assert (tmp_path / "recipes" / "mine.yaml").read_text().startswith("# swapd recipe")
    assert http("DELETE", f"{daemon.url}/admin/recipes/mine")[0] == 200


# -- 4. bounded parsing -----------------------------------------------------------------------

# 466 bytes: nine levels of nine aliases, 9^9 strings once expanded.
LAUGHS = """cmd: /bin/true
gpu: false
description: nine levels of nine aliases, 387420489 strings in all!!!
metadata:
  a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
  b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
  c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
  d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
  e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
  f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
  g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
  h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
  i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""
# Each macro doubles the last: 2^40 characters once expanded.
DOUBLING = {"cmd": "/bin/echo ${m40}", "gpu": False,
            "macros": {"m0": "xxxxxxxx", **{f"m{i}": f"${{m{i - 1}}}${{m{i - 1}}}"
                                            for i in range(1, 41)}}}


class HealthProbe:
    """Polls /health on a thread while the attack runs; records each answer's latency."""

    def __init__(self, daemon: Swapd) -> None:
        self.daemon = daemon
        self.latencies: list[float] = []
        self.failures: list[str] = []
        # How late a thread of this process wakes from a 10 ms sleep in the same window: the
        # machine's own scheduling delay, which every answer pays too (a loaded runner).
        self.lateness: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._clock = threading.Thread(target=self._tick, daemon=True)

    def _tick(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            time.sleep(0.01)
            self.lateness.append(time.monotonic() - t0 - 0.01)

    def _run(self) -> None:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.daemon.port, timeout=5)
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                conn.request("GET", "/health")
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    self.failures.append(str(resp.status))
            except OSError as exc:
                self.failures.append(repr(exc))
            self.latencies.append(time.monotonic() - t0)
        conn.close()

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        self._clock.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self._clock.join(10)


def test_billion_laughs_and_macro_doubling_recipes_are_refused_quickly(start, tmp_path):
    """Issue 11 attack 5: a 466-byte PUT blocked the event loop for 63 s and grew swapd to
    500 MB; /health did not answer for 33 s."""
    assert len(LAUGHS.encode()) == 466
    daemon = start(recipes_config(tmp_path))
    # The reference: /health on this machine now, before the attack (a loaded runner is slow
    # with or without it; the attack used to stall the loop for a minute).
    with HealthProbe(daemon) as quiet:
        wait_until(lambda: len(quiet.latencies) >= 20, message="health answers before")
    slack = 3 * max(quiet.latencies)
    with HealthProbe(daemon) as probe:
        t0 = time.monotonic()
        code, body = http("PUT", daemon.url + "/admin/recipes/lol", LAUGHS, YAML)
        laughs_took = time.monotonic() - t0
        assert code == 400 and "aliases" in body["error"]["message"], body
        t0 = time.monotonic()
        code, body = http("PUT", daemon.url + "/admin/recipes/dbl", DOUBLING)
        doubling_took = time.monotonic() - t0
        assert code == 400 and "64 KiB" in body["error"]["message"], body
        assert "models.dbl.macros" in body["error"]["message"]
        # A valid recipe near the 1 MiB cap is parsed, checked, written and loaded meanwhile.
        big = {"cmd": fake_cmd(name="big"), "gpu": False, "description": "d ${MODEL_ID} " * 60_000}
        t0 = time.monotonic()
        code, body = http("PUT", daemon.url + "/admin/recipes/big", big)
        big_took = time.monotonic() - t0
        assert code == 201, body
        wait_until(lambda: len(probe.latencies) >= 20, message="health answers")
    assert max(laughs_took, doubling_took) < 2 + slack, (laughs_took, doubling_took, slack)
    print(f"\nPUTs: aliases refused in {laughs_took * 1000:.0f} ms, macro doubling in "
          f"{doubling_took * 1000:.0f} ms, a 900 KB recipe written in {big_took * 1000:.0f} ms; "
          f"/health worst {max(probe.latencies) * 1000:.0f} ms over {len(probe.latencies)}")
    assert not probe.failures
    late = 2 * max(probe.lateness, default=0.0)  # the machine's own delay in this window
    assert max(probe.latencies) < 0.1 + slack + late, (sorted(probe.latencies)[-5:], slack,
                                                       late)
    assert [p.name for p in (tmp_path / "recipes").iterdir()] == ["big.yaml"]
    rss_kb = int(next(line for line in Path(f"/proc/{daemon.proc.pid}/status").read_text()
                      .splitlines() if line.startswith("VmRSS")).split()[1])
    assert rss_kb < 300_000


def test_duplicate_keys_and_deep_nesting_in_a_put_body_are_refused(start, tmp_path):
    daemon = start(recipes_config(tmp_path))
    cmd = fake_cmd(name="r")
    bodies = [
        (f'{{"cmd": "{cmd}", "ttl": 5, "ttl": 0}}', JSON, "duplicate key 'ttl'"),
        (f"cmd: {cmd}\nttl: 5\nttl: 0\n", YAML, "duplicate key 'ttl'"),
        ('{"cmd": "x", "metadata": ' + "[" * 100_000 + "]" * 100_000 + "}", JSON, "nested"),
        ("\xff\xfe".encode("latin-1"), YAML, "UTF-8"),
    ]
    for body, headers, why in bodies:
        code, answer = http("PUT", daemon.url + "/admin/recipes/r", body, headers)
        assert code == 400 and why in answer["error"]["message"], answer
    assert not list((tmp_path / "recipes").iterdir())
    assert http("GET", daemon.url + "/health")[0] == 200


def test_config_files_are_bounded_too(tmp_path):
    main = tmp_path / "config.yaml"
    main.write_text(yaml.safe_dump({"models": {"m": DOUBLING}}))
    with pytest.raises(ConfigError, match=r"models\.m\.macros: expands to more than 64 KiB"):
        load_config(main)
    main.write_text("models:\n  m:\n" + "".join(f"    {line}\n" for line in LAUGHS.splitlines()))
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="YAML aliases"):
        load_config(main)
    assert time.monotonic() - t0 < 2
    # An alias that repeats a little is fine (llama-swap configs use `<<: *defaults`).
    main.write_text("d: &d {ttl: 5, gpu: false}\nmodels:\n  m: {<<: *d, cmd: /bin/true}\n")
    assert load_config(main).config.models["m"].ttl == 5


# -- 5. one redaction, everywhere ---------------------------------------------------------------

SECRET_CORPUS = [
    "curl -k SEKRET-A http://x",
    "curl --header 'Authorization: Bearer SEKRET-B' http://x",
    "-H 'x-api-key: SEKRET-C'",
    "proxy https://user:SEKRET-D@host:8080/v1",
    "https://SEKRET-E@github.com/org/repo",
    "--auth 'Bearer SEKRET-F'",
    "--api-key SEKRET-G --port 1",
    "--api-key=SEKRET-H",
    "--token SEKRET-I",
    "--hf-token=SEKRET-J",
    "OPENAI_API_KEY=SEKRET-K HF_TOKEN=SEKRET-L AWS_SECRET_ACCESS_KEY=SEKRET-M "
    "DB_PASSWORD=SEKRET-N",
    "KEY=SEKRET-KEY TOKEN=SEKRET-TOKEN SECRET=SEKRET-SECRET PASSWORD=SEKRET-PASSWORD",
    "GET http://127.0.0.1:5800/v1/models?api_key=SEKRET-QS&x=1",
    "--password SEKRET-PW --passwd=SEKRET-PWD --client-secret SEKRET-CS",
    "Authorization: Bearer SEKRET-O",
    "authorization=basic U0VLUkVULVA6eHh4",
    '{"api_key": "SEKRET-Q", "max_tokens": 5}',
    "using key sk-SEKRETRSEKRETRSEKRETR and hf_SEKRETSSEKRETSSEKRETS",
]
NOT_SECRETS = [
    "--max-num-batched-tokens 8192 --tokenizer t --ssl-keyfile /k.pem",
    "--override-kv tokenizer.ggml.add_bos_token=bool:false",
    "proxy http://127.0.0.1:5800/v1/chat/completions",
    "invalid or missing API key",
    "max tokens 4096, prompt tokens=12",
]


def test_redaction_corpus():
    for text in SECRET_CORPUS:
        masked = redact_text(text)
        assert "SEKRET" not in masked and MASK in masked, (text, masked)
    for text in NOT_SECRETS:
        assert redact_text(text) == text
    argv = ["curl", "-k", "SEKRET-1", "-H", "Authorization: Bearer SEKRET-2",
            "--header=x-api-key: SEKRET-3", "--auth", "Bearer SEKRET-4",
            "https://u:SEKRET-5@h/x", "-e", "HF_TOKEN=SEKRET-6", "--port", "8000"]
    masked = redact_argv(argv)
    assert "SEKRET" not in " ".join(masked), masked
    assert masked[-2:] == ["--port", "8000"] and masked[0] == "curl"
    assert clean_line("\x1b[31mred\x1b[0m\x00 nul\r ok\tTAB \x07bell") == "red nul ok\tTAB bell"


def test_secrets_stay_out_of_status_check_errors_and_engines(start, tmp_path):
    """Issue 11 attack 6: /status and `swapd status` showed a proxy URL's password, `swapd
    check` printed argv unmasked, engine output reached API clients in 503 bodies, and the
    client's own Authorization / x-api-key were forwarded to engines."""
    port = port_block()
    fail_script = ("echo 'loading with token=SEKRET-OUT and \x1b[31mcolour\x1b[0m'; "
                   "printf 'nul\\000byte\\n'; exit 5")
    cfg = recipes_config(
        tmp_path, apiKeys=["api-SEKRET-1"],
        models={
            "m": model(fake_cmd(name="m"), gpu=False,
                       proxy=f"http://user:SEKRET-PROXY@127.0.0.1:{port}"),
            "e": model(fake_cmd(name="e"), gpu=False),
            "opt": model(fake_cmd(name="opt"), gpu=False, forwardClientAuth=True),
            "broken": {"cmd": f"/bin/sh -c \"{fail_script}\" -k SEKRET-ARGV", "gpu": False,
                       "proxy": "http://127.0.0.1:${PORT}"},
        },
    )
    cfg["models"]["m"]["cmd"] = fake_cmd(name="m").replace("${PORT}", str(port))
    daemon = start(cfg)
    api = {"Authorization": "Bearer api-SEKRET-1"}

    # The engine does not see the key meant for swapd, unless the recipe opts in.
    for headers in (api, {"x-api-key": "api-SEKRET-1"}):
        code, echo = http("POST", daemon.url + "/upstream/e/echo", {}, headers)
        assert code == 200, echo
        assert "api-SEKRET-1" not in json.dumps(echo["headers"]), echo["headers"]
    code, echo = http("POST", daemon.url + "/upstream/opt/echo", {}, api)
    assert echo["headers"]["authorization"] == "Bearer api-SEKRET-1"

    # A failed start: the client learns the model failed and its exit code, nothing more.
    code, body = chat(daemon, "broken", api)
    assert code == 503, body
    message = body["error"]["message"]
    assert "broken" in message and "exited with code 5" in message
    assert "token" not in message and "SEKRET" not in message
    code, logs = daemon.get("/logs")
    assert "loading with token=***" in logs and "nulbyte" in logs and "colour" in logs
    assert "\x1b" not in logs and "\x00" not in logs and "SEKRET" not in logs

    assert chat(daemon, "m", api)[0] == 200
    status = json.dumps(daemon.status())
    assert "user:***@127.0.0.1" in status and "SEKRET" not in status
    assert "SEKRET" not in json.dumps(daemon.get("/running")[1])
    cli = subprocess.run([PY, "-m", "swapd", "status", "--url", daemon.url, "--json"],
                         capture_output=True, text=True, timeout=30)
    assert cli.returncode == 0 and "user:***@" in cli.stdout and "SEKRET" not in cli.stdout
    check = subprocess.run([PY, "-m", "swapd", "check", "--config", str(daemon.config_path)],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    assert "-k '***'" in check.stdout and "SEKRET" not in check.stdout, check.stdout
    assert "not supported" not in check.stdout
    daemon.stop()
    assert "SEKRET" not in daemon.log()


# -- 6. item 8 ---------------------------------------------------------------------------------


def raw_request(port: int, data: bytes, host: str = "127.0.0.1", timeout: float = 10) -> bytes:
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/admin/recipes/r"])
def test_a_trickled_body_gets_408_and_loses_its_connection(start, tmp_path, path):
    """Issue 11 item 8: a body trickled at 1 byte/s kept its connection forever."""
    daemon = start(recipes_config(tmp_path, bodyTimeout=1))
    method = b"PUT" if path.startswith("/admin") else b"POST"
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        sock.sendall(method + b" " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
        t0 = time.monotonic()
        answer = b""
        sock.settimeout(0.2)
        while time.monotonic() - t0 < 8:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                try:
                    sock.sendall(b" ")  # one byte every 0.2 s: never done within 1 s
                except OSError:
                    break
                continue
            except OSError:
                break  # reset by swapd
            if not chunk:
                break  # closed by swapd
            answer += chunk
        took = time.monotonic() - t0
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"bodyTimeout" in answer
    assert took < 5, took


async def test_ipv4_client_on_a_dual_stack_listener_is_loopback(tmp_path):
    """An IPv4 client of a dual-stack socket (systemd socket activation, `[::]` with
    bindv6only=0) arrives as ::ffff:127.0.0.1; it is loopback, so adminKeys-less /status
    answers it."""
    import aiohttp
    from aiohttp import web

    from swapd.app import Daemon

    if not socket.has_dualstack_ipv6():
        pytest.skip("no dual-stack IPv6 here")
    main = tmp_path / "config.yaml"
    main.write_text(yaml.safe_dump({"stateDir": str(tmp_path / "state"),
                                    "models": {"m": {"cmd": "/bin/true"}}}))
    daemon = Daemon(str(main), load_config(main))
    sock = socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True)
    port = sock.getsockname()[1]
    runner = web.AppRunner(daemon.build_app())
    await runner.setup()
    await web.SockSite(runner, sock).start()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/status") as resp:
                assert resp.status == 200, await resp.text()
            async with session.get(f"http://127.0.0.1:{port}/v1/models") as resp:
                assert resp.status == 200
    finally:
        await runner.cleanup()


def test_broken_and_looping_include_symlinks_are_warned_about(tmp_path):
    folder = tmp_path / "recipes"
    (folder / "sub").mkdir(parents=True)
    (folder / "ok.yaml").write_text(yaml.safe_dump({"models": {"ok": {"cmd": "/bin/true"}}}))
    (folder / "gone.yaml").symlink_to(folder / "missing.yaml")
    (folder / "loop.yaml").symlink_to(folder / "loop.yaml")
    (folder / "sub" / "back").symlink_to(folder)  # a folder met again: not walked twice
    (folder / "sub" / "again.yaml").symlink_to(folder / "ok.yaml")
    main = tmp_path / "config.yaml"
    main.write_text(yaml.safe_dump({"include": "recipes/**/*.yaml", "models": {}}))
    result = load_config(main)
    assert list(result.config.models) == ["ok"]
    text = "\n".join(result.warnings)
    assert "gone.yaml is a broken or looping symlink" in text
    assert "loop.yaml is a broken or looping symlink" in text
    assert "a symlink), loaded once" in text


# -- issue 21: one request must not stall the daemon ----------------------------------------

# The issue's payload: the named-secret pattern backtracked from every position (2 KB: 0.1 s,
# 16 KB: 6.4 s), on the event loop.
HOSTILE = "key" + "a" * 20_000 + "!"


def _best_of(f: Any, n: int = 5) -> float:
    """The fastest of `n` runs of `f`, in this thread's CPU time: time the machine gave to
    other processes (a loaded runner, the suite's other workers) does not count."""
    best = float("inf")
    for _ in range(n):
        t0 = time.thread_time()
        f()
        best = min(best, time.thread_time() - t0)
    return best


def test_redaction_is_linear_in_its_input():
    """1 MB of the issue's hostile shape (and of a few others that defeated earlier patterns)
    is redacted in time linear in its size: 16 times the text takes about 16 times as long
    (under 64 allows for a shared runner's noise), where a backtracking pattern takes 256
    times as long."""
    import secrets

    mb = 1 << 20
    shapes = {
        "issue": lambda n: "key" + "a" * n + "!",
        "spaces": lambda n: "key" + " " * n + "!",
        "dotted scheme": lambda n: "a." * (n // 2) + "://",
        "token prefixes": lambda n: "sk-" * (n // 3) + "!",
        "a key per word": lambda n: "--api-key=x " * (n // 12),
        "random": lambda n: secrets.token_urlsafe(n * 3 // 4),
    }
    report = []
    for name, make in shapes.items():
        # Sizes that stay in the CPU's caches: the ratio is then the algorithm's.
        big, small = make(mb // 2), make(mb // 32)
        t_big = _best_of(lambda big=big: clean_line(big))
        t_small = _best_of(lambda small=small: clean_line(small))
        assert t_big < 64 * t_small + 0.002, (name, t_big, t_small)
        whole = make(mb)
        took = _best_of(lambda whole=whole: clean_line(whole), 3)
        report.append(f"{name}: 1 MB in {took * 1000:.1f} ms")
    print("\nredaction: " + "; ".join(report))


REDACTION_MISSES = [
    ("--api-key -Xq3vB9_kq1LWmWZ2uEUrV9pW3Tzu1Sb9nHwqVJuyZzE", "Xq3vB9"),
    ("Authorization: Token SEKRET-T1", "SEKRET"),
    ("authorization: ApiKey SEKRET-T2", "SEKRET"),
    ("PGPASSWORD=SEKRET-T3 DB_PASS=SEKRET-T4 SECRETKEY=SEKRET-T5", "SEKRET"),
    ("curl -u admin:SEKRET-T6 http://x", "SEKRET"),
    ("-k -Xq3vB9kq1LWmWZ2uEUrV9pW3Tzu1Sb9nHwqVJ", "Xq3vB9"),
]
NOT_OVER_MASKED = ["--token-delay 0.02", "--key-file /etc/swapd/k.pem", "-u 1000 --port 8"]


def test_redaction_misses_and_over_masks_of_issue_21():
    for text, secret in REDACTION_MISSES:
        masked = redact_text(text)
        assert secret not in masked and MASK in masked, (text, masked)
    for text in NOT_OVER_MASKED:
        assert redact_text(text) == text
    argv = ["llama-server", "--api-key", "-Xq3vB9kq1LWmWZ2uEUrV9pW3Tzu1Sb", "-ngl", "99",
            "--token-delay", "0.02", "--key-file", "/k", "-u", "me:SEKRET-7"]
    masked = redact_argv(argv)
    assert masked == ["llama-server", "--api-key", MASK, "-ngl", "99", "--token-delay", "0.02",
                      "--key-file", "/k", "-u", f"me:{MASK}"], masked


def test_a_hostile_model_name_is_answered_at_once_and_bounded(start, tmp_path):
    """Issue 21 item 1: the 20 KB `model` got its 404 after 11.7 s, /health stalled as long;
    the name is echoed bounded."""
    daemon = start({"models": {"m": model(fake_cmd(), gpu=False)}})
    baseline = health_baseline(daemon)
    with HealthProbe(daemon) as probe:
        took = []
        for path, body in (
            ("/v1/chat/completions", {"model": HOSTILE, "messages": []}),
            ("/v1/messages", {"model": HOSTILE, "messages": [], "max_tokens": 1}),
            (f"/models/{HOSTILE}/load", None),
            (f"/upstream/{HOSTILE}/v1/models", None),
        ):
            t0 = time.monotonic()
            code, answer = http("POST" if body or "load" in path else "GET",
                                daemon.url + path, body if body is not None else b"",
                                {"Content-Type": "text/plain"})
            took.append(time.monotonic() - t0)
            assert code in (404, 400), (path, code, answer)
            assert len(json.dumps(answer)) < 4096, (path, len(json.dumps(answer)))
        wait_until(lambda: len(probe.latencies) >= 5, message="health answers")
    assert max(took) < 2, took
    assert_health_held(probe, baseline)


def health_baseline(daemon: Swapd, samples: int = 30) -> list[float]:
    """/health latencies with no attack running, to compare with (a shared runner's noise)."""
    with HealthProbe(daemon) as probe:
        wait_until(lambda: len(probe.latencies) >= samples, message="baseline")
    return probe.latencies


def assert_health_held(probe: HealthProbe, baseline: list[float]) -> None:
    """/health answered all along, each answer under 100 ms, or (on a loaded runner) no
    slower than twice the worst answer of the baseline taken in the same test, plus twice
    how late this process's own threads woke in the attack's window: a stall of the loop
    shows as one answer that waited for the whole attack."""
    assert not probe.failures, probe.failures
    worst = max(probe.latencies)
    late = max(probe.lateness, default=0.0)
    assert worst < max(0.1, 2 * max(baseline)) + 2 * late, (
        sorted(probe.latencies)[-5:], max(baseline), late)


def _gzip_bomb(inflated_mib: int) -> bytes:
    """A gzip body of `inflated_mib` MiB of spaces (about 1/1000 of that on the wire)."""
    import zlib

    packer = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = b" " * (1 << 20)
    return b"".join([*(packer.compress(block) for _ in range(inflated_mib)), packer.flush()])


def _rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])


def test_gzip_bodies_are_inflated_after_the_key_and_within_the_limit(start, tmp_path):
    """Issue 21 item 2: 8 bodies of 300 KB inflating to 300 MiB took swapd to 690 MB and
    stalled /health 8.8 s, and without a key each got its 401 only after inflating."""
    import gzip
    from concurrent.futures import ThreadPoolExecutor

    # maxBodyBytes 1 MiB: each 413 inflates that much, not 64 MiB (this runner is shared).
    daemon = start(recipes_config(tmp_path, apiKeys=["api-key-1"], adminKeys=["admin-key-1"],
                                  maxBodyBytes=1 << 20))
    bomb = _gzip_bomb(300)
    assert len(bomb) < 400_000
    gz = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    key = {**gz, "Authorization": "Bearer api-key-1"}
    rss_before = _rss_kb(daemon.proc.pid)
    baseline = health_baseline(daemon)
    with HealthProbe(daemon) as probe, ThreadPoolExecutor(8) as pool:
        t0 = time.monotonic()
        refused = list(pool.map(lambda _: http("POST", daemon.url + "/v1/chat/completions",
                                               bomb, gz), range(8)))
        refused_in = time.monotonic() - t0
        too_big = list(pool.map(lambda _: http("POST", daemon.url + "/v1/chat/completions",
                                               bomb, key), range(8)))
        recipe = http("PUT", daemon.url + "/admin/recipes/r", _gzip_bomb(2),
                      {"Content-Type": "application/yaml", "Content-Encoding": "gzip",
                       "Authorization": "Bearer admin-key-1"})
        wait_until(lambda: len(probe.latencies) >= 10, message="health answers")
    assert [code for code, _ in refused] == [401] * 8, refused
    assert [code for code, _ in too_big] == [413] * 8, too_big
    assert recipe[0] == 413, recipe
    print(f"\n8 bombs without a key refused in {refused_in * 1000:.0f} ms; /health worst "
          f"{max(probe.latencies) * 1000:.0f} ms over {len(probe.latencies)}; RSS "
          f"{rss_before // 1024} -> {_rss_kb(daemon.proc.pid) // 1024} MB")
    assert_health_held(probe, baseline)
    assert _rss_kb(daemon.proc.pid) < rss_before + 200_000
    # A body that inflates within the limit is relayed inflated (no Content-Encoding left).
    (tmp_path / "recipes" / "m.yaml").write_text(yaml.safe_dump(
        {"models": {"m": model(fake_cmd(name="m"), gpu=False)}}))
    daemon.signal(1)  # SIGHUP: reload, m appears
    listed = lambda: [m["id"] for m in daemon.get(  # noqa: E731
        "/v1/models", headers={"Authorization": "Bearer api-key-1"})[1]["data"]]
    wait_until(lambda: "m" in listed(), message="m listed")
    body = gzip.compress(json.dumps({"model": "m", "messages": [{"role": "user",
                                                                   "content": "hi"}]}).encode())
    code, answer = http("POST", daemon.url + "/v1/chat/completions", body, key)
    assert code == 200 and answer["x_request"]["messages"][0]["content"] == "hi", answer
    code, answer = http("POST", daemon.url + "/v1/chat/completions", b"x",
                        {**key, "Content-Encoding": "br"})
    assert code == 415, answer
    code, answer = http("POST", daemon.url + "/v1/chat/completions", b"not gzip", key)
    assert code == 400 and answer["error"]["code"] == "bad_content_encoding", answer


def test_idle_connections_cannot_exhaust_file_descriptors(tmp_path):
    """Issue 21 item 5: under `ulimit -n 200`, 320 idle connections made /health time out and
    the failing accept wrote 118 MB of log in 40 s. Connections are capped below the limit
    (the oldest that never sent a header makes room), and a header that never completes
    gets 408 after headerTimeout."""
    port = free_port()
    path = write_config(tmp_path, {"listen": f"127.0.0.1:{port}", "headerTimeout": 2,
                                   "stateDir": str(tmp_path / "state"), "models": {}})
    log_path = tmp_path / "swapd.log"
    # Soft and hard 200: swapd cannot raise it, so the cap must hold under it.
    proc = subprocess.Popen(
        ["sh", "-c", f'ulimit -n 200 && exec "{PY}" -m swapd serve --config "{path}"'],
        stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=str(tmp_path))
    daemon = Swapd(path, port, proc, log_path, tmp_path / "state")
    idle: list[socket.socket] = []
    try:
        wait_healthy(daemon)
        baseline = health_baseline(daemon)
        with HealthProbe(daemon) as probe:
            for _ in range(320):
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            fresh = []
            for _ in range(10):  # new connections, one request each
                t0 = time.monotonic()
                assert http("GET", daemon.url + "/health", timeout=5)[0] == 200
                fresh.append(time.monotonic() - t0)
            wait_until(lambda: len(probe.latencies) >= 10, message="health answers")
        assert_health_held(probe, baseline)
        assert max(fresh) < max(0.5, 5 * max(baseline)), fresh
        # A header that never completes: 408 in JSON after headerTimeout, then closed.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as late:
            late.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            t0 = time.monotonic()
            answer = b""
            while chunk := late.recv(65536):
                answer += chunk
            took = time.monotonic() - t0
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b'"code": "header_timeout"' in answer
        assert 1.5 < took < 6, took
    finally:
        for sock in idle:
            sock.close()
        daemon.stop()
    log = daemon.log()
    assert len(log) < 200_000, len(log)
    assert "out of system resource" not in log


def test_a_failing_accept_is_logged_once_per_interval():
    import asyncio

    from swapd.http.connections import LoopErrors

    now = [0.0]
    seen: list[str] = []

    class Loop:
        def default_exception_handler(self, context: dict[str, Any]) -> None:
            seen.append(context["message"])

    errors = LoopErrors(interval=10, clock=lambda: now[0])
    loop: Any = Loop()
    for i in range(1000):
        now[0] = i / 100  # 1000 failures over 10 s
        errors(loop, {"message": "socket.accept() out of system resource"})
    now[0] = 10.5
    errors(loop, {"message": "socket.accept() out of system resource"})
    errors(loop, {"message": "another error"})
    assert seen == ["socket.accept() out of system resource",
                    "socket.accept() out of system resource (and 999 more like it in the last "
                    "10 s)", "another error"]
    assert asyncio  # the real loop's handler is LoopErrors (swapd.app)


@pytest.mark.parametrize("request_bytes", [
    b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"x" * 70_000 + b"\r\n\r\n",
    b"G<script>ET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked"
    b"\r\n\r\nZZ<script>\r\n",
    b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil<script>\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: <script>x\r\n"
    b"Content-Length: 2\r\n\r\n{}",
], ids=["oversized header", "bad request line", "CL and TE", "bad chunk", "two Hosts",
        "Expect"])
def test_aiohttp_own_errors_are_json_and_echo_nothing(start, tmp_path, request_bytes):
    """Issue 21 item 8: aiohttp's own 400s and 417 answered text/plain, echoing the request."""
    daemon = start({"models": {}})
    answer = raw_request(daemon.port, request_bytes)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] in (b"400", b"417", b"421"), answer[:300]
    assert b"application/json" in head, head
    if b"chunked" in head:
        body = body.split(b"\r\n", 1)[1]
    error = json.loads(body.split(b"\r\n0\r\n")[0])["error"]
    assert {"message", "type", "code"} <= set(error), error
    assert b"script" not in answer and b"xxxxxxxx" not in answer, answer[:300]


def test_smaller_items_of_issue_21(start, tmp_path):
    """Issue 21 item 8: /ui names that are no file name, bad bytes in a session header with
    the SQLite store, credentials in the `upstream` a load answers, deeply nested metadata."""
    import sqlite3

    cfg = recipes_config(tmp_path, activity={"store": "sqlite"})
    cfg["models"]["cred"] = model(fake_cmd(name="cred"), gpu=False,
                                  proxy="http://admin:Sup3rS3cretPw@127.0.0.1:${PORT}")
    daemon = start(cfg)
    for path in ("/ui/" + "a" * 4096, "/ui/%00", "/ui/..%2fconfig.yaml", "/ui/a%00.js"):
        t0 = time.monotonic()
        code, answer = daemon.get(path)
        assert code == 404 and answer["error"]["code"] == "not_found", (path, answer)
        assert len(json.dumps(answer)) < 400 and time.monotonic() - t0 < 1, path
    # A session id with a byte that is not UTF-8, between two good records of the same second.
    chat_body = json.dumps({"model": "base", "messages": []}).encode()
    for session in (b"good-1", b"bad-\xff", b"good-2"):
        answer = raw_request(daemon.port, b"POST /v1/chat/completions HTTP/1.1\r\n"
                             b"Host: 127.0.0.1\r\nContent-Type: application/json\r\n"
                             b"Connection: close\r\nX-Session-ID: " + session + b"\r\n"
                             b"Content-Length: " + str(len(chat_body)).encode() + b"\r\n\r\n"
                             + chat_body)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    code, answer = daemon.post("/models/cred/load")
    assert code == 200 and "Sup3rS3cretPw" not in json.dumps(answer), answer
    assert answer["upstream"].startswith("http://admin:***@"), answer
    deep = {"cmd": fake_cmd(name="r"), "metadata": {"x": json.loads("[" * 900 + "]" * 900)}}
    code, answer = http("PUT", daemon.url + "/admin/recipes/r", deep)
    assert code == 400 and "nested" in answer["error"]["message"], answer
    daemon.stop()
    db_path = tmp_path / "state" / "activity.sqlite3"
    assert db_path.stat().st_mode & 0o777 == 0o600
    with sqlite3.connect(db_path) as db:
        sessions = [row[0] for row in db.execute("SELECT session FROM activity ORDER BY id")]
    assert sessions == ["good-1", "bad-\ufffd", "good-2"], sessions


def test_a_state_dir_others_may_write_is_refused(start_swapd, tmp_path):
    """Issue 21 item 9: stateDir was trusted; a folder anyone may write to is refused."""
    state = tmp_path / "open-state"
    state.mkdir()
    state.chmod(0o777)
    daemon = start_swapd({"models": {}}, state_dir=state, wait=False)
    assert daemon.proc.wait(30) == 1
    assert "refusing stateDir" in daemon.log() and "o+w" in daemon.log()


def test_planted_state_files_are_not_acted_on(start, tmp_path):
    """Issue 21 item 9: a planted engines.json made swapd kill an unrelated process matched by
    pid and start time; a start-times.json holding Infinity made /v1/models invalid JSON."""
    from swapd.engines import procgroup
    from swapd.engines.orphans import _is_cgroup_dir

    victim = subprocess.Popen([PY, "-c", IDLE_SCRIPT])
    try:
        state = tmp_path / "state"
        state.mkdir(mode=0o700)
        record = {"version": 2, "groups": [{
            "model": "m", "pid": victim.pid, "start_ticks": procgroup.start_ticks(victim.pid),
            "marker": None, "cgroup": "/sys/fs/cgroup/system.slice/sshd.service"}]}
        planted = state / "engines.json"
        planted.write_text(json.dumps(record))
        planted.chmod(0o666)  # anyone may have written it
        (state / "start-times.json").write_text('{"m": [Infinity, NaN, 1e999, 2.5]}')
        daemon = start({"models": {"m": model(fake_cmd(name="m"), gpu=False)}})
        assert victim.poll() is None, "swapd killed a process a planted record named"
        assert "not swapd's own" in daemon.log()
        raw = urllib.request.urlopen(daemon.url + "/v1/models", timeout=10).read()
        json.loads(raw, parse_constant=lambda c: pytest.fail(f"{c} in /v1/models"))
    finally:
        victim.kill()
        victim.wait()
    # A record's cgroup counts only below swapd's own cgroup (never another service's).
    assert not _is_cgroup_dir("/sys/fs/cgroup/system.slice/sshd.service")
    assert not _is_cgroup_dir("/sys/fs/cgroup/../../etc")


def test_html_from_an_engine_is_sandboxed(start, tmp_path):
    """Issue 21 item 9: relayed HTML (llama.cpp's web UI, vLLM's /docs) ran in swapd's origin,
    next to the status page and its key."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<script>fetch('/unload')</script>")
    cmd = f"{PY} -m http.server ${{PORT}} --bind 127.0.0.1 --directory {site}"
    daemon = start({"models": {"web": model(cmd, gpu=False, checkEndpoint="/")}})
    with urllib.request.urlopen(daemon.url + "/upstream/web/index.html", timeout=60) as resp:
        csp = resp.headers.get("Content-Security-Policy", "")
    assert csp.startswith("sandbox") and "allow-scripts" in csp, csp
    assert "allow-same-origin" not in csp


def test_engines_do_not_inherit_swapds_own_keys(start, tmp_path):
    """Issue 21 item 9: engines inherited swapd's whole environment, SWAPD_ADMIN_KEY and the
    `${env.*}` its keys come from included; a recipe that names one still gets it."""
    dump, named = tmp_path / "env.json", tmp_path / "env-named.json"
    env = {"SWAPD_ADMIN_KEY": "adm-SEKRET-1", "MY_API_KEY": "api-SEKRET-2",
           "HF_TOKEN": "hf-kept-for-engines"}
    daemon = start({
        "adminKeys": ["${env.SWAPD_ADMIN_KEY}"], "apiKeys": ["${env.MY_API_KEY}"],
        "models": {
            "m": model(fake_cmd("--env-dump", str(dump), name="m"), gpu=False),
            "n": model(fake_cmd("--env-dump", str(named), name="n"), gpu=False,
                       env=["MY_API_KEY=${env.MY_API_KEY}"]),
        }}, env=env)
    for name in ("m", "n"):
        code, _ = daemon.post("/v1/chat/completions", {"model": name, "messages": []},
                              headers={"Authorization": "Bearer api-SEKRET-2"})
        assert code == 200
    seen, seen_named = json.loads(dump.read_text()), json.loads(named.read_text())
    assert "SWAPD_ADMIN_KEY" not in seen and "MY_API_KEY" not in seen, sorted(seen)
    assert seen["HF_TOKEN"] == "hf-kept-for-engines"
    assert seen_named["MY_API_KEY"] == "api-SEKRET-2" and "SWAPD_ADMIN_KEY" not in seen_named
    # `swapd status` takes the admin key from the environment or a file, not only argv.
    key_file = tmp_path / "admin.key"
    key_file.write_text("adm-SEKRET-1\n")
    key_file.chmod(0o600)
    base = [PY, "-m", "swapd", "status", "--url", daemon.url]
    clean = {k: v for k, v in os.environ.items() if k != "SWAPD_ADMIN_KEY"}
    for argv, extra in ((base, {"SWAPD_ADMIN_KEY": "adm-SEKRET-1"}),
                        ([*base, "--admin-key-file", str(key_file)], {}),
                        ([*base, "--admin-key", "adm-SEKRET-1"], {})):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                             env={**clean, **extra})
        assert out.returncode == 0, (argv, out.stderr)
        assert ("shows the key" in out.stderr) == ("--admin-key" in argv), out.stderr


def test_engines_cannot_forge_swapd_lines_or_hide_text():
    """Issue 21 item 9: an engine printing `[swapd] …` read as swapd's own line in its model's
    stream; bidirectional controls make a line read otherwise than it is."""
    from swapd.observe.logs import SWAPD, LogHub

    hub = LogHub(100)
    hub.append("m", "[swapd] model m ready (forged)")
    hub.append("m", "  [swapd] indented")
    hub.append("m", "evil \u202eexe.txt\u2066 hidden")
    hub.append(SWAPD, "engine ready", also="m")
    lines = hub.recent("m")
    assert lines == ["[m] [swapd] model m ready (forged)", "[m]   [swapd] indented",
                     "evil exe.txt hidden", "[swapd] engine ready"], lines


def test_include_globs_through_symlink_loops_are_bounded(tmp_path):
    """Issue 21 item 9: `include: recipes/**/*.yaml` with folders that link back to their
    parent (two at each level: 2^depth paths for glob) hung loading."""
    folder = tmp_path / "recipes"
    (folder / "sub").mkdir(parents=True)
    (folder / "ok.yaml").write_text(yaml.safe_dump({"models": {"ok": {"cmd": "/bin/true"}}}))
    (folder / "sub" / "deep.yaml").write_text(
        yaml.safe_dump({"models": {"deep": {"cmd": "/bin/true"}}}))
    for name in ("a", "b"):
        (folder / name).symlink_to(folder)
        (folder / "sub" / name).symlink_to(folder)
    main = tmp_path / "config.yaml"
    main.write_text(yaml.safe_dump({"include": "recipes/**/*.yaml", "models": {}}))
    t0 = time.monotonic()
    result = load_config(main)
    assert time.monotonic() - t0 < 5
    assert sorted(result.config.models) == ["deep", "ok"]


# -- pure rules ---------------------------------------------------------------------------------


def test_host_and_origin_rules():
    own = frozenset({"spark-1", "spark-1.lan"})
    for host in ("127.0.0.1", "127.0.0.1:28080", "[::1]:28080", "10.0.0.5", "[fe80::1%eth0]",
                 "localhost", "LOCALHOST:1", "a.localhost", "spark-1", "spark-1.lan:28080",
                 "spark-1.", "swapd:28080", None):
        assert host_allowed(host, (), own), host
    for host in ("attacker.example", "localhost.attacker.example", "spark-1.evil", "",
                 "::1", "a b", "127.0.0.1:99999", "x@127.0.0.1"):
        assert not host_allowed(host, (), own), host
    assert host_allowed("anything.example", ("*",), own)
    assert split_host("[::1]:80") == ("::1", 80)
    assert same_origin("http://127.0.0.1:28080", "127.0.0.1:28080")
    assert same_origin("https://llm.example.com", "llm.example.com")
    assert not same_origin("http://127.0.0.1:3000", "127.0.0.1:28080")
    assert not same_origin("http://evil.example:28080", "127.0.0.1:28080")
    assert not same_origin("null", "127.0.0.1:28080")
    from multidict import CIMultiDict, CIMultiDictProxy

    def headers(**kw: str) -> CIMultiDictProxy[str]:
        return CIMultiDictProxy(CIMultiDict({k.replace("_", "-"): v for k, v in kw.items()}))

    assert foreign_origin(headers(), "127.0.0.1:1") is None
    assert foreign_origin(headers(Sec_Fetch_Site="same-origin"), "127.0.0.1:1") is None
    assert foreign_origin(headers(Sec_Fetch_Site="cross-site"), "127.0.0.1:1")
    assert foreign_origin(headers(Origin="http://127.0.0.1:2"), "127.0.0.1:1")


def test_engine_argv_in_check_output_is_masked(tmp_path):
    main = tmp_path / "config.yaml"
    main.write_text(yaml.safe_dump({
        "allowedHosts": ["llm.example.com"], "cors": {"allowOrigins": ["https://a.example"]},
        "bodyTimeout": 30,
        "models": {"m": {"cmd": "llama-server --api-key SEKRET-1 -H 'Authorization: Bearer "
                                "SEKRET-2'", "proxy": "http://u:SEKRET-3@127.0.0.1:9000",
                         "forwardClientAuth": True}}}))
    out = subprocess.run([sys.executable, "-m", "swapd", "check", "--config", str(main)],
                         capture_output=True, text=True, timeout=30, env={**os.environ})
    assert out.returncode == 0, out.stderr
    assert "SEKRET" not in out.stdout and "not supported" not in out.stdout, out.stdout
    for text in ("llm.example.com", "https://a.example", "bodyTimeout: 30s", "forwardClientAuth"):
        assert text in out.stdout, text


assert FAKE_ENGINE.exists()
