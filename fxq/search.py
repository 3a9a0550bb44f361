"""Latency-budgeted mixed precision: which precision each layer gets.

The model is cut into an ordered chain of *groups* (regions, in graph order). Each group offers
*options*: a precision per layer of the group (an opaque label — bits ``2/4/8`` or ``"fp16"`` /
``"int8"`` / ``"float"``), with a measured sensitivity and a latency. Sensitivities add up across
groups (BRECQ's block-wise approximation); latencies add up too, plus a *transition cost*
wherever the precision changes between the last layer of one group and the first of the next
(a target may pay a requantize or a cast there). Inside a group the transitions are already part
of the option's latency (``build_group`` adds them).

Minimising total sensitivity subject to total latency <= budget is a multiple-choice knapsack
whose items are chained by the transition costs. Two solvers:

- ``solve_exact``: dynamic programming over groups. The state after a group is its last
  layer's precision (all the next transition depends on); each state keeps the Pareto frontier
  of (latency, sensitivity) of the partial assignments ending in it. Exact with float latencies.
- ``solve_ga``: a genetic algorithm over per-group option indices (tournament selection,
  crossover, mutation, elitism) whose every individual is *repaired* into the budget, then
  spends what budget it has left (Chu & Beasley's DROP/ADD); duplicates make way for fresh
  random individuals.

``pareto_front`` gives the whole latency-vs-sensitivity front. See docs/mixed_precision.md.

Nothing here knows about models or torch: sensitivity measurement and cost models build a
``Problem``; the CLI calls ``solve``. ``python -m fxq.search`` times both solvers on random
instances the size of EfficientNet-Lite0 and ResNet-18.
"""
from __future__ import annotations

import argparse
import fnmatch
import itertools
import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Hashable, Mapping, Sequence

import numpy as np

from fxq.errors import FxqError

Precision = Hashable
TransitionCost = Callable[[Precision, Precision], float]
Choice = tuple[int, ...]

SOLVERS = ("exact", "ga")


# ---------------------------------------------------------------------------------------------
# Problem description
# ---------------------------------------------------------------------------------------------

def change_cost(ms: float) -> TransitionCost:
    """A transition cost of ``ms`` for every precision change (one requantize/cast kernel)."""
    _check_cost(ms, "change cost")
    return lambda a, b: ms


def _check_cost(value: float, what: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be finite and >= 0, got {value!r}")
    return value


def _transition(transition: TransitionCost | None, a: Precision, b: Precision) -> float:
    # A change is what a target charges for; staying at one precision is free by definition,
    # so the cost function is never asked about equal labels.
    if transition is None or a == b:
        return 0.0
    return _check_cost(transition(a, b), f"transition cost {a!r} -> {b!r}")


@dataclass(frozen=True)
class Option:
    """One configuration of a group: a precision per layer, its sensitivity and latency (ms)."""

    precisions: tuple[Precision, ...]
    sensitivity: float
    latency_ms: float

    def __post_init__(self):
        object.__setattr__(self, "precisions", tuple(self.precisions))
        if not self.precisions:
            raise ValueError("an option needs a precision for at least one layer")
        label = f"option {self.precisions!r}"
        object.__setattr__(self, "sensitivity", _check_cost(self.sensitivity,
                                                            f"sensitivity of {label}"))
        object.__setattr__(self, "latency_ms", _check_cost(self.latency_ms, f"latency of {label}"))


@dataclass(frozen=True)
class Group:
    """A region of the model: its quantized layers in graph order and the options it offers."""

    name: str
    layers: tuple[str, ...]
    options: tuple[Option, ...]

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "options", tuple(self.options))
        if not self.layers:
            raise ValueError(f"group {self.name!r} has no layers")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"group {self.name!r} names a layer twice: {self.layers}")
        if not self.options:
            raise ValueError(f"group {self.name!r} has no options")
        seen = set()
        for option in self.options:
            if not isinstance(option, Option):
                raise ValueError(f"group {self.name!r}: options must be Option, got {option!r}")
            if len(option.precisions) != len(self.layers):
                raise ValueError(
                    f"group {self.name!r} has {len(self.layers)} layers but option "
                    f"{option.precisions!r} gives {len(option.precisions)} precisions")
            if option.precisions in seen:
                raise ValueError(f"group {self.name!r} lists option {option.precisions!r} twice")
            seen.add(option.precisions)


def build_group(name: str, layers: Sequence[str],
                sensitivity: Mapping[tuple[Precision, ...], float],
                layer_latency: Sequence[Mapping[Precision, float]],
                transition: TransitionCost | None = None) -> Group:
    """A group whose options are the keys of ``sensitivity``; each option's latency is the sum
    of ``layer_latency[j][precision]`` over its layers plus ``transition`` wherever adjacent
    layers of the group differ in precision."""
    layers = tuple(layers)
    if len(layer_latency) != len(layers):
        raise ValueError(f"group {name!r}: {len(layers)} layers but latencies for "
                         f"{len(layer_latency)}")
    options = []
    for precisions, sens in sensitivity.items():
        precisions = tuple(precisions)
        if len(precisions) != len(layers):
            raise ValueError(f"group {name!r} has {len(layers)} layers but option "
                             f"{precisions!r} gives {len(precisions)} precisions")
        total = 0.0
        for layer, table, p in zip(layers, layer_latency, precisions):
            if p not in table:
                raise ValueError(f"no latency for layer {layer!r} at precision {p!r}")
            total += _check_cost(table[p], f"latency of layer {layer!r} at {p!r}")
        total += sum(_transition(transition, a, b) for a, b in zip(precisions, precisions[1:]))
        options.append(Option(precisions, sens, total))
    return Group(name, layers, tuple(options))


