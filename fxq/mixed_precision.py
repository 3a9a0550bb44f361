"""``fxq compile --budget-ms``: pick every layer's precision so the model meets a latency budget
with the least loss of quality.

The stage runs on the float graph after ``detect_blocks`` and before ``annotate_qspecs``:

1. cost tables of the target (``fxq.cost_models``: measured on ort-cpu, estimated on TensorRT,
   modelled on bitserial) at the allowed precisions (the target's, or ``--bits``);
2. sensitivities of every region's configurations (``fxq.sensitivity``);
3. a ``fxq.search.Problem`` (first/last floor and ``--pin`` applied), solved by the GA or the
   exact DP; the Pareto front over the whole latency range;
4. the plan: a precision per layer (``annotate_qspecs``' ``layer_precision``), which feeds
   calibration, reconstruction and the backends like uniform bits do.

A budget below the fastest assignment is an ``InfeasibleBudget`` error giving the fastest
latency; a budget at or above the float model's latency (targets that run float) keeps float.
"""
from __future__ import annotations

import fnmatch
import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from fxq.cost_models import is_float, normalize_precision, precision_order
from fxq.errors import FxqError

SEARCHES = ("ga", "exact")


# ---------------------------------------------------------------------------------------------
# --pin
# ---------------------------------------------------------------------------------------------

def parse_pin(text: str) -> tuple[str, Any]:
    """``NAME=BITS`` (NAME a layer name or glob, BITS an integer or ``float``/``fp16``)."""
    name, sep, value = text.partition("=")
    name, value = name.strip(), value.strip()
    if not sep or not name or not value:
        raise FxqError(f"--pin '{text}' is not NAME=BITS.",
                       "Write e.g. --pin 'features.0.*=8' or --pin classifier.1=float.")
    return name, normalize_precision(value)


def resolve_pins(pins: Sequence[tuple[str, Any]], qualnames: Mapping[str, str]) -> dict[str, Any]:
    """Node name -> precision. A pattern matches a layer's qualified name (``layer1.0.conv1``) or
    its FX node name; one that matches nothing is an error listing some names."""
    out: dict[str, Any] = {}
    for pattern, precision in pins:
        hit = [n for n, q in qualnames.items()
               if fnmatch.fnmatchcase(q, pattern) or fnmatch.fnmatchcase(n, pattern)]
        if not hit:
            shown = ", ".join(list(qualnames.values())[:6])
            raise FxqError(f"--pin '{pattern}' matches no quantizable layer.",
                           f"Layer names look like: {shown} ... (glob patterns allowed; FX node names "
                           "as `fxq inspect MODEL` lists them match too).")
        for n in hit:
            if n in out and out[n] != precision:
                raise FxqError(f"Layer '{qualnames[n]}' is pinned to both {out[n]!r} and {precision!r}.",
                               "Make the --pin patterns agree.")
            out[n] = precision
    return out


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------

