"""Lower a quantized fxq graph to ONNX QuantizeLinear/DequantizeLinear (the onnx-qdq backend).

Float ops go through fxq's own FX->ONNX op table (``onnx_builder``); this module only adds what
quantization needs, laid out the way ONNX Runtime on x86 fuses it:

* weight quantizers -> integer initializer (int8; int4 for grids of <= 4 bits, opset 21) feeding
  ``DequantizeLinear(axis=0)`` — weights are never stored in float, so no constant folding can
  lose the Q/DQ;
* activation quantizers -> ``QuantizeLinear``/``DequantizeLinear`` in uint8 with a zero point;
  grids narrower than 8 bits add a ``Clip`` to the grid's real range before the uint8 Q, because
  ONNX Runtime's optimizer rejects uint4 activations (the container stays uint8);
* after emission, graph clean-ups: constant-zero ``Pad`` folds into the next Conv's pads;
  conv/Gemm biases become int32 with scale
  ``s_in * s_w`` (ONNX Runtime folds them into QLinearConv/QGemm), every activation DQ gets a
  single consumer ("dedicated" pairs), a float layer's dequantized input gets a per-channel
  scale so ONNX Runtime does not quantize that layer itself (``keep_float_layers_float``), and
  unused initializers are dropped.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fxq.onnx_size import check_model
from fxq.ops import get_attr
from fxq.quantizers import ActQuantizer, WeightQuantizer

OPSET = 21


def int_tensor_proto(name: str, values: np.ndarray, bits: int, signed: bool = True,
                     container: str | None = None) -> onnx.TensorProto:
    """Integers as an initializer: ``container`` "int4"/"int8" (or by ``bits``: int4 up to 4)."""
    if container == "int4" or (container is None and bits <= 4):
        dtype = TensorProto.INT4 if signed else TensorProto.UINT4
        return helper.make_tensor(name, dtype, values.shape, values.astype(np.int8 if signed else np.uint8).flatten().tolist())
    return numpy_helper.from_array(values.astype(np.int8 if signed else np.uint8), name)


def add_initializer(ctx, proto: onnx.TensorProto) -> str:
    """Register a ready-made TensorProto (e.g. int4, which numpy cannot hold) with the builder."""
    proto.name = ctx.fresh(proto.name)
    ctx.initializers.append(proto)
    ctx._initializer_names.add(proto.name)
    return proto.name


# metadata_props keys on DequantizeLinear nodes: the grid a container holds
META_BITS, META_QMIN, META_QMAX = "fxq.bits", "fxq.qmin", "fxq.qmax"
META_CONTAINER, META_STORAGE = "fxq.container", "fxq.storage_rule"


def _annotate(proto: onnx.NodeProto, **entries) -> None:
    for key, value in entries.items():
        prop = proto.metadata_props.add()
        prop.key, prop.value = key, str(value)


def check_scale(scale, what: str) -> None:
    """Refuse to emit a Q/DQ scale that is zero, negative, NaN or Inf: ONNX Runtime would divide
    by it (or multiply every value away) without complaint."""
    values = np.asarray(scale, dtype=np.float64)
    if values.size == 0 or not (np.all(np.isfinite(values)) and np.all(values > 0)):
        from fxq.errors import LoweringError

        bad = values[~(np.isfinite(values) & (values > 0))]
        raise LoweringError(f"The quantization scale of {what} is not a positive finite number "
                            f"({bad.ravel()[:3].tolist()}); fxq will not write a model that "
                            "divides by it.", "Please report this with the model and data.")


def new_notes() -> dict:
    """What a lowering reports: per weight its storage, and warnings (one per storage row)."""
    return {"weights": [], "warnings": {}}


def make_qdq_handler(gm, table=None, notes: dict | None = None):
    from fxq import ops
    from fxq.backends.tables import ONNX_QDQ

    table = table or ONNX_QDQ
    notes = notes if notes is not None else new_notes()

    def weight(ctx, node, module):
        src = node.args[0]
        w = get_attr(gm, src.target).detach() if src.op == "get_attr" else None
        if w is None:
            raise ValueError(f"weight quantizer {node.target} is not fed by a parameter")
        spec = module.spec
        layer = next((u for u in node.users if ops.is_layer(u)), None)
        row, block = table.storage_for(layer.target if layer is not None else None, spec.bits, w.shape)
        if block != spec.block_size:
            raise ValueError(f"weight quantizer {node.target} has block size {spec.block_size}, the "
                             f"{table.name} storage row {row.name} wants {block}")
        q = module.int_weight(w).numpy()
        scale = module.scale.detach().numpy().astype(np.float32)
        check_scale(scale, f"the weights of layer '{module.layer}'")
        axis = spec.axis or 0
        if block:  # [out, in] -> [in, out], blocked along in (axis 0): DQ feeds MatMul directly
            q, scale = q.T, scale.T
        qname = add_initializer(ctx, int_tensor_proto(src.target + "_quantized", q, spec.bits,
                                                      container=row.container))
        sname = ctx.const(np.ascontiguousarray(scale), src.target + "_scale")
        # Zero points explicit even when 0: ONNX Runtime's QGemm fusion requires them.
        zshape = scale.shape if block else (q.shape[axis],)
        zname = add_initializer(ctx, int_tensor_proto(src.target + "_zero_point", np.zeros(zshape, np.int8),
                                                      spec.bits, container=row.container))
        attrs = {"axis": 0, "block_size": block} if block else {"axis": axis}
        out = ctx.node("DequantizeLinear", [qname, sname, zname], 1, **attrs)[0]
        _annotate(ctx.nodes[-1], **{META_BITS: spec.bits, META_QMIN: spec.qmin, META_QMAX: spec.qmax,
                                    META_CONTAINER: row.container, META_STORAGE: row.name})
        notes["weights"].append({"layer": module.layer, "bits": spec.bits, "qmin": spec.qmin, "qmax": spec.qmax,
                                 "container": row.container, "block": block, "rule": row.name})
        if row.warn:
            notes["warnings"].setdefault(row.name, row.warn)
        if block:
            ctx.bind_transposed(node, out)
            out = ctx.op("Transpose", out, perm=[1, 0])  # the FX value's layout; unused by linear
        return out

    def activation(ctx, node, module):
        x = ctx.value(node.args[0])
        spec = module.spec
        scale = float(module.scale)
        check_scale(np.float32(scale), f"activation '{module.source}'")
        zp = int(module.zero_point)
        s = ctx.const(np.array(scale, dtype=np.float32), node.name + "_scale")
        z = add_initializer(ctx, numpy_helper.from_array(
            np.array(zp, dtype=np.uint8 if not spec.signed else np.int8), node.name + "_zero_point"))
        if spec.bits < 8:
            lo = ctx.const(np.array((spec.qmin - zp) * scale, dtype=np.float32), node.name + "_lo")
            hi = ctx.const(np.array((spec.qmax - zp) * scale, dtype=np.float32), node.name + "_hi")
            x = ctx.node("Clip", [x, lo, hi], 1)[0]
            if table.low_bit_act_warn:
                notes["warnings"].setdefault(f"{table.name}.low_bit_activations", table.low_bit_act_warn)
        q = ctx.node("QuantizeLinear", [x, s, z], 1)[0]
        out = ctx.node("DequantizeLinear", [q, s, z], 1)[0]
        if spec.bits < 8:
            _annotate(ctx.nodes[-1], **{META_BITS: spec.bits, META_QMIN: spec.qmin, META_QMAX: spec.qmax})
        return out

    def handler(ctx, node, module):
        if isinstance(module, WeightQuantizer):
            return weight(ctx, node, module)
        if isinstance(module, ActQuantizer):
            return activation(ctx, node, module)
        raise ValueError(f"no ONNX lowering for module {type(module).__name__} ({node.target})")

    return handler


# ---------------------------------------------------------------- ONNX graph clean-ups


def _producers(graph):
    return {o: n for n in graph.node for o in n.output}


def _consumers(graph):
    out = {}
    for n in graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def quantize_biases(model: onnx.ModelProto) -> int:
    """Float bias of a DQ-fed Conv/Gemm -> int32 initializer + DequantizeLinear(s_in * s_w)."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    names = set(inits)
    prod = _producers(g)
    done = 0
    new_nodes = []
    for node in g.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in inits:
            continue
        dq_x, dq_w = prod.get(node.input[0]), prod.get(node.input[1])
        if not (dq_x is not None and dq_w is not None and dq_x.op_type == dq_w.op_type == "DequantizeLinear"):
            continue
        sx, sw = inits.get(dq_x.input[1]), inits.get(dq_w.input[1])
        if sx is None or sw is None:
            continue
        sx, sw = numpy_helper.to_array(sx).astype(np.float64), numpy_helper.to_array(sw).astype(np.float64)
        if sx.size != 1:
            continue
        bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
        scale = (sx.reshape(()) * np.broadcast_to(sw, bias.shape)).astype(np.float32)
        qb = np.clip(np.round(bias / scale.astype(np.float64)), -2**31, 2**31 - 1).astype(np.int32)
        base = stem = node.input[2]
        k = 0
        while base + "_int32" in names:  # a layer called twice: one int32 bias per call (own s_in)
            k += 1
            base = f"{stem}_{k}"
        names.update((base + "_int32", base + "_int32_scale", base + "_int32_zero_point"))
        g.initializer.append(numpy_helper.from_array(qb, base + "_int32"))
        g.initializer.append(numpy_helper.from_array(scale, base + "_int32_scale"))
        g.initializer.append(numpy_helper.from_array(np.zeros(qb.shape, np.int32), base + "_int32_zero_point"))
        out = base + "_dequantized_" + str(done)
        new_nodes.append((node, helper.make_node(
            "DequantizeLinear", [base + "_int32", base + "_int32_scale", base + "_int32_zero_point"], [out],
            axis=0, name=out)))
        node.input[2] = out
        done += 1
    _insert_before(g, new_nodes)
    return done


