"""The baseline fxq is compared with: ONNX Runtime's own post-training static quantization.

``ort_quantize_static`` runs the recipe ORT documents for x86 CPUs: ``quant_pre_process``
(shape inference plus ORT's basic graph optimizations, which among other things fold BatchNorm
into the preceding Conv so the folded weight is what gets quantized), then ``quantize_static`` in
QDQ format with per-channel int8 weights, uint8 activations and MinMax calibration. uint8
activations are what let ORT fuse DQ -> Conv -> Q into its fast integer kernels on x86.

Those fused kernels are not exact on every x86 CPU: without VNNI (AVX2 only) the u8 x s8 dot
products go through 16-bit intermediate sums that can saturate, which ORT's documentation
answers with ``reduce_range`` (7-bit weights). So the same quantized file can agree less with
the float model on an AVX2 machine than on a VNNI one; ``--unfused`` also reports the agreement
with ORT's graph fusions off (Q/DQ executed literally, float Conv), which isolates that effect.

Run as a script for a self-contained check on EfficientNet-Lite0 and scikit-image photo crops::

    .venv/bin/python benchmarks/baselines.py            # or: python -m benchmarks.baselines

It prints the top-1 agreement of the quantized model with the float one and batch-1 latency of
both on 2 threads.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from typing import Iterator

import numpy as np

__all__ = ["NumpyCalibrationReader", "export_float_onnx", "ort_quantize_static", "top1_agreement",
           "run_onnx"]


def _reader_base():
    from onnxruntime.quantization import CalibrationDataReader

    return CalibrationDataReader


class NumpyCalibrationReader(_reader_base()):
    """Feeds the rows of an array to ORT's calibrator, ``batch`` rows per inference.

    The batch must match the model's (static) batch dimension; the last short batch is dropped
    rather than fed with a shape the model does not accept.
    """

    def __init__(self, input_name: str, data: np.ndarray, batch: int = 1):
        self.input_name = input_name
        self.data = np.ascontiguousarray(data, dtype=np.float32)
        self.batch = batch
        self._it: Iterator[dict[str, np.ndarray]] | None = None
        self.rewind()

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self.data) - self.batch + 1, self.batch):
            yield {self.input_name: self.data[start:start + self.batch]}

    def get_next(self):
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = self._batches()

    def __len__(self) -> int:
        return len(self.data) // self.batch


def _input_info(model_path: str) -> tuple[str, int | None]:
    import onnx

    graph = onnx.load(model_path, load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ValueError(f"expected a single-input model, {model_path} has {[i.name for i in inputs]}")
    dim0 = inputs[0].type.tensor_type.shape.dim[0]
    return inputs[0].name, (dim0.dim_value if dim0.HasField("dim_value") else None)


def ort_quantize_static(
    float_onnx_path: str,
    calib: np.ndarray,
    out_path: str,
    per_channel: bool = True,
    *,
    calibrate_method: str = "MinMax",
    activation_type: str = "QUInt8",
    weight_type: str = "QInt8",
    reduce_range: bool = False,
    preprocess: bool = True,
    extra_options: dict | None = None,
) -> str:
    """Quantize ``float_onnx_path`` with ORT's ``quantize_static`` (QDQ) and write ``out_path``.

    ``calib`` holds the calibration inputs, ``[N, ...]`` with the model's per-sample shape; it is
    fed in batches of the model's static batch size (1 when the batch is dynamic). Returns
    ``out_path``. The keyword options name ORT's enums by their member names so callers need not
    import ORT; the defaults are the configuration fxq compares against.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    calib = np.asarray(calib, dtype=np.float32)
    if calib.ndim < 1 or len(calib) == 0:
        raise ValueError("calib must hold at least one sample")
    with tempfile.TemporaryDirectory(prefix="fxq-ortq-") as tmp:
        src = float_onnx_path
        if preprocess:
            src = os.path.join(tmp, "preprocessed.onnx")
            quant_pre_process(float_onnx_path, src)
        name, batch = _input_info(src)
        batch = batch or 1
        if len(calib) < batch:
            raise ValueError(f"the model's batch is {batch} but calib has {len(calib)} samples")
        reader = NumpyCalibrationReader(name, calib, batch)
        quantize_static(
            src,
            out_path,
            calibration_data_reader=reader,
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            reduce_range=reduce_range,
            activation_type=getattr(QuantType, activation_type),
            weight_type=getattr(QuantType, weight_type),
            calibrate_method=getattr(CalibrationMethod, calibrate_method),
            extra_options=extra_options,
        )
    return out_path


