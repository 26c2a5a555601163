"""Observability end to end (issue 4): a real swapd process, real fake engines.

- ``GET /metrics`` after a swap: every metric the SPEC's "Metrics" section names, with sane values.
- GPU series through a real swapd whose ``import pynvml`` finds a fake module (the NVML boundary,
  nothing below): a GB10 (memory info NOT_SUPPORTED → /proc/meminfo), and a hung driver that
  must not slow a scrape.
- Logs: ``/logs/stream/{model}`` sends recent lines then live ones; swapd's JSON log (stdout, not
  a terminal) tags every line about an engine with its model; a reader that never reads does not
  slow the engines or swapd (its stream drops lines and says so).
- ``GET /status`` and ``swapd status --url`` after a crash, with a request in flight and one queued.

The only fake below swapd is `pynvml`; everything else is processes, sockets and signals.
"""

from __future__ import annotations

import json
import os
import re
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from http.client import HTTPConnection, HTTPException
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from swapd import __version__
from tests.support import PY, fake_cmd, http, model, stream_lines, wait_until
from tests.support.nvml import FAKE_PYNVML

REPO = Path(__file__).resolve().parent.parent

# The SPEC's "Metrics" list (sample names as a scrape shows them; counters end in _total).
SPEC_METRICS = (
    "swapd_requests_total",
    "swapd_request_duration_seconds",
    "swapd_time_to_first_byte_seconds",
    "swapd_inflight_requests",
    "swapd_queued_requests",
    "swapd_engine_state",
    "swapd_engine_starts_total",
    "swapd_engine_start_seconds",
    "swapd_engine_stops_total",
    "swapd_engine_kills_total",
    "swapd_engine_resident_memory_bytes",
    "swapd_gpu_memory_used_bytes",
    "swapd_gpu_memory_total_bytes",
    "swapd_gpu_temperature_celsius",
    "swapd_gpu_power_watts",
    "swapd_gpu_energy_joules_total",
    "swapd_gpu_utilization_ratio",
    "swapd_gpu_info",
    "swapd_build_info",
)
# Added to SPEC's list with the tokens, memory and stream-error series: each needs a workload
# of its own to appear (usage or timings, a learned footprint, a guard kill, a placement), so
# their own tests scrape them: test_activity, test_memory_*, test_metrics_scrape.
SPEC_METRICS_ELSEWHERE = (
    "swapd_stream_errors_total",
    "swapd_tokens_total",
    "swapd_time_to_first_token_seconds",
    "swapd_decode_tokens_per_second",
    "swapd_prefill_tokens_per_second",
    "swapd_engine_memory_peak_bytes",
    "swapd_memory_guard_kills_total",
    "swapd_placement_evictions_total",
)
GPU_METRICS = tuple(m for m in SPEC_METRICS if m.startswith("swapd_gpu_"))
HISTOGRAMS = (
    "swapd_request_duration_seconds",
    "swapd_time_to_first_byte_seconds",
    "swapd_engine_start_seconds",
)


# -- helpers ---------------------------------------------------------------------------------


def spec_metric_names() -> list[str] | None:
    """The metric names in SPEC.md's Metrics section, when the spec is at hand."""
    for spec in (REPO / "shared" / "SPEC.md", REPO.parent / "shared" / "SPEC.md"):
        if spec.exists():
            text = spec.read_text()
            section = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
            return sorted(set(re.findall(r"`(swapd_[a-z_]+)\{", section)))
    return None


Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(url: str) -> tuple[Samples, str]:
    """Every sample of a /metrics scrape, by sample name, and the raw text."""
    code, text = http("GET", url + "/metrics", timeout=10)
    assert code == 200, text
    assert isinstance(text, str)
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out, text


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The value of the one sample of `name` with exactly these labels (None if absent)."""
    found = [v for lbl, v in samples.get(name, []) if lbl == labels]
    assert len(found) <= 1, f"{name}{labels} appears {len(found)} times"
    return found[0] if found else None


def json_log(text: str) -> list[dict[str, Any]]:
    """swapd's stdout, parsed: not a terminal, so every line must be a JSON object."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:
            raise AssertionError(f"swapd wrote a line that is not JSON: {line!r}") from None
        assert isinstance(event, dict), line
        out.append(event)
    return out


