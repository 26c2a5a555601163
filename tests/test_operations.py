"""Operations, end to end on real swapd processes: sd_notify datagrams on a real unix socket,
SIGHUP / --watch-config reloads, SIGTERM drain, the second SIGINT, orphan reaping after a
real SIGKILL, the recipe admin API, admin auth, and secrets kept out of logs and /status.

What happened is read from the engines' own records, /proc and the datagrams, not from
swapd's word for it."""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import itertools
import json
import os
import resource
import signal
import socket
import threading
import time
import urllib.error
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from swapd.redact import MASK, is_secret_name, redact_argv
from swapd.systemd import SYSTEMD_ENV_VARS
from tests.support import (
    FAKE_ENGINE,
    PY,
    Swapd,
    fake_cmd,
    free_port,
    http,
    metric_value,
    model,
    non_loopback_address,
    pid_alive,
    port_block,
    read_records,
    wait_until,
)

# -- helpers -----------------------------------------------------------------------------


class NotifyListener:
    """A bound AF_UNIX datagram socket, read by a thread: what systemd would receive."""

    def __init__(self) -> None:
        self.address = f"@swapd-ops-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.address[1:])
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.messages.append((time.monotonic(), data.decode()))

    def texts(self) -> list[str]:
        with self._lock:
            return [m for _, m in self.messages]

    def wait_for(self, pred: Callable[[str], bool], message: str, timeout: float = 10) -> str:
        return wait_until(lambda: next((m for m in self.texts() if pred(m)), None),
                          timeout=timeout, message=message)

    def close(self) -> None:
        self._closed = True
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def notify() -> Iterator[NotifyListener]:
    listener = NotifyListener()
    try:
        yield listener
    finally:
        listener.close()


@pytest.fixture
def start(start_swapd: Callable[..., Swapd]) -> Callable[..., Swapd]:
    """start_swapd, with the models' ports below the ephemeral range."""

    def run(config: dict[str, Any], **kw: Any) -> Swapd:
        return start_swapd({"startPort": port_block(), **config}, **kw)

    return run


def edit_config(daemon: Swapd, mutate: Callable[[dict[str, Any]], None]) -> None:
    """Change the daemon's config file in place, atomically (a watcher never sees half)."""
    cfg = yaml.safe_load(daemon.config_path.read_text())
    mutate(cfg)
    write_file(daemon.config_path, yaml.safe_dump(cfg, sort_keys=False))


def write_file(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def pid_of(daemon: Swapd, name: str) -> int:
    pid = daemon.status()["models"][name]["pid"]
    assert isinstance(pid, int), daemon.status()
    return pid


def grandchild_of(records: Path, pid: int) -> int:
    return next(int(r["child"]) for r in read_records(records)
                if r["event"] == "grandchild" and r["pid"] == pid)


def refused(daemon: Swapd) -> bool:
    """True once swapd no longer accepts connections."""
    try:
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=1):
            return False
    except OSError:
        return True


def log_events(daemon: Swapd) -> list[dict[str, Any]]:
    out = []
    for line in daemon.log().splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict):
                out.append(event)
    return out


def kill_group_quietly(pgid: int) -> None:
    with contextlib.suppress(OSError):
        os.killpg(pgid, signal.SIGKILL)


def cpu_pair(records: Path | None = None) -> dict[str, Any]:
    """Two CPU-only models (gpu: false) that may run side by side."""
    return {
        "models": {
            "keep": model(fake_cmd(record=records, name="keep"), gpu=False),
            "change": model(fake_cmd(record=records, name="change"), gpu=False),
        }
    }


# -- sd_notify -----------------------------------------------------------------------------


