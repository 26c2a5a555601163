"""The pure scheduler core driven by hand: models, a core, and readers of its effects (for the
decision tests and every test that drives a Core without processes or clocks), and a memory
router's core with measured figures the test sets."""

from __future__ import annotations

from typing import Any

from swapd.config.sizes import GiB
from swapd.config.types import Config, ModelConfig, RestartPolicy, RouterKind
from swapd.memory.meminfo import MemInfo
from swapd.placement.registry import router_for
from swapd.schedule.core import ArmTimer, Core, Effect, Fail, Grant, Start, Stop
from swapd.schedule.phase import StopReason

RESTART = RestartPolicy(max_retries=3, backoff_initial=1.0, backoff_max=60.0)


def cfg(name: str, **kw: Any) -> ModelConfig:
    kw.setdefault("restart", RESTART)
    return ModelConfig(id=name, cmd=("engine", name), **kw)


def core(*models: ModelConfig, **kw: Any) -> Core:
    return Core(Config(models={m.id: m for m in models}, **kw))


def kinds(fx: list[Effect]) -> list[Effect]:
    """The effects that matter to a reader (timers left out)."""
    return [e for e in fx if not isinstance(e, ArmTimer)]


def grants(fx: list[Effect]) -> list[int]:
    return [e.ticket for e in fx if isinstance(e, Grant)]


def fails(fx: list[Effect]) -> list[Fail]:
    return [e for e in fx if isinstance(e, Fail)]


def starts(fx: list[Effect]) -> list[str]:
    return [e.model for e in fx if isinstance(e, Start)]


def stops(fx: list[Effect]) -> list[tuple[str, StopReason]]:
    return [(e.model, e.reason) for e in fx if isinstance(e, Stop)]


def timer(fx: list[Effect]) -> float | None:
    armed = [e.at for e in fx if isinstance(e, ArmTimer)]
    assert armed, f"no timer in {fx}"
    return armed[-1]


def ready(c: Core, model: str, now: float) -> list[Effect]:
    """Start `model` from cold and serve nothing: returns the effects of its start."""
    t, fx = c.request(model, now)
    assert starts(fx) == [model]
    fx = c.start_finished(model, now + 1, ok=True)
    assert grants(fx) == [t]
    c.release(model, now + 1)
    return fx


# -- the memory router inside the scheduler's core (events in, effects out) ---------------


class Measured:
    """A MemorySource with figures the test sets: MemAvailable and per-engine use."""

    def __init__(self, available_gib: float, total_gib: float = 119) -> None:
        self.available = int(available_gib * GiB)
        self.total = int(total_gib * GiB)
        self.use: dict[str, int] = {}
        self.fail = False

    def meminfo(self) -> MemInfo:
        if self.fail:
            raise OSError("no /proc/meminfo")
        return MemInfo(total=self.total, available=self.available)

    def footprint(self, cfg: ModelConfig) -> int | None:
        return cfg.memory

    def used(self, model: str) -> int | None:
        return self.use.get(model)


def mem_core(source: Measured, *models: ModelConfig,
             evicted: list[tuple[str, str]] | None = None, **kw: Any) -> Core:
    config = Config(models={m.id: m for m in models}, router=RouterKind.MEMORY,
                    memory_reserve=8 * GiB, **kw)
    sink = evicted if evicted is not None else []
    return Core(config, router_for(config, source, lambda m, r: sink.append((m, r))))


def gib_model(name: str, gib: float | None) -> ModelConfig:
    return ModelConfig(id=name, cmd=("engine", name),
                       memory=None if gib is None else int(gib * GiB))


def bring_up(c: Core, source: Measured, model: str, now: float, used_gib: float) -> None:
    t, fx = c.request(model, now)
    assert [e.model for e in fx if isinstance(e, Start)] == [model], fx
    source.use[model] = int(used_gib * GiB)
    source.available -= int(used_gib * GiB)
    fx = c.start_finished(model, now + 1, ok=True)
    assert [e.ticket for e in fx if isinstance(e, Grant)] == [t]
    c.release(model, now + 1)
