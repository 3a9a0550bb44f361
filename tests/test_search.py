"""The mixed-precision search layer (fxq.search): exact DP, GA, repair, Pareto front.

Reference answers come from a brute force written here against the raw ``Group``/``Option``
records and the transition function — not the solvers' arrays — so a bug in the shared tables
would show.
"""
from __future__ import annotations

import itertools
import json
import math
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fxq.errors import FxqError
from fxq.search import (GAConfig, Group, InfeasibleBudget, Option, Problem, build_group,
                        change_cost, pareto_front, random_problem, repair, solve,
                        solve_brute_force, solve_exact, solve_ga)


# -- reference ----------------------------------------------------------------------------------

def naive_cost(problem: Problem, choice) -> tuple[float, float]:
    opts = [g.options[c] for g, c in zip(problem.groups, choice)]
    edges = [(a.precisions[-1], b.precisions[0]) for a, b in zip(opts, opts[1:])]
    if problem.input_precision is not None:
        edges.append((problem.input_precision, opts[0].precisions[0]))
    if problem.output_precision is not None:
        edges.append((opts[-1].precisions[-1], problem.output_precision))
    step = problem.transition or (lambda a, b: 0.0)
    latency = problem.fixed_ms + sum(o.latency_ms for o in opts)
    latency += sum(step(a, b) for a, b in edges if a != b)
    return latency, sum(o.sensitivity for o in opts)


def all_assignments(problem: Problem):
    for choice in itertools.product(*(range(len(g.options)) for g in problem.groups)):
        yield choice, *naive_cost(problem, choice)


def naive_best(problem: Problem, budget: float) -> tuple[float, float]:
    """(least sensitivity, its latency) within the budget."""
    fits = [(s, lat) for _, lat, s in all_assignments(problem) if lat <= budget + 1e-9]
    return min(fits)


def raw_instance(rng: np.random.Generator, n_groups: int, max_layers: int = 2,
                 labels=("a", "b", "c"), transition_scale: float = 1.0,
                 integer: bool = False) -> Problem:
    """Arbitrary costs (no monotone structure), a random transition matrix, random subsets of
    options, optional input/output precision; ``integer`` makes latencies and sensitivities
    whole numbers so ties are everywhere."""
    value = (lambda hi: float(rng.integers(0, int(hi) + 1))) if integer else \
        (lambda hi: float(rng.uniform(0, hi)))
    table = {(a, b): value(transition_scale * 3) for a in labels for b in labels if a != b}
    groups = []
    for i in range(n_groups):
        k = int(rng.integers(1, max_layers + 1))
        combos = list(itertools.product(labels, repeat=k))
        picked = rng.choice(len(combos), size=int(rng.integers(1, min(len(combos), 4) + 1)),
                            replace=False)
        options = [Option(combos[j], value(10), value(5)) for j in picked]
        groups.append(Group(f"g{i}", [f"g{i}.l{j}" for j in range(k)], options))
    ends = [None, *labels]
    return Problem(groups, transition=lambda a, b: table[(a, b)], fixed_ms=value(1),
                   input_precision=ends[int(rng.integers(0, len(ends)))],
                   output_precision=ends[int(rng.integers(0, len(ends)))])