def test_sd_notify_ready_watchdog_status_stopping(start, tmp_path, notify):
    dump = tmp_path / "engine-env.json"
    cfg = {"models": {"m": model(fake_cmd("--env-dump", str(dump), name="m"))}}
    daemon = start(cfg, env={"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "200000"})

    ready = notify.wait_for(lambda m: m.startswith("READY=1"), "READY=1")
    assert "STATUS=" in ready and "tenant: none" in ready
    # WATCHDOG=1 from the event loop, every WATCHDOG_USEC/2 (0.1 s here).
    wait_until(lambda: notify.texts().count("WATCHDOG=1") >= 4, timeout=5,
               message="four WATCHDOG=1 pings")
    with notify._lock:
        pings = [t for t, m in notify.messages if m == "WATCHDOG=1"]
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) < 1.0, gaps

    assert daemon.post("/models/m/load")[0] == 200
    notify.wait_for(lambda m: m.startswith("STATUS=") and "tenant: m" in m, "STATUS= tenant m")
    # The engine must not be able to speak for swapd.
    env = json.loads(dump.read_text())
    assert not set(SYSTEMD_ENV_VARS) & set(env)

    assert daemon.post("/models/m/unload")[0] == 200
    notify.wait_for(lambda m: m == "STATUS=tenant: none", "STATUS=tenant: none after unload")

    daemon.signal(signal.SIGTERM)
    assert daemon.proc.wait(15) == 0
    notify.wait_for(lambda m: m == "STOPPING=1", "STOPPING=1")
    texts = notify.texts()
    assert texts.index(ready) < texts.index("STOPPING=1")
    assert sum(m.startswith("READY=1") for m in texts) == 1


# -- reload --------------------------------------------------------------------------------


def test_sighup_keeps_unchanged_engine_and_replaces_changed_one_when_idle(start, tmp_path):
    daemon = start(cpu_pair())
    assert daemon.post("/models/keep/load")[0] == 200
    assert daemon.post("/models/change/load")[0] == 200
    keep_pid, old_pid = pid_of(daemon, "keep"), pid_of(daemon, "change")

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(daemon.post, "/upstream/change/slow?seconds=2.5")
        wait_until(lambda: daemon.status()["models"]["change"]["inflight"] == 1,
                   message="slow request in flight")

        new_cmd = fake_cmd("--stream-tokens", "7", name="change")
        edit_config(daemon, lambda c: c["models"]["change"].update(cmd=new_cmd))
        daemon.signal(signal.SIGHUP)
        wait_until(lambda: "config reloaded" in daemon.log(), message="reload logged")

        # While the changed engine finishes its request, the unchanged one serves on.
        for _ in range(3):
            code, body = daemon.post("/upstream/keep/echo", {"x": 1})
            assert code == 200 and body["x_pid"] == keep_pid
        assert not slow.done() and pid_alive(old_pid)
        code, body = slow.result(10)
    assert code == 200 and body["x_pid"] == old_pid and body["slept"] == 2.5

    wait_until(lambda: not pid_alive(old_pid), message="changed engine stopped once idle")
    code, body = daemon.post("/upstream/change/echo", {})
    assert code == 200 and body["x_pid"] != old_pid
    new_argv = Path(f"/proc/{body['x_pid']}/cmdline").read_bytes().split(b"\0")
    assert b"--stream-tokens" in new_argv and b"7" in new_argv
    assert pid_of(daemon, "keep") == keep_pid and pid_alive(keep_pid)

    metrics = daemon.get("/metrics")[1]
    assert metric_value(metrics, "swapd_engine_stops_total", model="change", reason="reload") == 1
    assert metric_value(metrics, "swapd_engine_stops_total", model="keep", reason="reload") == 0


def test_sighup_with_a_broken_config_keeps_the_running_one(start, tmp_path):
    daemon = start(cpu_pair())
    assert daemon.post("/models/keep/load")[0] == 200
    pid = pid_of(daemon, "keep")
    good = daemon.config_path.read_text()

    edit_config(daemon, lambda c: c["models"]["keep"].update(ttl="soon"))
    daemon.signal(signal.SIGHUP)
    refusal = wait_until(
        lambda: next((e for e in log_events(daemon)
                      if e.get("event") == "config reload refused; keeping the running config"),
                     None),
        message="refusal logged")
    assert refusal["level"] == "error" and "models.keep.ttl" in refusal["error"]
    assert daemon.proc.poll() is None
    code, body = daemon.post("/upstream/keep/echo", {})
    assert code == 200 and body["x_pid"] == pid
    assert set(daemon.status()["models"]) == {"keep", "change"}

    # A file that is not even YAML: refused as well.
    write_file(daemon.config_path, "models: [unclosed\n")
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: daemon.log().count("config reload refused") >= 2, message="2nd refusal")
    assert daemon.post("/upstream/keep/echo", {})[1]["x_pid"] == pid

    # The fixed file, plus one more model, is taken; the untouched engine keeps running.
    cfg = yaml.safe_load(good)
    cfg["models"]["extra"] = model(fake_cmd(name="extra"), gpu=False)
    write_file(daemon.config_path, yaml.safe_dump(cfg, sort_keys=False))
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: "extra" in daemon.status()["models"], message="extra model added")
    assert daemon.post("/upstream/extra/echo", {})[0] == 200
    assert pid_of(daemon, "keep") == pid