@dataclass
class MixedPrecisionPlan:
    """What the search decided and why (``to_json`` is the report's ``mixed_precision``)."""

    status: str                              # "searched" or "float" (the budget allows float)
    assignment: dict[str, Any]               # FX node name -> precision
    qualnames: dict[str, str]
    target: str
    kind: str                                # measured / estimate / model / profile
    batch: int
    budget_ms: float
    search: str
    precisions: tuple
    predicted_ms: float                      # per-edge prediction of the chosen assignment
    search_latency_ms: float                 # the search's additive latency of it
    sensitivity: float
    fastest_ms: float
    float_ms: float | None
    uniform: list[dict]
    front: list                              # fxq.search.FrontPoint, additive latency order
    front_ms: list = field(default_factory=list)  # per-edge predicted latency of each front point
    solution: Any = None
    exact: Any = None                        # the exact optimum, to check the GA against
    tables: Any = None
    problem: Any = None                      # the fxq.search.Problem that was solved
    sens: Any = None                         # fxq.sensitivity.Sensitivity
    seconds: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    search_budget_ms: float | None = None    # the additive budget the solver was given
    cost_calibration: dict | None = None     # cost_models.calibrate_end_to_end's record
    budget_checks: list = field(default_factory=list)  # check_measured's timings of the chosen assignment

    def layer_precision(self) -> dict[str, Any]:
        return dict(self.assignment)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.assignment.values():
            out[str(p)] = out.get(str(p), 0) + 1
        return out

    def to_json(self) -> dict:
        from fxq.search import _json_label

        def named(layers: Mapping[str, Any]) -> dict:
            return {self.qualnames.get(n, n): _json_label(p) for n, p in layers.items()}

        out = {
            "status": self.status, "target": self.target, "cost_model": self.kind,
            "batch": self.batch, "budget_ms": self.budget_ms, "search": self.search,
            "precisions": [_json_label(p) for p in self.precisions],
            "predicted_ms": self.predicted_ms, "search_latency_ms": self.search_latency_ms,
            "search_budget_ms": self.search_budget_ms,
            "sensitivity": self.sensitivity, "fastest_ms": self.fastest_ms, "float_ms": self.float_ms,
            "layers": named(self.assignment), "counts": self.counts(),
            "uniform": [dict(r, layers=named(r["layers"])) for r in self.uniform],
            "pareto_front": [{"predicted_ms": q, "search_latency_ms": p.latency_ms,
                              "sensitivity": p.sensitivity, "layers": named(p.layers)}
                             for p, q in zip(self.front, self.front_ms)],
            "seconds": self.seconds, "notes": list(self.notes),
            "cost_calibration": self.cost_calibration,
            "budget_checks": list(self.budget_checks),
        }
        if self.solution is not None:
            sol = self.solution.to_json()
            out["solver"] = {k: sol[k] for k in ("solver", "latency_ms", "sensitivity", "seconds",
                                                  "evaluations", "stats")}
        if self.exact is not None:
            best = self.exact.sensitivity
            mine = self.solution.sensitivity if self.solution is not None else best
            out["exact_check"] = {"exact_sensitivity": best, "exact_seconds": self.exact.seconds,
                                  "gap_pct": 0.0 if best <= 0 else 100.0 * (mine - best) / best}
        if self.sens is not None:
            out["sensitivity_measurement"] = {"samples": self.sens.samples, "seconds": round(self.sens.seconds, 3),
                                              "cached": self.sens.cached, "groups": len(self.sens.groups)}
        return out


def _floor_ok(p, floor: int) -> bool:
    return is_float(p) or int(p) >= floor


def build_problem(tables, sens, edge_layers: set[str], floor: int,
                  pins: Mapping[str, Any]):
    """The search problem: one group per sensitivity group, options the measured configurations
    the target runs, the first/last layers at >= ``floor`` bits (float counts as highest)."""
    from fxq.search import Problem, build_group

    groups = []
    for g in sens.groups:
        lat = tables.layer_latency(g.layers)
        configs = {}
        for config, s in sens.table[g.name].items():
            if any(p not in lat[j] for j, p in enumerate(config)):
                continue  # the target does not run this layer at that precision
            if any(layer in edge_layers and not _floor_ok(p, floor) for layer, p in zip(g.layers, config)):
                continue
            if any(layer in pins and pins[layer] != p for layer, p in zip(g.layers, config)):
                continue
            configs[config] = s
        if not configs:
            wanted = {layer: pins[layer] for layer in g.layers if layer in pins}
            raise FxqError(f"No allowed precision configuration is left for region '{g.name}'"
                           + (f" with the pins {wanted}." if wanted else "."),
                           "Check --pin against --bits and the target's precisions.")
        groups.append(build_group(g.name, g.layers, configs, lat, tables.transition))
    return Problem(groups, **tables.problem_kwargs())


def _uniform_rows(problem, precisions, edge_layers: set[str], budget_ms: float) -> list[dict]:
    """Each precision everywhere it is allowed: the first/last layers, when the floor keeps them
    above it, at the fastest precision they may take; groups that cannot run it are skipped."""
    rows = []
    for p in precisions:
        choice = []
        for g in problem.groups:
            fits = [i for i, o in enumerate(g.options)
                    if all(x == p for layer, x in zip(g.layers, o.precisions) if layer not in edge_layers)]
            exact = [i for i in fits if all(x == p for x in g.options[i].precisions)]
            pool = exact or fits
            if not pool:
                break
            choice.append(min(pool, key=lambda i: g.options[i].latency_ms))
        if len(choice) != len(problem.groups):
            continue  # some layer cannot (or may not) run at p
        latency, sensitivity = problem.evaluate(choice)
        rows.append({"precision": p, "latency_ms": latency, "sensitivity": sensitivity,
                     "meets_budget": latency <= budget_ms, "layers": problem.layer_precisions(choice)})
    return rows


