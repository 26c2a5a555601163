"""What swapd knows about memory right now, and the guard that acts on it.

`MemoryWatch` lives on the event loop and owns:
- the guard (swapd/memguard.py), reading MemAvailable 40 times a second while an engine starts;
- each running engine's memory (process-tree RSS + NVML GPU memory), from the sampler thread's
  ≈1 Hz passes (swapd/gpu.py) and from the guard's fresh reads;
- footprint learning (swapd/footprints.py): configured `memory:` first, else the learned figure.

The scheduler asks it (`footprint`, `used`, `meminfo`) when it places a model or waits for
memory after a stop; it tells it about engine lifecycle (`engine_state`). It never touches a
process: a kill goes through the scheduler's `guard_kill`, which asks the engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import structlog

from swapd.config.types import Config, ModelConfig
from swapd.engines.procgroup import Tree
from swapd.memory import gpu
from swapd.memory.footprints import FootprintStore, Learner
from swapd.memory.guard import GuardEvent, MemoryGuard, Watched
from swapd.memory.meminfo import MemInfo, MemReader
from swapd.memory.sleep import SleepVerdicts

log = structlog.get_logger("swapd.memwatch")

# How often the sampler's last pass is folded in (it samples at ≈1 Hz).
FEED_INTERVAL = 0.5


class MemoryWatch:
    """Per-engine memory, learned footprints and the guard, for one daemon."""

    def __init__(
        self,
        config: Callable[[], Config],
        state_dir: Path | None,
        *,
        sample: Callable[[], gpu.Sample] | None = None,
        reader: MemReader | None = None,
        usage: Callable[[Mapping[str, Tree]], Mapping[str, int]] | None = None,
    ) -> None:
        self._config = config
        self.store = FootprintStore(state_dir)
        # Recipes whose sleep is off on this host (docs/sleep.md), kept across restarts.
        self.sleep_verdicts = SleepVerdicts(state_dir)
        self.learner = Learner(self.store)
        self._sample = sample
        self._seen_sample = 0.0
        self._used: dict[str, int] = {}
        self._peaks: dict[str, int] = {}  # last known run peak per model (metrics)
        self._killed: set[str] = set()
        self._groups: Callable[[], Sequence[Watched]] = lambda: ()
        self._kill: Callable[[str, GuardEvent], bool] = lambda model, event: False
        self._reader = reader if reader is not None else MemReader()
        self._fresh_usage = usage if usage is not None else self._read_usage
        self.guard = MemoryGuard(
            floor=lambda: self._config().memory_guard.floor,
            enabled=lambda: self._config().memory_guard.enabled,
            watched=lambda: self._groups(),
            usage=self._usage_for_guard,
            kill=self._guard_kill,
            observe=self._observe,
        )
        self._feeder: asyncio.TimerHandle | None = None

    # -- wiring ----------------------------------------------------------------------

    def bind(self, watched: Callable[[], Sequence[Watched]],
             kill: Callable[[str, GuardEvent], bool]) -> None:
        """The scheduler's view of running engines and its kill (set once at startup)."""
        self._groups = watched
        self._kill = kill

    def start(self) -> None:
        self.guard.start()
        self._feed()

    def stop(self) -> None:
        self.guard.stop()
        if self._feeder is not None:
            self._feeder.cancel()
            self._feeder = None
        self._reader.close()

    # -- what the scheduler asks -----------------------------------------------------

    def meminfo(self) -> MemInfo:
        """MemTotal and MemAvailable now (raises OSError/ValueError when unreadable)."""
        return self._reader.read()

    def footprint(self, cfg: ModelConfig) -> int | None:
        """What the model needs: its configured `memory:`, else what was learned, else None."""
        configured = self._config().models.get(cfg.id)
        if configured is not None and configured.memory is not None:
            return configured.memory
        if cfg.memory is not None:
            return cfg.memory
        return self.store.get(cfg)

    def footprint_source(self, cfg: ModelConfig) -> str | None:
        configured = self._config().models.get(cfg.id)
        if (configured is not None and configured.memory is not None) or cfg.memory is not None:
            return "configured"
        return "learned" if self.store.get(cfg) is not None else None

    def available_bytes(self) -> int | None:
        """MemAvailable as the guard last read it (metrics; never a fresh read)."""
        last = self.guard.latest()
        return last.available if last is not None else None

    def used(self, model: str) -> int | None:
        """What the engine's process tree holds, as last measured (None: not yet)."""
        return self._used.get(model)

    def peak(self, model: str) -> int | None:
        return self._peaks.get(model)

    def peaks(self) -> dict[str, int]:
        return dict(self._peaks)

    def sleep_base(self, cfg: ModelConfig) -> int | None:
        """What a percentage `sleepMinFreed` is taken of: the footprint (configured or
        learned), else what this run of the engine was measured needing so far (on a GB10 the
        MemAvailable drop to readiness: CUDA memory is in no RSS)."""
        return self.footprint(cfg) or self.learner.measured(cfg.id)

    def tree_memory(self, model: str, tree: Tree) -> int | None:
        """One engine tree's memory read afresh (RSS + its last NVML figure): what a sleep
        is verified by (swapd.memory.sleep)."""
        return self._read_usage({model: tree}).get(model)

    # -- what the scheduler tells ----------------------------------------------------

    def engine_state(self, cfg: ModelConfig, state: str) -> None:
        """An engine changed state (the scheduler's observer hook)."""
        if state == "starting":
            self.spawning(cfg.id)
        elif state == "ready":
            self.ready(cfg.id)
        elif state in ("stopped", "failed") and self.learner.running(cfg.id):
            self.ended(cfg)

    def spawning(self, model: str) -> None:
        """An engine is about to be spawned: note MemAvailable, read fast from now on."""
        available = self._available()
        self.learner.spawned(model, available)
        self._used.pop(model, None)
        self._killed.discard(model)
        self.guard.poke()

    def ready(self, model: str) -> None:
        self.learner.became_ready(model, self._available())

    def ended(self, cfg: ModelConfig) -> None:
        """The engine is gone (stopped, crashed or killed): learn from its run."""
        killed = cfg.id in self._killed
        self._killed.discard(cfg.id)
        self._used.pop(cfg.id, None)
        configured = cfg.memory is not None or self._config().models.get(cfg.id, cfg).memory
        self.learner.ended(cfg, guard_killed=killed, learn=not configured)

    # -- internals -------------------------------------------------------------------

    def _available(self) -> int | None:
        try:
            return self._reader.read().available
        except (OSError, ValueError):
            return None

    def _observe(self, model: str, used: int) -> None:
        self._used[model] = used
        self.learner.observed(model, used)
        peak = self.learner.peak(model)
        if peak is not None:
            self._peaks[model] = peak

    def _guard_kill(self, model: str, event: GuardEvent) -> bool:
        if not self._kill(model, event):
            return False
        self._killed.add(model)
        return True

    def _usage_for_guard(self, groups: Mapping[str, Tree]) -> Mapping[str, int]:
        return self._fresh_usage(groups)

    def _read_usage(self, groups: Mapping[str, Tree]) -> Mapping[str, int]:
        """A fresh read of each engine's process-tree RSS, plus its last NVML GPU figure."""
        rss, _ = gpu.group_rss(groups)
        gpu_bytes = self._sample().group_gpu_bytes if self._sample is not None else {}
        return {m: value + gpu_bytes.get(m, 0) for m, value in rss.items()}

    def _feed(self) -> None:
        """Fold the sampler's last pass into the per-engine figures and the guard's window."""
        self._feeder = None
        if self._sample is not None:
            sample = self._sample()
            if sample.taken_at != self._seen_sample:
                self._seen_sample = sample.taken_at
                self.learner.unified = any(g.memory_source == "meminfo" for g in sample.gpus)
                running = {w.model for w in self._groups()}
                used = {
                    m: rss + sample.group_gpu_bytes.get(m, 0)
                    for m, rss in sample.group_rss_bytes.items()
                    if m in running and rss > 0
                }
                for model, value in used.items():
                    self._observe(model, value)
                self.guard.sampled(used)
        self._feeder = asyncio.get_running_loop().call_later(FEED_INTERVAL, self._feed)