def test_watch_config_picks_up_file_and_recipe_edits(start, tmp_path):
    (tmp_path / "recipes").mkdir()
    cfg = {"include": "recipes/*.yaml", **cpu_pair()}
    daemon = start(cfg, args=("--watch-config",))
    assert daemon.post("/models/keep/load")[0] == 200
    pid = pid_of(daemon, "keep")

    edit_config(daemon, lambda c: c["models"].update(
        added=model(fake_cmd(name="added"), gpu=False)))
    wait_until(lambda: "added" in daemon.status()["models"], timeout=8, message="added model")

    recipe = tmp_path / "recipes" / "tuned.yaml"
    write_file(recipe, yaml.safe_dump(
        {"models": {"tuned": model(fake_cmd(name="tuned"), gpu=False)}}))
    wait_until(lambda: "tuned" in daemon.status()["models"], timeout=8, message="recipe model")
    code, body = daemon.post("/upstream/tuned/echo", {})
    assert code == 200 and body["x_served_by"] == "tuned"
    tuned_pid = body["x_pid"]

    recipe.unlink()
    wait_until(lambda: "tuned" not in daemon.status()["models"], timeout=8,
               message="recipe model removed")
    wait_until(lambda: not pid_alive(tuned_pid), message="removed model's engine stopped")
    assert pid_of(daemon, "keep") == pid


# -- shutdown ------------------------------------------------------------------------------


def test_sigterm_drains_in_flight_request_then_stops_every_engine(start, tmp_path):
    rec = tmp_path / "rec.jsonl"
    cfg = {"shutdownTimeout": 10,
           "models": {"m": model(fake_cmd("--spawn-grandchild", record=rec, name="m"))}}
    daemon = start(cfg)
    assert daemon.post("/models/m/load")[0] == 200
    pid = pid_of(daemon, "m")
    grandchild = grandchild_of(rec, pid)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(daemon.post, "/upstream/m/slow?seconds=2")
        wait_until(lambda: daemon.status()["models"]["m"]["inflight"] == 1,
                   message="slow request in flight")
        daemon.signal(signal.SIGTERM)
        wait_until(lambda: refused(daemon), timeout=5, message="listener closed")
        assert pid_alive(pid)  # the engine keeps serving the request in flight
        code, body = slow.result(10)
    assert code == 200 and body == {"slept": 2.0, "x_served_by": "m", "x_pid": pid}
    assert daemon.proc.wait(10) == 0
    assert not pid_alive(pid) and not pid_alive(grandchild)
    exits = [r for r in read_records(rec) if r["event"] == "exit"]
    assert exits and exits[0]["pid"] == pid


def test_drain_is_bounded_by_shutdown_timeout(start, tmp_path):
    cfg = {"shutdownTimeout": 0.5, "models": {"m": model(fake_cmd(name="m"))}}
    daemon = start(cfg)
    assert daemon.post("/models/m/load")[0] == 200
    pid = pid_of(daemon, "m")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(daemon.post, "/upstream/m/slow?seconds=60")
        wait_until(lambda: daemon.status()["models"]["m"]["inflight"] == 1,
                   message="slow request in flight")
        t0 = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert daemon.proc.wait(15) == 0
        elapsed = time.monotonic() - t0
        try:
            code, _ = slow.result(10)
        except (OSError, urllib.error.URLError):
            code = None  # the connection was cut: also an end
    assert code != 200
    assert elapsed < 6, f"exit took {elapsed:.1f}s with shutdownTimeout 0.5"
    assert not pid_alive(pid)


def test_second_sigint_kills_every_engine_group_fast(start, tmp_path):
    rec = tmp_path / "rec.jsonl"
    cfg = {"shutdownTimeout": 30,
           "models": {"m": model(fake_cmd("--ignore-sigterm", "--spawn-grandchild",
                                          record=rec, name="m"), unloadTimeout=120)}}
    daemon = start(cfg)
    assert daemon.post("/models/m/load")[0] == 200
    pid = pid_of(daemon, "m")
    grandchild = grandchild_of(rec, pid)
    try:
        daemon.signal(signal.SIGINT)
        # The engine ignores the SIGTERM; the normal path would now wait 120 s.
        wait_until(lambda: "ignoring SIGTERM" in daemon.log(), message="SIGTERM sent and ignored")
        assert daemon.proc.poll() is None and pid_alive(pid) and pid_alive(grandchild)

        t0 = time.monotonic()
        daemon.signal(signal.SIGINT)
        code = daemon.proc.wait(15)
        elapsed = time.monotonic() - t0
        assert code == 0
        assert elapsed < 5, f"forced exit took {elapsed:.1f}s"
        assert not pid_alive(pid) and not pid_alive(grandchild)
        assert "second stop signal" in daemon.log()
    finally:
        kill_group_quietly(pid)