def small_instance(seed: int) -> tuple[Problem, float]:
    """4-8 groups, small enough to enumerate; half structured (random_problem), half raw."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(4, 9))
    while True:
        if seed % 2:
            problem = raw_instance(rng, n)
        else:
            precisions = [(4, 8), (2, 4, 8), ("int8", "fp16")][seed % 3]
            change = float(rng.uniform(0, 0.1)) if seed % 4 else None
            problem = random_problem(rng, rng.integers(1, 3, size=n).tolist(), precisions,
                                     change_ms=change)
        if problem.size <= 4096:
            break
        n -= 1
    low, high = problem.fastest()[1], problem.slowest()[1]
    return problem, low + float(rng.uniform(0.05, 0.95)) * (high - low)


# -- solvers against brute force ----------------------------------------------------------------

@pytest.mark.parametrize("seed", range(30))
def test_exact_and_ga_find_the_brute_force_optimum(seed):
    problem, budget = small_instance(seed)
    best_sens, _ = naive_best(problem, budget)
    exact = solve_exact(problem, budget)
    ga = solve_ga(problem, budget, seed=seed)
    for sol in (exact, ga, solve_brute_force(problem, budget)):
        latency, sensitivity = naive_cost(problem, sol.choice)
        assert latency <= budget + 1e-9, sol.solver
        assert sol.latency_ms == pytest.approx(latency, rel=1e-12)
        assert sensitivity == pytest.approx(best_sens, rel=1e-9), sol.solver


@pytest.mark.parametrize("crossover", ["uniform", "one-point"])
def test_ga_operators_both_reach_the_optimum(crossover):
    for seed in range(30, 36):
        problem, budget = small_instance(seed)
        ga = solve_ga(problem, budget, seed=seed, crossover=crossover)
        assert ga.sensitivity == pytest.approx(solve_exact(problem, budget).sensitivity, rel=1e-9)


@pytest.mark.parametrize("seed", [3, 8, 13])
def test_pareto_front_is_the_brute_force_front(seed):
    problem, _ = small_instance(seed)
    points = sorted((lat, s) for _, lat, s in all_assignments(problem))
    front, best = [], math.inf
    for lat, s in points:       # by latency, then sensitivity: keep strict improvements
        if s < best:
            front.append((lat, s))
            best = s
    got = pareto_front(problem)
    assert [p.latency_ms for p in got] == pytest.approx([f[0] for f in front], rel=1e-9)
    assert [p.sensitivity for p in got] == pytest.approx([f[1] for f in front], rel=1e-9)
    for p in got:
        assert naive_cost(problem, p.choice) == pytest.approx((p.latency_ms, p.sensitivity))
    # each point is the exact optimum at its own latency
    mid = got[len(got) // 2]
    assert solve_exact(problem, mid.latency_ms).sensitivity == pytest.approx(mid.sensitivity)


def test_pareto_front_with_ties_keeps_one_point_per_sensitivity():
    problem = raw_instance(np.random.default_rng(1), 6, integer=True)   # 768 assignments
    best = {}
    for _, lat, s in all_assignments(problem):
        best[s] = min(best.get(s, math.inf), lat)
    front, fastest_so_far = [], math.inf
    for s in sorted(best):          # least sensitive first: a point survives if it is faster
        if best[s] < fastest_so_far:
            front.append((best[s], s))
            fastest_so_far = best[s]
    got = [(p.latency_ms, p.sensitivity) for p in pareto_front(problem)]
    assert got == sorted(front)      # whole numbers: exact
    assert len(got) < len(best)     # ties did occur, so the test covers them


@pytest.mark.parametrize("seed, fraction", [(0, 0.5), (1, 0.5), (2, 0.7), (7, 0.5)])
def test_ga_matches_exact_on_lite0_sized_instances(seed, fraction):
    # 19 groups of 2-3 layers, int4/int8: too many assignments to enumerate
    rng = np.random.default_rng(100 + seed)
    problem = random_problem(rng, rng.integers(2, 4, size=19).tolist(), (4, 8))
    low, high = problem.fastest()[1], problem.slowest()[1]
    budget = low + fraction * (high - low)
    optimum = solve_exact(problem, budget).sensitivity
    assert solve_ga(problem, budget, seed=seed).sensitivity == pytest.approx(optimum, rel=1e-9)
    # the seeded population plus repair alone does not get there: the evolution is needed
    assert solve_ga(problem, budget, seed=seed, generations=0).sensitivity > optimum * 1.001


def test_exact_on_a_large_instance_is_never_beaten_by_the_ga():
    problem = random_problem(np.random.default_rng(7), [4] * 30, (4, 8))   # 16 options each
    low, high = problem.fastest()[1], problem.slowest()[1]
    budget = low + 0.4 * (high - low)
    exact, ga = solve_exact(problem, budget), solve_ga(problem, budget, seed=0)
    assert exact.latency_ms <= budget and ga.latency_ms <= budget
    assert exact.sensitivity <= ga.sensitivity * (1 + 1e-12)
    assert ga.sensitivity <= exact.sensitivity * 1.01      # the 1 % target


# -- repair -------------------------------------------------------------------------------------

@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n_groups=st.integers(1, 7),
       transition_scale=st.sampled_from([0.0, 0.3, 1.0, 5.0]), integer=st.booleans(),
       fraction=st.floats(0.0, 1.0), data=st.data())
def test_repair_always_yields_a_feasible_assignment(seed, n_groups, transition_scale, integer,
                                                    fraction, data):
    problem = raw_instance(np.random.default_rng(seed), n_groups,
                           transition_scale=transition_scale, integer=integer)
    low, high = problem.fastest()[1], problem.slowest()[1]
    budget = low + fraction * (high - low)     # fraction 0: exactly the fastest latency
    choice = tuple(data.draw(st.integers(0, len(g.options) - 1)) for g in problem.groups)
    fixed = repair(problem, choice, budget)
    assert naive_cost(problem, fixed)[0] <= budget + 1e-9 * max(1.0, budget)
    if naive_cost(problem, choice)[0] <= budget:
        assert fixed == choice                 # a feasible individual is left alone


def test_repair_takes_the_fastest_when_no_single_switch_helps():
    # switching either group alone adds a 10 ms cast; only both together save time
    opts = [Option(("a",), 0.0, 5.0), Option(("b",), 1.0, 4.0)]
    problem = Problem([Group("g0", ["x"], opts), Group("g1", ["y"], opts)],
                      transition=change_cost(10.0))
    assert repair(problem, (0, 0), 8.0) == (1, 1)


def test_ga_individuals_all_fit_even_from_a_tiny_population():
    problem, _ = small_instance(5)
    budget = problem.fastest()[1]     # only the fastest assignments fit
    sol = solve_ga(problem, budget, seed=1, population=4, generations=3)
    assert sol.latency_ms <= budget + 1e-9


# -- budgets at the edges -----------------------------------------------------------------------

def cast_instance() -> Problem:
    # g0 alone is fastest at int8, but g1 only runs fp16 and a cast costs 0.5 ms:
    # fastest overall is fp16 -> fp16 = 2.2 ms, not 2.0 (ignoring the cast) or 2.5 (int8 first)
    g0 = Group("g0", ["conv0"], [Option(("int8",), 1.0, 1.0), Option(("fp16",), 0.0, 1.2)])
    g1 = Group("g1", ["conv1"], [Option(("fp16",), 0.0, 1.0)])
    return Problem([g0, g1], transition=change_cost(0.5))


@pytest.mark.parametrize("solver", [solve_exact, solve_ga, pareto_front, solve_brute_force])
def test_infeasible_budget_raises_with_the_fastest_latency(solver):
    with pytest.raises(InfeasibleBudget) as err:
        solver(cast_instance(), 2.1)
    assert err.value.fastest_ms == pytest.approx(2.2)
    assert err.value.budget_ms == 2.1
    assert "2.2 ms" in str(err.value)
    assert isinstance(err.value, FxqError) and isinstance(err.value, ValueError)


def test_infeasible_fastest_matches_brute_force_on_random_instances():
    for seed in range(6):
        problem, _ = small_instance(seed)
        fastest = min(lat for _, lat, _ in all_assignments(problem))
        with pytest.raises(InfeasibleBudget) as err:
            solve_exact(problem, fastest * 0.99 - 1e-6)
        assert err.value.fastest_ms == pytest.approx(fastest, rel=1e-12)
        assert solve_exact(problem, fastest).latency_ms == pytest.approx(fastest, rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_budget_above_the_slowest_gives_the_least_sensitive_assignment(seed):
    problem, _ = small_instance(seed)
    slowest = max(lat for _, lat, _ in all_assignments(problem))
    least = tuple(int(np.argmin([o.sensitivity for o in g.options])) for g in problem.groups)
    for budget in (slowest + 1.0, math.inf):
        assert solve_exact(problem, budget).choice == least
        assert solve_ga(problem, budget, seed=seed).choice == least


def test_budget_nan_is_rejected():
    with pytest.raises(ValueError, match="NaN"):
        solve_exact(cast_instance(), float("nan"))


# -- transition costs ---------------------------------------------------------------------------

def sandwich_instance(transition) -> Problem:
    # three single-layer groups; the middle one is very sensitive at int8. Within 4.5 ms and
    # without casts the answer is int8-fp16-int8 (4 ms); at 0.5 ms per cast that costs 5 ms
    groups = [build_group(f"g{i}", [f"l{i}"], {("int8",): s, ("fp16",): 0.0},
                          [{"int8": 1.0, "fp16": 2.0}]) for i, s in enumerate([1.0, 10.0, 1.0])]
    return Problem(groups, transition=transition)


@pytest.mark.parametrize("solver", ["exact", "ga"])
def test_transition_costs_change_the_answer(solver):
    naive = solve(sandwich_instance(None), 4.5, method=solver)
    assert [p for (p,) in naive.group_precisions] == ["int8", "fp16", "int8"]
    assert naive.latency_ms == pytest.approx(4.0)

    casts = sandwich_instance(change_cost(0.5))
    assert casts.evaluate(naive.choice)[0] == pytest.approx(5.0)    # the naive answer overruns
    sol = solve(casts, 4.5, method=solver)
    assert sol.latency_ms == pytest.approx(4.5)
    assert sol.sensitivity == pytest.approx(11.0)      # one end at fp16, next to one cast
    assert sol.group_precisions[1] == ("int8",)


def test_build_group_charges_changes_inside_the_group():
    g = build_group("blk", ["a", "b"], {(8, 8): 0.0, (8, 4): 1.0, (4, 4): 2.0},
                    [{8: 1.0, 4: 0.5}, {8: 2.0, 4: 1.0}], transition=change_cost(0.25))
    latency = {o.precisions: o.latency_ms for o in g.options}
    assert latency == {(8, 8): 3.0, (8, 4): 1.0 + 1.0 + 0.25, (4, 4): 1.5}


def test_input_and_output_precisions_are_charged():
    g = Group("g", ["only"], [Option(("int8",), 1.0, 1.0), Option(("float",), 0.0, 3.0)])
    problem = Problem([g], transition=change_cost(0.75), fixed_ms=0.5,
                      input_precision="float", output_precision="float")
    assert problem.evaluate((0,)) == (0.5 + 1.0 + 2 * 0.75, 1.0)   # quantize in, dequantize out
    assert problem.evaluate((1,)) == (0.5 + 3.0, 0.0)
    assert solve_exact(problem, 3.0).choice == (0,)


# -- pinning ------------------------------------------------------------------------------------

def test_pinning_filters_options_and_accepts_globs():
    problem = random_problem(np.random.default_rng(0), [2, 3, 2], (4, 8))
    pinned = problem.pin({"g1.*": 8, "g0.l0": 4})
    sol = solve_exact(pinned, math.inf)
    assert sol.layers["g0.l0"] == 4
    assert [sol.layers[f"g1.l{j}"] for j in range(3)] == [8, 8, 8]
    assert len(pinned.groups[1].options) == 1
    unpinned = solve_exact(problem, math.inf)
    assert unpinned.layers["g0.l0"] == 8        # so the pin did change the answer


@pytest.mark.parametrize("pins, message", [
    ({"nope*": 8}, "matches no layer"),
    ({"g0.l0": 4, "g0.*": 8}, "pinned to both"),
    ({"g0.l0": 2}, "without options"),
])
def test_pinning_errors(pins, message):
    problem = random_problem(np.random.default_rng(0), [2, 3], (4, 8))
    with pytest.raises(ValueError, match=message):
        problem.pin(pins)


# -- validation ---------------------------------------------------------------------------------

def _group(**kw):
    args = {"name": "g", "layers": ["a"], "options": [Option((8,), 0.0, 1.0)]}
    args.update(kw)
    return Group(**args)


@pytest.mark.parametrize("make, message", [
    (lambda: Problem([]), "at least one group"),
    (lambda: _group(options=[]), "no options"),
    (lambda: _group(layers=[]), "no layers"),
    (lambda: _group(layers=["a", "a"]), "twice"),
    (lambda: _group(options=[Option((8, 4), 0.0, 1.0)]), "gives 2 precisions"),
    (lambda: _group(options=[Option((8,), 0.0, 1.0), Option((8,), 1.0, 2.0)]), "twice"),
    (lambda: Option((8,), -1.0, 1.0), "sensitivity"),
    (lambda: Option((8,), 0.0, -0.1), "latency"),
    (lambda: Option((8,), float("nan"), 1.0), "sensitivity"),
    (lambda: Option((8,), 0.0, float("inf")), "latency"),
    (lambda: Option((), 0.0, 1.0), "at least one layer"),
    (lambda: Problem([_group(), _group(name="h")]), "is in groups"),
    (lambda: Problem([_group()], fixed_ms=-1.0), "fixed_ms"),
    (lambda: change_cost(-0.5), "change cost"),
    (lambda: Problem([_group(), _group(name="h", layers=["b"], options=[Option((4,), 0, 1)])],
                     transition=lambda a, b: -1.0), "transition cost"),
    (lambda: build_group("g", ["a"], {(8,): 0.0}, [{4: 1.0}]), "no latency"),
    (lambda: build_group("g", ["a", "b"], {(8, 8): 0.0}, [{8: 1.0}]), "latencies for 1"),
    (lambda: GAConfig(elite=64), "elite"),
    (lambda: GAConfig(crossover="two-point"), "crossover"),
    (lambda: solve(cast_instance(), 5.0, method="milp"), "unknown search"),
    (lambda: cast_instance().evaluate((0,)), "one option index per group"),
    (lambda: cast_instance().evaluate((2, 0)), "not index 2"),
])
def test_bad_input_is_rejected(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# -- determinism and output ---------------------------------------------------------------------

def test_ga_is_deterministic_for_a_seed():
    problem = random_problem(np.random.default_rng(11), [2, 3] * 3, (2, 4, 8))
    low, high = problem.fastest()[1], problem.slowest()[1]
    budget = low + 0.3 * (high - low)

    def run(seed):
        sol = solve_ga(problem, budget, seed=seed, population=16, patience=10)
        return sol.choice, sol.evaluations, sol.stats["generations"], sol.stats["moves_priced"]

    assert run(5) == run(5)
    assert run(random.Random(9)) == run(random.Random(9))
    assert run(np.random.default_rng(9)) == run(np.random.default_rng(9))
    runs = {run(s)[1:] for s in range(3)}
    assert len(runs) > 1          # the seed does steer the search


def test_solution_to_json():
    problem = sandwich_instance(change_cost(0.5))
    sol = solve_exact(problem, 4.5)
    data = json.loads(json.dumps(sol.to_json(), allow_nan=False))
    assert data["solver"] == "exact" and data["budget_ms"] == 4.5
    assert data["latency_ms"] == pytest.approx(4.5) and data["sensitivity"] == pytest.approx(11)
    assert data["layers"] == {name: p for name, (p,) in
                              zip(["l0", "l1", "l2"], sol.group_precisions)}
    assert [g["name"] for g in data["groups"]] == ["g0", "g1", "g2"]
    assert data["groups"][1]["precisions"] == {"l1": "int8"}
    assert data["evaluations"] > 0 and data["seconds"] >= 0
    unbounded = json.loads(json.dumps(solve_ga(problem, math.inf).to_json(), allow_nan=False))
    assert unbounded["budget_ms"] is None and unbounded["solver"] == "ga"
    front = [p.to_json() for p in pareto_front(problem)]
    assert front[0]["latency_ms"] == pytest.approx(3.0)       # all int8
    assert front[-1]["sensitivity"] == 0.0                     # all fp16
