"""Latency-budgeted mixed precision, side by side with uniform precision.

    .venv/bin/python benchmarks/mixed_precision.py                    # all parts (~15 min on 2 cores)
    .venv/bin/python benchmarks/mixed_precision.py --parts lite0      # ort-cpu only

Parts:

* ``lite0`` -- EfficientNet-Lite0 (ImageNet weights) on ``ort-cpu``, the cost model measured on
  this machine. Three budgets between the fastest assignment and the float model's latency
  (fractions ``--fractions`` of that range); each is compiled with ``fxq compile --budget-ms``
  (rtn) beside uniform float and uniform W8A8. All emitted models are then timed together,
  interleaved (one share of the runs per model per round, rotating order, sessions that do not
  spin-wait), and scored on evaluation crops of photos never used for calibration: top-1
  agreement with the float model and mean KL(float || quantized), in ONNX Runtime.
* ``bitserial`` -- torchvision ResNet-18 and MobileNetV2 on the ``bitserial`` accelerator model
  (2/4/8-bit weights, 8-bit activations, first and last layer at 8): uniform 8/4/2 and mixed
  precision at three budgets between uniform 2 and uniform 8. There are no ImageNet weights for
  these two in the packages fxq may use, so they carry seeded random weights (BatchNorm statistics
  re-estimated on the calibration crops and the classifier scaled to logits of std 4, so they
  behave like trained networks numerically) and the accuracy proxy is agreement with their own
  float model (top-1 and KL) on photo crops, fake-quantized in PyTorch (rtn). Latencies are the
  model's, not measured.
* ``costerror`` -- the ort-cpu cost model against the measured latency of the emitted float,
  W8A8 and mixed (middle of the range) models of ResNet-18 and MobileNetV2 (and Lite0's rows of
  part 1): the sum of the segments timed alone, and the tables after their end-to-end fit on the
  uniform float and int8 models (``cost_models.calibrate_end_to_end``), which the search uses.
* ``search`` -- the GA against the exact dynamic program on the Lite0 (ort-cpu) and ResNet-18
  (bitserial) problems: objective gap and run time over budgets across the range and GA seeds.

Writes ``docs/mixed_precision_results.md`` (``--out``) and the raw numbers beside it as JSON.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _fmt(x, spec=".3g"):
    return "—" if x is None else format(x, spec)


def _counts(layers: dict) -> str:
    out: dict = {}
    for p in layers.values():
        out[str(p)] = out.get(str(p), 0) + 1
    return ", ".join(f"{n}×{p}" for p, n in sorted(out.items(), key=lambda kv: kv[0]))


def _score(reference: torch.Tensor, logits: torch.Tensor) -> dict:
    from fxq.pipeline import fidelity

    f = fidelity(reference, logits)
    return {"top1_agreement": f["top1_agreement"], "mean_kl": max(f["mean_kl"], 0.0)}


# ---------------------------------------------------------------------------------------------
# Part 1: Lite0 on ort-cpu
# ---------------------------------------------------------------------------------------------

def part_lite0(args, log) -> dict:
    from fxq.backends.lower_qdq import lower_qdq
    from fxq.capture import capture
    from fxq.examples.efficientnet_lite0 import INPUT_SHAPE, efficientnet_lite0
    from fxq.examples.photos import photo_crops
    from fxq.options import CompileOptions
    from fxq.ort_timing import timing_report
    from fxq.pipeline import compile_model, plan_mixed_precision, run_onnx

    model = efficientnet_lite0(pretrained=True).eval()
    example = (torch.zeros(INPUT_SHAPE),)
    calib = photo_crops("calib", args.n_calib, seed=0)
    evalx = photo_crops("eval", args.n_eval, seed=1)
    gm = capture(model, example)
    float_onnx = lower_qdq(copy.deepcopy(gm), quantized=False).SerializeToString()
    float_logits = run_onnx(float_onnx, evalx, 1)

    t0 = time.perf_counter()
    # a budget above everything: the plan prices the model and measures the sensitivities
    probe = plan_mixed_precision(gm, calib, CompileOptions(budget_ms=1e9, target="ort-cpu"))
    log(f"lite0: cost tables + sensitivity {time.perf_counter() - t0:.0f} s; fastest "
        f"{probe.fastest_ms:.2f} ms, float {probe.float_ms:.2f} ms (predicted)")
    lo, hi = probe.fastest_ms, probe.float_ms
    budgets = [round(lo + f * (hi - lo), 2) for f in args.fractions]

    variants: dict[str, dict] = {"float": {"onnx": float_onnx, "budget_ms": None, "layers": None}}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        rep = compile_model((model, example), calib, CompileOptions(out_dir=Path(tmp) / "w8a8"))
        variants["uniform W8A8"] = {"onnx": (Path(tmp) / "w8a8" / "model.onnx").read_bytes(),
                                    "budget_ms": None, "compile_s": time.perf_counter() - t0,
                                    "predicted_ms": probe.tables.predict_ms(8),
                                    "parts_ms": probe.cost_calibration["models"]["8"]["predicted_ms_before"],
                                    "sensitivity": next(r["sensitivity"] for r in probe.uniform if r["precision"] == 8)}
        variants["float"].update(predicted_ms=probe.tables.predict_ms("float"), sensitivity=0.0,
                                 parts_ms=probe.cost_calibration["models"]["float"]["predicted_ms_before"])
        for b in budgets:
            out = Path(tmp) / f"mixed-{b}"
            t0 = time.perf_counter()
            rep = compile_model((model, example), calib, CompileOptions(out_dir=out, budget_ms=b, target="ort-cpu",
                                                                         search=args.search))
            mp = rep["mixed_precision"]
            variants[f"mixed @ {b:g} ms"] = {
                "onnx": (out / "model.onnx").read_bytes(), "budget_ms": b, "compile_s": time.perf_counter() - t0,
                "predicted_ms": mp["predicted_ms"], "search_latency_ms": mp["search_latency_ms"],
                "sensitivity": mp["sensitivity"], "counts": mp["counts"],
                "end_to_end_ms": (mp.get("end_to_end") or {}).get("measured_ms"),
                "budget_checks": [{k: c[k] for k in ("round", "predicted_ms", "measured_ms", "corrected_ms", "drift",
                                                     "kept") if k in c}
                                  for c in mp.get("budget_checks") or []],
                "exact_gap_pct": (mp.get("exact_check") or {}).get("gap_pct")}
            log(f"lite0 mixed @ {b} ms: {mp['counts']}, predicted {mp['predicted_ms']:.2f} ms, "
                f"compile {variants[f'mixed @ {b:g} ms']['compile_s']:.0f} s")
    x = evalx[:1].numpy()
    timing = timing_report({k: v["onnx"] for k, v in variants.items()}, x, threads=2, warmup=10,
                           runs=args.runs, rounds=max(1, args.runs // 10), spinning=False)
    rows = []
    for name, v in variants.items():
        q = _score(float_logits, run_onnx(v["onnx"], evalx, 1)) if name != "float" else \
            {"top1_agreement": 1.0, "mean_kl": 0.0}
        rows.append({"variant": name, "budget_ms": v["budget_ms"], "predicted_ms": v.get("predicted_ms"),
                     "parts_ms": v.get("parts_ms"),
                     "search_latency_ms": v.get("search_latency_ms"), "measured_ms": timing[name]["median_ms"],
                     "p10_ms": timing[name]["p10_ms"], "p90_ms": timing[name]["p90_ms"],
                     "sensitivity": v.get("sensitivity"), "counts": v.get("counts"),
                     "end_to_end_ms": v.get("end_to_end_ms"), "compile_s": v.get("compile_s"),
                     "exact_gap_pct": v.get("exact_gap_pct"), "budget_checks": v.get("budget_checks"), **q})
    # The machine's speed on this timing run against the fit's (the uniform models' predicted /
    # measured): a row's measured latency times it is on the cost model's clock.
    uniform_rows = [r for r in rows if r["budget_ms"] is None]
    drift = sum(r["predicted_ms"] for r in uniform_rows) / sum(r["measured_ms"] for r in uniform_rows)
    for r in rows:
        r["fit_clock_ms"] = r["measured_ms"] * drift
    for r in rows:  # the checks, per budget
        if r["budget_ms"] is None:
            continue
        r["within_budget_5pct_fit_clock"] = r["fit_clock_ms"] <= r["budget_ms"] * 1.05
        fits = [u for u in rows if u["budget_ms"] is None and u["measured_ms"] <= r["budget_ms"] * 1.05]
        best = max(fits, key=lambda u: u["top1_agreement"]) if fits else None
        r["within_budget_5pct"] = r["measured_ms"] <= r["budget_ms"] * 1.05
        r["best_uniform_in_budget"] = best["variant"] if best else None
        r["beats_best_uniform"] = best is None or r["top1_agreement"] >= best["top1_agreement"]
    return {"fastest_ms": lo, "float_ms": hi, "budgets": budgets, "rows": rows,
            "sensitivity_s": probe.sens.seconds, "n_calib": args.n_calib, "n_eval": args.n_eval,
            "runs": args.runs, "problem": probe.problem, "drift": drift}


# ---------------------------------------------------------------------------------------------
# Part 2: bitserial
# ---------------------------------------------------------------------------------------------

def _torchvision(name: str, data: torch.Tensor | None = None):
    """A torchvision classifier with seeded random weights. With ``data``, made to behave like a
    trained network on it: BatchNorm statistics re-estimated on ``data`` (random init leaves
    MobileNetV2's logits at 1e-9) and the classifier scaled to logits of standard deviation 4,
    so agreement and KL with the float model measure something."""
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    if data is None:
        return model.eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for chunk in data.split(16):
            model(chunk)
    model.eval()
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        std = float(model(data[:32]).std())
        last.weight.mul_(4.0 / max(std, 1e-12))
        last.bias.mul_(4.0 / max(std, 1e-12))
    return model


def _bitserial_calib(n: int) -> torch.Tensor:
    from fxq.examples.photos import photo_crops

    return photo_crops("calib", n, seed=0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _bitserial_probe(name: str, args):
    from fxq.capture import capture
    from fxq.options import CompileOptions
    from fxq.pipeline import plan_mixed_precision

    calib = _bitserial_calib(args.n_calib)
    gm = capture(_torchvision(name, calib), (torch.zeros(1, 3, 224, 224),))
    return plan_mixed_precision(gm, calib, CompileOptions(budget_ms=1e9, target="bitserial"))


def part_bitserial(args, log) -> dict:
    from fxq.calibrate import run_batched
    from fxq.capture import capture
    from fxq.examples.photos import photo_crops
    from fxq.options import CompileOptions
    from fxq.pipeline import plan_mixed_precision, quantize_graph

    calib = _bitserial_calib(args.n_calib)
    evalx = photo_crops("eval", args.n_eval_bitserial, seed=1, mean=(0.485, 0.456, 0.406),
                        std=(0.229, 0.224, 0.225))
    out = {}
    for name in ("resnet18", "mobilenet_v2"):
        model = _torchvision(name, calib)
        gm = capture(model, (torch.zeros(1, 3, 224, 224),))
        ref = run_batched(copy.deepcopy(gm), evalx)
        t0 = time.perf_counter()
        probe = plan_mixed_precision(gm, calib, CompileOptions(budget_ms=1e9, target="bitserial"))
        log(f"{name}: bitserial tables + sensitivity {time.perf_counter() - t0:.0f} s")
        uni = {r["precision"]: r for r in probe.uniform}
        lo, hi = uni[2]["latency_ms"], uni[8]["latency_ms"]
        budgets = [lo + f * (hi - lo) for f in args.fractions]
        configs = [(f"uniform W{p}A8", None, r["layers"], r["latency_ms"], r["sensitivity"])
                   for p, r in sorted(uni.items(), reverse=True)]
        for b in budgets:
            plan = plan_mixed_precision(gm, calib, CompileOptions(budget_ms=b, target="bitserial", search=args.search))
            configs.append((f"mixed @ {b:.3g} ms", b, plan.assignment, plan.search_latency_ms, plan.sensitivity))
        rows = []
        for label, budget, layers, latency, sens in configs:
            q, _ = quantize_graph(copy.deepcopy(gm), calib, CompileOptions(layer_precision=dict(layers)))
            rows.append({"variant": label, "budget_ms": budget, "latency_ms": latency, "sensitivity": sens,
                         "counts": _counts(layers), **_score(ref, run_batched(q, evalx))})
            log(f"{name} {label}: {rows[-1]['top1_agreement']:.3f} / {rows[-1]['mean_kl']:.4f}")
        out[name] = {"rows": rows, "problem": probe.problem}
    return out


# ---------------------------------------------------------------------------------------------
# Part 2b: ort-cpu cost-model error per model
# ---------------------------------------------------------------------------------------------

def part_costerror(args, log, lite0_rows=None) -> dict:
    """Predicted vs measured end-to-end latency on ort-cpu of ResNet-18 and MobileNetV2 (random
    weights): float, W8A8 and a mixed model at the middle of the range, timed interleaved.
    ``parts`` is the sum of the segments timed alone (before the end-to-end fit), ``predicted``
    the fitted tables the search used (fitted on the uniform float and int8 models, so the
    mixed row is the out-of-sample check); Lite0's rows come from part 1."""
    from fxq.backends.lower_qdq import lower_qdq
    from fxq.capture import capture
    from fxq.examples.photos import photo_crops
    from fxq.options import CompileOptions
    from fxq.ort_timing import timing_report
    from fxq.pipeline import compile_model, plan_mixed_precision

    calib = photo_crops("calib", 32, seed=0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    out = {}
    if lite0_rows:
        out["lite0"] = [{k: r.get(k) for k in ("variant", "parts_ms", "predicted_ms", "measured_ms")}
                        for r in lite0_rows if r.get("predicted_ms")]
    for name in ("resnet18", "mobilenet_v2"):
        model = _torchvision(name)
        example = (torch.zeros(1, 3, 224, 224),)
        gm = capture(model, example)
        probe = plan_mixed_precision(gm, calib, CompileOptions(budget_ms=1e9, target="ort-cpu"))
        fit = probe.cost_calibration["models"]
        mid = round((probe.fastest_ms + probe.float_ms) / 2, 2)
        with tempfile.TemporaryDirectory() as tmp:
            compile_model((model, example), calib, CompileOptions(out_dir=Path(tmp) / "w8", holdout=0))
            int8 = (Path(tmp) / "w8" / "model.onnx").read_bytes()
            rep = compile_model((model, example), calib, CompileOptions(out_dir=Path(tmp) / "mx", holdout=0,
                                                                        budget_ms=mid, target="ort-cpu"))
            mixed = (Path(tmp) / "mx" / "model.onnx").read_bytes()
        mp = rep["mixed_precision"]
        models = {"float": lower_qdq(copy.deepcopy(gm), quantized=False).SerializeToString(),
                  "uniform W8A8": int8, f"mixed @ {mid:g} ms": mixed}
        timing = timing_report(models, calib[:1].numpy(), threads=2, warmup=10, runs=args.runs,
                               rounds=max(1, args.runs // 10), spinning=False)
        out[name] = [{"variant": "float", "parts_ms": fit["float"]["predicted_ms_before"],
                      "predicted_ms": probe.tables.predict_ms("float"), "measured_ms": timing["float"]["median_ms"]},
                     {"variant": "uniform W8A8", "parts_ms": fit["8"]["predicted_ms_before"],
                      "predicted_ms": probe.tables.predict_ms(8), "measured_ms": timing["uniform W8A8"]["median_ms"]},
                     {"variant": f"mixed @ {mid:g} ms ({', '.join(f'{n}×{p}' for p, n in mp['counts'].items())})",
                      "parts_ms": None, "predicted_ms": mp["predicted_ms"],
                      "measured_ms": timing[f"mixed @ {mid:g} ms"]["median_ms"]}]
        log(f"costerror {name}: {out[name]}")
    return out


# ---------------------------------------------------------------------------------------------
# Part 3: GA vs exact
# ---------------------------------------------------------------------------------------------

def part_search(problems: dict, args, log) -> dict:
    from fxq.search import solve_exact, solve_ga

    out = {}
    for name, problem in problems.items():
        lo, _ = problem.fastest()
        lo = problem.evaluate(lo)[0]
        hi = problem.evaluate(problem.least_sensitive())[0]
        gaps, ga_s, ex_s = [], [], []
        for f in np.linspace(0.05, 0.95, args.search_budgets):
            budget = lo + f * (hi - lo)
            exact = solve_exact(problem, budget)
            ex_s.append(exact.seconds)
            for seed in range(args.ga_seeds):
                ga = solve_ga(problem, budget, seed=seed)
                ga_s.append(ga.seconds)
                gaps.append(0.0 if exact.sensitivity <= 0 else 100 * (ga.sensitivity - exact.sensitivity) / exact.sensitivity)
        out[name] = {"groups": len(problem.groups), "layers": len(problem.layers), "runs": len(gaps),
                     "gap_pct_median": statistics.median(gaps), "gap_pct_max": max(gaps),
                     "exact_optimum_found": sum(g <= 1e-9 for g in gaps),
                     "ga_seconds_median": statistics.median(ga_s), "exact_seconds_median": statistics.median(ex_s)}
        log(f"search {name}: {out[name]}")
    return out


# ---------------------------------------------------------------------------------------------

def markdown(res: dict, command: str) -> str:
    lines = ["# Mixed precision: results", "",
             f"Produced by {command} on {res['machine']} ({res['date']}). The method is in "
             "[mixed_precision.md](mixed_precision.md).", ""]
    if "lite0" in res:
        l0 = res["lite0"]
        lines += ["## EfficientNet-Lite0 on ort-cpu (measured cost model)", "",
                  f"Fastest assignment {l0['fastest_ms']:.2f} ms, float {l0['float_ms']:.2f} ms (cost model, batch 1, "
                  f"2 threads). Budgets at {', '.join(f'{b:g}' for b in l0['budgets'])} ms. Quality: ONNX Runtime on "
                  f"{l0['n_eval']} evaluation crops (photos disjoint from the {l0['n_calib']} calibration crops). "
                  f"Measured: median of {l0['runs']} interleaved runs of all models together. All compiles use rtn. "
                  + (f"*Fit's clock*: the measured median times this run's drift "
                     f"(x{l0['drift']:.3f} = the uniform models' predicted / measured total), i.e. the latency "
                     f"at the machine speed of the cost model's fit, which is what a budget can be held to "
                     f"on a machine whose speed drifts. *Budget check*: the compile's own timings of the "
                     f"chosen assignment on the fit's clock, one per round (`--budget-check-rounds`); "
                     f"*(kept)*: every round was over budget and this candidate measured fastest."
                     if "drift" in l0 else ""), "",
                  "| variant | budget | predicted | measured (p10–p90) | fit's clock | ≤ budget +5 % (measured / fit's clock) | "
                  "budget check | top-1 agreement | mean KL | predicted KL | layers | best uniform in budget | ≥ it |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

        def yes(flag):
            return "—" if flag is None else ("yes" if flag else "NO")
        for r in l0["rows"]:
            checks = " → ".join(f"{c['corrected_ms']:.2f}" + (" (kept)" if c.get("kept") else "")
                                for c in r.get("budget_checks") or []) or "—"
            lines.append(
                f"| {r['variant']} | {_fmt(r['budget_ms'], 'g')} | {_fmt(r['predicted_ms'], '.2f')} | "
                f"{r['measured_ms']:.2f} ({r['p10_ms']:.2f}–{r['p90_ms']:.2f}) | {_fmt(r.get('fit_clock_ms'), '.2f')} | "
                f"{'—' if r['budget_ms'] is None else yes(r['within_budget_5pct']) + ' / ' + yes(r.get('within_budget_5pct_fit_clock'))} | "
                f"{checks} | "
                f"{r['top1_agreement']:.1%} | {r['mean_kl']:.4f} | {_fmt(r['sensitivity'], '.2e')} | "
                f"{_fmt(r['counts'] and ', '.join(f'{n}×{p}' for p, n in r['counts'].items()), 's')} | "
                f"{r.get('best_uniform_in_budget') or '—'} | "
                f"{'—' if r['budget_ms'] is None else ('yes' if r['beats_best_uniform'] else 'NO')} |")
        lines += ["", "Cost-model error (predicted vs measured, same table): " + ", ".join(
            f"{r['variant']} {100 * (r['predicted_ms'] - r['measured_ms']) / r['measured_ms']:+.1f} %"
            for r in l0["rows"] if r.get("predicted_ms")), ""]
    for name in ("resnet18", "mobilenet_v2"):
        if name not in res.get("bitserial", {}):
            continue
        lines += [f"## {name} on bitserial (accelerator model; random weights with re-estimated BatchNorm, "
                  "agreement with own float model on evaluation crops)", "",
                  "| variant | budget (ms) | latency (ms, model) | predicted KL | top-1 agreement | mean KL | layers |",
                  "|---|---|---|---|---|---|---|"]
        for r in res["bitserial"][name]["rows"]:
            lines.append(f"| {r['variant']} | {_fmt(r['budget_ms'], '.3g')} | {r['latency_ms']:.3g} | "
                         f"{r['sensitivity']:.2e} | {r['top1_agreement']:.1%} | {r['mean_kl']:.4f} | {r['counts']} |")
        lines.append("")
    if "costerror" in res:
        lines += ["## ort-cpu cost model: predicted vs measured end to end", "",
                  "*Parts*: the sum of the segments timed alone (before the fit). *Predicted*: the per-edge "
                  "prediction (`CostTables.predict_ms`) of the tables the search used, fitted to the whole "
                  "uniform float and int8 models (`cost_models.calibrate_end_to_end`, its own timing run), so "
                  "the mixed rows are the out-of-sample check. *Measured*: the interleaved median of the "
                  "emitted ONNX models in a later timing run (batch 1, 2 threads; ResNet-18 and MobileNetV2 "
                  "with random weights, rtn).", "",
                  "| model | variant | parts (ms) | error | predicted (ms) | measured (ms) | error |",
                  "|---|---|---|---|---|---|---|"]

        def err(pred, meas):
            return "—" if pred is None else f"{100 * (pred - meas) / meas:+.1f} %"
        for name, rows in res["costerror"].items():
            for r in rows:
                lines.append(f"| {name} | {r['variant']} | {_fmt(r.get('parts_ms'), '.2f')} | "
                             f"{err(r.get('parts_ms'), r['measured_ms'])} | {r['predicted_ms']:.2f} | "
                             f"{r['measured_ms']:.2f} | {err(r['predicted_ms'], r['measured_ms'])} |")
        lines.append("")
    if "search" in res:
        lines += ["## GA vs exact", "",
                  "| problem | groups | layers | runs | GA = exact optimum | median gap | max gap | GA time (median) | exact time (median) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, s in res["search"].items():
            lines.append(f"| {name} | {s['groups']} | {s['layers']} | {s['runs']} | {s['exact_optimum_found']}/{s['runs']} | "
                         f"{s['gap_pct_median']:.3f} % | {s['gap_pct_max']:.3f} % | {s['ga_seconds_median']:.2f} s | "
                         f"{s['exact_seconds_median'] * 1e3:.1f} ms |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="lite0,costerror,bitserial,search")
    p.add_argument("--fractions", default="0.2,0.5,0.8",
                   help="budgets as fractions of the range fastest..float (lite0) or W2..W8 (bitserial)")
    p.add_argument("--n-calib", type=int, default=128)
    p.add_argument("--n-eval", type=int, default=1000)
    p.add_argument("--n-eval-bitserial", type=int, default=256)
    p.add_argument("--runs", type=int, default=200, help="timed runs per Lite0 model")
    p.add_argument("--search", default="ga", choices=("ga", "exact"))
    p.add_argument("--search-budgets", type=int, default=10)
    p.add_argument("--ga-seeds", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "docs" / "mixed_precision_results.md"))
    p.add_argument("--keep", action="store_true",
                   help="keep the parts not run now from the JSON beside --out (its commands are listed)")
    args = p.parse_args(argv)
    args.fractions = [float(f) for f in args.fractions.split(",")]
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    torch.set_num_threads(2)
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {msg}", flush=True)

    out = Path(args.out)
    command = "python benchmarks/mixed_precision.py" + (f" {' '.join(argv or sys.argv[1:])}" if (argv or sys.argv[1:]) else "")
    res = {}
    if args.keep and out.with_suffix(".json").is_file():
        res = json.loads(out.with_suffix(".json").read_text())
        for part in parts:
            res.pop(part, None)
    res.update({"machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}",
                "date": time.strftime("%Y-%m-%d")})
    # which command last produced each part (a --keep run replaces only the parts it ran)
    res.pop("commands", None)
    res["part_commands"] = {**res.get("part_commands", {}), **{part: command for part in parts}}
    problems = {}
    if "lite0" in parts:
        res["lite0"] = part_lite0(args, log)
        problems["lite0 (ort-cpu)"] = res["lite0"].pop("problem")
    if "costerror" in parts:
        res["costerror"] = part_costerror(args, log, res.get("lite0", {}).get("rows"))
    if "bitserial" in parts:
        res["bitserial"] = part_bitserial(args, log)
        for name, r in res["bitserial"].items():
            problems[f"{name} (bitserial)"] = r.pop("problem")
    if "search" in parts:
        if "resnet18 (bitserial)" not in problems:  # the sensitivity is cached after one run
            problems["resnet18 (bitserial)"] = _bitserial_probe("resnet18", args).problem
        res["search"] = part_search(problems, args, log)
    text = markdown(res, " and ".join(f"`{c}`" for c in dict.fromkeys(res["part_commands"].values())))
    out.write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(res, indent=2, default=str))
    print(text)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