ENGINE_EVENTS = {
    "engine spawned",
    "engine ready",
    "engine output",
    "engine exited",
    "engine crashed",
    "engine start failed",
    "engine marked failed",
    "stopping engine",
    "swap",
    "upstream failed",
    "upstream died mid-response",
}


def assert_engine_lines_carry_model(events: list[dict[str, Any]], models: set[str]) -> None:
    """Every event from the engine and scheduler modules (and every engine event) names a
    configured model."""
    about_engines = [
        e
        for e in events
        if str(e.get("logger", "")).startswith(("swapd.engine", "swapd.scheduler"))
        or e.get("event") in ENGINE_EVENTS
    ]
    assert about_engines
    for e in about_engines:
        assert e.get("model") in models, f"log line about an engine without its model: {e}"


def nvml_on_this_machine() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:
        return False


def chat(url: str, name: str, timeout: float = 30) -> tuple[int, Any]:
    return http(
        "POST",
        url + "/v1/chat/completions",
        {"model": name, "messages": [{"role": "user", "content": "hi"}]},
        timeout=timeout,
    )


def ask(daemon: Any, name: str) -> Any:
    """One chat request that must succeed (swapd's log in the message when it does not)."""
    code, body = chat(daemon.url, name)
    assert code == 200, f"{name}: {code} {body}\n{daemon.log()[-4000:]}"
    return body


def chat_stream(url: str, name: str) -> list[str]:
    body = {"model": name, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    lines = [line for line, _ in stream_lines(url + "/v1/chat/completions", body)]
    assert "data: [DONE]" in lines, lines
    return lines


class LineReader:
    """Reads a streaming text response line by line in a thread (as `curl -N` would)."""

    def __init__(self, url: str, path: str) -> None:
        self.conn = HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=30)
        self.conn.request("GET", path)
        self.resp = self.conn.getresponse()
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                raw = self.resp.readline()
                if not raw:
                    return
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
        except (OSError, ValueError, AttributeError, HTTPException):
            return  # closed under it

    def index(self, needle: str, start: int = 0) -> int | None:
        for i, line in enumerate(list(self.lines)[start:], start):
            if needle in line:
                return i
        return None

    def close(self) -> None:
        sock = self.conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(5)
        self.conn.close()


def timed(fn: Any, *args: Any) -> tuple[float, Any]:
    t0 = time.monotonic()
    out = fn(*args)
    return time.monotonic() - t0, out


