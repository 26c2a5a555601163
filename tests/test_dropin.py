"""Issue 22: a llama-swap user's flags, scripts and clients, replayed against a real swapd.

Listening (`:PORT` = every interface, the addresses printed, `-tls-*`, `-version`,
`-config-dir`), the shapes scripts read (/v1/models, /running, /unload, /logs/stream, error
bodies, ids holding '/'), fail-fast failed starts with the official openai client, and the
smaller items (litellm-config, startPort on reload, `swapd status --config`, key hints, a
failed start's last line, 499).
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import ssl
import subprocess
import threading
import time
from http.client import HTTPConnection, HTTPException, HTTPSConnection
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from tests.support import (
    PY,
    fake_cmd,
    free_port,
    http,
    model,
    read_records,
    stream_lines,
    wait_until,
    write_config,
)

CHAT = "/v1/chat/completions"
QWEN = "Qwen/Qwen3-8B"


def swapd(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
          ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "swapd", *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd, env=env)


def log_events(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict):
                out.append(event)
    return out


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def get_status(host: str, port: int, path: str = "/health") -> int:
    conn = HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


# -- 1. listening and flags -------------------------------------------------------------------


def test_colon_port_listens_on_every_interface_and_says_where(start_swapd, tmp_path) -> None:
    port = free_port()
    daemon = start_swapd({"models": {"m": model(fake_cmd())}},
                         args=("-listen", f":{port}"), port=port)
    wait_until(lambda: "swapd listening" in daemon.log(), message="the listening line")
    line = next(ln for ln in daemon.log().splitlines() if "swapd listening" in ln)
    assert f"http://0.0.0.0:{port}" in line, line
    assert get_status("127.0.0.1", port) == 200
    if ipv6_loopback():
        assert f"http://[::]:{port}" in line, line
        assert get_status("::1", port) == 200
    assert daemon.status()["listen"] == f":{port}"
    assert "reachable by every host on the network without a key" in daemon.log()


def test_listen_colon_port_in_the_config_loads(tmp_path) -> None:
    path = write_config(tmp_path, {"listen": ":28181", "models": {"m": model(fake_cmd())}})
    out = swapd("check", "-config", str(path))
    assert out.returncode == 0, out.stderr
    assert "listen: :28181" in out.stdout
    bad = write_config(tmp_path, {"listen": "28181", "models": {"m": model(fake_cmd())}},
                       name="bad.yaml")
    out = swapd("check", "--config", str(bad))
    assert out.returncode == 2 and "listen: must be HOST:PORT or :PORT" in out.stderr


@pytest.mark.parametrize("flag", ["-version", "--version"])
def test_version_needs_no_config(flag: str, tmp_path) -> None:
    out = swapd(flag, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("swapd ")


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    done = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        pytest.skip(f"openssl cannot make a certificate here: {done.stderr[-200:]}")
    return cert, key


def test_tls_flags_serve_https(start_swapd, tmp_path) -> None:
    cert, key = self_signed(tmp_path)
    daemon = start_swapd({"models": {"m": model(fake_cmd(name="m"))}}, wait=False,
                         args=("-tls-cert-file", str(cert), "-tls-key-file", str(key)))
    context = ssl.create_default_context(cafile=str(cert))

    def https(path: str, body: Any = None) -> tuple[int, Any]:
        conn = HTTPSConnection("127.0.0.1", daemon.port, timeout=30,
                                           context=context)
        try:
            conn.request("POST" if body is not None else "GET", path,
                         json.dumps(body) if body is not None else None,
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def up() -> bool:
        assert daemon.proc.poll() is None, daemon.log()
        try:
            return https("/health")[0] == 200
        except OSError:
            return False

    wait_until(up, timeout=20, message="swapd over https")
    assert f"https://127.0.0.1:{daemon.port}" in daemon.log()
    # The openai client, verifying the certificate.
    with openai.DefaultHttpxClient(verify=context) as client:
        c = openai.OpenAI(base_url=f"https://127.0.0.1:{daemon.port}/v1", api_key="none",
                          http_client=client)
        answer = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert answer.choices[0].message.content
    # Plain HTTP on that port is no longer answered as HTTP.
    with pytest.raises((OSError, HTTPException)):
        get_status("127.0.0.1", daemon.port)


def test_tls_needs_both_files(tmp_path) -> None:
    path = write_config(tmp_path, {"models": {"m": model(fake_cmd())}})
    out = swapd("-config", str(path), "-tls-cert-file", str(tmp_path / "c.pem"))
    assert out.returncode == 2 and "go together" in out.stderr


def test_config_dir_merges_files_as_llama_swap_does(start_swapd, tmp_path) -> None:
    folder = tmp_path / "conf.d"
    folder.mkdir()
    (folder / "10-models.yaml").write_text(yaml.safe_dump({
        "models": {"extra": model(fake_cmd(name="extra"), aliases=["ex"])},
        "groups": {"pair": {"swap": False, "members": ["base", "extra"]}},
    }))
    (folder / "20-more.yml").write_text(yaml.safe_dump({
        "models": {"third": model(fake_cmd(name="third"))},
        "macros": {"unused": "x"},
    }))
    (folder / "notes.txt").write_text("not a config")
    main = write_config(tmp_path, {"healthCheckTimeout": 30, "macros": {"base_flag": "1"},
                                   "models": {"base": model(fake_cmd(name="base"))}})
    out = swapd("check", "-config", str(main), "-config-dir", str(folder))
    assert out.returncode == 0, out.stderr
    assert [ln.strip() for ln in out.stdout.splitlines() if ln.startswith("  ") and
            not ln.startswith("    ")][:3] == ["base", "extra", "third"]
    assert "pair: swap=false" in out.stdout

    # A model defined twice: an error naming the second file.
    (folder / "30-dup.yaml").write_text(yaml.safe_dump({"models": {"base": model("x")}}))
    out = swapd("check", "-config", str(main), "-config-dir", str(folder))
    assert out.returncode == 2 and "30-dup.yaml" in out.stderr and "base" in out.stderr
    (folder / "30-dup.yaml").unlink()
    # Two values for one setting: an error.
    (folder / "40-hct.yaml").write_text("healthCheckTimeout: 99\n")
    out = swapd("check", "-config", str(main), "-config-dir", str(folder))
    assert out.returncode == 2 and "healthCheckTimeout" in out.stderr, out.stderr
    (folder / "40-hct.yaml").unlink()

    # Served from the folder alone (no -config), reloaded when a file is added.
    port = free_port()
    (folder / "00-top.yaml").write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{port}", "stateDir": str(tmp_path / "state"),
        "models": {"base": model(fake_cmd(name="base"))}}))
    proc = subprocess.Popen([PY, "-m", "swapd", "-config-dir", str(folder), "-watch-config"],
                            stdout=(tmp_path / "dir.log").open("wb"),
                            stderr=subprocess.STDOUT)
    try:
        def models() -> list[str]:
            try:
                code, doc = http("GET", f"http://127.0.0.1:{port}/v1/models", timeout=2)
            except OSError:
                return []
            return sorted(m["id"] for m in doc["data"]) if code == 200 else []

        wait_until(lambda: models() == ["base", "extra", "third"], timeout=20,
                   message=f"models from the folder: {(tmp_path / 'dir.log').read_text()}")
        (folder / "50-late.yaml").write_text(yaml.safe_dump(
            {"models": {"late": model(fake_cmd(name="late"))}}))
        wait_until(lambda: "late" in models(), timeout=20, message="a file added is loaded")
        code, answer = http("POST", f"http://127.0.0.1:{port}{CHAT}",
                            {"model": "late", "messages": []})
        assert code == 200, answer
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


# -- 2. the LAN ------------------------------------------------------------------------------


def test_on_the_lan_an_api_key_opens_the_operations_routes_never_recipes(
        start_swapd, tmp_path) -> None:
    from tests.support import non_loopback_address

    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")
    port = free_port()
    daemon = start_swapd({"apiKeys": ["sk-lan"], "listen": f":{port}",
                          "include": str(tmp_path / "recipes" / "*.yaml"),
                          "models": {"m": model(fake_cmd(name="m"))}}, port=port)
    remote = f"http://{address}:{port}"
    key = {"Authorization": "Bearer sk-lan"}
    # A llama-swap user's scripts, from another machine, with the API key.
    assert http("POST", remote + CHAT, {"model": "m", "messages": []}, key)[0] == 200
    code, doc = http("GET", remote + "/running", headers=key)
    assert code == 200 and [r["model"] for r in doc["running"]] == ["m"], doc
    assert http("GET", remote + "/logs", headers=key)[0] == 200
    assert http("GET", remote + "/status", headers=key)[0] == 200
    assert http("POST", remote + "/unload", headers=key) == (200, "OK")
    # Without it, or with a wrong one: 401.
    for headers in (None, {"Authorization": "Bearer nope"}):
        code, doc = http("GET", remote + "/running", headers=headers)
        assert code == 401 and doc["error"]["code"] == "invalid_api_key", doc
    # Recipes never open to an API key.
    code, doc = http("PUT", remote + "/admin/recipes/r", {"cmd": fake_cmd(name="r")}, key)
    assert code == 403, doc
    assert not (tmp_path / "recipes" / "r.yaml").exists()
    # On this machine, as before: no key needed for the operations routes.
    assert daemon.get("/running")[0] == 200


# -- 5. shapes --------------------------------------------------------------------------------


def test_shapes_scripts_read(start_swapd, tmp_path) -> None:
    before = time.time()
    daemon = start_swapd({"models": {
        QWEN: model(fake_cmd(name=QWEN), ttl=300, name="Qwen 3"),
        "other": model(fake_cmd(name="other")),
    }})
    after = time.time()
    code, listing = daemon.get("/v1/models")
    assert code == 200
    rows = {m["id"]: m for m in listing["data"]}
    for row in rows.values():
        # llama-swap's per-model fields beside swapd's own `state`.
        assert row["status"] == {"value": "unloaded"} and row["state"] == "stopped"
        assert before - 1 <= row["created"] <= after + 1, row  # the config's load time
        assert row["object"] == "model" and row["meta"]["llamaswap"]["type"] == "model"

    # An id with '/' in every operations path, unencoded.
    code, body = daemon.post(f"/models/{QWEN}/load")
    assert code == 200 and body["model"] == QWEN and body["state"] == "ready", body
    rows = {m["id"]: m for m in daemon.get("/v1/models")[1]["data"]}
    assert rows[QWEN]["status"] == {"value": "loaded"} and rows[QWEN]["state"] == "ready"
    assert rows["other"]["status"] == {"value": "unloaded"}
    code, running = daemon.get("/running")
    [entry] = running["running"]
    assert entry["model"] == QWEN and entry["ttl"] == 300 and isinstance(entry["ttl"], int)
    assert daemon.get(f"/upstream/{QWEN}/health")[0] == 200
    lines = stream_log(daemon.url + f"/logs/stream/{QWEN}", until="loading model")
    assert any("loading model" in line for line in lines), lines
    code, body = daemon.get("/logs/stream/nobody")
    assert code == 400 and body["src"] == "swapd" and body["error"]["param"] is None, body
    assert body["error"]["code"] == "unknown_log_source"
    # A recipe id cannot hold '/': a clear 400 (not "no route").
    code, body = daemon.get(f"/admin/recipes/{QWEN}")
    assert code == 400 and body["error"]["code"] == "invalid_id", body
    code, body = daemon.post(f"/models/{QWEN}/unload")
    assert code == 200 and body["unloaded"] == [QWEN], body

    # /unload: text `OK`, as llama-swap answers; JSON for a client that asks for it.
    assert daemon.post(f"/models/{QWEN}/load")[0] == 200
    code, text = daemon.post("/unload")
    assert code == 200 and text == "OK"
    code, doc = daemon.post("/unload", headers={"Accept": "application/json"})
    assert code == 200 and doc == {"unloaded": [], "msg": "OK"}

    # Errors carry llama-swap's fields.
    code, body = daemon.post(CHAT, {"model": "nope", "messages": []})
    assert code == 404 and body["src"] == "swapd"
    assert set(body["error"]) == {"message", "type", "param", "code"}


def stream_log(url: str, until: str) -> list[str]:
    """A log stream's lines (its history comes first) up to one holding `until`."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("GET", parts.path)
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        lines: list[str] = []
        while not any(until in line for line in lines):
            line = resp.readline()
            if not line:
                break
            lines.append(line.decode(errors="replace"))
        return lines
    finally:
        conn.close()