def plan(base, calib, *, target: str, budget_ms: float, quantized: Callable[[int], Any],
         bits: Sequence[int] | None = None, batch: int = 1, search: str = "ga", seed: int = 0,
         pins: Sequence[tuple[str, Any]] = (), first_last_bits: int = 8, settings: str = "",
         latency_table=None, sensitivity_samples: int = 64, progress=None,
         cost_options: Mapping[str, Any] | None = None,
         uniform_onnx: Callable[[Any], Any] | None = None,
         assignment_onnx: Callable[[Mapping[str, Any]], Any] | None = None,
         check_rounds: int = 2) -> MixedPrecisionPlan:
    """Plan the precision of every layer of ``base`` (float graph with regions) for
    ``budget_ms`` on ``target``; see the module doc. ``quantized(bits)`` returns a calibrated
    copy of ``base`` at ``bits`` (for the sensitivity measurement). ``uniform_onnx(precision)``
    returns the ONNX model with every layer at ``precision``: given it, measured cost tables are
    fitted to those models' end-to-end latencies (``cost_models.calibrate_end_to_end``).
    ``assignment_onnx(layers)`` returns the ONNX model of an assignment: given it as well, the
    chosen assignment is timed and the search tightened until it meets the budget as measured,
    for up to ``check_rounds`` timings (``check_measured``)."""
    from fxq import ops
    from fxq.cost_models import cost_tables
    from fxq.search import pareto_front, solve, solve_exact
    from fxq.sensitivity import measure_sensitivity

    if search not in SEARCHES:
        raise FxqError(f"Unknown --search '{search}'.", f"Use one of {', '.join(SEARCHES)}.")
    if not (isinstance(budget_ms, (int, float)) and math.isfinite(budget_ms) and budget_ms > 0):
        raise FxqError(f"--budget-ms must be a positive number of milliseconds; got {budget_ms}.",
                       "Pass e.g. --budget-ms 5.")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    tables = cost_tables(base, target, bits=bits, batch=batch, latency_table=latency_table,
                         progress=_cost_progress(progress), **dict(cost_options or {}))
    calibration = None
    if uniform_onnx is not None and tables.kind == "measured" and tables.act_type is not None:
        from fxq.cost_models import calibrate_end_to_end

        if progress is not None:
            task = progress.add_task("fitting the cost model to whole-model latencies", total=None)
        precisions_ = tables.precisions
        uniform_onnx = functools.cache(uniform_onnx)  # the budget check times the same models again
        tables, calibration = calibrate_end_to_end(tables, lambda: {p: uniform_onnx(p) for p in precisions_})
        if progress is not None:
            progress.remove_task(task)
    seconds["cost_model"] = round(time.perf_counter() - t0, 3)
    precisions = tuple(precision_order(tables.precisions))
    t0 = time.perf_counter()
    sens = measure_sensitivity(base, calib, precisions, quantized, settings=settings,
                               samples=sensitivity_samples, seed=seed, progress=progress)
    seconds["sensitivity"] = round(time.perf_counter() - t0, 3)

    layer_nodes = [n for n in base.graph.nodes if ops.is_layer(n)]
    qualnames = {n.name: ops.layer_name(n) for n in layer_nodes}
    edge_layers = {layer_nodes[0].name, layer_nodes[-1].name} if layer_nodes and first_last_bits else set()
    top_int = max(int(p) for p in precisions if not is_float(p))
    floor = min(first_last_bits, top_int) if first_last_bits else 0
    resolved = resolve_pins(pins, qualnames)
    bad = {qualnames[n]: p for n, p in resolved.items() if p not in precisions}
    if bad:
        raise FxqError(f"--pin asks for precision(s) the search does not offer: {bad}.",
                       f"Allowed here: {', '.join(map(str, precisions))} (target {target}, --bits).")
    problem = build_problem(tables, sens, edge_layers, floor, resolved)
    # The search optimises an additive latency (a mean cost per precision change); the tables
    # also price an assignment edge by edge (``predict_ms``), which is what the model will
    # measure. Budgets are judged by that prediction: the additive budget handed to the solver is
    # the largest one whose exact optimum the per-edge prediction still fits in.
    front = pareto_front(problem)
    predicted = [tables.predict_ms(p.layers) for p in front]
    fastest_ms = min(predicted)
    float_label = next((p for p in precisions if is_float(p)), None)
    uniform = _uniform_rows(problem, precisions, edge_layers, budget_ms)
    for row in uniform:
        row["search_latency_ms"] = row["latency_ms"]
        row["latency_ms"] = tables.predict_ms(row["layers"])
        row["meets_budget"] = row["latency_ms"] <= budget_ms
    float_ms = next((r["latency_ms"] for r in uniform if r["precision"] == float_label), None)
    common = dict(qualnames=qualnames, target=str(target), kind=tables.kind, batch=tables.batch,
                  budget_ms=float(budget_ms), search=search, precisions=precisions, front=front,
                  front_ms=predicted,
                  fastest_ms=fastest_ms, float_ms=float_ms, uniform=uniform, tables=tables, sens=sens,
                  problem=problem, cost_calibration=calibration)
    if float_ms is not None and budget_ms >= float_ms:
        assignment = {n.name: float_label for n in layer_nodes}
        return MixedPrecisionPlan(status="float", assignment=assignment, predicted_ms=float_ms,
                                  search_latency_ms=next(r["search_latency_ms"] for r in uniform
                                                         if r["precision"] == float_label),
                                  sensitivity=0.0, seconds=seconds,
                                  notes=[f"the budget {budget_ms:g} ms is at or above the float model's "
                                         f"predicted {float_ms:.4g} ms on {target}: the model stays float"],
                                  **common)
    fits = [p.latency_ms for p, q in zip(front, predicted) if q <= budget_ms]
    if not fits:
        raise FxqError(
            f"No precision assignment meets --budget-ms {budget_ms:g} on {target} at batch "
            f"{tables.batch}: the fastest achievable is {fastest_ms:.4g} ms ({tables.kind} "
            f"latency; allowed precisions {', '.join(map(str, precisions))}"
            + (", with the --pin constraints" if resolved else "") + ").",
            f"Raise --budget-ms to at least {fastest_ms:.4g}, allow lower precisions with "
            "--bits, or pin fewer layers.")
    search_budget = max(fits)
    t0 = time.perf_counter()
    solution = solve(problem, search_budget, method=search, seed=seed)
    seconds["search"] = round(time.perf_counter() - t0, 3)
    exact = solve_exact(problem, search_budget) if search == "ga" else None
    notes = [n for n in tables.notes if n.startswith("end-to-end calibration")] + \
        [n for n in tables.notes if not n.startswith("end-to-end calibration")][:20]
    if tables.predict_ms(solution.layers) > budget_ms and exact is not None:
        notes.insert(0, "the GA's answer fits the additive budget but not the per-edge prediction: "
                        "the exact optimum is used")
        solution = exact
    checks: list[dict] = []
    if calibration is not None and assignment_onnx is not None and check_rounds > 0:
        from fxq.cost_models import measure_against_uniform

        t0 = time.perf_counter()
        refs = [float_label, max((p for p in precisions if not is_float(p)), key=int)]

        def measure(layers):
            return measure_against_uniform(tables, assignment_onnx(layers), {p: uniform_onnx(p) for p in refs})

        def resolve(b):
            found = solve(problem, b, method=search, seed=seed)
            if tables.predict_ms(found.layers) > budget_ms and search == "ga":
                found = solve_exact(problem, b)
            return found

        if progress is not None:
            task = progress.add_task("timing the chosen assignment", total=None)
        solution, search_budget, checks, check_notes = check_measured(
            tables, front, predicted, budget_ms, solution, search_budget, resolve, measure, check_rounds)
        if progress is not None:
            progress.remove_task(task)
        notes[:0] = check_notes
        exact = solve_exact(problem, search_budget) if search == "ga" else None
        seconds["budget_check"] = round(time.perf_counter() - t0, 3)
    assignment = dict(solution.layers)
    return MixedPrecisionPlan(status="searched", assignment=assignment,
                              predicted_ms=tables.predict_ms(assignment),
                              search_latency_ms=solution.latency_ms, sensitivity=solution.sensitivity,
                              solution=solution, exact=exact, seconds=seconds, notes=notes,
                              search_budget_ms=search_budget, budget_checks=checks, **common)


