"""Lower a quantized fxq graph to ONNX for TensorRT explicit quantization (the tensorrt backend).

The graph comes from the ``tensorrt`` placement table (``backends/tables.py``): symmetric int8
activations per tensor (zero point 0), symmetric weights per output channel (axis 0), Q/DQ on the
inputs of every Conv/ConvTranspose/Gemm/MatMul and on the skip input of residual adds,
BatchNorm and activations left in the graph for TensorRT to fuse. This module emits it with the
same QDQ handler as ``lower_qdq`` and its own clean-ups:

* biases stay float (TensorRT quantizes them itself; int32 DequantizeLinear is not a TensorRT
  input type), and DQs are not duplicated per consumer (that is an ONNX Runtime grouping rule);
* a constant-zero ``Pad`` still folds into the next Conv (exact: 0 is on every symmetric grid);
* weights below 8 bits follow the table's storage rows: int4 blocked weight-only for Gemm/MatMul
  (``DequantizeLinear(axis=0, block_size=B)`` on the [in, out] weight, feeding ``MatMul``), an int8
  container for convs (with a warning: TensorRT runs them at int8).

``trtexec_command()`` is the TensorRT 10 build line (``--stronglyTyped``: the Q/DQ types decide
every layer's precision); ``write_build_script`` writes it as ``build_engine.sh``.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path

import onnx

from fxq.backends.lower_qdq import (OPSET, fold_zero_pad_into_conv, make_qdq_handler, prune_dead_nodes,
                                    prune_initializers)
from fxq.errors import LoweringError
from fxq.onnx_size import check_model
from fxq.quantizers import ActQuantizer, WeightQuantizer

ENGINE_SCRIPT = "build_engine.sh"


def check_symmetric(gm) -> None:
    """TensorRT accepts only zero points of 0: refuse a graph quantized for another backend."""
    for name, mod in gm.named_modules():
        if isinstance(mod, ActQuantizer):
            zp = float(mod.zero_point)
            if not (mod.spec.symmetric and mod.spec.signed) or zp != 0.0:
                raise LoweringError(
                    f"TensorRT needs symmetric int8 activations with zero point 0, but quantizer "
                    f"'{name}' ({mod.source}) is {mod.spec.describe()} with zero point {zp:g}: the graph "
                    "was quantized for another backend.",
                    "Annotate with the tensorrt table (--backend tensorrt, or "
                    "AnnotateQSpecs(fxq.backends.tables.TENSORRT, ...)).")
        elif isinstance(mod, WeightQuantizer) and not mod.spec.symmetric:
            raise LoweringError(f"TensorRT needs symmetric weights; quantizer '{name}' ({mod.layer}) is "
                                f"{mod.spec.describe()}.", "Annotate with the tensorrt table.")


def lower_tensorrt(gm, opts=None, notes: dict | None = None) -> onnx.ModelProto:
    """The TensorRT explicit-quantization ONNX model of ``gm`` (opset 21). ``notes`` (see
    ``lower_qdq.new_notes``) receives each weight's storage and the warnings."""
    from fxq.backends.onnx_builder import lower_to_onnx
    from fxq.backends.tables import TENSORRT

    check_symmetric(gm)
    ex = gm.meta["fxq.example_inputs"]
    model = lower_to_onnx(gm, ex, opset=OPSET, module_handler=make_qdq_handler(gm, TENSORRT, notes))
    fold_zero_pad_into_conv(model)
    prune_dead_nodes(model)
    prune_initializers(model)
    check_model(model)
    return model


def trtexec_command(onnx_name: str = "model.onnx", engine_name: str = "model.engine") -> list[str]:
    """TensorRT 10: strongly typed (the Q/DQ nodes fix each layer's precision; --int8/--fp16 are
    deprecated for explicitly quantized networks)."""
    return ["trtexec", f"--onnx={onnx_name}", f"--saveEngine={engine_name}", "--stronglyTyped"]


def build_script(onnx_name: str = "model.onnx", engine_name: str = "model.engine") -> str:
    cmd = shlex.join(trtexec_command(onnx_name, engine_name))
    return ("#!/bin/sh\n"
            "# Build a TensorRT 10 engine from fxq's explicitly quantized ONNX model (written by fxq).\n"
            "# Extra trtexec options pass through, e.g. ./build_engine.sh --separateProfileRun "
            "--dumpProfile --exportProfile=profile.json\n"
            "set -e\n"
            'cd "$(dirname "$0")"\n'
            f'exec {cmd} "$@"\n')


def write_build_script(out_dir: Path) -> Path:
    """``OUT/build_engine.sh`` (executable), written atomically."""
    from fxq.atomic import atomic_path

    path = Path(out_dir) / ENGINE_SCRIPT
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o755)
        with os.fdopen(fd, "w") as fh:
            fh.write(build_script())
        os.chmod(tmp, 0o755)  # umask may have removed the execute bits
    return path


def engine_report() -> dict:
    return {"trtexec": shlex.join(trtexec_command()), "build_script": ENGINE_SCRIPT,
            "tensorrt": ">= 10 (strongly typed network; --int8/--fp16 are not used)",
            "latency_note": "report.latency times this graph in ONNX Runtime on the CPU, which runs it "
                            "unfused (float convs on dequantized weights); TensorRT's speed needs "
                            "build_engine.sh on a GPU"}