def fake_nvml_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    folder = tmp_path / "fake-nvml"
    folder.mkdir(exist_ok=True)
    (folder / "pynvml.py").write_text(FAKE_PYNVML)
    path = os.pathsep.join(p for p in (str(folder), str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, **extra}


def two_models(*flags: str, **extra: Any) -> dict[str, Any]:
    return {
        "healthCheckTimeout": 30,
        "models": {
            "alpha": model(fake_cmd(*flags, name="alpha"), **extra),
            "beta": model(fake_cmd(*flags, name="beta"), **extra),
        },
    }


@pytest.fixture
def readers() -> Iterator[list[LineReader]]:
    opened: list[LineReader] = []
    yield opened
    for r in opened:
        r.close()


# -- (1) a scrape after a swap ---------------------------------------------------------------


def test_the_spec_metric_list_is_the_one_checked_here() -> None:
    names = spec_metric_names()
    if names is None:
        pytest.skip("SPEC.md is not beside this checkout")
    assert set(names) == set(SPEC_METRICS + SPEC_METRICS_ELSEWHERE)


def test_scrape_after_a_swap_shows_every_spec_metric_with_sane_values(start_swapd) -> None:
    daemon = start_swapd(two_models())
    url = daemon.url

    # alpha: two plain answers and a stream
    for _ in range(2):
        ask(daemon, "alpha")
    chat_stream(url, "alpha")
    # beta (a swap): two plain, two streams, one refused 400 on its /upstream inference path
    # (a body that is no JSON object): the path named beta, so beta's series counts it
    for _ in range(2):
        ask(daemon, "beta")
    for _ in range(2):
        chat_stream(url, "beta")
    code, body = http(
        "POST",
        url + "/upstream/beta/v1/chat/completions",
        "[1]",
        headers={"Content-Type": "application/json"},
    )
    assert code == 400, body
    # an unknown model: 404, and no series of its own (label cardinality stays bounded)
    assert chat(url, "nope")[0] == 404

    # Engine memory is sampled at ~1 Hz in a thread: wait for the first sample with beta.
    def beta_rss() -> Samples | None:
        samples, _ = scrape(url)
        rss = value(samples, "swapd_engine_resident_memory_bytes", model="beta")
        return samples if rss is not None and rss > 1_000_000 else None

    samples = wait_until(beta_rss, timeout=10, interval=0.1, message="beta's resident memory")
    _, text = scrape(url)

    gpu_here = nvml_on_this_machine()
    expected = SPEC_METRICS if gpu_here else tuple(m for m in SPEC_METRICS if m not in GPU_METRICS)
    missing = [m for m in expected if m not in samples and f"{m}_count" not in samples]
    assert not missing, f"metrics missing from the scrape: {missing}\n{text}"
    assert "nope" not in text

    # requests by model and code
    assert value(samples, "swapd_requests_total", model="alpha", code="200") == 3
    assert value(samples, "swapd_requests_total", model="beta", code="200") == 4
    assert value(samples, "swapd_requests_total", model="beta", code="400") == 1
    answered = {"alpha": 3, "beta": 5}
    for m, n in answered.items():
        total = sum(v for lbl, v in samples["swapd_requests_total"] if lbl["model"] == m)
        assert total == n
        # every answer observed once in the duration histogram, every relayed one (an engine
        # sent its first byte; not beta's 400, swapd's own) in TTFB's; durations positive, small
        relayed = {"alpha": 3, "beta": 4}[m]
        for hist, k in (("swapd_request_duration_seconds", n),
                        ("swapd_time_to_first_byte_seconds", relayed)):
            assert value(samples, f"{hist}_count", model=m) == k, hist
            assert 0 < (value(samples, f"{hist}_sum", model=m) or 0) < 30 * k
            assert value(samples, f"{hist}_bucket", model=m, le="+Inf") == k
        assert value(samples, "swapd_inflight_requests", model=m) == 0
        assert value(samples, "swapd_queued_requests", model=m) == 0
        # one start each, successful, timed
        assert value(samples, "swapd_engine_starts_total", model=m, result="success") == 1
        assert value(samples, "swapd_engine_starts_total", model=m, result="failure") == 0
        assert value(samples, "swapd_engine_start_seconds_count", model=m) == 1
        assert 0 < (value(samples, "swapd_engine_start_seconds_sum", model=m) or 0) < 30
        assert value(samples, "swapd_engine_kills_total", model=m) == 0
    # TTFB never exceeds the whole request
    for m in answered:
        ttfb = value(samples, "swapd_time_to_first_byte_seconds_sum", model=m) or 0
        assert ttfb <= (value(samples, "swapd_request_duration_seconds_sum", model=m) or 0)

    # engine state: one-hot, beta ready, alpha stopped
    for m, current in (("alpha", "stopped"), ("beta", "ready")):
        states = {lbl["state"]: v for lbl, v in samples["swapd_engine_state"] if lbl["model"] == m}
        assert states[current] == 1 and sum(states.values()) == 1, states
        assert {"stopped", "starting", "ready", "stopping", "failed"} <= set(states)

    # stops: alpha once, for the swap; nothing else
    stops = {(lbl["model"], lbl["reason"]): v for lbl, v in samples["swapd_engine_stops_total"]}
    assert stops[("alpha", "swap")] == 1
    assert sum(stops.values()) == 1, stops
    assert {r for (_, r) in stops} == {"idle", "swap", "unload", "crash", "shutdown", "reload",
                                       "memory_guard", "release"}

    # resident memory: the running engine only (a stopped one has no process group)
    assert value(samples, "swapd_engine_resident_memory_bytes", model="alpha") in (None, 0)
    assert (value(samples, "swapd_engine_resident_memory_bytes", model="beta") or 0) < 4 << 30

    assert samples["swapd_build_info"] == [({"version": __version__}, 1.0)]

    log = daemon.log()
    if gpu_here:
        # A real NVIDIA GPU (a GPU session): every GPU series, read through NVML.
        (info, one), *_ = samples["swapd_gpu_info"]
        assert one == 1 and info["memory_source"] in ("nvml", "meminfo")
        gpu = info["gpu"]
        used = value(samples, "swapd_gpu_memory_used_bytes", gpu=gpu) or 0
        assert 0 <= used <= (value(samples, "swapd_gpu_memory_total_bytes", gpu=gpu) or 0)
        assert 0 < (value(samples, "swapd_gpu_temperature_celsius", gpu=gpu) or 0) < 120
        assert 0 < (value(samples, "swapd_gpu_power_watts", gpu=gpu) or 0) < 2000
        assert 0 <= (value(samples, "swapd_gpu_utilization_ratio", gpu=gpu) or 0) <= 1
        print("\nreal GPU:", {k: v for k, v in samples.items() if k.startswith("swapd_gpu_")})
    else:
        # No NVML here: no GPU series at all, and exactly one log line that says so.
        assert not [m for m in samples if m.startswith("swapd_gpu_")], text
        nvml_lines = [line for line in log.splitlines() if "NVML" in line]
        assert len(nvml_lines) == 1, nvml_lines
        event = json.loads(nvml_lines[0])
        assert event["level"] == "info" and "not available" in event["event"]

    assert_engine_lines_carry_model(json_log(log), {"alpha", "beta"})


# -- (2) GPU series through swapd with a fake NVML (GB10) --------------------------------------


def meminfo() -> tuple[int, int]:
    values = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            values[key] = int(rest.split()[0]) * 1024
    return values["MemTotal"], values["MemAvailable"]


def test_gpu_series_of_a_gb10_through_a_real_swapd(start_swapd, tmp_path) -> None:
    daemon = start_swapd(two_models(), env=fake_nvml_env(tmp_path))
    ask(daemon, "beta")

    def gpu_sample() -> Samples | None:
        samples, _ = scrape(daemon.url)
        ready = "swapd_gpu_info" in samples and value(
            samples, "swapd_engine_gpu_memory_bytes", model="beta"
        )
        return samples if ready else None

    samples = wait_until(gpu_sample, timeout=10, interval=0.1, message="a GPU sample with beta")
    total, available = meminfo()

    missing = [m for m in GPU_METRICS if m not in samples]
    assert not missing, missing
    info = samples["swapd_gpu_info"]
    assert info == [
        (
            {
                "gpu": "0",
                "name": "NVIDIA GB10",
                "uuid": "GPU-5f1c0e2a-0000-0000-0000-00000000gb10",
                "driver": "580.95.05",
                "memory_source": "meminfo",
            },
            1.0,
        )
    ]
    # GB10: NVML has no memory info; used = MemTotal - MemAvailable of this machine, in bytes
    assert value(samples, "swapd_gpu_memory_total_bytes", gpu="0") == total
    used = value(samples, "swapd_gpu_memory_used_bytes", gpu="0")
    assert used is not None and abs(used - (total - available)) < 0.05 * total
    assert value(samples, "swapd_gpu_temperature_celsius", gpu="0") == 41
    assert value(samples, "swapd_gpu_power_watts", gpu="0") == 11.5  # 11 500 mW
    assert value(samples, "swapd_gpu_energy_joules_total", gpu="0") == 5000  # 5 000 000 mJ
    assert value(samples, "swapd_gpu_utilization_ratio", gpu="0") == pytest.approx(0.37)
    # NVML's compute processes, summed over the engine's process group
    assert value(samples, "swapd_engine_gpu_memory_bytes", model="beta") == 1 << 30
    assert "NVML initialised" in daemon.log()


# -- (3) a scrape never waits for NVML --------------------------------------------------------


def test_a_scrape_answers_at_once_while_nvml_hangs(start_swapd, tmp_path) -> None:
    marker = tmp_path / "nvml-calls"
    release = Path(str(marker) + ".release")
    # The sampler's first NVML call hangs until the test lets go (a minute at most): whatever
    # answers meanwhile did not wait for it, however slow this machine is.
    env = fake_nvml_env(tmp_path, FAKE_NVML_DELAY="60", FAKE_NVML_MARKER=str(marker))
    daemon = start_swapd(two_models(), env=env)
    try:
        wait_until(marker.exists, timeout=10, message="the sampler's first NVML call")
        for _ in range(5):
            code, _ = http("GET", daemon.url + "/metrics", None, None, 5)
            assert code == 200
        # an inference request does not wait for it either
        code, _ = chat(daemon.url, "alpha")
        assert code == 200
        samples, _ = scrape(daemon.url)
        assert value(samples, "swapd_requests_total", model="alpha", code="200") == 1
        assert "swapd_gpu_info" not in samples  # no sample finished yet: nothing made up
        assert not release.exists() and marker.read_text().count("\n") == 1  # still hung
    finally:
        release.touch()
    Path(f"{marker}.release").touch()  # the driver lets go: the GPU series appear
    wait_until(
        lambda: "swapd_gpu_info" in scrape(daemon.url)[0],
        timeout=10,
        message="the first GPU sample",
    )


# -- (4) logs ---------------------------------------------------------------------------------


def test_model_log_stream_sends_recent_lines_then_live_ones(start_swapd, readers) -> None:
    daemon = start_swapd(two_models())
    ask(daemon, "alpha")

    reader = LineReader(daemon.url, "/logs/stream/alpha")
    readers.append(reader)
    assert reader.resp.status == 200
    assert reader.resp.getheader("Content-Type", "").startswith("text/plain")
    assert reader.resp.getheader("X-Accel-Buffering") == "no"
    # history first: the engine's own output, and swapd's lines about alpha
    wait_until(
        lambda: reader.index("request POST /v1/chat/completions") is not None,
        timeout=10,
        message="alpha's recent lines",
    )
    listening = reader.index("listening on port")
    assert listening is not None
    assert reader.index("[swapd]") is not None and reader.index("engine ready") is not None
    seen = len(reader.lines)

    # live: a request now shows up on the open stream
    code, _ = http("POST", daemon.url + "/upstream/alpha/live-marker-1234", {"x": 1})
    assert code == 200
    live = wait_until(
        lambda: reader.index("request POST /live-marker-1234", seen),
        timeout=10,
        message="the live line",
    )
    assert live >= seen > listening
    # beta's lines are not alpha's
    ask(daemon, "beta")
    wait_until(
        lambda: reader.index("stopping engine", seen),
        timeout=10,
        message="swapd's line about stopping alpha",
    )
    assert reader.index("listening on port", live) is None  # beta's start is not in it

    # GET /logs: everything, tagged by source; /logs/stream/nope: 400 (llama-swap's answer)
    code, text = daemon.get("/logs")
    assert code == 200 and "[alpha] request POST /live-marker-1234" in text
    assert "[beta] listening on port" in text and "[swapd]" in text
    code, body = daemon.get("/logs/stream/nope")
    assert code == 400 and body["error"]["code"] == "unknown_log_source"


def test_engine_lines_in_swapd_json_log_carry_the_model(start_swapd) -> None:
    cfg = two_models()
    cfg["models"]["gamma"] = model(fake_cmd("--crash-after", "1", name="gamma"))
    daemon = start_swapd(cfg)
    ask(daemon, "alpha")
    ask(daemon, "gamma")  # then gamma crashes
    wait_until(lambda: '"engine crashed"' in daemon.log(), timeout=10, message="the crash")
    ask(daemon, "beta")
    daemon.post("/unload")
    assert daemon.stop() == 0

    events = json_log(daemon.log())
    assert_engine_lines_carry_model(events, {"alpha", "beta", "gamma"})
    output = [e for e in events if e["event"] == "engine output"]
    assert {e["model"] for e in output} == {"alpha", "beta", "gamma"}
    assert any(e["line"] == "request POST /v1/chat/completions" for e in output)
    crashed = next(e for e in events if e["event"] == "engine crashed")
    assert crashed["model"] == "gamma" and crashed["exit_code"] == 3
    assert any("simulated crash" in line for line in crashed["last_lines"])
    reasons = {(e["model"], e["reason"]) for e in events if e["event"] == "stopping engine"}
    assert ("alpha", "swap") in reasons and ("gamma", "crash") in reasons


def test_a_reader_that_never_reads_slows_nothing(start_swapd) -> None:
    """An engine writing ~2 MB of log per request, with and without a stalled /logs/stream
    reader: request latency stays the same, swapd answers at once, and the stalled stream
    drops lines with a marker instead of buffering them."""
    cfg = {
        "healthCheckTimeout": 30,
        "models": {"alpha": model(fake_cmd("--chatty", "2000", name="alpha"))},
    }
    daemon = start_swapd(cfg)
    ask(daemon, "alpha")  # started

    def latencies(n: int) -> list[float]:
        out = []
        for _ in range(n):
            seconds, (code, _) = timed(chat, daemon.url, "alpha", 20)
            assert code == 200
            out.append(seconds)
        return out

    baseline = latencies(5)

    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", daemon.port))
    stalled.sendall(b"GET /logs/stream HTTP/1.1\r\nHost: swapd\r\n\r\n")
    try:
        # While the stalled reader holds its stream: requests, and swapd's own routes.
        worst_health = 0.0
        done = threading.Event()

        def poll_health() -> None:
            nonlocal worst_health
            while not done.is_set():
                seconds, (code, _) = timed(http, "GET", daemon.url + "/health", None, None, 5)
                assert code == 200
                worst_health = max(worst_health, seconds)
                done.wait(0.05)

        poller = threading.Thread(target=poll_health, daemon=True)
        poller.start()
        try:
            with_stall = latencies(8)
        finally:
            done.set()
            poller.join(10)
        seconds, (code, _) = timed(http, "GET", daemon.url + "/metrics", None, None, 5)
        worst_health = max(worst_health, seconds)
        assert code == 200

        base, slow = statistics.median(baseline), statistics.median(with_stall)
        print(
            f"\nchatty request median: {base * 1000:.0f} ms without a stalled log reader, "
            f"{slow * 1000:.0f} ms with one; worst /health meanwhile "
            f"{worst_health * 1000:.0f} ms"
        )
        assert slow < 2 * base + 0.3, (baseline, with_stall)
        # swapd's own routes answer faster than a chatty request did before the stall
        assert worst_health < 2 * base + 0.3, (worst_health, baseline)

        # Now read the stalled stream: it dropped lines and says how many, in place.
        stalled.settimeout(10)
        got = b""
        deadline = time.monotonic() + 20
        while b"lines dropped (slow reader)" not in got:
            assert time.monotonic() < deadline, "no drop marker on the stalled stream"
            try:
                chunk = stalled.recv(1 << 20)
            except TimeoutError:
                raise AssertionError("the stalled stream has no drop marker") from None
            assert chunk, "stream ended without a drop marker"
            got = got[-200:] + chunk
        m = re.search(rb"\.\.\. (\d+) lines dropped \(slow reader\)", got)
        assert m and int(m.group(1)) > 0
    finally:
        stalled.close()
    # swapd is fine afterwards
    ask(daemon, "alpha")


# -- (5) /status and `swapd status` -----------------------------------------------------------


def test_status_and_cli_table_after_a_crash_with_work_in_flight(start_swapd) -> None:
    cfg = {
        "healthCheckTimeout": 30,
        "models": {
            "alpha": model(fake_cmd("--crash-after", "1", name="alpha")),
            "beta": model(fake_cmd(name="beta")),
        },
    }
    daemon = start_swapd(cfg)
    url = daemon.url
    ask(daemon, "alpha")  # alpha answers, then exits with code 3
    wait_until(
        lambda: (daemon.status()["models"]["alpha"]["last_exit"] or {}).get("code") == 3,
        timeout=10,
        message="alpha's crash in /status",
    )
    # A new request in the crash's backoff would get 503 at once: wait it out.
    wait_until(
        lambda: (f := daemon.status()["models"]["alpha"]["failure"]) and f["retry_at"] is None,
        timeout=10,
        message="alpha's backoff over",
    )

    # beta busy with a long request (until this client hangs up); alpha's waits behind it
    results: dict[str, int] = {}

    def queued_alpha() -> None:
        results["alpha"] = chat(url, "alpha")[0]

    slow_beta = HTTPConnection("127.0.0.1", daemon.port, timeout=30)
    slow_beta.request(
        "POST",
        "/upstream/beta/slow?seconds=60",
        body=b"{}",
        headers={"Content-Type": "application/json"},
    )
    wait_until(
        lambda: daemon.status()["models"]["beta"]["inflight"] == 1,
        timeout=10,
        message="beta's request in flight",
    )
    t_alpha = threading.Thread(target=queued_alpha)
    t_alpha.start()
    try:
        doc = wait_until(
            lambda: (d := daemon.status())["queue"] == 1 and d,
            timeout=5,
            message="alpha's request queued",
        )
        assert doc["tenant"] == ["beta"]
        assert doc["version"] == __version__
        alpha, beta = doc["models"]["alpha"], doc["models"]["beta"]
        assert alpha["state"] == "stopped" and alpha["pid"] is None and alpha["uptime"] is None
        assert alpha["inflight"] == 0 and alpha["queued"] == 1
        assert alpha["last_exit"]["code"] == 3
        assert any("simulated crash" in line for line in alpha["last_exit"]["last_lines"])
        assert beta["state"] == "ready" and isinstance(beta["pid"], int)
        assert 0 <= beta["uptime"] < 60 and beta["inflight"] == 1 and beta["queued"] == 0
        assert beta["last_exit"] is None

        samples, _ = scrape(url)
        assert value(samples, "swapd_inflight_requests", model="beta") == 1
        assert value(samples, "swapd_queued_requests", model="alpha") == 1
        assert value(samples, "swapd_engine_stops_total", model="alpha", reason="crash") == 1

        # the CLI, as a person runs it
        cli = subprocess.run(
            [PY, "-m", "swapd", "status", "--url", url], capture_output=True, text=True, timeout=20
        )
        assert cli.returncode == 0, cli.stderr
        table = cli.stdout.splitlines()
        assert "tenant: beta" in table[0] and "queued: 1" in table[0]
        header = next(line for line in table if line.startswith("MODEL"))
        assert header.split() == [
            "MODEL",
            "STATE",
            "PID",
            "UPTIME",
            "INFLIGHT",
            "QUEUED",
            "FAILURES",
            "LAST",
            "STOP",
        ]
        rows = {line.split()[0]: line.split() for line in table[table.index(header) + 1 :]
                if line.strip() and not line.split()[0].endswith(":")}  # not the failure notes
        assert rows["alpha"][:6] == ["alpha", "stopped", "-", "-", "0", "1"]
        # one failure (the crash), then why and how it ended: no bare exit code
        alpha_rest = " ".join(rows["alpha"][6:])
        assert re.fullmatch(r"1, retry .+ crash \(exit 3\) \d+s ago", alpha_rest), alpha_rest
        assert rows["beta"][:2] == ["beta", "ready"] and rows["beta"][2] == str(beta["pid"])
        assert rows["beta"][3].endswith("s") and rows["beta"][4:] == ["1", "0", "-", "-"]
        # columns line up: each value starts under its header
        col = header.index("INFLIGHT")
        beta_line = next(line for line in table if line.startswith("beta"))
        assert beta_line[col] == "1"

        raw = subprocess.run(
            [PY, "-m", "swapd", "status", "--url", url, "--json"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert raw.returncode == 0 and json.loads(raw.stdout)["tenant"] == ["beta"]
    finally:
        slow_beta.close()  # swapd cancels beta's request; alpha's turn comes
        t_alpha.join(30)
    assert results == {"alpha": 200}
    samples, _ = scrape(url)
    assert value(samples, "swapd_requests_total", model="beta", code="499") == 1
    assert value(samples, "swapd_inflight_requests", model="beta") == 0
    assert value(samples, "swapd_queued_requests", model="alpha") == 0

    bad = subprocess.run(
        [PY, "-m", "swapd", "status", "--url", "http://127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert bad.returncode == 1 and "cannot read" in bad.stderr
