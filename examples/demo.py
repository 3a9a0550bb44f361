"""`make demo`: EfficientNet-Lite0 (real ImageNet weights) compiled by fxq at W8A8 (round to
nearest) and at W4A8 (BRECQ block reconstruction, fast preset), side by side.

Calibrates on crops of scikit-image photos, evaluates on crops of *other* photos, and prints the
passes' op-count summaries, the fidelity of the ONNX model in ONNX Runtime against the float
model, and ONNX Runtime latency float vs quantized. Everything ships with pip packages.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; see fxq/cli.py
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table


def evaluate(onnx_path: Path, float_logits: torch.Tensor, crops: torch.Tensor) -> dict:
    from fxq.pipeline import fidelity, run_onnx

    logits = run_onnx(onnx_path.read_bytes(), crops, batch=1)
    fid = fidelity(float_logits, logits)
    top5 = logits.topk(5, dim=1).indices
    fid["float_top1_in_top5"] = float((top5 == float_logits.argmax(1, keepdim=True)).any(1).float().mean())
    return fid


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="fxq-out/demo")
    ap.add_argument("--calib", type=int, default=256, help="calibration crops")
    ap.add_argument("--eval", type=int, default=500, help="evaluation crops (photos disjoint from calibration)")
    ap.add_argument("--iters", type=int, default=None,
                    help="reconstruction steps per region for the W4A8 run (default: the fast preset's)")
    args = ap.parse_args(argv)
    console = Console(stderr=False)

    from fxq.examples.efficientnet_lite0 import INPUT_SHAPE, efficientnet_lite0
    from fxq.examples.photos import photo_crops, photo_names
    from fxq.options import CompileOptions
    from fxq.pipeline import compile_model

    console.rule("[bold]fxq demo: EfficientNet-Lite0 — W8A8 round-to-nearest beside W4A8 BRECQ")
    model = efficientnet_lite0(pretrained=True)
    calib = photo_crops("calib", args.calib, seed=0)
    crops = photo_crops("eval", args.eval, seed=1)
    console.print(f"calibration: {args.calib} crops of {', '.join(photo_names('calib'))}")
    console.print(f"evaluation:  {args.eval} crops of {', '.join(photo_names('eval'))}")
    with torch.no_grad():
        float_logits = torch.cat([model(c[None]) for c in crops])

    runs = {
        "W8A8 rtn": CompileOptions(out_dir=Path(args.out) / "w8a8-rtn", weight_bits=8, act_bits=8,
                                   method="rtn", print_summary=True),
        "W4A8 brecq (fast preset)": CompileOptions(out_dir=Path(args.out) / "w4a8-brecq", weight_bits=4,
                                                   act_bits=8, method="brecq", preset="fast",
                                                   iters=args.iters),
    }
    results = {}
    for label, opts in runs.items():
        console.rule(f"[bold]{label}")
        t0 = time.perf_counter()
        report = compile_model((model, (torch.zeros(INPUT_SHAPE),)), calib, opts, console=console)
        elapsed = time.perf_counter() - t0
        results[label] = (report, evaluate(Path(opts.out_dir) / "model.onnx", float_logits, crops), elapsed)

    table = Table(title="Lite0 in ONNX Runtime vs float PyTorch (evaluation photos)")
    table.add_column("metric")
    for label in results:
        table.add_column(label, justify="right")

    def row(name, fmt):
        table.add_row(name, *[fmt(rep, fid, t) for rep, fid, t in results.values()])

    row("top-1 agreement", lambda r, f, t: f"{f['top1_agreement']:.1%}")
    row("float top-1 within quantized top-5", lambda r, f, t: f"{f['float_top1_in_top5']:.1%}")
    row("mean KL(float || quantized)", lambda r, f, t: f"{f['mean_kl']:.4f}")
    row("ONNX Runtime vs fxq fake-quant (top-1)",
        lambda r, f, t: f"{r['verification']['onnx_vs_fake_quant']['top1_agreement']:.1%}")
    # the emulator models ONNX Runtime's fused int8 kernels; int4 weights run unfused (as float)
    row("ONNX Runtime vs fxq integer emulation (top-1)",
        lambda r, f, t: f"{r['verification']['onnx_vs_integer_emulation']['top1_agreement']:.1%}"
        if r["weight_bits"] == 8 else "n/a (int4 runs unfused)")
    row("ORT latency batch 1, 2 threads (float → quantized)",
        lambda r, f, t: f"{r['latency']['float_measured_ms']:.2f} → {r['latency']['measured_ms']:.2f} ms")
    row("model.onnx size", lambda r, f, t: f"{r['artifacts']['model.onnx'] / 1e6:.2f} MB")
    row("compile time", lambda r, f, t: f"{t:.0f} s")
    console.print(table)
    console.print(f"artifacts in {args.out}/{{w8a8-rtn,w4a8-brecq}}/: model.onnx, model.pt2, report.json")
    console.print("(ONNX Runtime's CPU kernels run 4-bit conv weights as float convs; the W4A8 "
                  "file is the small, faithful artifact, not the fast one on this runtime.)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