# -- 6. a failed start fails fast ---------------------------------------------------------------


def test_five_calls_to_a_broken_model_fail_fast(start_swapd, tmp_path) -> None:
    rec = tmp_path / "records.jsonl"
    daemon = start_swapd({"healthCheckTimeout": 30, "models": {
        # 20 tokens, 0.2 s apart: a request that stays in flight for ~4 s.
        "alpha": model(fake_cmd("--stream-tokens", "20", "--token-delay", "0.2",
                                record=rec, name="alpha")),
        # restart's defaults: backoff from 1 s, doubling up to 60 s.
        "crashy": model(fake_cmd("--crash-after", "0", record=rec, name="crashy")),
    }})
    attempts: list[dict[str, Any]] = []

    def on_request(request: Any) -> None:
        attempts.append({"sent": time.monotonic()})

    def on_response(response: Any) -> None:
        attempts[-1].update(status=response.status_code,
                            retry_after=response.headers.get("retry-after"))

    hooks = {"request": [on_request], "response": [on_response]}
    with openai.DefaultHttpxClient(event_hooks=hooks) as client:
        c = openai.OpenAI(base_url=daemon.url + "/v1", api_key="none", http_client=client)
        assert c.max_retries == 2  # the default

        def call() -> openai.APIStatusError:
            with pytest.raises(openai.APIStatusError) as err:
                c.chat.completions.create(model="crashy",
                                          messages=[{"role": "user", "content": "x"}])
            return err.value

        # The failed start itself: its last line in the message, no retry.
        first = call()
        assert first.status_code == 503 and "fatal: simulated crash" in str(first.message)
        assert len(attempts) == 1

        # alpha is the tenant, busy with a long request.
        pid_before = None
        streamed: list[str] = []

        def hold() -> None:
            for line, _ in stream_lines(daemon.url + CHAT,
                                        {"model": "alpha", "messages": [], "stream": True}):
                streamed.append(line)

        holder = threading.Thread(target=hold)
        holder.start()
        wait_until(lambda: daemon.status()["models"]["alpha"]["inflight"] == 1, timeout=20,
                   message="alpha's request in flight")
        pid_before = daemon.status()["models"]["alpha"]["pid"]

        # Five calls with the default client: one attempt each, answered at once.
        t0 = time.monotonic()
        errors = [call() for _ in range(5)]
        took = time.monotonic() - t0
    assert took < 10, (took, attempts)
    assert all(e.status_code == 503 for e in errors)
    assert len(attempts) == 6, attempts
    assert all(a["retry_after"] is None for a in attempts), attempts
    holder.join(30)
    assert any("[DONE]" in line for line in streamed), streamed[-3:]
    alpha = daemon.status()["models"]["alpha"]
    assert alpha["state"] == "ready" and alpha["pid"] == pid_before
    assert [r["event"] for r in read_records(rec) if r["model"] == "alpha"].count("start") == 1


