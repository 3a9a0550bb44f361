"""Latency only, on the models benchmarks/w8a8_lite0.py wrote (run that first):

    .venv/bin/python benchmarks/latency_w8a8_lite0.py [--dir bench-out/w8a8] [--runs 1000]

ONNX Runtime CPU, batch 1, 2 intra-op threads; many short interleaved rounds so machine noise
hits every model alike; prints medians and the fxq / quantize_static ratio.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

from fxq.ort_timing import format_report, timing_report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="bench-out/w8a8")
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args(argv)
    d = Path(args.dir)
    models = {"float": d / "float.onnx", "ORT quantize_static": d / "ort_qs.onnx", "fxq W8A8": d / "fxq" / "model.onnx"}
    x = np.random.default_rng(0).standard_normal((args.batch, 3, 224, 224)).astype(np.float32)
    rep = timing_report(models, x, threads=2, warmup=50, runs=args.runs, rounds=max(args.runs // 25, 1))
    print(format_report(rep))
    ratio = rep["fxq W8A8"]["median_ms"] / rep["ORT quantize_static"]["median_ms"]
    print(f"fxq / quantize_static median latency: {ratio:.3f}; fxq speed-up over float: "
          f"{rep['float']['median_ms'] / rep['fxq W8A8']['median_ms']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
