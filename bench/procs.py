"""Processes under test: start, wait for, measure (CPU time, memory), stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

from tests.support import free_port, port_block, wait_until

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
API_KEY = "bench-key"


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (OSError, urllib.error.URLError):
        return 0, b""


def http_post(url: str, body: bytes = b"", timeout: float = 60.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def cpu_seconds(procs: Sequence[psutil.Process]) -> float:
    """User + system CPU time of these processes (their own, not their children's)."""
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


@dataclass
class Server:
    """A process the benchmark started (in its own session, so its whole tree can be ended)."""

    name: str
    argv: list[str]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    cwd: Path = ROOT  # `python -m swapd` imports swapd from here first

    def start(self) -> Server:
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            start_new_session=True,
        )
        log.close()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def process(self) -> psutil.Process:
        return psutil.Process(self.pid)

    def tree(self) -> list[psutil.Process]:
        """The process and its descendants (LiteLLM's workers, if any)."""
        p = self.process()
        return [p, *p.children(recursive=True)]

    def wait_http(self, path: str = "/health", timeout: float = 60.0) -> Server:
        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log()[-2000:]}")
            return http_get(self.url + path)[0] == 200

        wait_until(up, timeout, message=f"{self.name} to answer {path}")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class Swapd(Server):
    """A `swapd serve` process with a config written for the benchmark."""

    def __init__(
        self, name: str, workdir: Path, config: dict[str, Any], loop: str = "uvloop"
    ) -> None:
        port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "listen": f"127.0.0.1:{port}",
            "stateDir": str(workdir / "state"),
            "startPort": port_block(16),  # ${PORT}s of its own
            **config,
        }
        cfg = workdir / "config.yaml"
        cfg.write_text(yaml.safe_dump(config, sort_keys=False))
        super().__init__(
            name,
            [PY, "-m", "swapd", "serve", "--config", str(cfg)],
            port,
            workdir / "swapd.log",
            env={"SWAPD_LOOP": loop},
        )

    def status(self) -> dict[str, Any]:
        code, body = http_get(self.url + "/status")
        if code != 200:
            raise RuntimeError(f"/status answered {code}: {body[:200]!r}")
        data: dict[str, Any] = json.loads(body)
        return data

    def events(self) -> list[dict[str, Any]]:
        """swapd's structured log (JSON lines on stdout), parsed."""
        out = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out


def upstream(workdir: Path) -> Server:
    port = free_port()
    return Server(
        "upstream", [PY, "-m", "bench.upstream", "--port", str(port)], port, workdir / "up.log"
    )


def relay(workdir: Path, target: str, loop: str) -> Server:
    port = free_port()
    return Server(
        f"relay-{loop}",
        [PY, "-m", "bench.relay", "--port", str(port), "--upstream", target, "--loop", loop],
        port,
        workdir / f"relay-{loop}.log",
    )


LITELLM = Path(os.environ.get("BENCH_LITELLM", "/tmp/litellm-venv/bin/litellm"))


def litellm(workdir: Path, target: str) -> Server | None:
    """LiteLLM's proxy in front of the upstream, or None when it is not installed."""
    if not LITELLM.exists():
        return None
    port = free_port()
    cfg = workdir / "litellm.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model_list": [
                    {
                        "model_name": "m",
                        "litellm_params": {
                            "model": "openai/m",
                            "api_base": target + "/v1",
                            "api_key": "unused",
                        },
                    }
                ],
                "general_settings": {"master_key": API_KEY},
            }
        )
    )
    return Server(
        "litellm",
        [str(LITELLM), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port)],
        port,
        workdir / "litellm.log",
        env={"LITELLM_TELEMETRY": "False"},
    )


def parse_ts(stamp: str) -> float:
    """An ISO-8601 UTC timestamp of swapd's log as epoch seconds."""
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
