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
    """Which activation inputs (and whether the weight) of the ``ops`` get a quantizer.

    ``act_inputs``: ``"first"`` (the first tensor input), ``"all"``, or ``"skip"`` (of a join of
    two activations, only the skip input: the one that is not a conv/gemm branch the runtime can
    fuse the join into; decided from the graph by ``annotate_qspecs.residual_skip``)."""
    name: str
    ops: frozenset
    act_inputs: str = "first"
    weight: bool = False        # quantize argument 1 (the layer weight)
    why: str = ""
    # the runtime's integer kernel is DQ -> op -> Q: the row applies only where a consumer
    # quantizes the op's output (annotate_qspecs.requantized); elsewhere the op stays float
    needs_quantized_output: bool = False


@dataclass(frozen=True)
class StorageRule:
    """How a weight grid of at most ``max_bits`` bits is stored in the ONNX file for ``ops``.

    ``container``: the initializer type (``int4`` needs opset 21). ``blocks``: block sizes along
    the layer's input dimension, tried in order (the first that divides it wins; none dividing it
    means the row does not apply). ``weight_only``: the layer's activation input stays float.
    ``warn``: printed once per compile (and recorded in the report) when the row is used."""
    name: str
    ops: frozenset
    max_bits: int
    container: str
    blocks: tuple[int, ...] = ()
    weight_only: bool = False
    warn: str = ""
    why: str = ""

    def block_for(self, weight_shape) -> int | None:
        """The block size for a weight of ``weight_shape`` ([out, in]); None when unblocked.
        Raises LookupError when the row is blocked and no block size fits."""
        if not self.blocks:
            return None
        if len(weight_shape) == 2:
            for b in self.blocks:
                if weight_shape[1] % b == 0:
                    return b
        raise LookupError(self.name)


@dataclass(frozen=True)
class RewriteRule:
    """A fused op the backend wants split into ops its placement rows quantize, before placement
    (``passes.decompose_attention`` reads these rows)."""
    name: str
    ops: frozenset
    why: str


@dataclass(frozen=True)
class FloatRule:
    """Ops a backend leaves in float on purpose, and why (reported per node in report.json)."""
    name: str
    ops: frozenset
    why: str


@dataclass(frozen=True)
class BackendTable:
    name: str
    rules: tuple[PlacementRule, ...]
    fold_batchnorm: bool
    weight_spec: callable = field(repr=False)     # (bits, reduced) -> QSpec
    act_spec: callable = field(repr=False)        # bits -> QSpec
    float_ops_note: str = ""
    runtime: str = ""
    storage: tuple[StorageRule, ...] = ()
    rewrites: tuple[RewriteRule, ...] = ()
    float_rules: tuple[FloatRule, ...] = ()
    float_default: str = "no placement row for this op: it runs in float"
    # ONNX Runtime's x86 u8s8 kernels can saturate with full-range int8 weights (see
    # host_int8_saturates); only a backend that runs on them needs the reduced range by default.
    cpu_u8s8_kernels: bool = False
    # fxq.emulate reproduces this backend's runtime arithmetic (ONNX Runtime's fused kernels)
    integer_emulation: bool = False
    low_bit_act_warn: str = ""  # printed once when an activation grid is below 8 bits

    def rules_for(self, node) -> list[PlacementRule]:
        if node.op == "output":
            return [r for r in self.rules if GRAPH_OUTPUT in r.ops]
        if node.op != "call_function":
            return []
        return [r for r in self.rules if node.target in r.ops]

    def storage_for(self, op, bits: int, weight_shape) -> tuple[StorageRule, int | None]:
        """The first storage row for a layer ``op`` with a ``bits``-bit weight grid, and its
        block size (None: per channel)."""
        for rule in self.storage:
            if op in rule.ops and bits <= rule.max_bits:
                try:
                    return rule, rule.block_for(tuple(weight_shape))
                except LookupError:
                    continue
        from fxq.errors import LoweringError

        raise LoweringError(f"The {self.name} table has no storage row for {bits}-bit weights of "
                            f"{_op_name(op)}.", "Use --weight-bits 8 for this layer's type.")

    def float_reason(self, node) -> tuple[str, str]:
        for rule in self.float_rules:
            if node.target in rule.ops:
                return rule.name, rule.why
        return f"{self.name}.float", self.float_default

    def describe_rows(self) -> list[dict]:
        return [{"rule": r.name, "ops": _op_names(r.ops), "inputs": r.act_inputs, "weight": r.weight,
                 "why": r.why} for r in self.rules]