def _insert_before(g, pairs):
    if not pairs:
        return
    order = list(g.node)
    before = {}
    for consumer, new in pairs:
        before.setdefault(id(consumer), []).append(new)
    del g.node[:]
    for n in order:
        g.node.extend(before.get(id(n), []))
        g.node.append(n)


def dedicate_dequantize(model: onnx.ModelProto) -> int:
    """Give every activation DequantizeLinear a single consumer (ONNX Runtime groups node units
    around dedicated DQs)."""
    g = model.graph
    cons = _consumers(g)
    graph_outputs = {o.name for o in g.output}
    pairs = []
    count = 0
    for node in list(g.node):
        if node.op_type != "DequantizeLinear":
            continue
        users = cons.get(node.output[0], [])
        if len(users) + (node.output[0] in graph_outputs) <= 1:
            continue
        for k, user in enumerate(users[1:], start=1):
            name = f"{node.output[0]}_c{k}"
            clone = helper.make_node("DequantizeLinear", list(node.input), [name], name=name)
            clone.attribute.extend(node.attribute)
            for j, inp in enumerate(user.input):
                if inp == node.output[0]:
                    user.input[j] = name
            pairs.append((user, clone))
            count += 1
    _insert_before(g, pairs)
    return count


def _float_weight_channels(node, inits) -> tuple[int, int] | None:
    """(axis, channels) of the activation input of a Conv/ConvTranspose/Gemm whose weight is a
    float initializer; None for any other node."""
    w = inits.get(node.input[1]) if len(node.input) > 1 else None
    if w is None or w.data_type != TensorProto.FLOAT or len(w.dims) < 2:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Conv":
        return 1, int(w.dims[1]) * int(attrs.get("group", 1))
    if node.op_type == "ConvTranspose":
        return 1, int(w.dims[0])
    if node.op_type == "Gemm":
        k = int(w.dims[1]) if attrs.get("transB", 0) else int(w.dims[0])
        return (0 if attrs.get("transA", 0) else 1), k
    return None


