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
    # Warm swaps (docs/sleep.md): the engine's process is kept, its memory given back.
    FALLING_ASLEEP = "falling_asleep"  # the sleep calls were issued; memory not yet verified
    SLEEPING = "sleeping"  # asleep: no GPU tenant, takes no requests, holds only a residue
    WAKING = "waking"  # a wake was decided (like STARTING, it counts as running)


# A GPU tenant from the decision to start (or wake) until its memory is back (stopped, or
# verified asleep): at most one of them at a time under the one-tenant rule.
RUNNING = frozenset({Phase.STARTING, Phase.READY, Phase.DRAINING, Phase.STOPPING,
                     Phase.FALLING_ASLEEP, Phase.WAKING})
# An engine process exists (running, or asleep): what shutdown and unload must stop.
ALIVE = RUNNING | {Phase.SLEEPING}


class StopReason(StrEnum):
    IDLE = "idle"
    SWAP = "swap"
    UNLOAD = "unload"
    RELOAD = "reload"
    CRASH = "crash"
    SHUTDOWN = "shutdown"
    RELEASE = "release"  # a cluster worker whose hold ended (docs/two-sparks.md)




class SleepResult(StrEnum):
    """How a sleep ended (swapd_engine_sleeps_total{result})."""

    SLEPT = "slept"  # the calls answered 2xx and at least sleepMinFreed came back
    NO_MEMORY_FREED = "no_memory_freed"  # the engine said yes, the memory said no
    FAILED = "failed"  # a call failed, timed out, or the engine died meanwhile