def _op_name(op) -> str:
    if op == GRAPH_OUTPUT:
        return "graph outputs"
    packet = getattr(op, "overloadpacket", None)
    return getattr(packet, "__name__", None) or str(op).replace("aten.", "")


def _op_names(op_set) -> list[str]:
    return sorted({_op_name(o) for o in op_set})


def _symmetric_weight(bits: int, reduced: bool = False) -> QSpec:
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


def resolve_weight_range(choice: str, table: "BackendTable | None" = None) -> tuple[bool, str]:
    """--weight-range auto|full|reduced -> (reduced?, why). ``auto`` reduces only for a backend
    that runs on ONNX Runtime's x86 u8s8 kernels, on a host where they saturate."""
    if choice == "full":
        return False, "requested full range"
    if choice == "reduced":
        return True, "requested reduced range"
    if table is not None and not table.cpu_u8s8_kernels:
        return False, f"auto: {table.name} does not run on ONNX Runtime's x86 u8s8 kernels"
    reduced, why = host_int8_saturates()
    return reduced, f"auto: {why}"


def _onnx_act(bits: int) -> QSpec:
    # uint8 asymmetric: what ONNX Runtime on x86 fuses into QLinearConv / QLinearAdd / QGemm.
    return QSpec(bits=bits, signed=False, symmetric=False, per_channel=False)


def _tensorrt_act(bits: int) -> QSpec:
    # TensorRT: symmetric int8 per tensor, zero point 0, scale amax / 127.
    return QSpec(bits=bits, signed=True, symmetric=True, per_channel=False)


_POOL_OPS = frozenset({aten.adaptive_avg_pool2d.default, aten.avg_pool2d.default, aten.mean.dim})
_LAYERS = frozenset(ops.LAYER_OPS)
_CLAMPS = frozenset(ops.CLAMP_OPS)
_ATTENTION = frozenset(getattr(aten, n).default for n in (
    "scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention") if hasattr(aten, n))
# Normalizations, Softmax and GELU: kept float by both tables (see the float rows below).
_TRANSFORMER_FLOAT = frozenset({aten.layer_norm.default, aten.native_layer_norm.default, aten.softmax.int,
                                aten._softmax.default, aten._safe_softmax.default, aten.log_softmax.int,
                                aten._log_softmax.default, aten.gelu.default})