@dataclass(frozen=True)
class _Tables:
    """The problem as arrays: precisions become integer states."""

    labels: tuple[Precision, ...]
    cost: np.ndarray                 # [P, P] transition cost between precision states
    lat: tuple[np.ndarray, ...]      # per group, per option (input/output casts folded in)
    sens: tuple[np.ndarray, ...]
    first: tuple[np.ndarray, ...]    # state of the option's first layer
    last: tuple[np.ndarray, ...]     # state of the option's last layer
    rest: tuple[np.ndarray, ...]     # rest[i][s]: least latency of groups after i, i ending at s


@dataclass(frozen=True)
class Problem:
    """An ordered chain of groups plus what links them.

    ``transition(a, b)`` is the cost (ms) of precision ``a`` at the end of one group followed by
    ``b`` at the start of the next (default: free). ``fixed_ms`` is the latency of everything
    outside the groups, so budgets are end to end. ``input_precision``/``output_precision``
    (optional) charge the transition from the model's input into the first layer and from the
    last layer to the output.
    """

    groups: tuple[Group, ...]
    transition: TransitionCost | None = None
    fixed_ms: float = 0.0
    input_precision: Precision | None = None
    output_precision: Precision | None = None
    _tables: _Tables = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "groups", tuple(self.groups))
        if not self.groups:
            raise ValueError("a mixed-precision problem needs at least one group")
        for g in self.groups:
            if not isinstance(g, Group):
                raise ValueError(f"groups must be Group, got {g!r}")
        seen: dict[str, str] = {}
        for g in self.groups:
            for layer in g.layers:
                if layer in seen:
                    raise ValueError(f"layer {layer!r} is in groups {seen[layer]!r} and {g.name!r}")
                seen[layer] = g.name
        object.__setattr__(self, "fixed_ms", _check_cost(self.fixed_ms, "fixed_ms"))
        object.__setattr__(self, "_tables", self._build_tables())

    def _build_tables(self) -> _Tables:
        labels: dict[Precision, int] = {}
        for g in self.groups:
            for o in g.options:
                for p in (o.precisions[0], o.precisions[-1]):
                    labels.setdefault(p, len(labels))
        names = tuple(labels)
        cost = np.array([[_transition(self.transition, a, b) for b in names] for a in names],
                        dtype=np.float64).reshape(len(names), len(names))
        lat, sens, first, last = [], [], [], []
        for i, g in enumerate(self.groups):
            ms = np.array([o.latency_ms for o in g.options], dtype=np.float64)
            if i == 0 and self.input_precision is not None:
                ms += [_transition(self.transition, self.input_precision, o.precisions[0])
                       for o in g.options]
            if i == len(self.groups) - 1 and self.output_precision is not None:
                ms += [_transition(self.transition, o.precisions[-1], self.output_precision)
                       for o in g.options]
            lat.append(ms)
            sens.append(np.array([o.sensitivity for o in g.options], dtype=np.float64))
            first.append(np.array([labels[o.precisions[0]] for o in g.options], dtype=np.int64))
            last.append(np.array([labels[o.precisions[-1]] for o in g.options], dtype=np.int64))
        rest = _suffix_latency(cost, lat, first, last, np.min)
        return _Tables(names, cost, tuple(lat), tuple(sens), tuple(first), tuple(last), rest)

    # -- queries --------------------------------------------------------------------------------

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(layer for g in self.groups for layer in g.layers)

    @property
    def size(self) -> int:
        """Number of assignments (product of the groups' option counts)."""
        return math.prod(len(g.options) for g in self.groups)

    def check_choice(self, choice: Sequence[int]) -> Choice:
        choice = tuple(int(c) for c in choice)
        if len(choice) != len(self.groups):
            raise ValueError(f"a choice needs one option index per group ({len(self.groups)}), "
                             f"got {len(choice)}")
        for g, c in zip(self.groups, choice):
            if not 0 <= c < len(g.options):
                raise ValueError(f"group {g.name!r} has {len(g.options)} options, not index {c}")
        return choice

    def evaluate(self, choice: Sequence[int]) -> tuple[float, float]:
        """(latency ms, sensitivity) of one option index per group."""
        choice = self.check_choice(choice)
        t = self._tables
        terms = [self.fixed_ms] + [float(t.lat[i][c]) for i, c in enumerate(choice)]
        terms += [float(t.cost[t.last[i][a], t.first[i + 1][b]])
                  for i, (a, b) in enumerate(zip(choice, choice[1:]))]
        # fsum: the same assignment gets the same latency whichever solver found it
        return math.fsum(terms), math.fsum(float(t.sens[i][c]) for i, c in enumerate(choice))

    def layer_precisions(self, choice: Sequence[int]) -> dict[str, Precision]:
        choice = self.check_choice(choice)
        return {layer: p for g, c in zip(self.groups, choice)
                for layer, p in zip(g.layers, g.options[c].precisions)}

    def fastest(self) -> tuple[Choice, float]:
        """The least-latency assignment and its latency (transitions included)."""
        return self._extreme(np.argmin, self._tables.rest)

    def slowest(self) -> tuple[Choice, float]:
        """The most-latency assignment and its latency."""
        t = self._tables
        return self._extreme(np.argmax, _suffix_latency(t.cost, t.lat, t.first, t.last, np.max))

    def least_sensitive(self) -> Choice:
        """Each group's least sensitive option (ties: the faster within the group); optimal
        whenever it fits the budget."""
        t = self._tables
        return tuple(int(np.lexsort((t.lat[i], t.sens[i]))[0]) for i in range(len(self.groups)))

    def _extreme(self, pick, rest: tuple[np.ndarray, ...]) -> tuple[Choice, float]:
        t = self._tables
        choice, state = [], None
        for i in range(len(self.groups)):
            into = 0.0 if state is None else t.cost[state, t.first[i]]
            c = int(pick(into + t.lat[i] + rest[i][t.last[i]]))
            choice.append(c)
            state = t.last[i][c]
        return tuple(choice), self.evaluate(choice)[0]

    # -- derived problems ----------------------------------------------------------------------

    def pin(self, pins: Mapping[str, Precision]) -> "Problem":
        """Only the options that give each pinned layer its precision. Keys are layer names or
        glob patterns (``fnmatch``); each must match a layer."""
        fixed: dict[str, Precision] = {}
        for pattern, precision in pins.items():
            matched = [layer for layer in self.layers if fnmatch.fnmatchcase(layer, pattern)]
            if not matched:
                shown = ", ".join(self.layers[:6]) + (", ..." if len(self.layers) > 6 else "")
                raise ValueError(f"pin {pattern!r} matches no layer (layers: {shown})")
            for layer in matched:
                if layer in fixed and fixed[layer] != precision:
                    raise ValueError(f"layer {layer!r} is pinned to both {fixed[layer]!r} "
                                     f"and {precision!r}")
                fixed[layer] = precision
        groups = []
        for g in self.groups:
            keep = tuple(o for o in g.options if all(fixed.get(layer, p) == p
                                                     for layer, p in zip(g.layers, o.precisions)))
            if not keep:
                wanted = {layer: fixed[layer] for layer in g.layers if layer in fixed}
                raise ValueError(f"pinning {wanted} leaves group {g.name!r} without options; it "
                                 f"offers {[o.precisions for o in g.options]}")
            groups.append(replace(g, options=keep))
        return replace(self, groups=tuple(groups))


