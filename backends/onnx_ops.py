"""The ONNX op table: one small emitter per ATen op family.

An emitter is ``fn(ctx, node, a) -> str | list[str] | None``: ``ctx`` is the
``LoweringContext`` (see ``backends/onnx_builder.py`` for its API), ``node`` the FX node and ``a``
its arguments by ATen schema name with defaults filled in (``a.input``, ``a.self``,
``a.stride`` ...). It returns the ONNX value name of the node's result (a list for ops that return
several tensors, which ``operator.getitem`` nodes then pick from).

Register with ``@emits(op, ...)``. An ``OpOverload`` (``aten.add.Tensor``) matches exactly; an
``OpOverloadPacket`` (``aten.add``) matches every overload without an exact entry; an in-place
op (``aten.add_.Tensor``) falls back to its functional twin, and the driver rebinds the mutated
argument so later readers see the new value.

Static shapes from ``node.meta["val"]`` are used wherever ONNX wants a shape (Reshape, Expand,
Split sizes), so no Shape/Gather arithmetic is emitted.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Callable

import numpy as np
import torch
from torch import fx

aten = torch.ops.aten

Emitter = Callable[..., Any]
EMITTERS: dict[Any, Emitter] = {}

# Ops whose output is their input, unchanged: lowered to nothing.
IDENTITY_OPS = {
    aten.contiguous.default, aten.clone.default, aten.alias.default, aten.detach.default,
    aten.dropout.default, aten.dropout_.default, aten.feature_dropout.default,
    aten.feature_dropout_.default, aten.alpha_dropout.default, aten.feature_alpha_dropout.default,
    aten.lift_fresh_copy.default, aten.lift_fresh.default, aten.detach_.default,
}
# Ops whose result depends only on the shapes of their tensor inputs (folded even when those
# inputs are graph values, since shapes are static).
SHAPE_ONLY_OPS = {
    aten.zeros_like.default, aten.ones_like.default, aten.full_like.default, aten.empty_like.default,
    aten.new_zeros.default, aten.new_ones.default, aten.new_full.default, aten.new_empty.default,
    aten.sym_size.int, aten.sym_numel.default, aten.size.int, aten.scalar_tensor.default,
}
# Never evaluated at lowering time: random, or the torch-level Q/DQ ops a backend must see.
_NO_FOLD_NAMESPACES = {"quantized_decomposed", "fxq"}
_NO_FOLD = {aten.rand.default, aten.randn.default, aten.randint.default, aten.bernoulli.default,
            aten.bernoulli.p, aten.rand_like.default, aten.randn_like.default, aten.normal.Tensor_float,
            aten.native_dropout.default}


def emits(*targets: Any) -> Callable[[Emitter], Emitter]:
    def register(fn: Emitter) -> Emitter:
        for target in targets:
            EMITTERS[target] = fn
        return fn
    return register


def _functional_twin(target: Any) -> Any:
    packet = getattr(target, "overloadpacket", None)
    if packet is None:
        return None
    name = packet.__name__
    if not name.endswith("_") or name.startswith("_"):
        return None
    twin_packet = getattr(aten, name[:-1], None)
    if twin_packet is None:
        return None
    return getattr(twin_packet, target._overloadname, None) or twin_packet


def lookup(target: Any) -> Emitter | None:
    """The emitter for an FX call_function target, or None."""
    for candidate in (target, _functional_twin(target)):
        if candidate is None:
            continue
        fn = EMITTERS.get(candidate)
        if fn is None:
            packet = getattr(candidate, "overloadpacket", None)
            fn = EMITTERS.get(packet) if packet is not None else None
        if fn is not None:
            return fn
    return None


def is_identity(target: Any) -> bool:
    return target in IDENTITY_OPS


def is_shape_only(target: Any) -> bool:
    return target in SHAPE_ONLY_OPS


def can_fold(target: Any) -> bool:
    if not callable(target) or target in _NO_FOLD:
        return False
    namespace = getattr(target, "namespace", None)
    return namespace not in _NO_FOLD_NAMESPACES


# ---------------------------------------------------------------------------- helpers
def _ints(value: Any, n: int) -> list[int]:
    if isinstance(value, int):
        return [value] * n
    value = [int(v) for v in value]
    return value * n if len(value) == 1 else value


def _axis(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def _i64(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def _reshape(ctx, x: str, shape) -> str:
    shape = [int(s) for s in shape]
    # A literal 0 in an ONNX shape means "copy" unless allowzero; only zero-size tensors need it.
    allowzero = 1 if 0 in shape else None
    return ctx.op("Reshape", x, ctx.const(_i64(shape), "shape"), allowzero=allowzero)


# ---------------------------------------------------------------------------- identity & casts
@emits(*IDENTITY_OPS)
def _identity(ctx, node, a):
    return ctx.value(node.args[0])


@emits(aten.native_dropout.default)
def _native_dropout(ctx, node, a):
    return [ctx.value(a.input), None]


@emits(aten._assert_tensor_metadata.default, aten._assert_scalar.default,
       aten.sym_constrain_range_for_size.default, aten._assert_async.msg)
def _no_op(ctx, node, a):
    return None


@emits(aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.to.device,
       aten.type_as.default, aten._to_copy)
def _to(ctx, node, a):
    x = node.args[0]
    return ctx.cast(ctx.value(x), ctx.dtype(node), from_dtype=ctx.dtype(x))


@emits(operator.getitem)
def _getitem(ctx, node, a):
    src, index = node.args
    values = ctx._values.get(src)
    if not isinstance(values, list):
        ctx.fail(f"getitem on '{src.name}', which does not hold a tuple of values")
    value = values[index]
    if value is None:
        ctx.fail(f"output {index} of '{src.name}' is not supported by its ONNX lowering")
    return value


# ---------------------------------------------------------------------------- elementwise
_UNARY = {
    aten.relu: "Relu", aten.sigmoid: "Sigmoid", aten.tanh: "Tanh", aten.exp: "Exp",
    aten.log: "Log", aten.sqrt: "Sqrt", aten.abs: "Abs", aten.neg: "Neg",
    aten.reciprocal: "Reciprocal", aten.erf: "Erf", aten.sin: "Sin", aten.cos: "Cos",
    aten.floor: "Floor", aten.ceil: "Ceil", aten.round: "Round", aten.sign: "Sign",
    aten.hardswish: "HardSwish", aten.logical_not: "Not",
    aten.mish: "Mish", aten.isnan: "IsNaN",
}


def _unary(op_type: str) -> Emitter:
    def emit(ctx, node, a):
        x = node.args[0]
        in_dtype = torch.bool if op_type == "Not" else (
            ctx.dtype(x) if op_type == "IsNaN" else ctx.dtype(node))
        return ctx.op(op_type, ctx.value(x, dtype=in_dtype))
    emit.__name__ = f"_unary_{op_type}"
    return emit


for _packet, _op_type in _UNARY.items():
    emits(_packet)(_unary(_op_type))


@emits(aten.rsqrt)
def _rsqrt(ctx, node, a):
    return ctx.op("Reciprocal", ctx.op("Sqrt", ctx.value(node.args[0], dtype=ctx.dtype(node))))


@emits(aten.silu)
def _silu(ctx, node, a):
    x = ctx.value(a.self, dtype=ctx.dtype(node))
    return ctx.op("Mul", x, ctx.op("Sigmoid", x))


@emits(aten.hardsigmoid)
def _hardsigmoid(ctx, node, a):
    return ctx.op("HardSigmoid", ctx.value(a.self), alpha=1.0 / 6.0, beta=0.5)


@emits(aten.leaky_relu)
def _leaky_relu(ctx, node, a):
    return ctx.op("LeakyRelu", ctx.value(a.self), alpha=float(a.negative_slope))


@emits(aten.prelu.default, aten._prelu_kernel.default)
def _prelu(ctx, node, a):
    x, w = a.self, a.weight
    slope = ctx.value(w)
    rank, w_rank = ctx.rank(x), ctx.rank(w)
    if w_rank == 1 and ctx.shape(w)[0] > 1 and rank > 2:
        # torch applies a per-channel slope on axis 1; ONNX broadcasts from the right.
        slope = _reshape(ctx, slope, [ctx.shape(w)[0]] + [1] * (rank - 2))
    return ctx.op("PRelu", ctx.value(x), slope)


@emits(aten.elu)
def _elu(ctx, node, a):
    if a.scale != 1 or a.input_scale != 1:
        ctx.fail("elu with scale/input_scale (selu-style) has no ONNX emitter")
    return ctx.op("Elu", ctx.value(a.self), alpha=float(a.alpha))


@emits(aten.softplus)
def _softplus(ctx, node, a):
    x = ctx.value(a.self)
    if a.beta == 1:
        return ctx.op("Softplus", x)
    beta = ctx.value(float(a.beta), ctx.dtype(node))
    return ctx.op("Div", ctx.op("Softplus", ctx.op("Mul", x, beta)), beta)


@emits(aten.gelu)
def _gelu(ctx, node, a):
    dtype = ctx.dtype(node)
    x = ctx.value(a.self, dtype)
    if ctx.opset >= 20:
        return ctx.op("Gelu", x, approximate=a.approximate)
    half, one = ctx.value(0.5, dtype), ctx.value(1.0, dtype)
    if a.approximate == "tanh":
        cube = ctx.op("Mul", ctx.op("Mul", x, x), x)
        inner = ctx.op("Add", x, ctx.op("Mul", cube, ctx.value(0.044715, dtype)))
        t = ctx.op("Tanh", ctx.op("Mul", inner, ctx.value(math.sqrt(2 / math.pi), dtype)))
    else:
        t = ctx.op("Erf", ctx.op("Mul", x, ctx.value(1 / math.sqrt(2), dtype)))
    return ctx.op("Mul", ctx.op("Mul", x, half), ctx.op("Add", t, one))


def _clip(ctx, node, x, lo, hi):
    dtype = ctx.dtype(node)
    lo_name = ctx.value(lo, dtype) if lo is not None else ""
    hi_name = ctx.value(hi, dtype) if hi is not None else ""
    if (lo is not None and isinstance(lo, fx.Node)) or (hi is not None and isinstance(hi, fx.Node)):
        # Tensor bounds broadcast; Clip wants scalars.
        y = ctx.value(x, dtype)
        if lo is not None:
            y = ctx.op("Max", y, lo_name)
        if hi is not None:
            y = ctx.op("Min", y, hi_name)
        return y
    return ctx.op("Clip", ctx.value(x, dtype), lo_name or None, hi_name or None)


@emits(aten.hardtanh)
def _hardtanh(ctx, node, a):
    return _clip(ctx, node, a.self, a.min_val, a.max_val)


@emits(aten.relu6)
def _relu6(ctx, node, a):
    return _clip(ctx, node, a.self, 0.0, 6.0)


@emits(aten.clamp, aten.clip)
def _clamp(ctx, node, a):
    return _clip(ctx, node, a.self, a.min, a.max)


@emits(aten.clamp_min)
def _clamp_min(ctx, node, a):
    return _clip(ctx, node, a.self, a.min, None)


@emits(aten.clamp_max)
def _clamp_max(ctx, node, a):
    return _clip(ctx, node, a.self, None, a.max)


def _result_type(ctx, *args) -> torch.dtype:
    def stand_in(arg):
        if isinstance(arg, fx.Node):
            return torch.empty((0,) if ctx.rank(arg) else (), dtype=ctx.dtype(arg))
        return arg
    return torch.result_type(stand_in(args[0]), stand_in(args[1]))


_BINARY = {aten.add: "Add", aten.sub: "Sub", aten.mul: "Mul", aten.div: "Div",
           aten.maximum: "Max", aten.minimum: "Min", aten.pow: "Pow",
           aten.eq: "Equal", aten.lt: "Less", aten.le: "LessOrEqual", aten.gt: "Greater",
           aten.ge: "GreaterOrEqual", aten.logical_and: "And", aten.logical_or: "Or",
           aten.logical_xor: "Xor",
           aten.fmod: "Mod", aten.remainder: "Mod"}
_COMPARE = {"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"}
_LOGICAL = {"And", "Or", "Xor"}


def _binary(op_type: str) -> Emitter:
    def emit(ctx, node, a):
        lhs, rhs = node.args[0], node.args[1]
        if op_type in _LOGICAL:
            dtype = torch.bool
        elif op_type in _COMPARE:
            dtype = _result_type(ctx, lhs, rhs)
        else:
            dtype = ctx.dtype(node)
        if op_type == "Pow" and not isinstance(rhs, fx.Node):
            # Pow takes its exponent in any numeric type; keep it exact.
            right = ctx.value(rhs, dtype if dtype.is_floating_point else None)
        else:
            right = ctx.value(rhs, dtype)
        alpha = getattr(a, "alpha", 1)
        if op_type in ("Add", "Sub") and alpha is not None and alpha != 1:
            right = ctx.op("Mul", right, ctx.value(alpha, dtype))
        if op_type == "Div":
            mode = getattr(a, "rounding_mode", None)
            if mode is not None:
                return _div_rounding(ctx, node, ctx.value(lhs, dtype), right, mode, dtype)
        attrs = {}
        if op_type == "Mod":
            # torch.fmod truncates like C (fmod=1); remainder follows the divisor's sign.
            attrs["fmod"] = 1 if (node.target.overloadpacket is aten.fmod or dtype.is_floating_point) else 0
            if node.target.overloadpacket is aten.remainder and dtype.is_floating_point:
                ctx.fail("float torch.remainder has no ONNX emitter (ONNX Mod on floats is fmod)")
        return ctx.op(op_type, ctx.value(lhs, dtype), right, **attrs)
    emit.__name__ = f"_binary_{op_type}"
    return emit


for _packet, _op_type in _BINARY.items():
    emits(_packet)(_binary(_op_type))


def _div_rounding(ctx, node, x, y, mode, dtype):
    if not dtype.is_floating_point:
        if mode == "trunc":
            return ctx.op("Div", x, y)  # ONNX integer Div truncates
        ctx.fail("integer floor division has no ONNX emitter")
    q = ctx.op("Div", x, y)
    if mode == "floor":
        return ctx.op("Floor", q)
    return ctx.op("Mul", ctx.op("Sign", q), ctx.op("Floor", ctx.op("Abs", q)))


_BITWISE = {aten.bitwise_and: "And", aten.__and__: "And", aten.bitwise_or: "Or", aten.__or__: "Or",
            aten.bitwise_xor: "Xor", aten.__xor__: "Xor"}


def _bitwise(op_type: str) -> Emitter:
    """``&``, ``|``, ``^``: logical And/Or/Xor on booleans, BitwiseAnd/Or/Xor on integers."""
    def emit(ctx, node, a):
        dtype = ctx.dtype(node)
        if dtype.is_floating_point:
            ctx.fail(f"bitwise {op_type} of floating-point tensors")
        name = op_type if dtype == torch.bool else f"Bitwise{op_type}"
        return ctx.op(name, ctx.value(node.args[0], dtype), ctx.value(node.args[1], dtype))
    emit.__name__ = f"_bitwise_{op_type}"
    return emit


for _packet, _op_type in _BITWISE.items():
    emits(_packet)(_bitwise(_op_type))


@emits(aten.ne)
def _ne(ctx, node, a):
    dtype = _result_type(ctx, node.args[0], node.args[1])
    return ctx.op("Not", ctx.op("Equal", ctx.value(node.args[0], dtype), ctx.value(node.args[1], dtype)))


@emits(aten.rsub)
def _rsub(ctx, node, a):
    dtype = ctx.dtype(node)
    x = ctx.value(a.self, dtype)
    if a.alpha != 1:
        x = ctx.op("Mul", x, ctx.value(a.alpha, dtype))
    return ctx.op("Sub", ctx.value(a.other, dtype), x)


@emits(aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar)
def _where(ctx, node, a):
    dtype = ctx.dtype(node)
    return ctx.op("Where", ctx.value(a.condition, torch.bool), ctx.value(a.self, dtype),
                  ctx.value(a.other, dtype))


@emits(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def _masked_fill(ctx, node, a):
    dtype = ctx.dtype(node)
    return ctx.op("Where", ctx.value(a.mask, torch.bool), ctx.value(a.value, dtype),
                  ctx.value(a.self, dtype))


# ---------------------------------------------------------------------------- linear algebra
@emits(aten.linear.default)
def _linear(ctx, node, a):
    x, w, b = a.input, a.weight, a.bias
    if isinstance(w, fx.Node) and w in ctx.transposed:
        # The weight exists as [in, out] (a blocked weight DQ): DQ -> MatMul, the form ONNX
        # Runtime (MatMulNBits) and TensorRT (weight-only int4) fuse.
        y = ctx.op("MatMul", ctx.value(x), ctx.transposed[w])
        return ctx.op("Add", y, ctx.value(b)) if b is not None else y
    if ctx.rank(x) == 2 and ctx.rank(w) == 2:
        return ctx.op("Gemm", ctx.value(x), ctx.value(w), ctx.value(b) if b is not None else None, transB=1)
    y = ctx.op("MatMul", ctx.value(x), transposed_weight(ctx, w))
    if b is not None:
        y = ctx.op("Add", y, ctx.value(b))
    return y


def transposed_weight(ctx, w) -> str:
    """``w.T`` for a 2-D weight: a transposed initializer when ``w`` is a constant (named
    ``<qualified name>/T``), else a Transpose node (e.g. after a weight quantizer)."""
    if isinstance(w, fx.Node) and w in ctx.transposed:
        return ctx.transposed[w]
    t = ctx.constant(w)
    if t is not None:
        return ctx.const(t.t().contiguous(), f"{ctx.name_hint(w)}/T", share=False)
    if ctx.rank(w) == 1:
        return ctx.value(w)
    return ctx.op("Transpose", ctx.value(w), perm=[1, 0])


@emits(aten.matmul.default, aten.mm.default, aten.bmm.default)
def _matmul(ctx, node, a):
    dtype = ctx.dtype(node)
    return ctx.op("MatMul", ctx.value(node.args[0], dtype), ctx.value(node.args[1], dtype))


@emits(aten.addmm.default)
def _addmm(ctx, node, a):
    return ctx.op("Gemm", ctx.value(a.mat1), ctx.value(a.mat2), ctx.value(a.self),
                  alpha=float(a.alpha), beta=float(a.beta))


@emits(aten.baddbmm.default)
def _baddbmm(ctx, node, a):
    dtype = ctx.dtype(node)
    prod = ctx.op("MatMul", ctx.value(a.batch1), ctx.value(a.batch2))
    if a.alpha != 1:
        prod = ctx.op("Mul", prod, ctx.value(float(a.alpha), dtype))
    base = ctx.value(a.self)
    if a.beta != 1:
        base = ctx.op("Mul", base, ctx.value(float(a.beta), dtype))
    return ctx.op("Add", base, prod)


@emits(aten.einsum.default)
def _einsum(ctx, node, a):
    return ctx.op("Einsum", *[ctx.value(t) for t in a.tensors], equation=a.equation)


# ---------------------------------------------------------------------------- convolution
def _conv(ctx, node, x, w, b, stride, padding, dilation, groups, transposed=False, output_padding=None):
    n = ctx.rank(w) - 2
    kernel = list(ctx.shape(w)[2:])
    stride, dilation = _ints(stride, n), _ints(dilation, n)
    if isinstance(padding, str):
        if padding == "valid":
            pads = [0] * (2 * n)
        else:  # "same": PyTorch puts the odd extra pixel at the end
            total = [d * (k - 1) for d, k in zip(dilation, kernel)]
            pads = [t // 2 for t in total] + [t - t // 2 for t in total]
    else:
        p = _ints(padding, n)
        pads = p + p
    xv = ctx.value(x)
    unbatched = ctx.rank(x) == n + 1
    if unbatched:
        xv = ctx.op("Unsqueeze", xv, ctx.const(_i64([0]), "axes"))
    inputs = [xv, ctx.value(w), ctx.value(b) if b is not None else None]
    if transposed:
        y = ctx.op("ConvTranspose", *inputs, strides=stride, pads=pads, dilations=dilation,
                   group=int(groups), kernel_shape=kernel,
                   output_padding=_ints(output_padding, n) if output_padding is not None else None)
    else:
        y = ctx.op("Conv", *inputs, strides=stride, pads=pads, dilations=dilation, group=int(groups),
                   kernel_shape=kernel)
    if unbatched:
        y = ctx.op("Squeeze", y, ctx.const(_i64([0]), "axes"))
    return y


@emits(aten.conv1d, aten.conv2d, aten.conv3d)
def _convnd(ctx, node, a):
    return _conv(ctx, node, a.input, a.weight, a.bias, a.stride, a.padding, a.dilation, a.groups)


@emits(aten.conv_transpose1d, aten.conv_transpose2d.input, aten.conv_transpose3d.input)
def _conv_transpose(ctx, node, a):
    return _conv(ctx, node, a.input, a.weight, a.bias, a.stride, a.padding, a.dilation, a.groups,
                 transposed=True, output_padding=a.output_padding)


@emits(aten.convolution.default, aten._convolution.default)
def _convolution(ctx, node, a):
    return _conv(ctx, node, a.input, a.weight, a.bias, a.stride, a.padding, a.dilation, a.groups,
                 transposed=bool(a.transposed), output_padding=a.output_padding if a.transposed else None)


# ---------------------------------------------------------------------------- normalization
def _ones_or(ctx, arg, shape, dtype, fill: float, hint: str) -> str:
    if arg is not None:
        return ctx.value(arg)
    return ctx.const(torch.full(tuple(shape), fill, dtype=dtype), hint)


@emits(aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default,
       aten.native_batch_norm.default, aten._native_batch_norm_legit.default)
def _batch_norm(ctx, node, a):
    training = getattr(a, "training", False)
    if training or a.running_mean is None:
        ctx.fail("batch norm in training mode (or without running statistics) cannot be lowered",
                 "Put the model in eval() mode before capture.")
    c = ctx.shape(a.input)[1]
    dtype = ctx.dtype(a.input)
    y = ctx.op("BatchNormalization", ctx.value(a.input),
               _ones_or(ctx, a.weight, [c], dtype, 1.0, f"{node.name}/scale"),
               _ones_or(ctx, a.bias, [c], dtype, 0.0, f"{node.name}/bias"),
               ctx.value(a.running_mean), ctx.value(a.running_var), epsilon=float(a.eps))
    if node.target is aten.batch_norm.default:
        return y
    return [y, None, None]


@emits(aten.layer_norm.default, aten.native_layer_norm.default)
def _layer_norm(ctx, node, a):
    shape = [int(s) for s in a.normalized_shape]
    dtype = ctx.dtype(a.input)
    y = ctx.op("LayerNormalization", ctx.value(a.input),
               _ones_or(ctx, a.weight, shape, dtype, 1.0, f"{node.name}/scale"),
               ctx.value(a.bias) if a.bias is not None else None,
               axis=-len(shape), epsilon=float(a.eps))
    return y if node.target is aten.layer_norm.default else [y, None, None]


@emits(aten.group_norm.default)
def _group_norm(ctx, node, a):
    shape = ctx.shape(a.input)
    c, groups, dtype = shape[1], int(a.num_groups), ctx.dtype(a.input)
    scale = _ones_or(ctx, a.weight, [c], dtype, 1.0, f"{node.name}/scale")
    bias = _ones_or(ctx, a.bias, [c], dtype, 0.0, f"{node.name}/bias")
    if ctx.opset >= 21:  # GroupNormalization-18 had per-group scale; 21 made it per channel
        return ctx.op("GroupNormalization", ctx.value(a.input), scale, bias,
                      num_groups=groups, epsilon=float(a.eps))
    x = _reshape(ctx, ctx.value(a.input), [shape[0], groups, -1])
    mean = ctx.reduce("ReduceMean", x, [2], True)
    centered = ctx.op("Sub", x, mean)
    var = ctx.reduce("ReduceMean", ctx.op("Mul", centered, centered), [2], True)
    std = ctx.op("Sqrt", ctx.op("Add", var, ctx.value(float(a.eps), dtype)))
    y = _reshape(ctx, ctx.op("Div", centered, std), shape)
    bshape = [c] + [1] * (len(shape) - 2)
    return ctx.op("Add", ctx.op("Mul", y, _reshape(ctx, scale, bshape)), _reshape(ctx, bias, bshape))


@emits(aten.instance_norm.default)
def _instance_norm(ctx, node, a):
    if not a.use_input_stats:
        ctx.fail("instance norm with running statistics has no ONNX emitter")
    c, dtype = ctx.shape(a.input)[1], ctx.dtype(a.input)
    return ctx.op("InstanceNormalization", ctx.value(a.input),
                  _ones_or(ctx, a.weight, [c], dtype, 1.0, f"{node.name}/scale"),
                  _ones_or(ctx, a.bias, [c], dtype, 0.0, f"{node.name}/bias"), epsilon=float(a.eps))


# ---------------------------------------------------------------------------- softmax
@emits(aten.softmax.int, aten._softmax.default, aten._safe_softmax.default)
def _softmax(ctx, node, a):
    return ctx.op("Softmax", ctx.value(a.self, ctx.dtype(node)), axis=int(a.dim))


@emits(aten.log_softmax.int, aten._log_softmax.default)
def _log_softmax(ctx, node, a):
    return ctx.op("LogSoftmax", ctx.value(a.self, ctx.dtype(node)), axis=int(a.dim))


# ---------------------------------------------------------------------------- reductions
def _dims(ctx, x, dim) -> list[int] | None:
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return None
    dims = [dim] if isinstance(dim, int) else list(dim)
    rank = ctx.rank(x)
    return sorted(_axis(int(d), rank) for d in dims)


def _reduction(op_type: str) -> Emitter:
    def emit(ctx, node, a):
        x = node.args[0]
        dims = _dims(ctx, x, getattr(a, "dim", None))
        keep = bool(getattr(a, "keepdim", False))
        dtype = ctx.dtype(node)
        return ctx.reduce(op_type, ctx.value(x, dtype), dims, keep)
    emit.__name__ = f"_reduce_{op_type}"
    return emit


for _op, _op_type in ((aten.mean.dim, "ReduceMean"), (aten.mean.default, "ReduceMean"),
                      (aten.sum.dim_IntList, "ReduceSum"), (aten.sum.default, "ReduceSum"),
                      (aten.amax.default, "ReduceMax"), (aten.amin.default, "ReduceMin"),
                      (aten.prod.dim_int, "ReduceProd")):
    emits(_op)(_reduction(_op_type))


@emits(aten.linalg_vector_norm.default)
def _vector_norm(ctx, node, a):
    """‖x‖_p over ``dim``: ReduceL2 / ReduceL1, ReduceMax(|x|) for p = inf, else (Σ|x|^p)^(1/p)."""
    dtype = ctx.dtype(node)
    x = ctx.value(a.self, dtype)
    dims, keep = _dims(ctx, a.self, a.dim), bool(a.keepdim)
    p = float(a.ord)
    if p == 2.0:
        return ctx.reduce("ReduceL2", x, dims, keep)
    if p == 1.0:
        return ctx.reduce("ReduceL1", x, dims, keep)
    if p == math.inf:
        return ctx.reduce("ReduceMax", ctx.op("Abs", x), dims, keep)
    if p == 0.0 or p == -math.inf:
        ctx.fail(f"vector norm of order {p} has no ONNX emitter")
    powered = ctx.op("Pow", ctx.op("Abs", x), ctx.value(p, dtype))
    return ctx.op("Pow", ctx.reduce("ReduceSum", powered, dims, keep), ctx.value(1.0 / p, dtype))


@emits(aten.max.dim, aten.min.dim)
def _max_min_dim(ctx, node, a):
    is_max = node.target is aten.max.dim
    x = ctx.value(a.self)
    axis = _axis(int(a.dim), ctx.rank(a.self))
    keep = int(bool(a.keepdim))
    values = ctx.reduce("ReduceMax" if is_max else "ReduceMin", x, [axis], bool(keep))
    # ONNX ArgMax returns the first occurrence, as torch does on CPU.
    indices = ctx.op("ArgMax" if is_max else "ArgMin", x, axis=axis, keepdims=keep)
    return [values, indices]


@emits(aten.argmax.default, aten.argmin.default)
def _argmax(ctx, node, a):
    op_type = "ArgMax" if node.target is aten.argmax.default else "ArgMin"
    x = ctx.value(a.self)
    if a.dim is None:
        x = _reshape(ctx, x, [-1])
        y = ctx.op(op_type, x, axis=0, keepdims=0)
        return _reshape(ctx, y, ctx.shape(node)) if ctx.shape(node) else y
    return ctx.op(op_type, x, axis=_axis(int(a.dim), ctx.rank(a.self)), keepdims=int(bool(a.keepdim)))


@emits(aten.var.correction, aten.std.correction, aten.var.dim, aten.std.dim)
def _var_std(ctx, node, a):
    x_arg = a.self
    dims = _dims(ctx, x_arg, a.dim)
    shape = ctx.shape(x_arg)
    count = math.prod(shape[d] for d in (dims if dims is not None else range(len(shape))))
    correction = getattr(a, "correction", None)
    if correction is None:
        correction = 1 if getattr(a, "unbiased", True) else 0
    dtype = ctx.dtype(node)
    x = ctx.value(x_arg, dtype)
    mean = ctx.reduce("ReduceMean", x, dims, True)
    centered = ctx.op("Sub", x, mean)
    total = ctx.reduce("ReduceSum", ctx.op("Mul", centered, centered), dims, bool(a.keepdim))
    var = ctx.op("Div", total, ctx.value(float(max(count - correction, 0)), dtype))
    return ctx.op("Sqrt", var) if node.target.overloadpacket is aten.std else var


@emits(aten.cumsum.default)
def _cumsum(ctx, node, a):
    dtype = ctx.dtype(node)
    return ctx.op("CumSum", ctx.value(a.self, dtype), ctx.const(_i64(int(a.dim)), "axis"))


# ---------------------------------------------------------------------------- pooling
def _pool_pads(ctx, node, x, kernel, stride, padding, dilation):
    """Begin/end pads that make ONNX's floor rule produce PyTorch's output size (which may
    come from ceil_mode): the difference goes on the end of each spatial axis."""
    n = len(kernel)
    in_sizes = ctx.shape(x)[-n:]
    out_sizes = ctx.shape(node)[-n:]
    extra = []
    for i in range(n):
        span = dilation[i] * (kernel[i] - 1) + 1
        need = (out_sizes[i] - 1) * stride[i] + span - (in_sizes[i] + 2 * padding[i])
        extra.append(max(0, need))
    return padding + [p + e for p, e in zip(padding, extra)], extra


def _max_pool(ctx, node, a, n):
    kernel = _ints(a.kernel_size, n)
    stride = _ints(a.stride, n) if a.stride else list(kernel)
    padding, dilation = _ints(a.padding, n), _ints(a.dilation, n)
    pads, _ = _pool_pads(ctx, node, a.self, kernel, stride, padding, dilation)
    return ctx.op("MaxPool", ctx.value(a.self), kernel_shape=kernel, strides=stride, pads=pads,
                  dilations=dilation if any(d != 1 for d in dilation) else None)


@emits(aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default)
def _max_poolnd(ctx, node, a):
    return _max_pool(ctx, node, a, ctx.rank(a.self) - 2)


@emits(aten.max_pool2d_with_indices.default, aten.max_pool3d_with_indices.default)
def _max_pool_with_indices(ctx, node, a):
    return [_max_pool(ctx, node, a, ctx.rank(a.self) - 2), None]


@emits(aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default)
def _avg_pool(ctx, node, a):
    n = ctx.rank(a.self) - 2
    if getattr(a, "divisor_override", None) is not None:
        ctx.fail("avg_pool with divisor_override has no ONNX emitter")
    kernel = _ints(a.kernel_size, n)
    stride = _ints(a.stride, n) if a.stride else list(kernel)
    padding = _ints(a.padding, n)
    x = ctx.value(a.self)
    pads, extra = _pool_pads(ctx, node, a.self, kernel, stride, padding, [1] * n)
    if a.count_include_pad and any(padding):
        if not any(extra):
            return ctx.op("AveragePool", x, kernel_shape=kernel, strides=stride, pads=pads,
                          count_include_pad=1)
        # PyTorch counts the real padding but not the ceil_mode overhang: pad explicitly, then
        # let AveragePool exclude only the overhang.
        x = ctx.op("Pad", x, ctx.const(_i64([0, 0] + padding + [0, 0] + padding), "pads"))
        pads = [0] * n + extra
    return ctx.op("AveragePool", x, kernel_shape=kernel, strides=stride, pads=pads, count_include_pad=0)


def _adaptive_pool(ctx, node, a, average: bool):
    x = a.self
    n = ctx.rank(x) - 2
    if n < 1:
        ctx.fail("adaptive pooling of an unbatched input has no ONNX emitter")
    in_sizes = ctx.shape(x)[-n:]
    out_sizes = ctx.shape(node)[-n:]
    if all(o == 1 for o in out_sizes):
        return ctx.op("GlobalAveragePool" if average else "GlobalMaxPool", ctx.value(x))
    if any(i % o for i, o in zip(in_sizes, out_sizes)):
        ctx.fail(f"adaptive pooling from {tuple(in_sizes)} to {tuple(out_sizes)} uses uneven windows, "
                 "which no ONNX pooling op expresses",
                 "Choose an input size divisible by the pooled size, or an output size of 1.")
    kernel = [i // o for i, o in zip(in_sizes, out_sizes)]
    return ctx.op("AveragePool" if average else "MaxPool", ctx.value(x), kernel_shape=kernel, strides=kernel)


@emits(aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default,
       aten.adaptive_avg_pool3d.default, aten._adaptive_avg_pool2d.default,
       aten._adaptive_avg_pool3d.default)
def _adaptive_avg_pool(ctx, node, a):
    return _adaptive_pool(ctx, node, a, True)


@emits(aten.adaptive_max_pool1d.default, aten.adaptive_max_pool2d.default, aten.adaptive_max_pool3d.default)
def _adaptive_max_pool(ctx, node, a):
    return [_adaptive_pool(ctx, node, a, False), None]


# ---------------------------------------------------------------------------- shapes & layout
@emits(aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unflatten.int,
       aten._reshape_alias.default, aten.view_copy.default, aten.view_as.default,
       aten.reshape_as.default)
def _view(ctx, node, a):
    x = node.args[0]
    if ctx.shape(x) == ctx.shape(node):
        return ctx.value(x)
    return _reshape(ctx, ctx.value(x), ctx.shape(node))


@emits(aten.flatten.using_ints)
def _flatten(ctx, node, a):
    rank = ctx.rank(a.self)
    start, end = _axis(int(a.start_dim), max(rank, 1)), _axis(int(a.end_dim), max(rank, 1))
    if ctx.shape(a.self) == ctx.shape(node):
        return ctx.value(a.self)
    if start == 1 and end == rank - 1:
        return ctx.op("Flatten", ctx.value(a.self), axis=1)
    return _reshape(ctx, ctx.value(a.self), ctx.shape(node))


@emits(aten.permute.default)
def _permute(ctx, node, a):
    rank = ctx.rank(a.self)
    perm = [_axis(int(d), rank) for d in a.dims]
    if perm == list(range(rank)):
        return ctx.value(a.self)
    return ctx.op("Transpose", ctx.value(a.self), perm=perm)


@emits(aten.transpose.int, aten.swapaxes.default, aten.swapdims.default)
def _transpose(ctx, node, a):
    x = node.args[0]
    rank = ctx.rank(x)
    d0, d1 = (_axis(int(d), rank) for d in node.args[1:3])
    if d0 == d1:
        return ctx.value(x)
    perm = list(range(rank))
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return ctx.op("Transpose", ctx.value(x), perm=perm)


@emits(aten.t.default, aten.numpy_T.default)
def _t(ctx, node, a):
    rank = ctx.rank(a.self)
    if rank < 2:
        return ctx.value(a.self)
    return ctx.op("Transpose", ctx.value(a.self), perm=list(reversed(range(rank))))


@emits(aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims)
def _squeeze(ctx, node, a):
    shape = ctx.shape(a.self)
    dims = getattr(a, "dim", None)
    candidates = range(len(shape)) if dims is None else (
        [dims] if isinstance(dims, int) else list(dims))
    # torch.squeeze ignores dims whose size is not 1; ONNX Squeeze would reject them.
    axes = sorted({_axis(int(d), len(shape)) for d in candidates if shape[_axis(int(d), len(shape))] == 1}) \
        if shape else []
    if not axes:
        return ctx.value(a.self)
    return ctx.op("Squeeze", ctx.value(a.self), ctx.const(_i64(axes), "axes"))


@emits(aten.unsqueeze.default)
def _unsqueeze(ctx, node, a):
    axis = _axis(int(a.dim), ctx.rank(node))
    return ctx.op("Unsqueeze", ctx.value(a.self), ctx.const(_i64([axis]), "axes"))


@emits(aten.cat.default, aten.concat.default, aten.concatenate.default)
def _cat(ctx, node, a):
    dtype = ctx.dtype(node)
    rank = ctx.rank(node)
    # Legacy torch.cat accepts 1-D empty tensors next to anything; they add nothing.
    parts = [t for t in a.tensors if not (ctx.shape(t) == (0,) and rank != 1)]
    if len(parts) == 1:
        return ctx.value(parts[0], dtype)
    return ctx.op("Concat", *[ctx.value(t, dtype) for t in parts], axis=_axis(int(a.dim), rank))


@emits(aten.stack.default)
def _stack(ctx, node, a):
    axis = _axis(int(a.dim), ctx.rank(node))
    dtype = ctx.dtype(node)
    axes = ctx.const(_i64([axis]), "axes")
    parts = [ctx.op("Unsqueeze", ctx.value(t, dtype), axes) for t in a.tensors]
    return parts[0] if len(parts) == 1 else ctx.op("Concat", *parts, axis=axis)


def _split_sizes(ctx, node, dim_arg) -> tuple[int, list[int]]:
    vals = node.meta.get("val")
    src = node.args[0]
    axis = _axis(int(dim_arg), ctx.rank(src))
    if not isinstance(vals, (list, tuple)):
        ctx.fail("the split has no per-output shapes in meta['val']")
    return axis, [int(v.shape[axis]) for v in vals]


@emits(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default,
       aten.unsafe_split.Tensor, aten.split_with_sizes_copy.default, aten.tensor_split.sections)
def _split(ctx, node, a):
    axis, sizes = _split_sizes(ctx, node, a.dim)
    x = ctx.value(node.args[0])
    if len(sizes) == 1:
        return [x]
    return ctx.node("Split", [x, ctx.const(_i64(sizes), "split")], len(sizes), axis=axis)


@emits(aten.unbind.int)
def _unbind(ctx, node, a):
    axis = _axis(int(a.dim), ctx.rank(a.self))
    sizes = [1] * ctx.shape(a.self)[axis]
    x = ctx.value(a.self)
    axes = ctx.const(_i64([axis]), "axes")
    parts = [x] if len(sizes) == 1 else ctx.node("Split", [x, ctx.const(_i64(sizes), "split")],
                                                 len(sizes), axis=axis)
    return [ctx.op("Squeeze", p, axes) for p in parts]


@emits(aten.slice.Tensor)
def _slice(ctx, node, a):
    shape = ctx.shape(a.self)
    axis = _axis(int(a.dim), len(shape))
    size = shape[axis]
    start, end, step = a.start, a.end, int(a.step)
    start = 0 if start is None else int(start)
    end = size if end is None else int(end)
    start = min(max(start + size if start < 0 else start, 0), size)
    end = min(max(end + size if end < 0 else end, 0), size)
    if start == 0 and end == size and step == 1:
        return ctx.value(a.self)
    return ctx.op("Slice", ctx.value(a.self), ctx.const(_i64([start]), "starts"),
                  ctx.const(_i64([end]), "ends"), ctx.const(_i64([axis]), "axes"),
                  ctx.const(_i64([step]), "steps"))


@emits(aten.select.int)
def _select(ctx, node, a):
    shape = ctx.shape(a.self)
    axis = _axis(int(a.dim), len(shape))
    index = int(a.index)
    index = index + shape[axis] if index < 0 else index
    return ctx.op("Gather", ctx.value(a.self), ctx.const(_i64(index), "index"), axis=axis)


@emits(aten.index_select.default)
def _index_select(ctx, node, a):
    axis = _axis(int(a.dim), ctx.rank(a.self))
    return ctx.op("Gather", ctx.value(a.self), ctx.value(a.index), axis=axis)


@emits(aten.index.Tensor)
def _index(ctx, node, a):
    indices = list(a.indices)
    used = [i for i, t in enumerate(indices) if t is not None]
    if not used or any(ctx.dtype(indices[i]) == torch.bool for i in used):
        ctx.fail("advanced indexing with a boolean mask has no ONNX emitter",
                 "Index with integer tensors, or use torch.where / masked_fill.")
    if len(used) == 1:
        axis = used[0]
        return ctx.op("Gather", ctx.value(a.self), ctx.value(indices[axis]), axis=axis)
    return _index_nd(ctx, node, a.self, indices, used)


def _index_nd(ctx, node, data, indices, used):
    """``x[i, j, ...]`` with several integer index tensors: broadcast them to one shape B, stack
    them on a last axis and GatherND. torch puts B where the indexed dims were when they are
    adjacent, else first; the indexed dims are moved to the front for GatherND and B is moved
    back afterwards."""
    shape = ctx.shape(data)
    rank = len(shape)
    bshape = tuple(torch.broadcast_shapes(*(tuple(ctx.shape(indices[i])) for i in used)))
    rest = [d for d in range(rank) if d not in used]
    x = ctx.value(data)
    if used != list(range(len(used))):
        x = ctx.op("Transpose", x, perm=used + rest)
    stacked = []
    for i in used:
        idx = ctx.value(indices[i])
        if ctx.dtype(indices[i]) != torch.int64:
            idx = ctx.op("Cast", idx, to=7)  # INT64
        if tuple(ctx.shape(indices[i])) != bshape:
            idx = ctx.op("Expand", idx, ctx.const(_i64(bshape), "shape"))
        stacked.append(ctx.op("Unsqueeze", idx, ctx.const(_i64([-1]), "axes")))
    out = ctx.op("GatherND", x, ctx.op("Concat", *stacked, axis=-1))
    adjacent = used == list(range(used[0], used[0] + len(used)))
    if adjacent and used[0] > 0:  # B goes back to where the indexed dims were
        nb, before = len(bshape), used[0]
        perm = list(range(nb, nb + before)) + list(range(nb)) + list(range(nb + before, nb + len(rest)))
        out = ctx.op("Transpose", out, perm=perm)
    return out


@emits(aten.gather.default)
def _gather_elements(ctx, node, a):
    return ctx.op("GatherElements", ctx.value(a.self), ctx.value(a.index),
                  axis=_axis(int(a.dim), ctx.rank(a.self)))


@emits(aten.pixel_shuffle.default)
def _pixel_shuffle(ctx, node, a):
    if ctx.rank(a.self) != 4:
        ctx.fail("pixel_shuffle on a non-4-D tensor has no ONNX emitter")
    # torch's channel order is ONNX's "CRD" (column-row-depth) mode.
    return ctx.op("DepthToSpace", ctx.value(a.self), blocksize=int(a.upscale_factor), mode="CRD")


@emits(aten.embedding.default)
def _embedding(ctx, node, a):
    return ctx.op("Gather", ctx.value(a.weight), ctx.value(a.indices), axis=0)


@emits(aten.expand.default, aten.expand_copy.default, aten.broadcast_to.default,
       aten.expand_as.default)
def _expand(ctx, node, a):
    x = node.args[0]
    if ctx.shape(x) == ctx.shape(node):
        return ctx.value(x)
    return ctx.op("Expand", ctx.value(x), ctx.const(_i64(ctx.shape(node)), "shape"))


@emits(aten.repeat.default)
def _repeat(ctx, node, a):
    repeats = [int(r) for r in a.repeats]
    x = ctx.value(a.self)
    rank = ctx.rank(a.self)
    if len(repeats) > rank:
        x = _reshape(ctx, x, [1] * (len(repeats) - rank) + list(ctx.shape(a.self)))
    return ctx.op("Tile", x, ctx.const(_i64(repeats), "repeats"))


@emits(aten.roll.default)
def _roll(ctx, node, a):
    shape = ctx.shape(a.self)
    x = ctx.value(a.self)
    shifts, dims = list(a.shifts), list(a.dims)
    if not dims:
        flat = _reshape(ctx, x, [-1])
        return _reshape(ctx, _roll_axis(ctx, flat, int(shifts[0]), 0, math.prod(shape)), shape)
    for shift, dim in zip(shifts, dims):
        axis = _axis(int(dim), len(shape))
        x = _roll_axis(ctx, x, int(shift), axis, shape[axis])
    return x


def _roll_axis(ctx, x, shift, axis, size):
    shift %= size
    if shift == 0:
        return x
    axes = ctx.const(_i64([axis]), "axes")
    tail = ctx.op("Slice", x, ctx.const(_i64([size - shift]), "starts"), ctx.const(_i64([size]), "ends"), axes)
    head = ctx.op("Slice", x, ctx.const(_i64([0]), "starts"), ctx.const(_i64([size - shift]), "ends"), axes)
    return ctx.op("Concat", tail, head, axis=axis)


@emits(aten.constant_pad_nd.default)
def _constant_pad(ctx, node, a):
    return _pad(ctx, node, a.self, a.pad, "constant", a.value)


@emits(aten.pad.default)
def _pad_default(ctx, node, a):
    return _pad(ctx, node, a.self, a.pad, a.mode, a.value)


@emits(aten.reflection_pad1d.default, aten.reflection_pad2d.default, aten.reflection_pad3d.default)
def _reflection_pad(ctx, node, a):
    return _pad(ctx, node, a.self, a.padding, "reflect", None)


@emits(aten.replication_pad1d.default, aten.replication_pad2d.default, aten.replication_pad3d.default)
def _replication_pad(ctx, node, a):
    return _pad(ctx, node, a.self, a.padding, "replicate", None)


def _pad(ctx, node, x, pad, mode, value):
    rank = ctx.rank(x)
    pad = [int(p) for p in pad]
    begins, ends = [0] * rank, [0] * rank
    # torch lists (begin, end) pairs starting from the last axis.
    for i in range(len(pad) // 2):
        axis = rank - 1 - i
        begins[axis], ends[axis] = pad[2 * i], pad[2 * i + 1]
    onnx_mode = {"constant": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}.get(mode)
    if onnx_mode is None or (onnx_mode == "wrap" and ctx.opset < 19):
        ctx.fail(f"padding mode '{mode}' has no ONNX emitter at opset {ctx.opset}")
    if not any(begins) and not any(ends):
        return ctx.value(x)
    inputs = [ctx.value(x), ctx.const(_i64(begins + ends), "pads")]
    if onnx_mode == "constant" and value:
        inputs.append(ctx.value(value, ctx.dtype(x)))
    return ctx.op("Pad", *inputs, mode=onnx_mode)


# ---------------------------------------------------------------------------- resize
def _resize(ctx, node, x, mode: str, coordinate: str, nearest_mode: str | None = None):
    sizes = ctx.const(_i64(ctx.shape(node)), "sizes")
    return ctx.op("Resize", ctx.value(x), None, None, sizes, mode=mode,
                  coordinate_transformation_mode=coordinate, nearest_mode=nearest_mode)


@emits(aten.upsample_nearest1d, aten.upsample_nearest2d, aten.upsample_nearest3d)
def _upsample_nearest(ctx, node, a):
    return _resize(ctx, node, node.args[0], "nearest", "asymmetric", "floor")


@emits(aten._upsample_nearest_exact1d, aten._upsample_nearest_exact2d, aten._upsample_nearest_exact3d)
def _upsample_nearest_exact(ctx, node, a):
    return _resize(ctx, node, node.args[0], "nearest", "half_pixel", "round_prefer_ceil")


@emits(aten.upsample_linear1d, aten.upsample_bilinear2d, aten.upsample_trilinear3d)
def _upsample_linear(ctx, node, a):
    coordinate = "align_corners" if a.align_corners else "pytorch_half_pixel"
    return _resize(ctx, node, node.args[0], "linear", coordinate)


# ---------------------------------------------------------------------------- attention
@emits(aten.scaled_dot_product_attention.default)
def _sdpa(ctx, node, a):
    q, k, v = a.query, a.key, a.value
    dtype = ctx.dtype(node)
    q_shape, k_shape = ctx.shape(q), ctx.shape(k)
    if a.enable_gqa and len(q_shape) >= 3 and q_shape[-3] != k_shape[-3]:
        ctx.fail("grouped-query attention (enable_gqa with fewer key heads) has no ONNX emitter")
    scale = a.scale if a.scale is not None else 1.0 / math.sqrt(q_shape[-1])
    rank = len(k_shape)
    perm = list(range(rank))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    k_t = ctx.op("Transpose", ctx.value(k), perm=perm)
    scores = ctx.op("Mul", ctx.op("MatMul", ctx.value(q), k_t), ctx.value(float(scale), dtype))
    length, source = q_shape[-2], k_shape[-2]
    if a.is_causal:
        causal = torch.ones(length, source, dtype=torch.bool).tril()
        bias = torch.zeros(length, source, dtype=dtype).masked_fill(~causal, float("-inf"))
        scores = ctx.op("Add", scores, ctx.const(bias, f"{node.name}/causal_mask"))
    if a.attn_mask is not None:
        mask = a.attn_mask
        if ctx.dtype(mask) == torch.bool:
            neg = ctx.value(float("-inf"), dtype)
            bias = ctx.op("Where", ctx.value(mask), ctx.value(0.0, dtype), neg)
        else:
            bias = ctx.value(mask, dtype)
        scores = ctx.op("Add", scores, bias)
    probs = ctx.op("Softmax", scores, axis=-1)
    return ctx.op("MatMul", probs, ctx.value(v))