ONNX_QDQ = BackendTable(
    name="onnx-qdq",
    runtime="ONNX Runtime (CPU)",
    fold_batchnorm=True,
    cpu_u8s8_kernels=True,
    integer_emulation=True,
    weight_spec=_symmetric_weight,
    act_spec=_onnx_act,
    rules=(
        PlacementRule("onnx-qdq.layer", _LAYERS, "first", weight=True,
                      why="DQ -> Conv/Gemm -> Q fuses to QLinearConv/QGemm"),
        PlacementRule("onnx-qdq.matmul", frozenset(ops.MATMUL_OPS), "all",
                      why="activation x activation products run as QLinearMatMul"),
        PlacementRule("onnx-qdq.add", frozenset(ops.ADD_OPS), "all", needs_quantized_output=True,
                      why="QLinearAdd keeps residual joins in uint8; ONNX Runtime fuses DQ -> Add -> Q "
                          "only, so an add whose output only float ops read (a post-norm "
                          "transformer's residual add feeding LayerNorm) stays float"),
        PlacementRule("onnx-qdq.concat", frozenset(ops.CAT_OPS), "all",
                      why="QLinearConcat keeps concat joins in uint8"),
        PlacementRule("onnx-qdq.pool", _POOL_OPS, "first",
                      why="QLinearGlobalAveragePool / QLinearAveragePool"),
        PlacementRule("onnx-qdq.output", frozenset({GRAPH_OUTPUT}), "all",
                      why="a Q after the last layer lets DQ -> Gemm -> Q fuse into QGemm instead of "
                          "dequantizing the classifier weights on every run"),
    ),
    storage=(
        StorageRule("onnx-qdq.weights.int4", _LAYERS, 4, "int4",
                    why="ONNX Runtime dequantizes int4 initializers (opset 21); 2- and 3-bit grids use "
                        "the int4 container (int4 convs run unfused in float)"),
        StorageRule("onnx-qdq.weights.int8", _LAYERS, 8, "int8",
                    why="int8, per output channel; 5- to 7-bit grids use the int8 container"),
    ),
    rewrites=(
        RewriteRule("onnx-qdq.attention", frozenset({aten.scaled_dot_product_attention.default}),
                    "split into MatMul(Q, Kᵀ) · scale → mask → Softmax → MatMul(P, V) "
                    "(passes.decompose_attention), so the matmul row quantizes Q·Kᵀ and attention·V "
                    "(QLinearMatMul); Softmax stays float"),
    ),
    float_rules=(
        FloatRule("onnx-qdq.float.clamp", _CLAMPS,
                  "ONNX Runtime removes it in front of a Q whose range it does not restrict"),
        FloatRule("onnx-qdq.float.batchnorm", frozenset(ops.BATCHNORM_OPS),
                  "not folded: fold_batchnorm refused it (see that pass's refusals)"),
        FloatRule("onnx-qdq.float.transformer", _TRANSFORMER_FLOAT,
                  "kept float on purpose: LayerNorm and Softmax reduce over a whole row (outlier "
                  "channels and a long-tailed softmax lose most of an 8-bit grid), GELU is cheap "
                  "between the Q/DQ of the linears around it; their outputs are quantized where a "
                  "quantized op reads them (Linear, MatMul)"),
        FloatRule("onnx-qdq.float.attention", _ATTENTION,
                  "fused attention that decompose_attention left fused (its stats say why): runs in "
                  "float"),
    ),
    float_default="no QLinear kernel in the placement table: runs in float between DQ and Q",
    float_ops_note="BatchNorm is folded; other ops (activations, softmax, layer norm) run in float "
                   "between the quantized tensors unless ONNX Runtime fuses them.",
)

