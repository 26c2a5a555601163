"""llama-swap's matrix router and fifo priority as the scheduler's pure decisions: events
fed to `swapd.core.Core` with the router and queue order `swapd.placement` picks from a
loaded config; no processes, no clock."""

from __future__ import annotations

import textwrap
from pathlib import Path

from swapd.config.loader import load_config
from swapd.config.types import Config
from swapd.placement.registry import queue_key_for, router_for
from swapd.schedule.core import Core, Effect, Fail, Grant, Refusal, Start, Stop


def loaded(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return load_config(path, environ={}).config


def core(config: Config) -> Core:
    return Core(config, router_for(config), queue_key_for(config))


def models(*names: str, **extra: str) -> str:
    lines = ["models:"]
    for name in names:
        lines.append(f"  {name}: {{cmd: 'srv --port ${{PORT}}'{extra.get(name, '')}}}")
    return "\n".join(lines) + "\n"


def grants(fx: list[Effect]) -> list[int]:
    return [e.ticket for e in fx if isinstance(e, Grant)]


def starts(fx: list[Effect]) -> list[str]:
    return [e.model for e in fx if isinstance(e, Start)]


def stops(fx: list[Effect]) -> list[str]:
    return sorted(e.model for e in fx if isinstance(e, Stop))


def ready(c: Core, model: str, now: float) -> None:
    t, fx = c.request(model, now)
    assert starts(fx) == [model], fx
    assert grants(c.start_finished(model, now + 0.5, ok=True)) == [t]
    c.release(model, now + 0.5)


MATRIX = """
routing:
  router:
    use: matrix
    settings:
      matrix:
        vars: {g: gemma, q: qwen, v: voxtral, e: rerank}
        evict_costs: {v: 50}
        sets:
          standard: "(g | q) & v"
          with_rerank: "(g | q) & v & e"
          creative: "(g | q) & sd"
          full: big
"""


def test_matrix_starts_beside_what_its_set_allows(tmp_path: Path) -> None:
    c = core(loaded(tmp_path, models("gemma", "qwen", "voxtral", "rerank", "sd", "big")
                    + MATRIX))
    ready(c, "gemma", 0.0)
    _, fx = c.request("voxtral", 1.0)
    assert starts(fx) == ["voxtral"] and stops(fx) == []  # together: standard
    c.start_finished("voxtral", 1.5, ok=True)
    c.release("voxtral", 1.6)
    _, fx = c.request("rerank", 2.0)
    assert starts(fx) == ["rerank"] and stops(fx) == []  # with_rerank
    c.start_finished("rerank", 2.5, ok=True)
    c.release("rerank", 2.6)
    assert set(c.running_gpu()) == {"gemma", "voxtral", "rerank"}


def test_matrix_evicts_the_cheapest_and_starts_only_the_target(tmp_path: Path) -> None:
    c = core(loaded(tmp_path, models("gemma", "qwen", "voxtral", "rerank", "sd", "big")
                    + MATRIX))
    ready(c, "gemma", 0.0)
    ready(c, "voxtral", 1.0)
    # qwen: standard and with_rerank both keep voxtral (cost 50) and evict gemma (1)
    _, fx = c.request("qwen", 2.0)
    assert stops(fx) == ["gemma"] and starts(fx) == []
    assert starts(c.stop_finished("gemma", 2.5)) == ["qwen"]  # rerank is not preloaded
    c.start_finished("qwen", 3.0, ok=True)
    c.release("qwen", 3.1)
    assert set(c.running_gpu()) == {"qwen", "voxtral"}
    # sd: only creative has it; voxtral (50) must go, qwen may stay
    _, fx = c.request("sd", 4.0)
    assert stops(fx) == ["voxtral"]
    assert starts(c.stop_finished("voxtral", 4.5)) == ["sd"]
    c.start_finished("sd", 5.0, ok=True)
    c.release("sd", 5.1)
    # big runs alone
    _, fx = c.request("big", 6.0)
    assert stops(fx) == ["qwen", "sd"]


def test_matrix_leaves_cpu_helpers_alone(tmp_path: Path) -> None:
    c = core(loaded(tmp_path, models("gemma", "qwen", "voxtral", "rerank", "sd", "big",
                                     "embed", embed=", gpu: false") + MATRIX))
    ready(c, "embed", 0.0)
    ready(c, "gemma", 1.0)
    _, fx = c.request("big", 2.0)
    assert stops(fx) == ["gemma"]  # not embed: no GPU tenant, in no set, left running


PRIORITY = """
routing:
  scheduler:
    use: fifo
    settings:
      fifo:
        priority: {high: 10, mid: 5, mid2: 5}
"""


def busy_tenant(c: Core) -> int:
    ready(c, "tenant", 0.0)
    t, fx = c.request("tenant", 1.0)
    assert grants(fx) == [t]
    return t


def test_higher_priority_is_served_first(tmp_path: Path) -> None:
    c = core(loaded(tmp_path, models("tenant", "low", "high") + PRIORITY))
    busy_tenant(c)
    t_low, _ = c.request("low", 2.0)  # first to wait: would pick the next swap in FIFO
    t_high, _ = c.request("high", 3.0)
    fx = c.release("tenant", 4.0)
    assert stops(fx) == ["tenant"]
    assert starts(c.stop_finished("tenant", 4.5)) == ["high"]
    assert grants(c.start_finished("high", 5.0, ok=True)) == [t_high]
    fx = c.release("high", 6.0)
    assert stops(fx) == ["high"]
    assert starts(c.stop_finished("high", 6.5)) == ["low"]
    assert grants(c.start_finished("low", 7.0, ok=True)) == [t_low]  # answered, not lost


def test_equal_priority_stays_fifo(tmp_path: Path) -> None:
    c = core(loaded(tmp_path, models("tenant", "mid", "mid2") + PRIORITY))
    busy_tenant(c)
    c.request("mid2", 2.0)
    c.request("mid", 3.0)
    c.release("tenant", 4.0)
    assert starts(c.stop_finished("tenant", 4.5)) == ["mid2"]


def test_without_priorities_the_first_to_wait_goes_first(tmp_path: Path) -> None:
    c = core(loaded(tmp_path, models("tenant", "low", "high")))
    busy_tenant(c)
    c.request("low", 2.0)
    c.request("high", 3.0)
    c.release("tenant", 4.0)
    assert starts(c.stop_finished("tenant", 4.5)) == ["low"]


def test_a_low_priority_request_gets_504_at_queue_timeout(tmp_path: Path) -> None:
    c = core(loaded(tmp_path, "queueTimeout: 30\n" + models("tenant", "low", "high")
                    + PRIORITY))
    busy_tenant(c)
    t_low, _ = c.request("low", 2.0)
    fx = c.tick(31.9)
    assert [e for e in fx if isinstance(e, Fail)] == []
    fx = c.tick(32.0)
    failed = [e for e in fx if isinstance(e, Fail)]
    assert [(f.ticket, f.refusal) for f in failed] == [(t_low, Refusal.QUEUE_TIMEOUT)]


def test_a_started_stop_is_not_taken_back(tmp_path: Path) -> None:
    """Priority reorders who is next, never undoes a stop already under way."""
    c = core(loaded(tmp_path, models("tenant", "low", "high") + PRIORITY))
    ready(c, "tenant", 0.0)
    t_low, fx = c.request("low", 2.0)  # tenant idle: stopped at once for low
    assert stops(fx) == ["tenant"]
    t_high, _ = c.request("high", 2.1)
    assert starts(c.stop_finished("tenant", 2.5)) == ["low"]
    c.start_finished("low", 3.0, ok=True)
    fx = c.release("low", 3.5)
    assert stops(fx) == ["low"]
    assert starts(c.stop_finished("low", 4.0)) == ["high"]
    assert grants(c.start_finished("high", 4.5, ok=True)) == [t_high]
    assert t_low != t_high