# ---------------------------------------------------------------- structural checks

_PRODUCTS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# ops a conv/gemm output may pass through before an add and still fuse with it
_EPILOGUE = ("BatchNormalization", "Add", "Mul", "Transpose", "Reshape", "Identity")


def structure_report(model: onnx.ModelProto) -> dict:
    """Check the TensorRT explicit-quantization rules on an ONNX model; returns counts and a list
    of ``problems`` (empty when the graph follows every rule):

    * every Q/DQ zero point is an all-zero int8 (int4 for blocked int4 weights) initializer;
    * every weight DequantizeLinear (integer initializer input) has axis 0;
    * every Conv/ConvTranspose/Gemm/MatMul reads DQ outputs (a weight through at most a
      Transpose), except weight-only int4 MatMuls, whose activation stays float, and
      activation x activation MatMuls left wholly in float (``float_matmuls``: the inside of a
      fused attention op);
    * every add of two computed tensors has exactly one DQ input (the skip), and its other input
      is a Conv/Gemm/MatMul output reached without Q/DQ — unless neither input comes from one (an
      add left in float);
    * no graph output is produced by a DequantizeLinear.
    """
    from onnx import TensorProto, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    prod = {o: n for n in g.node for o in n.output}
    users: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    problems = []
    counts = {"quantize": 0, "dequantize": 0, "weight_dq": 0, "blocked_int4_dq": 0, "layers": 0,
              "weight_only_layers": 0, "float_matmuls": 0, "residual_adds": 0, "float_adds": 0}

    def attr(n, name, default=None):
        return next((onnx.helper.get_attribute_value(a) for a in n.attribute if a.name == name), default)

    def is_weight_dq(n):
        return n is not None and n.op_type == "DequantizeLinear" and n.input[0] in inits

    for n in g.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        counts["quantize" if n.op_type == "QuantizeLinear" else "dequantize"] += 1
        zp = n.input[2] if len(n.input) > 2 else ""
        if not zp or zp not in inits:
            problems.append(f"{n.name}: zero point is not an explicit initializer")
            continue
        t = inits[zp]
        blocked = attr(n, "block_size", 0)
        want = (TensorProto.INT4,) if blocked else (TensorProto.INT8,)
        if t.data_type not in want:
            problems.append(f"{n.name}: zero point type {TensorProto.DataType.Name(t.data_type)}, "
                            f"want {TensorProto.DataType.Name(want[0])}")
        if numpy_helper.to_array(t).astype("int64").any():
            problems.append(f"{n.name}: non-zero zero point")
        if is_weight_dq(n):
            counts["weight_dq"] += 1
            counts["blocked_int4_dq"] += bool(blocked)
            if attr(n, "axis", 1) != 0:
                problems.append(f"{n.name}: weight DequantizeLinear on axis {attr(n, 'axis', 1)}, want 0")

    def dq_through_transpose(name):
        p = prod.get(name)
        if p is not None and p.op_type == "Transpose":
            p = prod.get(p.input[0])
        return p

    def is_dq(p):
        return p is not None and p.op_type == "DequantizeLinear"

    for n in g.node:
        if n.op_type not in _PRODUCTS:
            continue
        counts["layers"] += 1
        x, w = prod.get(n.input[0]), dq_through_transpose(n.input[1])
        if n.op_type == "MatMul" and not is_dq(x) and not is_dq(w):
            counts["float_matmuls"] += 1  # activation x activation left in float (fused attention)
            continue
        if not is_dq(w):
            problems.append(f"{n.name} ({n.op_type}): input 1 is not dequantized")
            continue
        if is_weight_dq(w) and attr(w, "block_size", 0):
            counts["weight_only_layers"] += 1
            continue
        if x is None or x.op_type != "DequantizeLinear":
            problems.append(f"{n.name} ({n.op_type}): input 0 is not dequantized")

    def conv_branch(name):
        """The Conv/Gemm/MatMul reaching ``name`` through epilogue ops without Q/DQ, or None."""
        p = prod.get(name)
        while p is not None:
            if p.op_type in _PRODUCTS:
                return p
            if p.op_type not in _EPILOGUE:
                return None
            acts = [i for i in p.input if i and i not in inits]
            if len(acts) != 1:
                return None
            p = prod.get(acts[0])
        return None

    for n in g.node:
        if n.op_type != "Add":
            continue
        acts = [i for i in n.input if i not in inits]
        if len(acts) != 2:
            continue
        dq = [i for i in acts if prod.get(i) is not None and prod[i].op_type == "DequantizeLinear"]
        branches = [conv_branch(i) for i in acts if i not in dq]
        if not dq and not any(branches):
            counts["float_adds"] += 1
            continue
        counts["residual_adds"] += 1
        if len(dq) != 1:
            problems.append(f"{n.name}: {len(dq)} quantized inputs, want exactly 1 (the skip)")
        elif branches[0] is None:
            problems.append(f"{n.name}: its unquantized input is not a conv/gemm output")
    for o in g.output:
        p = prod.get(o.name)
        if p is not None and p.op_type == "DequantizeLinear":
            problems.append(f"graph output {o.name} is quantized")
    return {"counts": counts, "problems": problems}
