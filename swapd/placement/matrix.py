"""llama-swap's matrix router: the `sets` expression language and its solver.

A set's expression names models that may run together: `a & b` (together), `a | b`
(alternatives), `( … )` (grouping), `+name` (another set's expression inlined). An
expression stands for one or more concrete sets ("(a | b) & c" is [a, c] and [b, c]),
and a concrete set allows any subset of itself: it says which models may coexist, it
never starts the others.

Pure functions only: `compile_sets` parses and links the definitions once (at config
load), `solve` picks what a start must evict. The solver does not expand the
Cartesian product of an expression: each expression is projected onto the models that
matter to one decision (the target and the running ones), and a candidate whose
projection is a subset of another's is dropped (costs are positive, so keeping more
running models can never cost more). That is llama-swap's algorithm (its
internal/matrix), so ten groups of ten alternatives stay cheap to solve.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum


class MatrixError(ValueError):
    """A set expression that cannot be used; `str()` says what and where."""


class _Kind(StrEnum):
    LEAF = "leaf"
    REF = "ref"
    AND = "and"
    OR = "or"


@dataclass(eq=False)
class _Node:
    kind: _Kind
    name: str = ""  # a model id (LEAF, after resolution) or a set name (REF)
    children: list[_Node] = field(default_factory=list)
    ref: _Node | None = None


_IDENT = re.compile(r"[\w.\-]+")
# The characters of an identifier, as llama-swap's tokenizer takes them (letters,
# digits, '_', '-', '.'); anything else outside the operators is an error.


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch in "&|()":
            out.append((ch, ch))
            i += 1
        elif ch == "+":
            m = _IDENT.match(text, i + 1)
            if not m:
                raise MatrixError(f"expected a set name after '+' at position {i + 1}")
            out.append(("+", m[0]))
            i = m.end()
        else:
            m = _IDENT.match(text, i)
            if not m:
                raise MatrixError(f"unexpected character {ch!r} at position {i}")
            out.append(("id", m[0]))
            i = m.end()
    out.append(("eof", ""))
    return out


def parse(text: str) -> _Node:
    """One expression → its syntax tree. `|` binds looser than `&`."""
    if not text.strip():
        raise MatrixError("empty expression")
    tokens = _tokens(text)
    pos = 0

    def peek() -> tuple[str, str]:
        return tokens[pos]

    def take() -> tuple[str, str]:
        nonlocal pos
        tok = tokens[pos]
        if tok[0] != "eof":
            pos += 1
        return tok

    def either() -> _Node:
        first = both()
        if peek()[0] != "|":
            return first
        node = _Node(_Kind.OR, children=[first])
        while peek()[0] == "|":
            take()
            node.children.append(both())
        return node

    def both() -> _Node:
        first = atom()
        if peek()[0] != "&":
            return first
        node = _Node(_Kind.AND, children=[first])
        while peek()[0] == "&":
            take()
            node.children.append(atom())
        return node

    def atom() -> _Node:
        kind, value = take()
        if kind == "id":
            return _Node(_Kind.LEAF, name=value)
        if kind == "+":
            return _Node(_Kind.REF, name=value)
        if kind == "(":
            inner = either()
            if take()[0] != ")":
                raise MatrixError("missing closing parenthesis")
            return inner
        raise MatrixError(f"unexpected {value!r}" if value else "unexpected end of expression")

    root = either()
    if peek()[0] != "eof":
        raise MatrixError(f"unexpected {peek()[1]!r} after the expression")
    return root


def _walk(node: _Node) -> Iterable[_Node]:
    yield node
    for child in node.children:
        yield from _walk(child)


@dataclass(frozen=True)
class MatrixSet:
    name: str
    expression: str
    root: _Node = field(compare=False, repr=False)
    # Every model the expression can name: a set that lacks the target is skipped.
    support: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Program:
    """Compiled sets in definition order (ties go to the earlier one)."""

    sets: tuple[MatrixSet, ...]
    evict_costs: tuple[tuple[str, int], ...] = ()

    @property
    def models(self) -> frozenset[str]:
        out: set[str] = set()
        for s in self.sets:
            out |= s.support
        return frozenset(out)

    def cost(self, model: str) -> int:
        return dict(self.evict_costs).get(model, 1)


Resolver = Callable[[str], str | None]


def compile_sets(
    definitions: Sequence[tuple[str, str]],
    resolve: Resolver,
    evict_costs: Mapping[str, int] | None = None,
) -> Program:
    """Parse, resolve identifiers (vars first, then model ids) and link `+ref`s.

    Raises MatrixError naming the set; a cycle of references is an error.
    """
    if not definitions:
        raise MatrixError("at least one set is required")
    names = [name for name, _ in definitions]
    roots: dict[str, _Node] = {}
    deps: dict[str, list[str]] = {}
    for name, text in definitions:
        try:
            root = parse(text)
        except MatrixError as exc:
            raise MatrixError(f"set {name!r}: {exc}") from None
        refs: list[str] = []
        for node in _walk(root):
            if node.kind == _Kind.LEAF:
                model = resolve(node.name)
                if model is None:
                    raise MatrixError(f"set {name!r}: unknown var or model {node.name!r}")
                node.name = model
            elif node.kind == _Kind.REF:
                if node.name not in names:
                    raise MatrixError(f"set {name!r}: +{node.name} names no set")
                if node.name not in refs:
                    refs.append(node.name)
        roots[name] = root
        deps[name] = refs
    state: dict[str, int] = {}

    def visit(name: str) -> None:
        if state.get(name) == 1:
            raise MatrixError(f"set {name!r}: its references form a cycle")
        if state.get(name) == 2:
            return
        state[name] = 1
        for dep in deps[name]:
            visit(dep)
        state[name] = 2

    for name in names:
        visit(name)
    for root in roots.values():
        for node in _walk(root):
            if node.kind == _Kind.REF:
                node.ref = roots[node.name]
    sets = tuple(
        MatrixSet(name, text, roots[name], frozenset(_support(roots[name])))
        for name, text in definitions
    )
    return Program(sets=sets, evict_costs=tuple(sorted((evict_costs or {}).items())))


def _support(node: _Node) -> set[str]:
    if node.kind == _Kind.LEAF:
        return {node.name}
    if node.kind == _Kind.REF:
        assert node.ref is not None
        return _support(node.ref)
    out: set[str] = set()
    for child in node.children:
        out |= _support(child)
    return out


# -- solving ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _State:
    """One alternative of an expression, projected onto the relevant models; `full` is
    the whole concrete set it came from (for the decision's log line)."""

    mask: frozenset[str]
    full: tuple[str, ...]


def _add(states: list[_State], candidate: _State) -> list[_State]:
    """Keep only maximal projections; among equal ones the first (traversal order)."""
    if any(candidate.mask <= s.mask for s in states):
        return states
    return [s for s in states if not s.mask <= candidate.mask] + [candidate]


def _evaluate(node: _Node, relevant: frozenset[str],
              memo: dict[int, list[_State]]) -> list[_State]:
    key = id(node)
    if key in memo:
        return memo[key]
    if node.kind == _Kind.LEAF:
        mask = frozenset({node.name}) & relevant
        states = [_State(mask, (node.name,))]
    elif node.kind == _Kind.REF:
        assert node.ref is not None
        states = _evaluate(node.ref, relevant, memo)
    elif node.kind == _Kind.OR:
        states = []
        for child in node.children:
            for state in _evaluate(child, relevant, memo):
                states = _add(states, state)
    else:
        states = [_State(frozenset(), ())]
        for child in node.children:
            combined: list[_State] = []
            for left in states:
                for right in _evaluate(child, relevant, memo):
                    full = tuple(dict.fromkeys(left.full + right.full))
                    combined = _add(combined, _State(left.mask | right.mask, full))
            states = combined
    memo[key] = states
    return states


@dataclass(frozen=True)
class MatrixChoice:
    """What starting `target` takes: the running models to stop first, and why."""

    evict: tuple[str, ...]
    set_name: str | None  # None: the target is in no set and runs alone
    allowed: tuple[str, ...]  # the concrete set chosen (sorted), for the log
    cost: float = 0


# Starts a model needs before its own median load time counts in full: below, its median
# is pulled toward the fleet's (one slow load while others loaded must not define it).
PRIOR_STARTS = 2


def load_weights(samples: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """Each measured model's reload cost in milliseconds (llama-swap: an eviction costs
    `evict_costs` × the model's median measured load time): its median over its last
    starts, shrunk toward the fleet median while it has fewer than PRIOR_STARTS of them.
    `"*"` is the fleet median, what a model never started costs. Empty: nothing measured
    (every model then weighs 1, and `evict_costs` alone decides)."""
    medians = {m: statistics.median(t) for m, t in samples.items() if t}
    if not medians:
        return {}
    fleet = statistics.median(medians.values())
    out = {"*": fleet * 1000}
    for model, own in medians.items():
        n = len(samples[model])
        if n < PRIOR_STARTS:
            own = (n * own + (PRIOR_STARTS - n) * fleet) / PRIOR_STARTS
        out[model] = own * 1000
    return out


def solve(program: Program, target: str, running: Iterable[str],
          weights: Mapping[str, float] | None = None) -> MatrixChoice:
    """The set containing `target` whose running-but-outside models cost least to
    evict; ties go to the set defined first. A target in no set runs alone. A model's
    cost is its `evict_costs` multiplier times its weight (`load_weights`; 1 without).

    Only `target` is ever started: the other members of the chosen set are allowed,
    not loaded.
    """
    def cost_of(model: str) -> float:
        weight = weights.get(model, weights.get("*", 1.0)) if weights else 1.0
        return program.cost(model) * weight

    running = [m for m in dict.fromkeys(running) if m != target]
    relevant = frozenset([target, *running])
    memo: dict[int, list[_State]] = {}
    best: tuple[float, MatrixSet, _State] | None = None
    for matrix_set in program.sets:
        if target not in matrix_set.support:
            continue
        for state in _evaluate(matrix_set.root, relevant, memo):
            if target not in state.mask:
                continue
            cost = sum(cost_of(m) for m in running if m not in state.mask)
            if best is None or cost < best[0]:
                best = (cost, matrix_set, state)
    if best is None:
        cost = sum(cost_of(m) for m in running)
        return MatrixChoice(evict=tuple(running), set_name=None, allowed=(target,), cost=cost)
    cost, chosen, state = best
    return MatrixChoice(
        evict=tuple(m for m in running if m not in state.mask),
        set_name=chosen.name,
        allowed=tuple(sorted(state.full)),
        cost=cost,
    )


def can_run_together(program: Program, models: Iterable[str]) -> bool:
    """Does one concrete set contain every one of `models`?"""
    wanted = frozenset(models)
    if not wanted:
        return True
    memo: dict[int, list[_State]] = {}
    for matrix_set in program.sets:
        if not wanted <= matrix_set.support:
            continue
        if any(wanted <= s.mask for s in _evaluate(matrix_set.root, wanted, memo)):
            return True
    return False


def expand(program: Program, name: str) -> list[tuple[str, ...]]:
    """Every concrete set an expression stands for, in order (for `swapd check` and
    tests; the solver never needs this)."""
    matrix_set = next((s for s in program.sets if s.name == name), None)
    if matrix_set is None:
        raise KeyError(name)

    def walk(node: _Node) -> list[tuple[str, ...]]:
        if node.kind == _Kind.LEAF:
            return [(node.name,)]
        if node.kind == _Kind.REF:
            assert node.ref is not None
            return walk(node.ref)
        if node.kind == _Kind.OR:
            out: list[tuple[str, ...]] = []
            for child in node.children:
                out += [s for s in walk(child) if s not in out]
            return out
        combos: list[tuple[str, ...]] = [()]
        for child in node.children:
            combos = [tuple(dict.fromkeys(a + b)) for a in combos for b in walk(child)]
        return list(dict.fromkeys(combos))

    return walk(matrix_set.root)


def evictions(program: Program, target: str, running: Iterable[str],
              gpu: Mapping[str, bool],
              weights: Mapping[str, float] | None = None) -> tuple[str, ...]:
    """The matrix router's answer for the scheduler: the running models `target`'s start
    stops. Models with `gpu: false` are no GPU tenant here either: they neither evict
    nor get evicted (as under groups)."""
    if not gpu.get(target, True):
        return ()
    return solve(program, target, [m for m in running if gpu.get(m, True)], weights).evict