def check_measured(tables, front, front_ms, budget_ms: float, solution, search_budget: float,
                   resolve: Callable[[float], Any], measure: Callable[[Mapping[str, Any]], dict],
                   rounds: int):
    """Time the chosen assignment; while it measures over the budget, tighten the search.

    ``measure(layers)`` returns ``corrected_ms`` (the candidate's measured latency on the
    tables' clock, ``cost_models.measure_against_uniform``). Over budget, the candidate's
    ``bias`` = corrected / predicted is applied to the whole front: the next search budget is
    the largest front point whose prediction times ``bias`` fits, and ``resolve(budget)``
    solves again. Why: the tables price each layer and each precision change alone, and a mixed
    model pays somewhat more than that sum (measured on Lite0, ResNet-18 and MobileNetV2: the
    mixed models ran 2-12 % slower than predicted relative to the uniform ones), so an
    assignment predicted right at the budget lands over it. When no faster front point fits at
    that bias, the fastest one is tried. Returns the solution, its search budget, one record per
    timing and notes; when every timing is over budget, the candidate that measured fastest is
    kept (``kept`` in its record), with a note."""
    checks: list[dict] = []
    tried = []  # the solution each check timed
    for round_ in range(1, rounds + 1):
        predicted = tables.predict_ms(solution.layers)
        m = measure(solution.layers)
        bias = m["corrected_ms"] / predicted if predicted > 0 else 1.0
        checks.append({"round": round_, "search_budget_ms": search_budget, "predicted_ms": predicted,
                       "bias": bias, **m})
        tried.append(solution)
        if m["corrected_ms"] <= budget_ms:
            note = (f"budget check: the chosen assignment measured {m['corrected_ms']:.4g} ms on the cost "
                    f"model's clock (predicted {predicted:.4g} ms)"
                    + (f", after {round_ - 1} tightening(s)" if round_ > 1 else ""))
            return solution, search_budget, checks, [note]
        faster = [(p.latency_ms, q) for p, q in zip(front, front_ms) if p.latency_ms < search_budget]
        if not faster or round_ == rounds:
            break
        fits = [lat for lat, q in faster if q * bias <= budget_ms]
        # Nothing fits at this bias: the fastest point has the fewest precision changes (all
        # int8 has none), which is where a mixed model's extra cost comes from, so its bias is
        # usually smaller; try it rather than give up.
        search_budget = max(fits) if fits else min(lat for lat, _ in faster)
        solution = resolve(search_budget)
    # Every candidate measured over: keep the one that measured fastest. The later ones are
    # predicted faster, but on a noisy machine a later timing can read slower than an earlier one.
    best = min(range(len(checks)), key=lambda i: checks[i]["corrected_ms"])
    checks[best]["kept"] = True
    return tried[best], checks[best]["search_budget_ms"], checks, [
        f"budget check: every candidate measured over the {budget_ms:g} ms budget on the cost model's "
        f"clock ({len(checks)} timing(s)"
        + (", no faster assignment on the front" if len(checks) < rounds else "")
        + f"); kept the fastest measured, {checks[best]['corrected_ms']:.4g} ms (round {best + 1})"]



