"""A model's phase as the scheduler's core decides it, and why an engine stops."""

from __future__ import annotations

from enum import StrEnum


class Phase(StrEnum):
    STOPPED = "stopped"  # no engine (maybe in backoff: see retry_at)
    STARTING = "starting"  # a start was decided; counts as running from that instant
    READY = "ready"  # serving
    DRAINING = "draining"  # a stop was decided: finishes what it holds, takes nothing new
    STOPPING = "stopping"  # the stop effect was issued
    FAILED = "failed"  # gave up after restart.maxRetries failures, until the cool-down ends


RUNNING = frozenset({Phase.STARTING, Phase.READY, Phase.DRAINING, Phase.STOPPING})


class StopReason(StrEnum):
    IDLE = "idle"
    SWAP = "swap"
    UNLOAD = "unload"
    RELOAD = "reload"
    CRASH = "crash"
    SHUTDOWN = "shutdown"