def export_float_onnx(model, example: "torch.Tensor", path: str, opset: int = 21) -> str:  # noqa: F821
    """Export a float model with the dynamo-based exporter, weights embedded in one file."""
    import onnx
    import torch

    with torch.no_grad():
        program = torch.onnx.export(
            model, (example,), dynamo=True, opset_version=opset,
            input_names=["input"], output_names=["logits"],
        )
    # save through onnx so a small model never ends up split into external-data files
    onnx.save(program.model_proto, path)
    return path


def run_onnx(model_path: str, x: np.ndarray, threads: int = 2) -> np.ndarray:
    """Outputs of a single-input, single-output model, one batch-sized slice at a time."""
    from fxq.ort_timing import session

    sess = session(model_path, threads)
    name = sess.get_inputs()[0].name
    dim0 = sess.get_inputs()[0].shape[0]
    step = dim0 if isinstance(dim0, int) and dim0 > 0 else len(x)
    outs = [sess.run(None, {name: x[i:i + step]})[0] for i in range(0, len(x), step)]
    return np.concatenate(outs)


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).mean())


def run_onnx_unfused(model_path: str, x: np.ndarray, threads: int = 2) -> np.ndarray:
    """Like :func:`run_onnx` with every ORT graph optimization off, so a QDQ model is executed
    as written (float Conv between DequantizeLinear and QuantizeLinear) instead of being fused
    into integer kernels."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    dim0 = sess.get_inputs()[0].shape[0]
    step = dim0 if isinstance(dim0, int) and dim0 > 0 else len(x)
    return np.concatenate([sess.run(None, {name: x[i:i + step]})[0]
                           for i in range(0, len(x), step)])


def cpu_int8_features() -> str:
    """'VNNI' / 'AVX2 only' / 'unknown': which integer dot-product path ORT's x86 kernels take."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return "unknown"
    if "vnni" in flags:
        return "VNNI"
    return "AVX2 only (no VNNI)" if "avx2" in flags else "unknown"


def _main(argv: list[str] | None = None) -> dict:
    import torch

    from fxq.examples.efficientnet_lite0 import INPUT_SHAPE, efficientnet_lite0
    from fxq.examples.photos import photo_crops
    from fxq.ort_timing import format_report, timing_report

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calib", type=int, default=128, help="calibration crops")
    ap.add_argument("--eval", type=int, default=200, help="evaluation crops")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--opset", type=int, default=21)
    ap.add_argument("--reduce-range", action="store_true", help="7-bit weights (non-VNNI x86)")
    ap.add_argument("--unfused", action="store_true",
                    help="also report agreement with ORT graph fusions off")
    ap.add_argument("--out", default=None, help="keep the ONNX files in this folder")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model = efficientnet_lite0()
    calib = photo_crops("calib", args.calib, seed=0).numpy()
    evals = photo_crops("eval", args.eval, seed=1).numpy()

    tmp = None
    out_dir = args.out
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="fxq-baseline-")
        out_dir = tmp.name
    os.makedirs(out_dir, exist_ok=True)
    try:
        float_path = export_float_onnx(model, torch.zeros(INPUT_SHAPE),
                                       os.path.join(out_dir, "lite0_float.onnx"), args.opset)
        q_path = ort_quantize_static(float_path, calib, os.path.join(out_dir, "lite0_ortq.onnx"),
                                     reduce_range=args.reduce_range)

        ref = run_onnx(float_path, evals, args.threads)
        with torch.no_grad():
            torch_ref = model(torch.from_numpy(evals[:16])).numpy()
        q = run_onnx(q_path, evals, args.threads)
        agree = top1_agreement(ref, q)
        agree_unfused = (top1_agreement(ref, run_onnx_unfused(q_path, evals, args.threads))
                         if args.unfused else None)
        x1 = evals[:1]
        report = timing_report({"float": float_path, "ort quantize_static": q_path}, x1,
                               threads=args.threads, runs=args.runs)
    finally:
        if tmp is not None:
            tmp.cleanup()

    print(f"float ONNX vs torch, max |logit diff| on 16 crops: "
          f"{np.abs(ref[:16] - torch_ref).max():.2e}")
    print(f"quantize_static (QDQ, per-channel, MinMax, u8 act / s8 weight"
          f"{', reduce_range' if args.reduce_range else ''}), {args.calib} calib crops")
    print(f"top-1 agreement with float on {len(evals)} eval crops: {agree:.1%}"
          f"  (CPU int8 path: {cpu_int8_features()})")
    if agree_unfused is not None:
        print(f"  same file with ORT fusions off (Q/DQ run literally): {agree_unfused:.1%}")
    print(format_report(report))
    return {"agreement": agree, "agreement_unfused": agree_unfused, "latency": report}


if __name__ == "__main__":
    _main()
