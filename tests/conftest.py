"""Shared fixtures (the helpers they use are in tests/support)."""

from __future__ import annotations

import fcntl
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import PY, Swapd, free_port, port_block, wait_healthy, write_config


@pytest.fixture
def start_swapd(tmp_path: Path) -> Iterator[Callable[..., Swapd]]:
    """Start swapd on a config dict; every daemon started is stopped at teardown."""
    started: list[Swapd] = []

    def start(config: dict[str, Any], *, args: tuple[str, ...] = (), wait: bool = True,
              env: dict[str, str] | None = None, port: int | None = None,
              state_dir: Path | None = None, name: str = "config.yaml") -> Swapd:
        port = port or free_port()
        state = state_dir or tmp_path / "state"
        config = {"stateDir": str(state), "startPort": port_block(), **config}
        config.setdefault("listen", f"127.0.0.1:{port}")
        path = write_config(tmp_path, config, name)  # a name of its own for a second daemon
        log_path = tmp_path / f"swapd-{len(started)}.log"
        proc_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        proc = subprocess.Popen(
            [PY, "-m", "swapd", "serve", "--config", str(path), *args],
            stdout=log_path.open("wb"),
            stderr=subprocess.STDOUT,
            env=proc_env,
            cwd=str(tmp_path),
        )
        daemon = Swapd(path, port, proc, log_path, state)
        started.append(daemon)
        if wait:
            wait_healthy(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `late` (real engines built from source, minutes each) run after the
    others: a quick failure shows first, and quick tests do not queue behind them.
    The real-vLLM tests (`vllm`: a few minutes, ~5 GB per vLLM, one xdist group) come after
    those: under xdist their group is handed out last. Order kept otherwise."""
    items.sort(key=lambda item: (item.get_closest_marker("vllm") is not None,
                                 item.get_closest_marker("late") is not None))


@pytest.fixture
def real_memory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One test at a time, across the session's xdist workers, among those that allocate real
    RAM and measure MemAvailable (floors, fits, sleeps): run side by side they move it under
    each other. A lock, not only their xdist_group: pytest 9.2 silently stopped honouring
    `--dist loadgroup` (pytest-dev/pytest-xdist#1386)."""
    base = tmp_path_factory.getbasetemp()
    folder = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the session's
    with open(folder / "real_memory.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)