TENSORRT = BackendTable(
    name="tensorrt",
    runtime="TensorRT 10 explicit quantization (--stronglyTyped)",
    fold_batchnorm=False,
    weight_spec=_symmetric_weight,
    act_spec=_tensorrt_act,
    rules=(
        PlacementRule("tensorrt.layer", _LAYERS, "first", weight=True,
                      why="Q/DQ on the input and the weight of every Conv/ConvTranspose/Gemm, none on "
                          "its output: TensorRT fuses BN, bias and activation into the int8 kernel"),
        PlacementRule("tensorrt.matmul", frozenset(ops.MATMUL_OPS), "all",
                      why="Q/DQ on both inputs of an activation x activation MatMul (int8 GEMM)"),
        PlacementRule("tensorrt.add", frozenset(ops.ADD_OPS), "skip",
                      why="Q/DQ on the skip input only: the conv branch enters the add unquantized so "
                          "TensorRT fuses Conv+Add(+ReLU); quantizing both inputs breaks the fusion"),
    ),
    storage=(
        StorageRule("tensorrt.weights.int4_blocked", frozenset(ops.LINEAR_OPS), 4, "int4", blocks=(128, 64),
                    weight_only=True,
                    why="TensorRT's INT4 is weight-only and blocked for GEMM/MatMul: DQ(int4, block "
                        "along the input dim) -> MatMul on the transposed weight, activation in float"),
        StorageRule("tensorrt.weights.low_bit_int8", _LAYERS, 7, "int8",
                    warn="TensorRT has no kernel below 8 bits for convs (nor for Gemms whose input size "
                         "is not a multiple of 64): their low-bit weight grids are stored in int8 "
                         "containers and TensorRT runs them at int8 (same values, no extra speed)",
                    why="no TensorRT kernel below 8 bits: the grid is stored in int8, its qmin/qmax in "
                        "the DequantizeLinear node's metadata"),
        StorageRule("tensorrt.weights.int8", _LAYERS, 8, "int8",
                    why="int8, per output channel (axis 0; ConvTranspose: axis 0 too, as TensorRT "
                        "expects)"),
    ),
    float_rules=(
        FloatRule("tensorrt.float.batchnorm", frozenset(ops.BATCHNORM_OPS),
                  "left unfolded: TensorRT folds BatchNorm into the preceding conv"),
        FloatRule("tensorrt.float.activation", frozenset(ops.ACTIVATION_OPS),
                  "left unfused: TensorRT fuses pointwise activations into the preceding conv/gemm/add"),
        FloatRule("tensorrt.float.transformer", _TRANSFORMER_FLOAT - frozenset(ops.ACTIVATION_OPS),
                  "LayerNorm and Softmax stay float: TensorRT fuses them in its normalization and "
                  "attention kernels"),
        FloatRule("tensorrt.float.attention", _ATTENTION,
                  "fused attention stays float: TensorRT runs it in its own attention kernel; the "
                  "Q/K/V and output projections around it are quantized"),
    ),
    float_default="no placement row: TensorRT runs it at its inputs' float type (--stronglyTyped); "
                  "data movement (concat, slice, pooling) takes the int8 of a following Q",
    low_bit_act_warn="TensorRT runs activations at int8: grids below 8 bits are kept by a Clip before "
                     "the int8 QuantizeLinear, at int8 speed",
    float_ops_note="BatchNorm and activations are left for TensorRT to fuse; every weighted layer's "
                   "inputs are quantized, its output is not.",
)

BACKENDS = {t.name: t for t in (ONNX_QDQ, TENSORRT)}


def get_backend(name: str) -> BackendTable:
    from fxq.errors import FxqError

    if name not in BACKENDS:
        raise FxqError(f"Backend '{name}' is not available (known: {', '.join(sorted(BACKENDS))}).",
                       "Pick one of those with --backend.")
    return BACKENDS[name]


# ---------------------------------------------------------------- nodes left in float (report)


def float_nodes(gm, table: BackendTable) -> dict:
    """Every computing node of the quantized graph ``gm`` that runs in float, with the table row
    (or the pass decision) that explains why: ``{"count", "by_rule", "nodes": [{node, op, rule,
    why}]}``. Nodes that only move quantized values (reshape, max-pool ...) and constants are not
    listed."""
    import operator

    from fxq.backends import onnx_ops
    from fxq.passes.infra import FLOAT, QSPEC

    skip_ops = ops.TRANSPARENT_OPS | onnx_ops.IDENTITY_OPS | onnx_ops.SHAPE_ONLY_OPS | {operator.getitem}
    live: set = set()
    for node in gm.graph.nodes:  # nodes that depend on a graph input (the rest is folded away)
        if node.op == "placeholder" or any(a in live for a in node.all_input_nodes):
            live.add(node)
    rows = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target in skip_ops or node not in live:
            continue
        spec = node.meta.get(QSPEC)
        if spec and (spec.get("weight") is not None or spec.get("inputs")):
            continue
        if FLOAT in node.meta:
            rule, why = node.meta[FLOAT]["rule"], node.meta[FLOAT]["why"]
        elif ops.is_layer(node):
            rule, why = f"{table.name}.float", "layer without a quantized weight"
        else:
            rule, why = table.float_reason(node)
        rows.append({"node": node.name, "op": _op_name(node.target), "rule": rule, "why": why})
    by_rule: dict[str, int] = {}
    for row in rows:
        by_rule[row["rule"]] = by_rule.get(row["rule"], 0) + 1
    return {"count": len(rows), "by_rule": by_rule, "nodes": rows}


# ---------------------------------------------------------------- the tables as Markdown (docs)