def _suffix_latency(cost, lat, first, last, reduce) -> tuple[np.ndarray, ...]:
    """``rest[i][s]``: the least (``np.min``) or most (``np.max``) latency the groups after i can
    add when group i ends at precision state s. Exact, transitions included (a Viterbi pass)."""
    n, states = len(lat), cost.shape[0]
    rest = [np.zeros(states)] * n
    for i in range(n - 2, -1, -1):
        nxt = cost[:, first[i + 1]] + (lat[i + 1] + rest[i + 1][last[i + 1]])[None, :]
        rest[i] = reduce(nxt, axis=1)
    return tuple(rest)


# ---------------------------------------------------------------------------------------------
# Results and errors
# ---------------------------------------------------------------------------------------------

class InfeasibleBudget(FxqError, ValueError):
    """No assignment meets the budget; ``fastest_ms`` is the least achievable latency."""

    def __init__(self, budget_ms: float, fastest_ms: float, fastest: Choice | None = None):
        self.budget_ms = budget_ms
        self.fastest_ms = fastest_ms
        self.fastest = fastest
        super().__init__(
            f"No precision assignment meets the latency budget of {budget_ms:.6g} ms: the "
            f"fastest achievable on this target is {fastest_ms:.6g} ms.",
            "Raise --budget-ms to at least that, allow lower precisions, or pin fewer layers.")


def _json_label(p: Precision) -> Any:
    # labels are opaque; JSON keeps the native ones and prints the others
    return p if isinstance(p, (str, int, float, bool)) or p is None else str(p)