@pytest.mark.parametrize("stop_reason", ["idle", "reload"])
def test_sigterm_while_an_engine_stop_is_under_way(start, tmp_path, stop_reason):
    """Shutdown cancels the scheduler's tasks; a stop they had begun must still finish
    (regression: the engine stayed 'stopping' and swapd never exited)."""
    slow_exit = fake_cmd("--exit-on-sigterm-delay", "1.5", name="m")
    ttl = 1 if stop_reason == "idle" else 0
    daemon = start({"models": {"m": model(slow_exit, ttl=ttl)}})
    assert daemon.post("/models/m/load")[0] == 200
    pid = pid_of(daemon, "m")
    if stop_reason == "reload":
        edit_config(daemon, lambda c: c["models"]["m"].update(ttl=60))
        daemon.signal(signal.SIGHUP)
    wait_until(lambda: daemon.status()["models"]["m"]["state"] == "stopping", timeout=5,
               message=f"{stop_reason} stop under way")
    t0 = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.proc.wait(10) == 0
    assert time.monotonic() - t0 < 5
    assert not pid_alive(pid)
    assert f'"reason": "{stop_reason}"' in daemon.log()


# -- orphans -------------------------------------------------------------------------------


def test_engines_left_by_a_sigkilled_swapd_are_reaped_before_the_next_listens(
        start, tmp_path):
    rec = tmp_path / "rec.jsonl"
    # A fixed startPort: the second swapd starts the model on the port the orphan held.
    cfg = {"startPort": port_block(),
           "models": {"m": model(fake_cmd("--spawn-grandchild", record=rec, name="m"))}}
    first = start(cfg)
    assert first.post("/models/m/load")[0] == 200
    pid = pid_of(first, "m")
    grandchild = grandchild_of(rec, pid)
    try:
        record = json.loads((first.state_dir / "engines.json").read_text())
        assert [(g["pid"], g["pgid"], g["model"]) for g in record["groups"]] == [(pid, pid, "m")]
        # Every state file is replaced atomically: no temp file stays (the start-times file
        # is written by a worker thread, so its write may still be under way right now).
        wait_until(lambda: not list(first.state_dir.glob("*.tmp")), timeout=10,
                   message="no temp file left in the state folder")

        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        # No one stopped them: the engine (its own session) and its grandchild live on.
        assert pid_alive(pid) and pid_alive(grandchild)
        # A SIGKILL between a state file's temp file and its rename leaves the temp file:
        # the next swapd removes what its own writes left, and nothing else.
        (first.state_dir / ".start-times.json.k1ll3d.tmp").write_text('{"half": ')
        (first.state_dir / "notes.tmp").write_text("not swapd's")

        second = start(cfg, port=first.port, state_dir=first.state_dir)
        # Checked the instant /health first answers: the reaping came before the bind.
        assert not pid_alive(pid) and not pid_alive(grandchild)
        wait_until(lambda: [p.name for p in first.state_dir.glob("*.tmp")] == ["notes.tmp"],
                   timeout=10, message="the killed swapd's temp file removed, notes.tmp kept")
        events = [e.get("event") for e in log_events(second)]
        assert events.index("reaped an engine left by an earlier swapd") < events.index(
            "swapd listening")
        reaped = next(e for e in log_events(second)
                      if e.get("event") == "reaped an engine left by an earlier swapd")
        assert reaped["pid"] == pid and reaped["model"] == "m" and reaped["gone"] is True
        # The port the orphan held is free again: the model starts on it.
        code, body = second.post("/upstream/m/echo", {})
        assert code == 200 and body["x_pid"] != pid
    finally:
        kill_group_quietly(pid)


# -- recipes -------------------------------------------------------------------------------

YAML = {"Content-Type": "application/yaml"}


