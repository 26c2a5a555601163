"""The matrix router's eviction cost from measured load times (llama-swap: `evict_costs` ×
the model's median load time): pure functions, no clock, no process."""

from __future__ import annotations

from swapd.config.types import Config, ModelConfig, RouterKind
from swapd.placement.matrix import load_weights, solve
from swapd.placement.registry import router_for
from swapd.schedule.core import Core, Start, Stop
from tests.support.matrix import identity

# Two sets hold the target; defined first is the one that stops the slow model.
SETS = (("keep-fast", "t & fast"), ("keep-slow", "t & slow"))


def test_weights_are_median_load_times_shrunk_toward_the_fleet_while_few() -> None:
    weights = load_weights({"slow": [60.0, 62.0, 58.0], "fast": [2.0, 2.2, 1.8],
                            "once": [30.0]})
    assert weights["slow"] == 60_000 and weights["fast"] == 2_000
    fleet = 30.0  # median of the three medians (60, 2, 30)
    assert weights["*"] == fleet * 1000
    assert weights["once"] == (30.0 + fleet) / 2 * 1000
    # One very slow load is not a model's cost yet: pulled halfway to the fleet's.
    assert load_weights({"a": [2.0, 2.0], "b": [2.0, 2.0], "odd": [200.0]})["odd"] == 101_000
    assert load_weights({}) == {}


def test_the_model_slower_to_reload_is_kept() -> None:
    program = identity(*SETS)
    running = ["fast", "slow"]
    # Without measurements every model costs its multiplier (1): ties go to the first set.
    assert solve(program, "t", running).evict == ("slow",)
    weights = load_weights({"slow": [60.0] * 3, "fast": [2.0] * 3})
    choice = solve(program, "t", running, weights)
    assert choice.evict == ("fast",) and choice.set_name == "keep-slow"
    assert choice.cost == 2_000
    # evict_costs multiplies the measured time: 40 × 2 s outweighs 60 s.
    heavy = identity(*SETS, costs={"fast": 40})
    assert solve(heavy, "t", running, weights).evict == ("slow",)


def test_a_model_never_started_costs_the_fleet_median() -> None:
    program = identity(*SETS)
    weights = load_weights({"fast": [2.0] * 3, "other": [50.0] * 3})  # slow: never measured
    assert solve(program, "t", ["fast", "slow"], weights).evict == ("fast",)


def test_the_core_with_the_matrix_router_stops_the_cheap_one() -> None:
    models = {m: ModelConfig(id=m, cmd=("engine", m)) for m in ("t", "fast", "slow")}
    program = identity(*SETS, ("both", "fast & slow"))
    config = Config(models=models, router=RouterKind.MATRIX, matrix=program)
    samples = {"slow": [60.0] * 3, "fast": [2.0] * 3}
    c = Core(config, router_for(config, load_times=lambda: samples))
    for i, model in enumerate(("fast", "slow")):
        _, fx = c.request(model, float(i))
        assert [e.model for e in fx if isinstance(e, Start)] == [model]
        c.start_finished(model, i + 0.5, ok=True)
        c.release(model, i + 0.5)
    _, fx = c.request("t", 10.0)
    assert [e.model for e in fx if isinstance(e, Stop)] == ["fast"]