def _json_float(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


@dataclass(frozen=True)
class Solution:
    """A solver's answer: the option per group, per-layer precisions and what they cost.

    ``latency_ms`` and ``sensitivity`` are recomputed from ``choice`` (``Problem.evaluate``), so
    solvers compare exactly. ``evaluations``: exact — partial assignments the DP extended;
    GA — individuals evaluated (the single-switch neighbours its repair and ADD steps priced
    are ``stats["moves_priced"]``); brute force — assignments enumerated.
    """

    choice: Choice
    groups: tuple[str, ...]
    layers: dict[str, Precision]
    group_precisions: tuple[tuple[Precision, ...], ...]
    latency_ms: float
    sensitivity: float
    solver: str
    budget_ms: float | None
    seconds: float
    evaluations: int
    stats: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        names = iter(self.layers)
        return {
            "solver": self.solver,
            "budget_ms": _json_float(self.budget_ms),
            "latency_ms": self.latency_ms,
            "sensitivity": self.sensitivity,
            "seconds": self.seconds,
            "evaluations": self.evaluations,
            "groups": [{"name": g, "option": c,
                        "precisions": {next(names): _json_label(p) for p in ps}}
                       for g, c, ps in zip(self.groups, self.choice, self.group_precisions)],
            "layers": {k: _json_label(v) for k, v in self.layers.items()},
            "stats": dict(self.stats),
        }


def _solution(problem: Problem, choice: Sequence[int], solver: str, budget_ms: float | None,
              started: float, evaluations: int, **stats: Any) -> Solution:
    choice = problem.check_choice(choice)
    latency, sensitivity = problem.evaluate(choice)
    return Solution(choice=choice, groups=tuple(g.name for g in problem.groups),
                    layers=problem.layer_precisions(choice),
                    group_precisions=tuple(g.options[c].precisions
                                           for g, c in zip(problem.groups, choice)),
                    latency_ms=latency, sensitivity=sensitivity, solver=solver,
                    budget_ms=budget_ms, seconds=time.perf_counter() - started,
                    evaluations=evaluations, stats=stats)


@dataclass(frozen=True)
class FrontPoint:
    """One Pareto-optimal assignment: no other is both faster and less sensitive."""

    latency_ms: float
    sensitivity: float
    choice: Choice
    layers: dict[str, Precision]

    def to_json(self) -> dict:
        return {"latency_ms": self.latency_ms, "sensitivity": self.sensitivity,
                "choice": list(self.choice),
                "layers": {k: _json_label(v) for k, v in self.layers.items()}}


def _limit(budget_ms: float) -> float:
    """The budget with a rounding allowance: latencies summed in another order may differ in the
    last bits, and an assignment exactly at the budget must count as meeting it."""
    try:
        budget_ms = float(budget_ms)
    except (TypeError, ValueError):
        raise ValueError(f"budget_ms must be a number, got {budget_ms!r}") from None
    if math.isnan(budget_ms):
        raise ValueError("budget_ms is NaN")
    if math.isinf(budget_ms):
        return budget_ms
    return budget_ms + 1e-9 * max(1.0, abs(budget_ms))


def _check_feasible(problem: Problem, budget_ms: float) -> tuple[float, Choice]:
    limit = _limit(budget_ms)
    fastest, fastest_ms = problem.fastest()
    if fastest_ms > limit:
        raise InfeasibleBudget(float(budget_ms), fastest_ms, fastest)
    return limit, fastest


# ---------------------------------------------------------------------------------------------
# Exact: dynamic programming over Pareto frontiers
# ---------------------------------------------------------------------------------------------

def _pareto(lat: np.ndarray, sens: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated (latency, sensitivity) pairs, by increasing latency.
    A pair survives only if it is strictly less sensitive than every pair at most as slow, so
    exact duplicates keep one representative."""
    order = np.lexsort((sens, lat))
    s = sens[order]
    best_before = np.minimum.accumulate(np.concatenate(([np.inf], s[:-1])))
    return order[s < best_before]


@dataclass
class _DP:
    # per group, per end state: (parent state, parent index, option) for each frontier entry
    backs: list[dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]]
    final: dict[int, tuple[np.ndarray, np.ndarray]]   # end state -> (latency, sensitivity)
    evaluations: int
    widest: int


def _frontier_dp(problem: Problem, limit: float) -> _DP:
    """Forward DP. Entries that cannot finish within ``limit`` even with the fastest suffix are
    dropped (``rest`` is exact), so every final entry is feasible."""
    t = problem._tables
    frontier = {-1: (np.array([problem.fixed_ms]), np.array([0.0]))}   # -1: before group 0
    backs, evaluations, widest = [], 0, 1
    for i in range(len(problem.groups)):
        parts = defaultdict(list)
        for s, (lat, sens) in frontier.items():
            step = t.lat[i] + (t.cost[s, t.first[i]] if s >= 0 else 0.0)
            for o in range(len(step)):
                parts[int(t.last[i][o])].append((lat + step[o], sens + t.sens[i][o], s, o))
        frontier, back = {}, {}
        for state, chunks in parts.items():
            lat = np.concatenate([c[0] for c in chunks])
            sens = np.concatenate([c[1] for c in chunks])
            pstate = np.concatenate([np.full(len(c[0]), c[2]) for c in chunks])
            pidx = np.concatenate([np.arange(len(c[0])) for c in chunks])
            opt = np.concatenate([np.full(len(c[0]), c[3]) for c in chunks])
            evaluations += len(lat)
            keep = np.flatnonzero(lat + t.rest[i][state] <= limit)
            keep = keep[_pareto(lat[keep], sens[keep])]
            if len(keep):
                frontier[state] = (lat[keep], sens[keep])
                back[state] = (pstate[keep], pidx[keep], opt[keep])
                widest = max(widest, len(keep))
        backs.append(back)
    return _DP(backs, frontier, evaluations, widest)


def _trace(dp: _DP, state: int, index: int) -> Choice:
    choice = []
    for back in reversed(dp.backs):
        pstate, pidx, opt = back[state]
        choice.append(int(opt[index]))
        state, index = int(pstate[index]), int(pidx[index])
    return tuple(reversed(choice))


def _final_entries(dp: _DP) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    states = list(dp.final)
    lat = np.concatenate([dp.final[s][0] for s in states])
    sens = np.concatenate([dp.final[s][1] for s in states])
    state = np.concatenate([np.full(len(dp.final[s][0]), s) for s in states])
    index = np.concatenate([np.arange(len(dp.final[s][0])) for s in states])
    return lat, sens, state, index


def solve_exact(problem: Problem, budget_ms: float) -> Solution:
    """The least total sensitivity with total latency <= ``budget_ms``; ties go to the faster.
    Raises ``InfeasibleBudget`` (with the fastest achievable latency) if nothing fits."""
    started = time.perf_counter()
    limit, _ = _check_feasible(problem, budget_ms)
    dp = _frontier_dp(problem, limit)
    lat, sens, state, index = _final_entries(dp)
    best = int(np.lexsort((lat, sens))[0])
    choice = _trace(dp, int(state[best]), int(index[best]))
    return _solution(problem, choice, "exact", float(budget_ms), started, dp.evaluations,
                     max_frontier=dp.widest)


def pareto_front(problem: Problem, budget_ms: float = math.inf) -> list[FrontPoint]:
    """Every Pareto-optimal (latency, sensitivity) assignment with latency <= ``budget_ms``,
    fastest first (sensitivity strictly decreasing along the list)."""
    limit, _ = _check_feasible(problem, budget_ms)
    dp = _frontier_dp(problem, limit)
    lat, sens, state, index = _final_entries(dp)
    points = []
    for k in _pareto(lat, sens):
        choice = _trace(dp, int(state[k]), int(index[k]))
        latency, sensitivity = problem.evaluate(choice)
        points.append(FrontPoint(latency, sensitivity, choice, problem.layer_precisions(choice)))
    return points


def solve_brute_force(problem: Problem, budget_ms: float,
                      max_assignments: int = 2_000_000) -> Solution:
    """Enumerates every assignment (a reference for tests and small problems)."""
    started = time.perf_counter()
    if problem.size > max_assignments:
        raise ValueError(f"{problem.size} assignments; brute force is capped at {max_assignments}")
    limit, _ = _check_feasible(problem, budget_ms)
    arrays = _Arrays(problem)
    best, best_key = None, (math.inf, math.inf)
    ranges = [range(len(g.options)) for g in problem.groups]
    for chunk in _batched(itertools.product(*ranges), 65536):
        x = np.array(chunk, dtype=np.int64)
        lat, sens = arrays.totals(x)
        ok = np.flatnonzero(lat <= limit)
        if len(ok):
            k = ok[np.lexsort((lat[ok], sens[ok]))[0]]
            if (sens[k], lat[k]) < best_key:
                best, best_key = tuple(x[k]), (sens[k], lat[k])
    return _solution(problem, best, "brute-force", float(budget_ms), started, problem.size)


def _batched(iterable, n: int):
    it = iter(iterable)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


# ---------------------------------------------------------------------------------------------
# Genetic algorithm
# ---------------------------------------------------------------------------------------------

class _Arrays:
    """The problem padded to [groups, max options] so a whole population evaluates, and every
    single-group switch of every individual is priced, in a few numpy ops. Padding slots are
    never chosen (mutation draws and moves only cover real options)."""

    def __init__(self, problem: Problem):
        t = problem._tables
        n, m = len(problem.groups), max(len(g.options) for g in problem.groups)
        self.n, self.fixed, self.cost = n, problem.fixed_ms, t.cost
        self.nopt = np.array([len(g.options) for g in problem.groups])
        self.valid = np.arange(m)[None, :] < self.nopt[:, None]
        self.lat, self.sens = np.zeros((n, m)), np.zeros((n, m))
        self.first, self.last = np.zeros((n, m), np.int64), np.zeros((n, m), np.int64)
        for i in range(n):
            k = self.nopt[i]
            self.lat[i, :k], self.sens[i, :k] = t.lat[i], t.sens[i]
            self.first[i, :k], self.last[i, :k] = t.first[i], t.last[i]
        self.rows = np.arange(n)

    def totals(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(latency, sensitivity) of each row of ``x`` [individuals, groups]."""
        r = self.rows
        lat = self.lat[r, x].sum(axis=1) + self.fixed
        if self.n > 1:
            lat += self.cost[self.last[r[:-1], x[:, :-1]], self.first[r[1:], x[:, 1:]]].sum(axis=1)
        return lat, self.sens[r, x].sum(axis=1)

    def moves(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Change in (latency, sensitivity) when individual b switches group i to option o, as
        [individuals, groups, options]; both neighbouring transitions are re-priced. Non-moves
        (padding, the current option) get latency change +inf."""
        r = self.rows
        dlat = self.lat[None] - self.lat[r, x][..., None]
        dsens = self.sens[None] - self.sens[r, x][..., None]
        if self.n > 1:
            before = self.last[r[:-1], x[:, :-1]]    # [b, i]: state ending group i
            after = self.first[r[1:], x[:, 1:]]      # [b, i]: state starting group i + 1
            now = self.cost[before, after][..., None]
            dlat[:, 1:] += self.cost[before[..., None], self.first[None, 1:]] - now
            dlat[:, :-1] += self.cost[self.last[None, :-1], after[..., None]] - now
        dlat[:, ~self.valid] = np.inf
        np.put_along_axis(dlat, x[..., None], np.inf, axis=2)
        return dlat, dsens

    def switch(self, x: np.ndarray, which: np.ndarray, score: np.ndarray) -> None:
        """In each row ``which`` of ``x``, take the (group, option) of least ``score``."""
        flat = np.argmin(score.reshape(len(score), -1), axis=1)
        x[which, flat // score.shape[2]] = flat % score.shape[2]


def _repair(arrays: _Arrays, x: np.ndarray, limit: float,
            fastest: np.ndarray) -> tuple[np.ndarray, int]:
    """Rows of ``x`` switched, one group at a time, until each fits the budget (a DROP phase).
    A switch that makes the row fit right away wins, the least sensitive such; otherwise the
    switch gaining the least sensitivity per ms saved. Each step lowers latency strictly, so it
    ends; a row no single switch speeds up (a transition cost can make two groups worth changing
    only together) becomes the fastest assignment, which fits whenever anything does. Returns the
    rows and the number of switches priced."""
    x = x.copy()
    lat, _ = arrays.totals(x)
    todo, priced = np.flatnonzero(lat > limit), 0
    for _ in range(4 * (int(arrays.nopt.sum()) + arrays.n)):   # a safety cap only
        if not len(todo):
            return x, priced
        dlat, dsens = arrays.moves(x[todo])
        priced += len(todo) * int(arrays.valid.sum())
        saves = dlat < 0
        stuck = ~saves.any(axis=(1, 2))
        x[todo[stuck]] = fastest
        live = ~stuck
        todo, dlat, dsens, saves = todo[live], dlat[live], dsens[live], saves[live]
        if not len(todo):
            return x, priced
        fits = saves & (lat[todo][:, None, None] + dlat <= limit)
        ratio = np.where(saves, dsens / np.where(saves, -dlat, 1.0), np.inf)
        score = np.where(fits.any(axis=(1, 2))[:, None, None],
                         np.where(fits, dsens, np.inf), ratio)
        arrays.switch(x, todo, score)
        lat[todo] = arrays.totals(x[todo])[0]
        todo = todo[lat[todo] > limit]
    x[todo] = fastest
    return x, priced


def _improve(arrays: _Arrays, x: np.ndarray, limit: float) -> tuple[np.ndarray, int]:
    """Rows of ``x`` (all fitting) switched while a switch lowers sensitivity and still fits
    (an ADD phase): the most sensitivity removed per ms added, free ones (no added latency)
    first. Spends what the budget has left, which random children rarely do. Returns the rows
    and the number of switches priced."""
    x = x.copy()
    lat, _ = arrays.totals(x)
    todo, priced = np.arange(len(x)), 0
    while len(todo):
        dlat, dsens = arrays.moves(x[todo])
        priced += len(todo) * int(arrays.valid.sum())
        ok = (dsens < 0) & (lat[todo][:, None, None] + dlat <= limit)
        has = ok.any(axis=(1, 2))
        todo, ok, dlat, dsens = todo[has], ok[has], dlat[has], dsens[has]
        if not len(todo):
            break
        # dsens < 0 here, so the ratio is negative; a switch adding no latency ranks by dsens
        # ahead of every paying one
        score = np.where(ok, dsens / np.maximum(dlat, 1e-12), np.inf)
        arrays.switch(x, todo, score)
        lat[todo] = arrays.totals(x[todo])[0]
    return x, priced


def repair(problem: Problem, choice: Sequence[int], budget_ms: float) -> Choice:
    """``choice`` switched group by group until it meets the budget (unchanged if it already
    does). Raises ``InfeasibleBudget`` if no assignment does."""
    limit, fastest = _check_feasible(problem, budget_ms)
    x = np.array([problem.check_choice(choice)], dtype=np.int64)
    x, _ = _repair(_Arrays(problem), x, limit, np.array(fastest))
    return tuple(int(v) for v in x[0])


def _generator(seed: int | np.random.Generator | random.Random) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, random.Random):
        return np.random.default_rng(seed.getrandbits(64))
    return np.random.default_rng(seed)


@dataclass(frozen=True)
class GAConfig:
    population: int = 64
    generations: int = 300
    patience: int = 40             # stop after this many generations without a better best
    tournament: int = 3
    crossover: str = "uniform"     # or "one-point"
    crossover_rate: float = 0.9
    mutation_rate: float | None = None   # per gene; None: 1 / groups
    elite: int = 2
    improve: bool = True           # after repair, spend the budget left (ADD phase)
    unique: bool = True            # duplicates replaced by fresh random individuals

    def __post_init__(self):
        if self.population < 2:
            raise ValueError("population must be >= 2")
        if not 0 <= self.elite < self.population:
            raise ValueError("elite must be in [0, population)")
        if self.tournament < 1 or self.generations < 0 or self.patience < 1:
            raise ValueError("tournament and patience must be >= 1, generations >= 0")
        if self.crossover not in ("uniform", "one-point"):
            raise ValueError(f"crossover must be 'uniform' or 'one-point', not {self.crossover!r}")
        rates = [self.crossover_rate] + ([] if self.mutation_rate is None else [self.mutation_rate])
        if any(not 0 <= r <= 1 for r in rates):
            raise ValueError("crossover_rate and mutation_rate must be in [0, 1]")


def _tournament(rng: np.random.Generator, rank: np.ndarray, count: int, k: int) -> np.ndarray:
    """``count`` winners, each the best-ranked of ``k`` individuals drawn with replacement."""
    entrants = rng.integers(0, len(rank), size=(count, k))
    return entrants[np.arange(count), np.argmin(rank[entrants], axis=1)]


def _offspring(rng: np.random.Generator, pop: np.ndarray, rank: np.ndarray, count: int,
               cfg: GAConfig, arrays: _Arrays) -> np.ndarray:
    a = pop[_tournament(rng, rank, count, cfg.tournament)]
    b = pop[_tournament(rng, rank, count, cfg.tournament)]
    n = arrays.n
    if cfg.crossover == "uniform":
        take_b = rng.random((count, n)) < 0.5
    else:  # one-point: genes from the cut onwards come from b
        cut = rng.integers(1, n, size=count) if n > 1 else np.ones(count, np.int64)
        take_b = np.arange(n)[None, :] >= cut[:, None]
    take_b &= (rng.random(count) < cfg.crossover_rate)[:, None]
    child = np.where(take_b, b, a)
    rate = cfg.mutation_rate if cfg.mutation_rate is not None else 1.0 / n
    return _mutate(rng, child, rate, arrays)


def _mutate(rng: np.random.Generator, x: np.ndarray, rate: float, arrays: _Arrays) -> np.ndarray:
    """Each gene, with probability ``rate``, becomes a uniformly drawn *different* option."""
    count, n = x.shape
    mutate = (rng.random((count, n)) < rate) & (arrays.nopt > 1)[None, :]
    # draw among the nopt - 1 other options: draw below nopt - 1, then skip over the current one
    draw = np.floor(rng.random((count, n)) * (arrays.nopt - 1)[None, :]).astype(np.int64)
    draw += draw >= x
    return np.where(mutate, draw, x)


def _replace_duplicates(rng: np.random.Generator, pop: np.ndarray, arrays: _Arrays,
                        fix: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, int]:
    """Later copies of an individual become fresh random ones, fixed like any child. Repair and
    the ADD phase pull children towards the same few greedy outcomes; without fresh blood the
    population collapses onto them within a few generations and crossover has nothing left to
    mix (on random Lite0-sized instances the GA then missed the optimum in 1 run of 10, by up to
    1.5 %). Shaking the copies instead (redrawing a fifth of the genes) was cheaper to repair
    but found the optimum less often (99 % against 100 % of 100 runs per shape)."""
    _, first = np.unique(pop, axis=0, return_index=True)
    dup = np.setdiff1d(np.arange(len(pop)), first)
    if len(dup):
        pop[dup] = fix(_random(rng, len(dup), arrays))
    return pop, len(dup)


def _random(rng: np.random.Generator, count: int, arrays: _Arrays) -> np.ndarray:
    return np.floor(rng.random((count, arrays.n)) * arrays.nopt).astype(np.int64)


def solve_ga(problem: Problem, budget_ms: float,
             seed: int | np.random.Generator | random.Random = 0,
             config: GAConfig | None = None, **overrides: Any) -> Solution:
    """Genetic search for the least sensitive assignment within ``budget_ms``. Deterministic
    for a seed. ``overrides`` set ``GAConfig`` fields (``population=128``, ...)."""
    started = time.perf_counter()
    cfg = replace(config or GAConfig(), **overrides)
    limit, fastest = _check_feasible(problem, budget_ms)
    arrays = _Arrays(problem)
    best0 = np.array(problem.least_sensitive())
    if arrays.totals(best0[None])[0][0] <= limit:   # the least sensitive fits: nothing to search
        return _solution(problem, best0, "ga", float(budget_ms), started, 1, generations=0)
    rng = _generator(seed)
    fastest = np.array(fastest)
    priced = 0

    def fix(x: np.ndarray) -> np.ndarray:
        # every individual is made to fit, then (by default) spends what budget it has left
        nonlocal priced
        x, n = _repair(arrays, x, limit, fastest)
        priced += n
        if cfg.improve:
            x, n = _improve(arrays, x, limit)
            priced += n
        return x

    # seeds: the fastest assignment and the least sensitive one repaired; the rest at random
    seeds = np.vstack([fastest[None], best0[None], _random(rng, cfg.population - 2, arrays)])
    pop = fix(seeds[: cfg.population])
    lat, sens = arrays.totals(pop)
    evaluations, best, stale, generation = len(pop), float(sens.min()), 0, 0
    for generation in range(1, cfg.generations + 1):
        order = np.lexsort((lat, sens))
        rank = np.empty(len(pop), np.int64)
        rank[order] = np.arange(len(pop))
        children = fix(_offspring(rng, pop, rank, cfg.population - cfg.elite, cfg, arrays))
        pop = np.vstack([pop[order[: cfg.elite]], children])
        evaluations += len(children)
        if cfg.unique:
            pop, fresh = _replace_duplicates(rng, pop, arrays, fix)
            evaluations += fresh
        lat, sens = arrays.totals(pop)
        # relative tolerance: a float-rounding "improvement" must not reset patience
        if sens.min() < best - 1e-12 * max(1.0, abs(best)):
            best, stale = float(sens.min()), 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    winner = pop[np.lexsort((lat, sens))[0]]
    return _solution(problem, winner, "ga", float(budget_ms), started, evaluations,
                     generations=generation, population=cfg.population, moves_priced=priced,
                     seed=seed if isinstance(seed, int) else None)


def solve(problem: Problem, budget_ms: float, method: str = "exact", seed: int = 0,
          **options: Any) -> Solution:
    """``--search exact|ga``."""
    if method == "exact":
        if options:
            raise ValueError(f"the exact solver takes no options, got {sorted(options)}")
        return solve_exact(problem, budget_ms)
    if method == "ga":
        return solve_ga(problem, budget_ms, seed, **options)
    raise ValueError(f"unknown search {method!r}; choose one of {', '.join(SOLVERS)}")


# ---------------------------------------------------------------------------------------------
# Random instances and the benchmark
# ---------------------------------------------------------------------------------------------

def random_problem(rng: np.random.Generator | int, layers_per_group: Sequence[int],
                   precisions: Sequence[Precision] = (4, 8), change_ms: float | None = 0.02,
                   mixed: str = "adjacent") -> Problem:
    """A synthetic problem shaped like a real one: a group per entry of ``layers_per_group``.

    ``precisions`` go from lowest to highest. A layer's latency falls with precision (bit-serial
    style, cost ~ bits, plus a fixed overhead); its sensitivity grows about 4x per bit removed
    (quantization noise ~ 2^-2b) with a random interaction inside the group, so options are not
    additive within a group. ``mixed="adjacent"`` offers, as fxq's sensitivity pass does, the
    2^k mixes of each pair of adjacent precisions; ``"all"`` every combination. ``change_ms``:
    cost of each precision change (None: free).
    """
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    precisions = tuple(precisions)
    if len(precisions) < 1:
        raise ValueError("random_problem needs at least one precision")
    transition = change_cost(change_ms) if change_ms is not None else None
    rank = {p: r for r, p in enumerate(precisions)}
    top = len(precisions) - 1
    groups = []
    for gi, k in enumerate(layers_per_group):
        layers = [f"g{gi}.l{j}" for j in range(k)]
        base_ms = rng.uniform(0.05, 0.5, size=k)
        base_err = rng.lognormal(0.0, 1.0, size=k)
        lat_tables = [{p: float(base_ms[j] * (0.3 + 0.7 * (rank[p] + 1) / (top + 1))
                               * rng.uniform(0.9, 1.1)) for p in precisions} for j in range(k)]
        if mixed == "all" or len(precisions) == 1:
            combos = set(itertools.product(precisions, repeat=k))
        elif mixed == "adjacent":
            combos = {c for lo, hi in zip(precisions, precisions[1:])
                      for c in itertools.product((lo, hi), repeat=k)}
        else:
            raise ValueError(f"mixed must be 'adjacent' or 'all', not {mixed!r}")
        sens = {}
        for combo in sorted(combos, key=lambda c: [rank[p] for p in c]):
            drop = np.array([top - rank[p] for p in combo], dtype=float)
            err = float((base_err * (4.0 ** drop - 1)).sum())
            interaction = 1.0 + rng.uniform(0.0, 0.3) * (np.count_nonzero(drop) > 1)
            sens[combo] = err * interaction + float(rng.uniform(0.0, 0.01))
        groups.append(build_group(f"g{gi}", layers, sens, lat_tables, transition))
    return Problem(tuple(groups), transition)


RESNET18_LAYERS = [1, 2, 2, 3, 2, 3, 2, 3, 2, 1]  # stem, 8 basic blocks (3 with downsample), fc


def _budgets(problem: Problem, fractions: Sequence[float]) -> list[float]:
    low, high = problem.fastest()[1], problem.slowest()[1]
    return [low + f * (high - low) for f in fractions]


def benchmark(seed: int = 0, instances: int = 5,
              fractions: Sequence[float] = (0.1, 0.25, 0.5, 0.75, 0.9),
              out: Callable[[str], None] = print) -> list[dict]:
    """GA vs exact on random instances shaped like Lite0 (19 groups of 2-3 layers, int4/int8:
    up to 8 options) and ResNet-18 (10 groups of 1-3 layers, 2/4/8 bits: up to 15 options), at
    budgets a fraction of the way from the fastest to the slowest assignment; then both solvers
    and the full Pareto front on 20-60 groups of 15-16 options. Returns the rows it prints."""
    rng = np.random.default_rng(seed)
    shapes = [
        ("lite0-like 19 groups, int4/int8", lambda: rng.integers(2, 4, size=19).tolist(), (4, 8)),
        ("resnet18-like 10 groups, 2/4/8", lambda: RESNET18_LAYERS, (2, 4, 8)),
    ]
    out(f"GA vs exact, {instances} random instances x {len(fractions)} budgets each")
    out(f"{'instance':44} {'runs':>4} {'GA=exact':>8} {'gap max %':>9} {'gap mean %':>10} "
        f"{'exact s mean/max':>16} {'GA s mean/max':>14} {'GA evals':>8}")
    rows = []
    for name, layers, precisions in shapes:
        runs = []
        for k in range(instances):
            problem = random_problem(rng, layers(), precisions)
            for budget in _budgets(problem, fractions):
                runs.append(_compare(problem, budget, ga_seed=k))
        rows.append(_summary(name, runs, out))
    out("")
    out("Larger instances (one each)")
    scaling = [("20 groups x 16 options (4 layers, 2 prec.)", [4] * 20, (4, 8)),
               ("60 groups x 16 options (4 layers, 2 prec.)", [4] * 60, (4, 8)),
               ("60 groups x 15 options (3 layers, 3 prec.)", [3] * 60, (2, 4, 8))]
    for name, layers, precisions in scaling:
        problem = random_problem(rng, layers, precisions)
        runs = [_compare(problem, b, ga_seed=0) for b in _budgets(problem, fractions)]
        row = _summary(name, runs, out)
        started = time.perf_counter()
        row["front_points"] = len(pareto_front(problem))
        row["front_s"] = time.perf_counter() - started
        row["max_frontier"] = max(r["max_frontier"] for r in runs)
        out(f"{'':44}   full Pareto front: {row['front_points']} points in "
            f"{row['front_s']:.2f} s; widest DP frontier {row['max_frontier']}")
        rows.append(row)
    return rows


def _compare(problem: Problem, budget: float, ga_seed: int) -> dict:
    exact = solve_exact(problem, budget)
    ga = solve_ga(problem, budget, seed=ga_seed)
    gap = (ga.sensitivity - exact.sensitivity) / max(exact.sensitivity, 1e-300)
    return {"gap": 100.0 * gap, "exact_s": exact.seconds, "ga_s": ga.seconds,
            "ga_evaluations": ga.evaluations, "max_frontier": exact.stats["max_frontier"]}


def _summary(name: str, runs: list[dict], out: Callable[[str], None]) -> dict:
    gaps = np.array([r["gap"] for r in runs])
    ex, ga = np.array([r["exact_s"] for r in runs]), np.array([r["ga_s"] for r in runs])
    row = {"instance": name, "runs": len(runs), "ga_equals_exact": int((gaps <= 1e-7).sum()),
           "gap_percent_max": float(gaps.max()), "gap_percent_mean": float(gaps.mean()),
           "exact_s_mean": float(ex.mean()), "exact_s_max": float(ex.max()),
           "ga_s_mean": float(ga.mean()), "ga_s_max": float(ga.max()),
           "ga_evaluations_mean": float(np.mean([r["ga_evaluations"] for r in runs]))}
    out(f"{name:44} {len(runs):4d} {row['ga_equals_exact']:8d} {row['gap_percent_max']:9.3f} "
        f"{row['gap_percent_mean']:10.4f} {row['exact_s_mean']:8.3f}/{row['exact_s_max']:<7.3f} "
        f"{row['ga_s_mean']:6.2f}/{row['ga_s_max']:<7.2f} {row['ga_evaluations_mean']:8.0f}")
    return row


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fxq.search",
        description="Time the GA against the exact solver on random instances.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--instances", type=int, default=5,
                        help="random instances per model shape (default 5)")
    args = parser.parse_args(argv)
    benchmark(args.seed, args.instances)


if __name__ == "__main__":
    main()