def recipe_config(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    (tmp_path / "recipes").mkdir(exist_ok=True)
    return {"include": "recipes/*.yaml",
            "models": {"base": model(fake_cmd(name="base"))}, **extra}


def put(daemon: Swapd, recipe: str, body: Any, headers: dict[str, str] | None = None,
        ) -> tuple[int, Any]:
    return http("PUT", f"{daemon.url}/admin/recipes/{recipe}", body, headers=headers)


def chat(daemon: Swapd, name: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    return daemon.post("/v1/chat/completions", {"model": name, "messages": []}, headers=headers)


def test_recipe_put_yaml_and_json_get_and_serve_at_once(start, tmp_path):
    daemon = start(recipe_config(tmp_path))
    entry = {"cmd": fake_cmd(name="r1"), "ttl": 300, "aliases": ["r-one"]}

    code, body = put(daemon, "r1", yaml.safe_dump(entry), YAML)
    assert code == 201, body
    path = tmp_path / "recipes" / "r1.yaml"
    assert body["path"] == str(path) and body["changes"]["added"] == ["r1"]
    assert yaml.safe_load(path.read_text()) == {"models": {"r1": entry}}
    code, answer = chat(daemon, "r-one")
    assert code == 200 and answer["x_served_by"] == "r1", (answer, daemon.log())

    code, text = daemon.get("/admin/recipes/r1")
    assert code == 200 and yaml.safe_load(text) == entry
    assert daemon.get("/admin/recipes/r1", headers={"Accept": "application/json"}) == (200, entry)

    # JSON body, a second recipe.
    entry2 = {"cmd": fake_cmd(name="r2"), "gpu": False}
    code, body = put(daemon, "r2", entry2)
    assert code == 201, body
    assert yaml.safe_load((tmp_path / "recipes" / "r2.yaml").read_text()) == {
        "models": {"r2": entry2}}
    assert chat(daemon, "r2")[1]["x_served_by"] == "r2"

    # Replacing an existing recipe answers 200; the running engine is replaced once idle.
    old_pid = pid_of(daemon, "r2")
    entry2b = {**entry2, "cmd": fake_cmd("--stream-tokens", "3", name="r2")}
    code, body = put(daemon, "r2", entry2b)
    assert code == 200 and body["changes"]["changed"] == ["r2"]
    wait_until(lambda: not pid_alive(old_pid), message="old r2 engine stopped")
    code, answer = chat(daemon, "r2")
    assert code == 200 and answer["x_pid"] != old_pid
    assert not list((tmp_path / "recipes").glob(".*"))  # no temp file left behind


def test_invalid_recipe_is_refused_and_old_file_kept(start, tmp_path):
    daemon = start(recipe_config(tmp_path))
    assert put(daemon, "r1", {"cmd": fake_cmd(name="r1"), "gpu": False})[0] == 201
    path = tmp_path / "recipes" / "r1.yaml"
    before = path.read_bytes()
    assert chat(daemon, "r1")[0] == 200
    pid = pid_of(daemon, "r1")

    code, body = put(daemon, "r1", {"cmd": fake_cmd(name="r1"), "ttl": "soon"})
    assert code == 400 and body["error"]["code"] == "invalid_recipe"
    assert "models.r1.ttl" in body["error"]["message"]
    code, body = put(daemon, "r1", {"ttl": 5})
    assert code == 400 and "models.r1.cmd" in body["error"]["message"]
    code, body = put(daemon, "r1", "cmd: [unclosed", YAML)
    assert code == 400 and body["error"]["code"] == "bad_recipe"
    code, body = put(daemon, "r1", "[1, 2]", {"Content-Type": "application/json"})
    assert code == 400 and "models.r1" in body["error"]["message"]
    # An alias that collides with another model is a config error too.
    code, body = put(daemon, "r2", {"cmd": fake_cmd(name="r2"), "aliases": ["base"]})
    assert code == 400, body
    assert not (tmp_path / "recipes" / "r2.yaml").exists()
    for bad in (".hidden", "a%20b", "x..y"):
        code, body = put(daemon, bad, {"cmd": fake_cmd(name="x")})
        assert code == 400, (bad, body)

    assert path.read_bytes() == before
    code, answer = chat(daemon, "r1")
    assert code == 200 and answer["x_pid"] == pid


def test_delete_recipe_stops_its_engine(start, tmp_path):
    daemon = start(recipe_config(tmp_path))
    assert put(daemon, "r1", {"cmd": fake_cmd("--spawn-grandchild", name="r1")})[0] == 201
    assert chat(daemon, "r1")[0] == 200
    pid = pid_of(daemon, "r1")
    grandchild = int(next(line for line in daemon.get("/logs")[1].splitlines()
                          if "grandchild pid" in line).split()[-1])

    code, body = http("DELETE", daemon.url + "/admin/recipes/r1")
    assert code == 200 and body["deleted"] is True and body["changes"]["removed"] == ["r1"]
    assert not (tmp_path / "recipes" / "r1.yaml").exists()
    code, body = chat(daemon, "r1")  # at once, while its engine is still being stopped
    assert code == 404 and body["error"]["code"] == "model_not_found"
    # /status lists it until the last process of its group is gone.
    wait_until(lambda: "r1" not in daemon.status()["models"], message="r1 gone from /status")
    assert not pid_alive(pid) and not pid_alive(grandchild)
    assert daemon.get("/admin/recipes/r1")[0] == 404
    assert http("DELETE", daemon.url + "/admin/recipes/r1")[0] == 404
    assert chat(daemon, "base")[0] == 200


def test_recipes_without_include_are_a_clear_error(start, tmp_path):
    daemon = start({"models": {"m": model(fake_cmd(name="m"))}})
    for method, body in (("GET", None), ("PUT", {"cmd": fake_cmd(name="r")}), ("DELETE", None)):
        code, answer = http(method, daemon.url + "/admin/recipes/r", body)
        assert code == 409, (method, answer)
        assert answer["error"]["code"] == "no_include"
        assert "include" in answer["error"]["message"]


def test_recipe_write_failure_is_a_clear_5xx_and_leaves_the_old_file(start, tmp_path):
    daemon = start(recipe_config(tmp_path))
    folder = tmp_path / "recipes"

    # The target name is taken by a folder: rename() fails, nothing half-written remains.
    (folder / "r3.yaml").mkdir()
    code, body = put(daemon, "r3", {"cmd": fake_cmd(name="r3")})
    assert code == 500 and body["error"]["code"] == "recipe_write_failed", body
    assert "r3" in body["error"]["message"]
    assert sorted(p.name for p in folder.iterdir()) == ["r3.yaml"]
    assert (folder / "r3.yaml").is_dir()

    # A write that fails half-way (file size limit: EFBIG) must leave the old recipe whole.
    # Root ignores chmod, so the limit is put on the swapd process itself.
    assert put(daemon, "r1", {"cmd": fake_cmd(name="r1"), "gpu": False})[0] == 201
    before = (folder / "r1.yaml").read_bytes()
    limit = daemon.log_path.stat().st_size + 256 * 1024
    soft, hard = resource.prlimit(daemon.proc.pid, resource.RLIMIT_FSIZE)
    resource.prlimit(daemon.proc.pid, resource.RLIMIT_FSIZE, (limit, hard))
    try:
        big = {"cmd": fake_cmd(name="r1"), "gpu": False, "description": "x" * 1_000_000}
        code, body = put(daemon, "r1", big)
    finally:
        resource.prlimit(daemon.proc.pid, resource.RLIMIT_FSIZE, (soft, hard))
    assert code == 500 and body["error"]["code"] == "recipe_write_failed", body
    assert os.strerror(errno.EFBIG) in body["error"]["message"]
    assert (folder / "r1.yaml").read_bytes() == before
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]
    assert daemon.proc.poll() is None and chat(daemon, "r1")[0] == 200


def test_adding_or_deleting_a_recipe_does_not_restart_the_others(start, tmp_path):
    """${PORT}s are numbered in file order; a reload keeps each model's port, so a recipe
    that sorts first does not renumber (and restart) the ones after it."""
    daemon = start(recipe_config(tmp_path))
    assert put(daemon, "zz", {"cmd": fake_cmd(name="zz"), "gpu": False})[0] == 201
    assert chat(daemon, "zz")[0] == 200
    pid = pid_of(daemon, "zz")
    code, body = put(daemon, "aa", {"cmd": fake_cmd(name="aa"), "gpu": False})
    assert code == 201 and body["changes"] == {"added": ["aa"], "changed": [], "removed": []}
    assert chat(daemon, "aa")[0] == 200  # on a port of its own, beside zz
    code, body = http("DELETE", daemon.url + "/admin/recipes/aa")
    assert code == 200 and body["changes"] == {"added": [], "changed": [], "removed": ["aa"]}
    # A model inserted first in the main file does not renumber the rest either.
    edit_config(daemon, lambda c: c.update(models={"first": model(fake_cmd(name="first")),
                                                   **c["models"]}))
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: "first" in daemon.status()["models"], message="first model added")
    reload = [e for e in log_events(daemon) if e.get("why") == "SIGHUP"][-1]
    assert reload["added"] == ["first"] and reload["changed"] == []
    code, answer = chat(daemon, "zz")
    assert code == 200 and answer["x_pid"] == pid


