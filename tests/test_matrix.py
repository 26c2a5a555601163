"""The matrix router's expression language and solver, as pure functions: every worked
example in the comments of llama-swap's config.example.yaml, and its solver rules."""

from __future__ import annotations

import pytest

from swapd.placement.matrix import (
    MatrixError,
    Program,
    can_run_together,
    compile_sets,
    evictions,
    expand,
    solve,
)
from tests.support.matrix import identity

# The example file's matrix: vars, evict_costs and the four sets, in its order.
VARS = {"g": "gemma-model", "q": "qwen-model", "m": "mistral-model", "v": "voxtral-model",
        "e": "reranker-model"}
MODELS = {*VARS.values(), "stable-diffusion", "llama-70B", "other-model"}
SETS = [
    ("standard", "(g | qwen-model | m) & v"),
    ("with_rerank", "(g | q) & v & e"),
    ("creative", "(g | q) & stable-diffusion"),
    ("full", "llama-70B"),
]
COSTS = {"voxtral-model": 50, "llama-70B": 30}


def resolver(models: set[str], variables: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    variables = variables or {}
    return lambda ident: variables.get(ident) or (ident if ident in models else None)


def example() -> Program:
    return compile_sets(SETS, resolver(MODELS, VARS), COSTS)




# -- the expression language: each line of the file's "expands into" table ------------


@pytest.mark.parametrize(("expression", "concrete"), [
    ("model-a", [("model-a",)]),
    ("a & b", [("a", "b")]),
    ("a | b", [("a",), ("b",)]),
    ("(a | b) & c", [("a", "c"), ("b", "c")]),
    ("(a | b) & (c | d)", [("a", "c"), ("a", "d"), ("b", "c"), ("b", "d")]),
    ("a | b & c", [("a",), ("b", "c")]),  # & binds tighter than |
    ("a & a", [("a",)]),
    ("  a&b  ", [("a", "b")]),
    ("model.v2 & org_x-y", [("model.v2", "org_x-y")]),
])
def test_expansion_table(expression: str, concrete: list[tuple[str, ...]]) -> None:
    assert expand(identity(("s", expression)), "s") == concrete


def test_ref_inlines_another_set() -> None:
    # "+llms & v" → inline the llms set, then AND with v
    program = identity(("llms", "g | q | m"), ("with_tts", "+llms & v"), ("mega", "+with_tts & e"))
    assert expand(program, "with_tts") == [("g", "v"), ("q", "v"), ("m", "v")]
    assert expand(program, "mega") == [("g", "v", "e"), ("q", "v", "e"), ("m", "v", "e")]


def test_a_ref_may_come_before_the_set_it_names() -> None:
    program = identity(("all", "+pair | c"), ("pair", "a & b"))
    assert expand(program, "all") == [("a", "b"), ("c",)]


def test_the_example_files_sets_expand_as_its_comments_say() -> None:
    program = example()
    g, q, m, v, e = (VARS[k] for k in "gqmve")
    # standard: expands to [g,v], [qwen-model,v], [m,v] (vars and real ids mixed)
    assert expand(program, "standard") == [(g, v), (q, v), (m, v)]
    # with_rerank: expands to [g,v,e], [q,v,e]
    assert expand(program, "with_rerank") == [(g, v, e), (q, v, e)]
    # creative: expands to [g,stable-diffusion], [q,stable-diffusion]
    assert expand(program, "creative") == [(g, "stable-diffusion"), (q, "stable-diffusion")]
    # full: the 70B model can only run alone
    assert expand(program, "full") == [("llama-70B",)]
    assert program.cost(v) == 50 and program.cost("llama-70B") == 30
    assert program.cost(g) == 1  # evict_costs default 1


def test_a_var_wins_over_a_model_id_of_the_same_name() -> None:
    program = compile_sets([("s", "x & y")], resolver({"x", "y", "real"}, {"x": "real"}))
    assert expand(program, "s") == [("real", "y")]


@pytest.mark.parametrize(("sets", "message"), [
    ([("s", "")], "empty expression"),
    ([("s", "a &")], "unexpected end"),
    ([("s", "(a | b")], "missing closing parenthesis"),
    ([("s", "a b")], "unexpected 'b'"),
    ([("s", "a @ b")], "unexpected character '@'"),
    ([("s", "+")], "expected a set name after '+'"),
    ([("s", "a & +nope")], "+nope names no set"),
    ([("s", "a & ghost")], "unknown var or model 'ghost'"),
    ([("x", "+y"), ("y", "+x")], "cycle"),
    ([], "at least one set"),
])
def test_bad_expressions_are_refused_naming_the_set(sets: list[tuple[str, str]],
                                                     message: str) -> None:
    with pytest.raises(MatrixError) as info:
        compile_sets(sets, resolver({"a", "b"}))
    assert message in str(info.value)
    if sets:
        assert repr(sets[0][0]) in str(info.value) or "cycle" in str(info.value)


# -- the solver: the file's six steps ------------------------------------------------


G, Q, M, V, E = (VARS[k] for k in "gqmve")


@pytest.mark.parametrize(("target", "running", "evict", "set_name"), [
    # 2. already running: nothing to do
    (G, [G, V], (), "standard"),
    # subset semantics: [g, v] allows g alone; only g is started, v is not preloaded
    (G, [], (), "standard"),
    (G, [V], (), "standard"),
    # 3-6. the reranker joins g and v without evicting anything
    (E, [G, V], (), "with_rerank"),
    # qwen with g and v running: standard and with_rerank both evict g (cost 1);
    # the tie goes to the set defined first
    (Q, [G, V], (G,), "standard"),
    # qwen with g and stable-diffusion: creative evicts only g (1) instead of both (2)
    (Q, [G, "stable-diffusion"], (G,), "creative"),
    # stable-diffusion with g and v: the only set with it evicts the costly v (50)
    ("stable-diffusion", [G, V], (V,), "creative"),
    # the 70B model runs alone: everything else goes
    ("llama-70B", [G, V, E], (G, V, E), "full"),
    # anything with llama-70B running evicts it (it is in no set with others)
    (G, ["llama-70B"], ("llama-70B",), "standard"),
])
def test_solver_on_the_example(target: str, running: list[str], evict: tuple[str, ...],
                               set_name: str) -> None:
    decision = solve(example(), target, running)
    assert decision.evict == evict
    assert decision.set_name == set_name
    assert target in decision.allowed


def test_a_model_in_no_set_runs_alone() -> None:
    decision = solve(example(), "other-model", [G, V])
    assert decision.evict == (G, V) and decision.set_name is None
    assert decision.allowed == ("other-model",) and decision.cost == 51


def test_costs_keep_the_costliest_models_loaded() -> None:
    # llama-swap's TestMatrixSolver_EvictCostsPreferred: b costs 10, c costs 1
    program = identity(("a_with_c", "a & c"), ("a_with_b", "a & b"), costs={"b": 10, "c": 1})
    decision = solve(program, "a", ["b", "c"])
    assert decision.set_name == "a_with_b" and decision.evict == ("c",) and decision.cost == 1


def test_ties_go_to_definition_order() -> None:
    program = identity(("first", "a & b"), ("second", "a & c"))
    assert solve(program, "a", []).set_name == "first"
    program = identity(("second", "a & c"), ("first", "a & b"))
    assert solve(program, "a", []).set_name == "second"


def test_overlapping_references() -> None:
    program = identity(("base", "a & b"), ("extended", "target & +base & b"))
    decision = solve(program, "target", ["a", "b"])
    assert decision.evict == () and decision.allowed == ("a", "b", "target")


def test_the_cheapest_alternative_inside_one_set() -> None:
    program = identity(("s", "t & (a | b)"), costs={"a": 5})
    assert solve(program, "t", ["a", "b"]).evict == ("b",)  # keep a (5), drop b (1)


def test_wide_expressions_solve_without_expanding_them() -> None:
    # 12 groups of 10 alternatives: 10**12 concrete sets, never materialised
    groups = [" | ".join(f"m{g}_{i}" for i in range(10)) for g in range(12)]
    program = identity(("wide", " & ".join(f"({g})" for g in groups)))
    running = [f"m{g}_3" for g in range(1, 12)] + ["m0_5"]
    decision = solve(program, "m0_1", running)
    assert decision.evict == ("m0_5",) and decision.set_name == "wide"


def test_can_run_together() -> None:
    program = example()
    assert can_run_together(program, [G, V, E])
    assert can_run_together(program, [Q, "stable-diffusion"])
    assert not can_run_together(program, [M, E])
    assert not can_run_together(program, ["llama-70B", G])
    assert can_run_together(program, [])


def test_evictions_leave_cpu_helpers_alone() -> None:
    program = example()
    gpu = {"stable-diffusion": True, G: True, V: True, "helper": False}
    assert evictions(program, "stable-diffusion", [G, V, "helper"], gpu) == (V,)
    assert evictions(program, "helper", [G, V], gpu) == ()
    assert evictions(program, "llama-70B", [G, "helper"], gpu) == (G,)