def keep_float_layers_float(model: onnx.ModelProto) -> int:
    """Give the dequantized input of every float-weight Conv/ConvTranspose/Gemm a per-channel
    scale (the per-tensor one repeated along the channel axis: the same values).

    Why: ONNX Runtime's level-1 optimizer ``WeightBiasQuantization`` (1.21 and later) quantizes
    the float weight of such a layer to *per-tensor* symmetric int8 whenever its input comes
    from a per-tensor DequantizeLinear and its output reaches a QuantizeLinear -- exactly what a
    layer kept in float between two int8 layers looks like. The layer then runs in int8 on a
    grid no quantizer of fxq chose (measured on EfficientNet-Lite0 with one depthwise conv kept
    float: cosine to the fake-quant model 0.9995 with the optimizer off, 0.980 with it on), and
    its latency is an int8 layer's, not the float one the cost model priced. The transformer
    only acts on per-tensor input scales, so a per-channel one keeps the layer float. Runs after
    ``dedicate_dequantize``: each DQ has this layer as its only reader.
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    prod = _producers(g)
    cons = _consumers(g)
    done = 0
    for node in g.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm"):
            continue
        found = _float_weight_channels(node, inits)
        dq = prod.get(node.input[0])
        if found is None or dq is None or dq.op_type != "DequantizeLinear" or len(cons.get(dq.output[0], [])) != 1:
            continue
        scale, zp = inits.get(dq.input[1]), inits.get(dq.input[2]) if len(dq.input) > 2 else None
        if scale is None or zp is None or numpy_helper.to_array(scale).size != 1:
            continue
        axis, channels = found
        if channels < 2:  # one channel: the per-axis scale would have one element, still "scalar"
            continue
        base = dq.output[0]
        for k, (t, suffix) in enumerate(((scale, "_scale_per_channel"), (zp, "_zero_point_per_channel")), start=1):
            values = np.full(channels, numpy_helper.to_array(t).reshape(()), dtype=numpy_helper.to_array(t).dtype)
            g.initializer.append(numpy_helper.from_array(values, base + suffix))
            dq.input[k] = base + suffix
        del dq.attribute[:]
        dq.attribute.append(helper.make_attribute("axis", axis))
        done += 1
    return done


def _zero_spatial_pads(node, inits, rank: int) -> list[int] | None:
    """The spatial pads of a constant-zero Pad over dims >= 2, as ONNX Conv ``pads``; else None."""
    mode = next((a.s for a in node.attribute if a.name == "mode"), b"constant")
    if mode != b"constant" or len(node.input) < 2 or node.input[1] not in inits:
        return None
    if len(node.input) > 2 and node.input[2]:
        if node.input[2] not in inits or np.any(numpy_helper.to_array(inits[node.input[2]]) != 0):
            return None
    if len(node.input) > 3 and node.input[3]:
        return None  # explicit axes: rare, not worth the bookkeeping
    pads = numpy_helper.to_array(inits[node.input[1]]).astype(np.int64).tolist()
    if len(pads) != 2 * rank or any(p < 0 for p in pads):
        return None
    begins, ends = pads[:rank], pads[rank:]
    if begins[:2] != [0, 0] or ends[:2] != [0, 0]:
        return None
    return begins[2:] + ends[2:]


def fold_zero_pad_into_conv(model: onnx.ModelProto) -> int:
    """Pad(0) -> [Q -> DQ ->] Conv  ==>  [Q -> DQ ->] Conv(pads += ...).

    Exact: zero is on every activation grid, so padding before or after Q/DQ gives the same
    values, and Conv pads with zeros. Without this, TF-"same" models keep a float Pad between DQ
    and Conv and ONNX Runtime cannot fuse those convs to QLinearConv.
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    ranks = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in list(g.value_info) + list(g.input)}
    cons = _consumers(g)
    folded = 0
    remove = set()
    for pad in g.node:
        if pad.op_type != "Pad" or pad.input[0] not in ranks:
            continue
        extra = _zero_spatial_pads(pad, inits, ranks[pad.input[0]])
        if extra is None:
            continue
        users = cons.get(pad.output[0], [])
        via_q = len(users) == 1 and users[0].op_type == "QuantizeLinear"
        if via_q:
            dqs = cons.get(users[0].output[0], [])
            if not dqs or any(d.op_type != "DequantizeLinear" for d in dqs):
                continue
            convs = [c for d in dqs for c in cons.get(d.output[0], [])]
        else:
            convs = users
        if not convs or any(c.op_type != "Conv" for c in convs):
            continue
        if any(a.name == "auto_pad" and a.s not in (b"", b"NOTSET") for c in convs for a in c.attribute):
            continue
        for conv in convs:
            old = next((list(a.ints) for a in conv.attribute if a.name == "pads"), [0] * len(extra))
            new = [a + b for a, b in zip(old, extra)]
            kept = [a for a in conv.attribute if a.name != "pads"]
            del conv.attribute[:]
            conv.attribute.extend(kept + [helper.make_attribute("pads", new)])
        if via_q:
            users[0].input[0] = pad.input[0]
            # the Q/DQ values now hold the unpadded tensor: drop their (padded) value_info
            stale = {users[0].output[0], *(d.output[0] for d in dqs)}
            keep_info = [vi for vi in g.value_info if vi.name not in stale]
            del g.value_info[:]
            g.value_info.extend(keep_info)
        else:
            for conv in convs:
                conv.input[0] = pad.input[0]
        remove.add(id(pad))
        folded += 1
    if remove:
        keep = [n for n in g.node if id(n) not in remove]
        del g.node[:]
        g.node.extend(keep)
    return folded