# -- admin auth --------------------------------------------------------------------------------


def test_admin_routes_need_an_admin_key(start, tmp_path):
    cfg = recipe_config(tmp_path, apiKeys=["api-key-ONE"], adminKeys=["admin-key-TWO"])
    daemon = start(cfg)
    admin = {"Authorization": "Bearer admin-key-TWO"}
    api = {"Authorization": "Bearer api-key-ONE"}
    entry = {"cmd": fake_cmd(name="r"), "gpu": False}
    routes: list[tuple[str, str, Any]] = [
        ("GET", "/status", None), ("GET", "/running", None), ("GET", "/logs", None),
        ("POST", "/models/base/load", None), ("POST", "/models/base/unload", None),
        ("POST", "/unload", None), ("GET", "/admin/recipes/r", None),
        ("PUT", "/admin/recipes/r", entry), ("DELETE", "/admin/recipes/r", None),
    ]
    for method, path, body in routes:
        for headers in (None, api, {"Authorization": "Bearer wrong"}):
            code, answer = http(method, daemon.url + path, body, headers=headers)
            assert code == 401, (method, path, headers, answer)
            assert answer["error"]["code"] == "invalid_admin_key"
    assert not (tmp_path / "recipes" / "r.yaml").exists()
    assert "base" not in [m for m, s in daemon.get("/status", admin)[1]["models"].items()
                          if s["pid"]]

    assert http("GET", daemon.url + "/health")[0] == 200
    assert http("GET", daemon.url + "/metrics")[0] == 200
    assert daemon.get("/status", {"x-api-key": "admin-key-TWO"})[0] == 200
    assert daemon.post("/models/base/load", headers=admin)[0] == 200
    assert http("PUT", daemon.url + "/admin/recipes/r", entry, headers=admin)[0] == 201
    assert daemon.get("/admin/recipes/r", admin)[0] == 200
    assert chat(daemon, "r")[0] == 401
    assert chat(daemon, "r", api)[0] == 200
    assert http("DELETE", daemon.url + "/admin/recipes/r", headers=admin)[0] == 200