def test_a_real_wait_keeps_retry_after(start_swapd, tmp_path) -> None:
    """The queue is full: that is a wait, and Retry-After says how long."""
    daemon = start_swapd({"maxQueue": 1, "models": {
        "slow": model(fake_cmd("--boot-delay", "3", name="slow")),
    }})
    results: list[int] = []
    first = threading.Thread(
        target=lambda: results.append(daemon.post(CHAT, {"model": "slow"})[0]))
    first.start()
    wait_until(lambda: daemon.status()["queue"] >= 1, message="one request queued")
    conn = HTTPConnection("127.0.0.1", daemon.port, timeout=10)
    conn.request("POST", CHAT, json.dumps({"model": "slow"}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    assert resp.status == 503 and resp.getheader("Retry-After") is not None
    assert resp.getheader("x-should-retry") is None
    first.join(30)
    assert results == [200]


# -- 9. smaller -------------------------------------------------------------------------------


def test_litellm_config_with_the_key_variable_unset(tmp_path) -> None:
    path = write_config(tmp_path, {"apiKeys": ["${env.MY_SWAPD_KEY}"], "listen": ":28080",
                                   "models": {"chat": model("x --port ${PORT}")}})
    env = {k: v for k, v in __import__("os").environ.items() if k != "MY_SWAPD_KEY"}
    out = swapd("litellm-config", "--config", str(path), env=env)
    assert out.returncode == 0, out.stderr
    doc = yaml.safe_load(out.stdout)
    params = doc["model_list"][0]["litellm_params"]
    assert params["api_key"] == "os.environ/MY_SWAPD_KEY"
    assert params["api_base"] == "http://127.0.0.1:28080/v1"
    assert "MY_SWAPD_KEY" in out.stdout.split("\ngeneral_settings:")[0]  # the header says so


def test_start_port_change_applies_on_reload(start_swapd, tmp_path) -> None:
    from tests.support import port_block

    daemon = start_swapd({"models": {"m": model(fake_cmd(name="m"))}})
    old = daemon.status()["models"]["m"]["upstream"]
    new_port = port_block()
    cfg = yaml.safe_load(daemon.config_path.read_text())
    cfg["startPort"] = new_port
    daemon.config_path.write_text(yaml.safe_dump(cfg))
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: daemon.status()["models"]["m"]["upstream"] != old,
               message="the new startPort applied")
    assert daemon.status()["models"]["m"]["upstream"].endswith(f":{new_port}")
    reload = [e for e in log_events(daemon.log()) if e.get("why") == "SIGHUP"][-1]
    assert reload["changed"] == ["m"], reload
    code, _ = daemon.post(CHAT, {"model": "m"})
    assert code == 200


def test_status_takes_config_and_admin_key_file(start_swapd, tmp_path) -> None:
    daemon = start_swapd({"adminKeys": ["adm-secret-1"], "models": {"m": model(fake_cmd())}})
    keyfile = tmp_path / "admin.key"
    keyfile.write_text("adm-secret-1\n")
    out = swapd("status", "--config", str(daemon.config_path), "--admin-key-file", str(keyfile))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "swapd" and "m " in out.stdout
    out = swapd("status", "--config", str(daemon.config_path))
    assert out.returncode == 1 and "401" in out.stderr


def test_key_slips_get_a_hint_and_no_false_not_supported(tmp_path) -> None:
    path = write_config(tmp_path, {"models": {"m": {**model(fake_cmd()), "tll": 30}}})
    out = swapd("check", "--config", str(path))
    assert out.returncode == 0, out.stderr
    assert "warning: models.m.tll: unknown key, ignored; did you mean ttl?" in out.stdout
    assert "not supported" not in out.stdout


def test_client_leaving_mid_stream_is_499(start_swapd, tmp_path) -> None:
    daemon = start_swapd({"models": {"m": model(fake_cmd(
        "--stream-tokens", "50", "--token-delay", "0.1", name="m"))}})
    conn = HTTPConnection("127.0.0.1", daemon.port, timeout=10)
    conn.request("POST", CHAT, json.dumps({"model": "m", "messages": [], "stream": True}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    resp.fp.readline()  # the first chunk came
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()

    def counted() -> dict[str, float]:
        _, text = daemon.get("/metrics")
        out = {}
        for line in text.splitlines():
            if line.startswith('swapd_requests_total{') and 'model="m"' in line:
                out[line.split('code="')[1].split('"')[0]] = float(line.split()[-1])
        return out

    wait_until(lambda: counted().get("499") == 1, timeout=15,
               message=f"a 499 counted: {counted()}")
    assert counted().get("200") == 0