DOC_BEGIN = "<!-- generated by `python -m fxq.backends.tables --write docs/backends.md`: begin -->"
DOC_END = "<!-- generated: end -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(tables=None) -> str:
    """Every backend's placement, storage and float rows as Markdown tables (docs/backends.md)."""
    out = []
    for t in tables or BACKENDS.values():
        w8, a8, w4 = t.weight_spec(8, False), t.act_spec(8), t.weight_spec(4, False)
        out += [f"### `{t.name}` — {t.runtime}", "",
                f"Activations: {a8.describe()} ({'zero point 0' if a8.symmetric else 'with a zero point'}). "
                f"Weights: {w8.describe()}, [{w8.qmin}, {w8.qmax}] at 8 bits, [{w4.qmin}, {w4.qmax}] "
                f"at 4 bits. BatchNorm {'folded into the conv' if t.fold_batchnorm else 'left in the graph'}.",
                "", "Placement (consumer ops whose inputs get Q/DQ):", "",
                "| row | consumer ops | quantized inputs | weight | why |", "|---|---|---|---|---|"]
        for r in t.rules:
            inputs = {"first": "input 0", "all": "all", "skip": "the skip input only"}[r.act_inputs]
            if r.needs_quantized_output:
                inputs += ", where its output is quantized"
            out.append(f"| `{r.name}` | {', '.join(_op_names(r.ops))} | {inputs} | "
                       f"{'yes' if r.weight else 'no'} | {_cell(r.why)} |")
        out += ["", "Weight storage (first matching row wins):", "",
                "| row | layer ops | grid bits | container | block (input dim) | activation | why |",
                "|---|---|---|---|---|---|---|"]
        for s in t.storage:
            ops_text = "all layers" if s.ops == _LAYERS else ", ".join(_op_names(s.ops))
            out.append(f"| `{s.name}` | {ops_text} | ≤ {s.max_bits} | {s.container} | "
                       f"{' or '.join(map(str, s.blocks)) or 'per channel'} | "
                       f"{'float (weight-only)' if s.weight_only else 'quantized'} | "
                       f"{_cell(s.why)}{' (warns)' if s.warn else ''} |")
        if t.rewrites:
            out += ["", "Rewritten before placement (a fused op split so the placement rows reach its "
                    "products):", "", "| row | fused ops | why |", "|---|---|---|"]
            out += [f"| `{r.name}` | {', '.join(_op_names(r.ops))} | {_cell(r.why)} |" for r in t.rewrites]
        out += ["", "Left in float (listed per node in `report.json` → `float_nodes`):", "",
                "| row | ops | why |", "|---|---|---|"]
        for f in t.float_rules:
            out.append(f"| `{f.name}` | {', '.join(_op_names(f.ops))} | {_cell(f.why)} |")
        out += [f"| `{t.name}.float` | any other op | {_cell(t.float_default)} |", ""]
    return "\n".join(out).rstrip() + "\n"


def write_doc(path) -> bool:
    """Replace the generated block of ``path``; returns whether the file changed."""
    from pathlib import Path

    from fxq.errors import FxqError

    path = Path(path)
    text = path.read_text()
    if DOC_BEGIN not in text or DOC_END not in text.split(DOC_BEGIN, 1)[1]:
        raise FxqError(f"{path} has no generated block to replace.",
                       f"Put the lines {DOC_BEGIN} and {DOC_END} where the tables go.")
    head, rest = text.split(DOC_BEGIN, 1)
    _, tail = rest.split(DOC_END, 1)
    new = head + DOC_BEGIN + "\n\n" + render_markdown() + "\n" + DOC_END + tail
    if new != text:
        path.write_text(new)
    return new != text


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m fxq.backends.tables",
                                description="Print the backends' placement tables as Markdown.")
    p.add_argument("--write", metavar="DOC", help="replace the generated block of DOC instead")
    args = p.parse_args(argv)
    if args.write:
        print(("updated " if write_doc(args.write) else "unchanged ") + args.write)
    else:
        print(render_markdown(), end="")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