def test_without_admin_keys_admin_routes_answer_loopback_only(start, tmp_path):
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")
    port = free_port()
    daemon = start(recipe_config(tmp_path, listen=f"0.0.0.0:{port}"), port=port)
    remote = f"http://{address}:{port}"
    for method, path in (("GET", "/status"), ("POST", "/models/base/load"),
                         ("PUT", "/admin/recipes/r"), ("GET", "/logs")):
        body = {"cmd": fake_cmd(name="r")} if method == "PUT" else None
        code, answer = http(method, remote + path, body)
        assert code == 403, (path, answer)
        assert answer["error"]["code"] == "operations_loopback_only", answer
    assert not (tmp_path / "recipes" / "r.yaml").exists()
    assert http("GET", remote + "/health")[0] == 200
    code, answer = http("POST", remote + "/v1/chat/completions", {"model": "base", "messages": []})
    assert code == 200  # inference is open without apiKeys
    assert daemon.get("/status")[0] == 200  # loopback
    assert put(daemon, "r", {"cmd": fake_cmd(name="r"), "gpu": False})[0] == 201


# -- secrets -------------------------------------------------------------------------------


def test_secrets_never_reach_logs_or_status(start, tmp_path):
    secrets = {
        "api": "sk-api-SECRET-1", "admin": "adm-SECRET-2", "flag": "sk-flag-SECRET-3",
        "argv_env": "hf_argv_SECRET-4", "env": "hf_env_SECRET-5", "recipe_env": "hf_rcp_SECRET-6",
        "recipe_flag": "rcp-flag-SECRET-7",
    }

    def wrapped(name: str, *extra: str) -> str:
        # sh runs the fake engine; what follows the script is argv the engine never reads.
        script = f"exec {PY} {FAKE_ENGINE} --port \"$1\" --model-name {name}"
        return f"/bin/sh -c '{script}' sh ${{PORT}} " + " ".join(extra)

    cfg = recipe_config(
        tmp_path, apiKeys=[secrets["api"]], adminKeys=[secrets["admin"]],
        logLevel="debug")
    cfg["models"]["base"] = model(
        wrapped("base", "--api-key", secrets["flag"], f"HF_TOKEN={secrets['argv_env']}"),
        env={"HF_TOKEN": secrets["env"], "OPENAI_API_KEY": secrets["env"]})
    daemon = start(cfg)
    admin = {"Authorization": f"Bearer {secrets['admin']}"}
    api = {"x-api-key": secrets["api"]}

    assert chat(daemon, "base", api)[0] == 200
    recipe = {"cmd": wrapped("r", f"--hf-token={secrets['recipe_flag']}"), "gpu": False,
              "env": {"HF_TOKEN": secrets["recipe_env"]}}
    assert put(daemon, "r", recipe, admin)[0] == 201
    assert chat(daemon, "r", api)[0] == 200
    assert chat(daemon, "r", {"Authorization": "Bearer wrong-key"})[0] == 401

    outputs = {
        "/status": json.dumps(daemon.get("/status", admin)[1]),
        "/running": json.dumps(daemon.get("/running", admin)[1]),
        "/logs": daemon.get("/logs", admin)[1],
        "/metrics": daemon.get("/metrics")[1],
        "/v1/models": json.dumps(daemon.get("/v1/models", api)[1]),
    }
    daemon.stop()
    outputs["stdout log"] = daemon.log()
    assert "engine spawned" in outputs["stdout log"] and MASK in outputs["/logs"]
    for where, text in outputs.items():
        for name, value in secrets.items():
            assert value not in text, f"{name} secret appears in {where}"
    running = outputs["/running"]
    assert "--api-key ***" in running and "--hf-token=***" in running


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["vllm", "serve", "m", "--api-key", "sk-1", "--port", "8000"],
         ["vllm", "serve", "m", "--api-key", MASK, "--port", "8000"]),
        (["llama-server", "--api-key=sk-1", "-m", "x.gguf"],
         ["llama-server", f"--api-key={MASK}", "-m", "x.gguf"]),
        (["env", "HF_TOKEN=hf_1", "CUDA_VISIBLE_DEVICES=0", "vllm", "serve"],
         ["env", f"HF_TOKEN={MASK}", "CUDA_VISIBLE_DEVICES=0", "vllm", "serve"]),
        (["docker", "run", "-e", "HF_TOKEN=hf_1", "--env=MY_PASSWORD=p", "img"],
         ["docker", "run", "-e", f"HF_TOKEN={MASK}", f"--env=MY_PASSWORD={MASK}", "img"]),
        (["x", "--hf_token", "t", "--jwt-secret", "s", "--db-password", "p", "--client_secret=c"],
         ["x", "--hf_token", MASK, "--jwt-secret", MASK, "--db-password", MASK,
          f"--client_secret={MASK}"]),
        # A flag with no value does not swallow the next flag.
        (["x", "--api-key", "--port", "1"], ["x", "--api-key", "--port", "1"]),
        # Not secrets: these must stay readable in the log.
        (["vllm", "serve", "--max-num-batched-tokens", "8192", "--tokenizer", "t",
          "--ssl-keyfile", "/k.pem", "--override-kv", "tokenizer.ggml.add_bos_token=bool:false"],
         ["vllm", "serve", "--max-num-batched-tokens", "8192", "--tokenizer", "t",
          "--ssl-keyfile", "/k.pem", "--override-kv", "tokenizer.ggml.add_bos_token=bool:false"]),
    ],
)
def test_redact_argv(argv, expected):
    assert redact_argv(argv) == expected
    assert redact_argv(tuple(argv)) == expected  # a recipe's cmd is a tuple


