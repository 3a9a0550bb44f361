"""Placement tables: which graph edges each backend quantizes, and how.

A backend is data: a list of rows, each naming the consumer ops it applies to, which of their
inputs get an activation quantizer, and whether their weight is quantized. ``annotate_qspecs``
reads the rows; nothing else in fxq knows backend-specific placement. Each row's ``name`` is
stamped on the nodes it causes (``fxq.rule``), so graph diffs say which row made a quantizer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fxq import ops
from fxq.quantizers import QSpec

aten = torch.ops.aten


@dataclass(frozen=True)
class PlacementRule:
    name: str
    ops: frozenset
    act_inputs: str = "first"   # "first" | "all": which tensor inputs are activation-quantized
    weight: bool = False        # quantize argument 1 (the layer weight)
    why: str = ""


@dataclass(frozen=True)
class BackendTable:
    name: str
    rules: tuple[PlacementRule, ...]
    fold_batchnorm: bool
    weight_spec: callable = field(repr=False)     # bits -> QSpec
    act_spec: callable = field(repr=False)        # bits -> QSpec
    float_ops_note: str = ""

    def rules_for(self, node) -> list[PlacementRule]:
        if node.op != "call_function":
            return []
        return [r for r in self.rules if node.target in r.ops]

    def describe_rows(self) -> list[dict]:
        return [{"rule": r.name, "ops": sorted(str(o).replace("aten.", "") for o in r.ops),
                 "inputs": r.act_inputs, "weight": r.weight, "why": r.why} for r in self.rules]


def _onnx_weight(bits: int) -> QSpec:
    # Narrow [-127, 127] at 8 bits: x86 u8s8 kernels can saturate int16 pair sums at -128.
    return QSpec(bits=bits, signed=True, symmetric=True, per_channel=True, axis=0, narrow=bits == 8)


def _onnx_act(bits: int) -> QSpec:
    # uint8 asymmetric: what ONNX Runtime on x86 fuses into QLinearConv / QLinearAdd / QGemm.
    return QSpec(bits=bits, signed=False, symmetric=False, per_channel=False)


ONNX_QDQ = BackendTable(
    name="onnx-qdq",
    fold_batchnorm=True,
    weight_spec=_onnx_weight,
    act_spec=_onnx_act,
    rules=(
        PlacementRule("onnx-qdq.layer", frozenset(ops.LAYER_OPS), "first", weight=True,
                      why="DQ -> Conv/Gemm -> Q fuses to QLinearConv/QGemm"),
        PlacementRule("onnx-qdq.matmul", frozenset(ops.MATMUL_OPS), "all",
                      why="activation x activation products run as QLinearMatMul"),
        PlacementRule("onnx-qdq.add", frozenset(ops.ADD_OPS), "all",
                      why="QLinearAdd keeps residual joins in uint8"),
        PlacementRule("onnx-qdq.concat", frozenset(ops.CAT_OPS), "all",
                      why="QLinearConcat keeps concat joins in uint8"),
        PlacementRule("onnx-qdq.pool", frozenset({aten.adaptive_avg_pool2d.default, aten.avg_pool2d.default,
                                                  aten.mean.dim}), "first",
                      why="QLinearGlobalAveragePool / QLinearAveragePool"),
    ),
    float_ops_note="BatchNorm is folded; other ops (activations, softmax, layer norm) run in float "
                   "between the quantized tensors unless ONNX Runtime fuses them.",
)

BACKENDS = {ONNX_QDQ.name: ONNX_QDQ}


def get_backend(name: str) -> BackendTable:
    from fxq.errors import FxqError

    if name not in BACKENDS:
        raise FxqError(f"Backend '{name}' is not available (known: {', '.join(sorted(BACKENDS))}).",
                       "Pick one of those with --backend.")
    return BACKENDS[name]
