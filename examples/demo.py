"""`make demo`: EfficientNet-Lite0 (real ImageNet weights) compiled at W8A8 by fxq.

Calibrates on crops of scikit-image photos, evaluates on crops of *other* photos, and prints the
passes' op-count summaries, the fidelity of the ONNX model in ONNX Runtime against the float
model, and ONNX Runtime latency float vs quantized. Everything ships with pip packages.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
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
    args = ap.parse_args(argv)
    console = Console(stderr=False)

    from fxq.examples.efficientnet_lite0 import INPUT_SHAPE, efficientnet_lite0
    from fxq.examples.photos import photo_crops, photo_names
    from fxq.options import CompileOptions
    from fxq.pipeline import compile_model

    console.rule("[bold]fxq demo: EfficientNet-Lite0, W8A8, round-to-nearest with searched clipping")
    model = efficientnet_lite0(pretrained=True)
    calib = photo_crops("calib", args.calib, seed=0)
    crops = photo_crops("eval", args.eval, seed=1)
    console.print(f"calibration: {args.calib} crops of {', '.join(photo_names('calib'))}")
    console.print(f"evaluation:  {args.eval} crops of {', '.join(photo_names('eval'))}")
    with torch.no_grad():
        float_logits = torch.cat([model(c[None]) for c in crops])

    opts = CompileOptions(out_dir=Path(args.out), weight_bits=8, act_bits=8, method="rtn", print_summary=True)
    t0 = time.perf_counter()
    report = compile_model((model, (torch.zeros(INPUT_SHAPE),)), calib, opts, console=console)
    elapsed = time.perf_counter() - t0
    fid = evaluate(Path(args.out) / "model.onnx", float_logits, crops)

    table = Table(title="W8A8 Lite0 in ONNX Runtime vs float PyTorch (evaluation photos)")
    for col in ("metric", "value"):
        table.add_column(col)
    table.add_row("top-1 agreement", f"{fid['top1_agreement']:.1%}")
    table.add_row("float top-1 within quantized top-5", f"{fid['float_top1_in_top5']:.1%}")
    table.add_row("mean KL(float || quantized)", f"{fid['mean_kl']:.4f}")
    v = report["verification"]["onnx_vs_fake_quant"]
    table.add_row("ONNX Runtime vs fxq fake-quant PyTorch (top-1 / max |Δ|)",
                  f"{v['top1_agreement']:.1%} / {v['max_abs_diff']:.3g}")
    e = report["verification"]["onnx_vs_integer_emulation"]
    table.add_row("ONNX Runtime vs fxq integer emulation (top-1 / max |Δ|)",
                  f"{e['top1_agreement']:.1%} / {e['max_abs_diff']:.3g}")
    lat = report["latency"]
    table.add_row("ORT latency batch 1, 2 threads: float → int8",
                  f"{lat['float_measured_ms']:.2f} ms → {lat['measured_ms']:.2f} ms ({lat['speedup_vs_float']:.2f}×)")
    table.add_row("compile time", f"{elapsed:.1f} s")
    console.print(table)
    console.print(f"artifacts in {args.out}/: model.onnx, model.pt2, report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
