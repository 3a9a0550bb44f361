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


GRAPH_OUTPUT = "output"  # a row with this op applies to the graph's outputs


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
    weight_spec: callable = field(repr=False)     # (bits, reduced) -> QSpec
    act_spec: callable = field(repr=False)        # bits -> QSpec
    float_ops_note: str = ""

    def rules_for(self, node) -> list[PlacementRule]:
        if node.op == "output":
            return [r for r in self.rules if GRAPH_OUTPUT in r.ops]
        if node.op != "call_function":
            return []
        return [r for r in self.rules if node.target in r.ops]

    def describe_rows(self) -> list[dict]:
        return [{"rule": r.name, "ops": sorted(str(o).replace("aten.", "") for o in r.ops),
                 "inputs": r.act_inputs, "weight": r.weight, "why": r.why} for r in self.rules]


def _onnx_weight(bits: int, reduced: bool = False) -> QSpec:
    if bits == 8 and reduced:
        # x86 without VNNI multiplies u8 x s8 pairs into a saturating int16 (vpmaddubsw):
        # 255*|w1| + 255*|w2| must stay <= 32767, so |w| <= 64 -- a 7-bit grid in int8.
        return QSpec(bits=7, signed=True, symmetric=True, per_channel=True, axis=0)
    # Narrow [-127, 127] at 8 bits, as TensorRT and ONNX Runtime's own quantizer use.
    return QSpec(bits=bits, signed=True, symmetric=True, per_channel=True, axis=0, narrow=bits == 8)


def host_int8_saturates() -> tuple[bool, str]:
    """Whether ONNX Runtime's fused u8s8 kernels on *this* machine can saturate (x86 without
    VNNI), with the evidence. Measured on an AVX2-only CPU: full-range int8 weights made fused
    QLinearConv disagree with the unfused QDQ graph on 35 % of Lite0 predictions; with |w| <= 63
    they agreed on all."""
    import platform

    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64", "i686", "x86"):
        return False, f"{machine}: no u8s8 saturation issue"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return True, "x86 with unknown CPU flags: assuming no VNNI"
    vnni = sorted({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))
    if vnni:
        return False, f"x86 with {', '.join(vnni)}"
    return True, "x86 without VNNI (AVX2 u8s8 kernels saturate int16 sums)"


def resolve_weight_range(choice: str) -> tuple[bool, str]:
    """--weight-range auto|full|reduced -> (reduced?, why)."""
    if choice == "full":
        return False, "requested full range"
    if choice == "reduced":
        return True, "requested reduced range"
    reduced, why = host_int8_saturates()
    return reduced, f"auto: {why}"


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
        PlacementRule("onnx-qdq.output", frozenset({GRAPH_OUTPUT}), "all",
                      why="a Q after the last layer lets DQ -> Gemm -> Q fuse into QGemm instead of "
                          "dequantizing the classifier weights on every run"),
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