def _cost_progress(progress):
    if progress is None:
        return None
    state: dict = {}

    def update(done: int, total: int, what: str) -> None:
        if "task" not in state:
            state["task"] = progress.add_task("pricing layers", total=total)
        progress.update(state["task"], completed=done, total=total, description=f"pricing {what}"[:60])
        if done >= total:
            progress.remove_task(state.pop("task"))

    return update


# ---------------------------------------------------------------------------------------------
# Outputs: search.json and the Pareto plot
# ---------------------------------------------------------------------------------------------

def plot_front(plan: MixedPrecisionPlan, path: Path, measured_ms: float | None = None) -> None:
    """Latency vs sensitivity: the Pareto front, the uniform precisions, the chosen point and
    the budget, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fxq.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    if plan.front:
        pts = sorted(zip(plan.front_ms, (p.sensitivity for p in plan.front)))
        ax.plot([a for a, _ in pts], [b for _, b in pts], color="tab:blue", marker=".", linewidth=1,
                label="Pareto front (mixed precision)")
    for row in plan.uniform:
        ax.scatter([row["latency_ms"]], [row["sensitivity"]], marker="s", color="tab:gray", zorder=3)
        ax.annotate(f"uniform {row['precision']}", (row["latency_ms"], row["sensitivity"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.scatter([plan.predicted_ms], [plan.sensitivity], marker="*", s=160, color="tab:red",
               zorder=4, label=f"chosen ({plan.search})")
    ax.axvline(plan.budget_ms, color="tab:red", linestyle="--", linewidth=1,
               label=f"budget {plan.budget_ms:g} ms")
    if measured_ms is not None:
        ax.axvline(measured_ms, color="tab:green", linestyle=":", linewidth=1,
                   label=f"measured {measured_ms:.3g} ms")
    positive = [p.sensitivity for p in plan.front if p.sensitivity > 0]
    if positive and max(positive) / min(positive) > 100:
        ax.set_yscale("symlog", linthresh=min(positive))
    ax.set_xlabel(f"latency (ms, batch {plan.batch}, {plan.target}: {plan.kind})")
    ax.set_ylabel("sensitivity (predicted KL increase, nats)")
    ax.set_title("fxq mixed precision: latency vs sensitivity")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