def prune_dead_nodes(model: onnx.ModelProto) -> int:
    """Drop nodes none of whose outputs is read (ONNX ops have no side effects)."""
    g = model.graph
    used = {o.name for o in g.output}
    keep = []
    for n in reversed(g.node):
        if any(o in used for o in n.output):
            keep.append(n)
            used.update(n.input)
    removed = len(g.node) - len(keep)
    if removed:
        del g.node[:]
        g.node.extend(reversed(keep))
    return removed


def prune_initializers(model: onnx.ModelProto) -> int:
    g = model.graph
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [t for t in g.initializer if t.name in used]
    removed = len(g.initializer) - len(keep)
    del g.initializer[:]
    g.initializer.extend(keep)
    return removed


def lower_qdq(gm, opts=None, quantized: bool = True, notes: dict | None = None) -> onnx.ModelProto:
    """ONNX QDQ model of ``gm``; with ``quantized=False`` the float graph (quantizers skipped).
    ``notes`` (a ``new_notes()`` dict) receives each weight's storage and the warnings."""
    from fxq.backends.onnx_builder import lower_to_onnx
    from fxq.backends.tables import ONNX_QDQ

    ex = gm.meta["fxq.example_inputs"]
    handler = make_qdq_handler(gm, ONNX_QDQ, notes) if quantized else None
    model = lower_to_onnx(gm, ex, opset=OPSET, module_handler=handler)
    fold_zero_pad_into_conv(model)
    if quantized:
        quantize_biases(model)
        dedicate_dequantize(model)
        keep_float_layers_float(model)
    prune_dead_nodes(model)
    prune_initializers(model)
    check_model(model)
    return model
