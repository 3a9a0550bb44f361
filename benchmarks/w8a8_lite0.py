"""fxq W8A8 vs ONNX Runtime's own quantize_static on EfficientNet-Lite0, side by side.

    .venv/bin/python benchmarks/w8a8_lite0.py [--calib 256] [--eval 1000] [--out bench-out/w8a8]

Real ImageNet weights; calibration crops and evaluation crops come from disjoint scikit-image
photos. Every model is evaluated on the same crops in one process, and latencies are timed
interleaved (ONNX Runtime CPU, batch 1, 2 intra-op threads, median). quantize_static is run in
its documented configuration (QDQ, per-channel, MinMax, uint8 activations, int8 weights) and
with reduce_range=True (ORT's advice for CPUs without VNNI). Prints a markdown table and writes
it to OUT/results.md.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baselines import cpu_int8_features, ort_quantize_static  # noqa: E402

from fxq.backends.lower_qdq import lower_qdq  # noqa: E402
from fxq.calibrate import run_batched  # noqa: E402
from fxq.capture import capture  # noqa: E402
from fxq.examples.efficientnet_lite0 import INPUT_SHAPE, efficientnet_lite0  # noqa: E402
from fxq.examples.photos import photo_crops  # noqa: E402
from fxq.options import CompileOptions  # noqa: E402
from fxq.ort_timing import format_report, timing_report  # noqa: E402
from fxq.pipeline import compile_model, fidelity, run_onnx  # noqa: E402


def quality(float_logits: torch.Tensor, logits: torch.Tensor) -> dict:
    f = fidelity(float_logits, logits)
    top5 = logits.topk(5, 1).indices
    f["top5"] = float((top5 == float_logits.argmax(1, keepdim=True)).any(1).float().mean())
    return f


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--eval", type=int, default=1000)
    ap.add_argument("--out", default="bench-out/w8a8")
    ap.add_argument("--runs", type=int, default=200, help="latency runs per model")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model = efficientnet_lite0(pretrained=True)
    calib = photo_crops("calib", args.calib, seed=0)
    crops = photo_crops("eval", args.eval, seed=1)
    example = (torch.zeros(INPUT_SHAPE),)

    float_gm = capture(model, example)
    float_logits = run_batched(float_gm, crops)
    float_path = out / "float.onnx"
    float_path.write_bytes(lower_qdq(copy.deepcopy(float_gm), quantized=False).SerializeToString())

    rows = {}
    t0 = time.perf_counter()
    # all calibration samples are used for calibration; the evaluation set is separate
    kept: dict = {}
    report = compile_model((model, example), calib, CompileOptions(out_dir=out / "fxq", holdout=0), keep=kept)
    rows["fxq W8A8 (rtn + bias correction)"] = {"path": out / "fxq" / "model.onnx",
                                                 "time_s": time.perf_counter() - t0}
    for label, rr in (("ORT quantize_static", False), ("ORT quantize_static reduce_range", True)):
        t0 = time.perf_counter()
        path = out / ("ort_qs_rr.onnx" if rr else "ort_qs.onnx")
        ort_quantize_static(str(float_path), calib.numpy(), str(path), reduce_range=rr)
        rows[label] = {"path": path, "time_s": time.perf_counter() - t0}

    results = {"float ONNX": quality(float_logits, run_onnx(float_path.read_bytes(), crops, 1))}
    for label, row in rows.items():
        results[label] = quality(float_logits, run_onnx(Path(row["path"]).read_bytes(), crops, 1))

    # parity: fxq's ONNX model in ONNX Runtime vs fxq's own fake-quant PyTorch model (model.pt2)
    fq = torch.export.load(str(out / "fxq" / "model.pt2")).module()
    with torch.no_grad():
        fq_logits = torch.cat([fq(c[None]) for c in crops])
    fxq_ort = run_onnx((out / "fxq" / "model.onnx").read_bytes(), crops, 1)
    parity = fidelity(fq_logits, fxq_ort)
    margin = (lambda z: (z.topk(2, 1).values[:, 0] - z.topk(2, 1).values[:, 1]))(torch.log_softmax(fq_logits, 1))
    decided = margin > 0.1
    parity_decided = float((fq_logits.argmax(1) == fxq_ort.argmax(1))[decided].float().mean())
    from fxq.emulate import emulate_batched

    emulated = fidelity(emulate_batched(kept["graph_module"], crops), fxq_ort)

    x = crops[:1].numpy()
    lat = timing_report({"float": float_path, "ORT quantize_static": rows["ORT quantize_static"]["path"],
                         "fxq W8A8": rows["fxq W8A8 (rtn + bias correction)"]["path"],
                         "ORT quantize_static reduce_range": rows["ORT quantize_static reduce_range"]["path"]},
                        x, threads=2, warmup=20, runs=args.runs, rounds=10)

    lines = ["# W8A8 EfficientNet-Lite0: fxq vs ONNX Runtime quantize_static",
             "",
             f"Calibration: {args.calib} crops of the calib photos; evaluation: {args.eval} crops of the "
             f"eval photos (disjoint). CPU: {cpu_int8_features()}; fxq weight range: "
             f"{report['weight_range']['why']}.",
             "",
             "| model | top-1 agreement with float | float top-1 in top-5 | mean KL(float‖q) | compile s |",
             "|---|---|---|---|---|"]
    for label, q in results.items():
        t = rows.get(label, {}).get("time_s")
        lines.append(f"| {label} | {q['top1_agreement']:.1%} | {q['top5']:.1%} | {q['mean_kl']:.4f} | "
                     f"{'' if t is None else f'{t:.1f}'} |")
    lines += ["", f"Parity, fxq ONNX in ONNX Runtime vs fxq fake-quant PyTorch (model.pt2), {args.eval} crops: "
              f"top-1 {parity['top1_agreement']:.2%}, max |Δ| {parity['max_abs_diff']:.3g}, mean cosine "
              f"{parity['mean_cosine']:.5f}; on the {int(decided.sum())} crops whose top-1/top-2 log-prob "
              f"margin exceeds 0.1: top-1 {parity_decided:.2%}.", "",
              f"fxq's integer emulation of ONNX Runtime's fused kernels (fxq.emulate) vs ONNX Runtime, "
              f"same crops: top-1 {emulated['top1_agreement']:.2%}, max |Δ| {emulated['max_abs_diff']:.3g}, "
              f"mean KL {emulated['mean_kl']:.5f}.", "",
              "Latency (ONNX Runtime CPU, batch 1, 2 threads, interleaved rounds):", "", "```",
              format_report(lat), "```"]
    q_med = lat["ORT quantize_static"]["median_ms"]
    lines.append(f"\nfxq / quantize_static latency ratio: {lat['fxq W8A8']['median_ms'] / q_med:.3f}; "
                 f"fxq speed-up over float: {lat['float']['median_ms'] / lat['fxq W8A8']['median_ms']:.2f}×")
    text = "\n".join(lines)
    (out / "results.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
