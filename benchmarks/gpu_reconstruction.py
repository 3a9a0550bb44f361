"""Reconstruction wall time with the paper preset on a GPU (or the CPU), per region and in total.

    python benchmarks/gpu_reconstruction.py [--device cuda] [--models resnet18,lite0]
        [--setting W4A4] [--pilot-iters 200] [--quality lite0] [--budget-s 300] [--eval 500]
        [--quality-presets fast,paper,fast:2000] [--out bench-out/gpu]

The paper preset is 20,000 iterations per region at batch 32 on 1024 calibration samples: about
40 CPU-hours for EfficientNet-Lite0 on a 2-core machine, which is why fxq's default is ``fast``.
This script measures what it costs where the papers ran it, a GPU, in three steps:

1. **Pilot** (every model in ``--models``): ``fxq.pipeline.compile_model`` with ``--method brecq
   --preset paper --iters P`` on ``--device``. Each region's wall time is split into its training
   loop (``train_seconds``, P iterations) and the rest (caching its inputs, probing its loss); the
   paper-preset time of a region is projected as ``rest + train_seconds * 20000 / P``. Training
   steps cost the same whatever the iteration count (the batch size and region are fixed), so the
   projection is linear; the pilot's own totals are printed beside it.
2. **Quality** (models in ``--quality``, with real weights: ``lite0``): the same compile with as
   many iterations as fit in ``--budget-s`` by the pilot's per-iteration times (capped at 20,000),
   beside the ``fast`` preset on the same device (``--quality-presets``; ``fast:2000`` is the fast
   preset's batch, samples and rates at 2,000 iterations), all evaluated in ONNX Runtime on ``--eval``
   crops of the evaluation photos (top-1 agreement with the float model, mean KL).

Models: ``resnet18`` is torchvision's ResNet-18 with random weights (fixed seed; nothing is ever
downloaded), a ResNet-18-sized workload for timing only; ``lite0`` is EfficientNet-Lite0 with its
ImageNet weights. Calibration: ``photo_crops("calib", 1024, seed=0)``. Results go to
``OUT/results.json`` and ``OUT/gpu_reconstruction.md`` after every step, so a run stopped at a
time limit keeps what it finished. Run the CPU side with ``--device cpu --pilot-iters 10
--quality ''`` for the figures to put beside it.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see benchmarks/quality.py)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from fxq.options import CompileOptions  # noqa: E402
from fxq.pipeline import compile_model  # noqa: E402
from fxq.reconstruct import PRESETS  # noqa: E402

PAPER_ITERS = PRESETS["paper"].iters


def build(name: str):
    if name == "resnet18":
        import torchvision

        torch.manual_seed(0)
        return torchvision.models.resnet18(weights=None).eval(), (torch.zeros(1, 3, 224, 224),)
    if name == "lite0":
        from fxq.examples.efficientnet_lite0 import INPUT_SHAPE, efficientnet_lite0

        return efficientnet_lite0(pretrained=True), (torch.zeros(INPUT_SHAPE),)
    raise SystemExit(f"unknown model {name!r} (known: resnet18, lite0)")


def setting_bits(text: str) -> tuple[int, int]:
    w, a = text.upper().lstrip("W").split("A")
    return int(w), int(a)


def compile_once(name, calib, setting, device, out, preset="paper", iters=None) -> dict:
    module, example = build(name)
    wb, ab = setting_bits(setting)
    opts = CompileOptions(out_dir=out, method="brecq", preset=preset, iters=iters, weight_bits=wb,
                          act_bits=ab, device=device, holdout=0)
    t0 = time.perf_counter()
    report = compile_model((module, example), calib, opts)
    report["wall_s"] = time.perf_counter() - t0
    return report


def project(report: dict, iters: int, target: int = PAPER_ITERS) -> dict:
    rows, total_now, total_proj = [], 0.0, 0.0
    for r in report["regions"]:
        if r.get("seconds") is None:
            continue
        rest = r["seconds"] - r["train_seconds"]
        proj = rest + r["train_seconds"] * target / iters
        rows.append({"region": r["name"], "layers": len(r.get("layers") or []), "seconds": r["seconds"],
                     "train_seconds": r["train_seconds"], "ms_per_iter": 1e3 * r["train_seconds"] / iters,
                     "projected_s": proj})
        total_now += r["seconds"]
        total_proj += proj
    return {"regions": rows, "iters": iters, "reconstruct_s": report["timings_s"].get("reconstruct"),
            "regions_s": total_now, "projected_regions_s": total_proj,
            "projected_reconstruct_s": report["timings_s"].get("reconstruct", 0.0) - total_now + total_proj,
            "compile_s": report["wall_s"]}


def evaluate(out: Path, n_eval: int, threads: int) -> dict:
    from fxq.calibrate import run_batched
    from fxq.capture import capture
    from fxq.examples.photos import photo_crops
    from fxq.pipeline import fidelity, run_onnx

    key = ("lite0", n_eval)
    if key not in _FLOAT:
        module, example = build("lite0")
        x = photo_crops("eval", n_eval, seed=1)
        _FLOAT[key] = (x, run_batched(capture(module, example), x))
    x, ref = _FLOAT[key]
    logits = run_onnx((out / "model.onnx").read_bytes(), x, 1, threads=threads)
    f = fidelity(ref, logits)
    return {"top1_agreement": f["top1_agreement"], "mean_kl": f["mean_kl"], "eval": n_eval}


_FLOAT: dict = {}


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def markdown(res: dict) -> str:
    lines = [f"# Reconstruction wall time, paper preset ({res['setting']}, {res['calib']} calibration samples)",
             "", f"Device: {res['device']}; torch {res['torch']}.", ""]
    for name, p in res["pilot"].items():
        lines += [f"## {name}: pilot at {p['iters']} iterations per region, projected to {PAPER_ITERS}", "",
                  "| region | layers | ms / iteration | pilot s | projected s |", "|---|---|---|---|---|"]
        lines += [f"| {r['region']} | {r['layers']} | {r['ms_per_iter']:.2f} | {r['seconds']:.1f} | "
                  f"{r['projected_s']:.0f} |" for r in p["regions"]]
        lines += [f"| **total** | | | {p['regions_s']:.1f} | **{p['projected_regions_s']:.0f}** "
                  f"({p['projected_regions_s'] / 3600:.2f} h) |", "",
                  f"Whole reconstruct stage (caching included): {p['reconstruct_s']:.1f} s in the pilot, "
                  f"projected {p['projected_reconstruct_s']:.0f} s at {PAPER_ITERS} iterations.", ""]
    if res["quality"]:
        lines += ["## Quality (ONNX Runtime, evaluation crops)", "",
                  "| run | iterations | batch | samples | reconstruct s | top-1 agreement | mean KL |",
                  "|---|---|---|---|---|---|---|"]
        for q in res["quality"]:
            lines.append(f"| {q['model']} {q['preset']} | {q['iters']} | {q['batch_size']} | {q['samples']} | "
                         f"{q['reconstruct_s']:.0f} | {q['top1_agreement']:.1%} | {q['mean_kl']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", default="resnet18,lite0")
    ap.add_argument("--setting", default="W4A4")
    ap.add_argument("--calib", type=int, default=PRESETS["paper"].samples)
    ap.add_argument("--pilot-iters", type=int, default=200)
    ap.add_argument("--quality", default="lite0", help="models to also compile for quality ('' for none)")
    ap.add_argument("--budget-s", type=float, default=300.0,
                    help="seconds of training the quality run may take (sets its iterations)")
    ap.add_argument("--quality-iters", type=int, help="iterations of the quality run (default: from --budget-s)")
    ap.add_argument("--quality-presets", default="fast,paper",
                    help="quality runs: comma-separated presets, each optionally PRESET:ITERS (fast:2000); "
                         "a bare 'paper' gets the iterations from --budget-s or --quality-iters")
    ap.add_argument("--eval", type=int, default=500)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="ONNX Runtime threads for evaluation")
    ap.add_argument("--out", default="bench-out/gpu")
    args = ap.parse_args(argv)

    from fxq.devices import resolve_device
    from fxq.examples.photos import photo_crops

    device = str(resolve_device(args.device))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    calib = photo_crops("calib", args.calib, seed=0)
    res = {"device": device_name(device), "torch": torch.__version__, "setting": args.setting,
           "calib": args.calib, "pilot": {}, "quality": []}

    def save():
        (out / "results.json").write_text(json.dumps(res, indent=2))
        (out / "gpu_reconstruction.md").write_text(markdown(res))

    for name in [m for m in args.models.split(",") if m]:
        print(f"[pilot] {name} {args.setting} paper preset, {args.pilot_iters} iterations/region on {device}", flush=True)
        rep = compile_once(name, calib, args.setting, device, out / f"{name}-pilot", iters=args.pilot_iters)
        res["pilot"][name] = p = project(rep, args.pilot_iters)
        print(f"  {len(p['regions'])} regions, {p['regions_s']:.1f} s; projected at {PAPER_ITERS}: "
              f"{p['projected_regions_s']:.0f} s", flush=True)
        save()

    for name in [m for m in args.quality.split(",") if m]:
        p = res["pilot"].get(name)
        if args.quality_iters is not None:
            iters = args.quality_iters
        elif p is None:
            raise SystemExit(f"--quality {name}: run its pilot too (--models), or give --quality-iters")
        else:
            per_iter = sum(r["train_seconds"] for r in p["regions"]) / p["iters"]
            iters = int(min(PAPER_ITERS, max(p["iters"], args.budget_s / per_iter // 100 * 100)))
        for spec in [k for k in args.quality_presets.split(",") if k]:
            preset, _, given = spec.partition(":")
            n = int(given) if given else (iters if preset == "paper" else None)
            label = f"{name}-{preset}" + (f"-{given}" if given else "")
            print(f"[quality] {label}: {n if n is not None else PRESETS[preset].iters} iterations/region", flush=True)
            rep = compile_once(name, calib, args.setting, device, out / label, preset=preset, iters=n)
            cfg = rep["reconstruction"]
            row = {"model": name, "preset": preset, "iters": cfg["iters"], "batch_size": cfg["batch_size"],
                   "samples": cfg["samples"], "reconstruct_s": rep["timings_s"].get("reconstruct", 0.0)}
            row.update(evaluate(out / label, args.eval, args.threads))
            res["quality"].append(row)
            print(f"  top-1 agreement {row['top1_agreement']:.1%}, mean KL {row['mean_kl']:.3f}, "
                  f"reconstruct {row['reconstruct_s']:.0f} s", flush=True)
            save()
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
