"""How long each model's engine took to become ready, remembered across restarts.

The loading ETA shown in /ui, /status, /v1/models, the sendLoadingState progress and
`Retry-After` comes from here: the median of the last `KEEP` successful starts, which one slow
first start (a cold page cache) or one lucky one does not move much.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import threading
import time
from pathlib import Path
from typing import Protocol

import structlog

from swapd.files import read_state_json, write_atomic

log = structlog.get_logger("swapd.starts")

KEEP = 9
# A start time read back longer than this is no start time swapd measured.
MAX_SECONDS = 7 * 24 * 3600.0
FILE = "start-times.json"


class Starting(Protocol):
    """What the ETA needs of an engine (the scheduler's `EngineView`)."""

    @property
    def state(self) -> str: ...

    @property
    def started_at(self) -> float | None: ...

    @property
    def id(self) -> str: ...


def estimate(durations: list[float]) -> float | None:
    """The expected start duration from recent ones (None without any)."""
    return statistics.median(durations[-KEEP:]) if durations else None


def remaining(expected: float | None, elapsed: float) -> float | None:
    """Seconds left of a start `elapsed` seconds old; a start past its estimate is 'any
    moment now' (1 s), not a negative number."""
    if expected is None:
        return None
    return max(1.0, expected - elapsed)


class StartTimes:
    """Per-model start durations, kept in `state_dir/start-times.json` (None: memory only)."""

    def __init__(self, state_dir: Path | None) -> None:
        self._path = state_dir / FILE if state_dir is not None else None
        self._loaded: dict[str, list[float]] | None = None
        self._lock = threading.Lock()
        self._version = 0  # records made
        self._written = 0  # the newest record on disk

    @property
    def _times(self) -> dict[str, list[float]]:
        # Read on first use, not at construction: by then logging is set up (a warning about
        # a bad file must reach the configured log, not stderr in another format).
        if self._loaded is None:
            self._loaded = _read(self._path) if self._path is not None else {}
        return self._loaded

    def record(self, model: str, seconds: float) -> None:
        """Remember a successful start. On an event loop the file is written by a worker
        thread: its two fsyncs must not delay the requests the start has just released."""
        times = self._times.setdefault(model, [])
        times.append(round(seconds, 3))
        del times[:-KEEP]
        if self._path is None:
            return
        data = json.dumps(self._times, sort_keys=True).encode()
        self._version += 1
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write(data, self._version)
            return
        loop.run_in_executor(None, self._write, data, self._version)

    def _write(self, data: bytes, version: int) -> None:
        assert self._path is not None
        with self._lock:
            if version <= self._written:
                return  # a newer record was written already (writes may finish out of order)
            try:
                write_atomic(self._path, data)
            except OSError as exc:
                log.warning("cannot remember start times", path=str(self._path), error=str(exc))
            self._written = version

    def samples(self) -> dict[str, list[float]]:
        """Every model's recent start durations (seconds, oldest first): what the matrix
        router weighs an eviction by."""
        return {model: list(times) for model, times in self._times.items()}

    def expected(self, model: str) -> float | None:
        return estimate(self._times.get(model, []))

    def eta(self, model: str, started_at: float | None, now: float | None = None) -> float | None:
        """Seconds left for an engine that began starting at wall time `started_at`."""
        if started_at is None:
            return None
        elapsed = (time.time() if now is None else now) - started_at
        return remaining(self.expected(model), elapsed)

    def loading_eta(self, engine: Starting | None) -> float | None:
        """Seconds left while `engine` is starting; None when it is not starting."""
        if engine is None or engine.state != "starting":
            return None
        return self.eta(engine.id, engine.started_at)

    def wait_eta(self, model: str, engine: Starting | None) -> float | None:
        """What a request for `model` should expect to wait for it to become ready: the rest of
        a start under way, a whole start for a stopped engine, None for a ready one."""
        if engine is not None and engine.state == "ready":
            return None
        loading = self.loading_eta(engine)
        return loading if loading is not None else self.expected(model)


def _read(path: Path) -> dict[str, list[float]]:
    try:
        data = read_state_json(path)
    except (OSError, ValueError) as exc:
        log.warning("start times unreadable; starting afresh", path=str(path), error=str(exc))
        return {}
    if isinstance(data, dict):
        # Durations as swapd writes them: finite, not negative (an Infinity read back made
        # /v1/models emit invalid JSON).
        return {
            str(k): [
                float(x) for x in v
                if isinstance(x, int | float) and not isinstance(x, bool)
                and math.isfinite(x) and 0 <= x < MAX_SECONDS
            ][-KEEP:]
            for k, v in data.items()
            if isinstance(v, list)
        }
    return {}