def test_is_secret_name():
    for name in ("--api-key", "HF_TOKEN", "OPENAI_API_KEY", "--admin-keys", "aws.secret",
                 "DB_PASSWORD", "--apikey"):
        assert is_secret_name(name), name
    for name in ("--max-tokens", "--tokenizer", "--ssl-keyfile", "--port", "CUDA_VISIBLE_DEVICES",
                 "--kv-cache-dtype"):
        assert not is_secret_name(name), name



def test_load_config_keeps_ports_across_a_reload(tmp_path):
    from swapd.config.loader import load_config

    path = tmp_path / "c.yaml"

    def write(*names: str) -> None:
        path.write_text(yaml.safe_dump({"startPort": 7000, "models": {
            n: {"cmd": f"engine --port ${{PORT}} --name {n}"} for n in names}}))

    write("b", "c")
    first = load_config(path).config
    assert {m.id: m.port for m in first.models.values()} == {"b": 7000, "c": 7001}
    kept = {m.id: m.port for m in first.models.values() if m.port is not None}
    write("a", "b", "c", "d")
    again = load_config(path, keep_ports=kept).config
    ports = {m.id: m.port for m in again.models.values()}
    # b and c keep theirs (their ModelConfig is unchanged); new ones never take a held port.
    assert ports == {"a": 7002, "b": 7000, "c": 7001, "d": 7003}
    assert again.models["b"] == first.models["b"] and again.models["c"] == first.models["c"]
    assert load_config(path).config.models["a"].port == 7000  # a fresh start numbers anew
