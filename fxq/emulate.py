"""Integer-exact emulation of the quantized graph as ONNX Runtime's fused x86 kernels run it.

fxq's fake-quant model computes each quantized layer in float (DQ -> conv -> Q). ONNX Runtime
fuses the same graph into integer kernels: QLinearConv/QGemm accumulate (q_x - z_x) * q_w + q_b
exactly in int32 and requantize with a float32 multiplier; QLinearAdd and
QLinearGlobalAveragePool rescale in float32 as well. The two differ by one quantization step now
and then, which is enough to flip near-tie predictions. ``IntegerEmulator`` runs the fake-quant
graph with those kernel semantics so fxq can predict what the runtime will output.

Measured: bit-exact against ONNX Runtime 1.32 on a model of convs, residual adds, pooling and a
classifier (tests/test_emulate.py); on EfficientNet-Lite0 about 1e-5 of the depthwise-conv
outputs still differ by one step (ONNX Runtime's AVX2 depthwise u8s8 kernel accumulates in its
own order), which is not emulated.

Values flow as one of: a float tensor; ``QTensor`` (integers on an activation grid);
``Accumulator`` (exact int32 sums of a conv/linear with their per-channel input*weight scale);
``PendingAdd`` / ``PendingPool`` (an add or global average pool of quantized inputs, waiting for
the output quantizer that ONNX Runtime fuses into it). Anything else is dequantized to float and
run as in the fake-quant model, which is what ONNX Runtime does for ops it does not fuse.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx
from torch.nn import functional as F

from fxq import ops
from fxq.quantizers import ActQuantizer, WeightQuantizer

aten = torch.ops.aten
f32 = torch.float32
f64 = torch.float64

# Ops ONNX Runtime removes in front of a QuantizeLinear whose range they do not restrict.
_CLAMP_OPS = {aten.relu.default, aten.relu_.default, aten.hardtanh.default, aten.hardtanh_.default}
_POOL_OPS = {aten.adaptive_avg_pool2d.default, aten.mean.dim}


@dataclass
class QTensor:
    q: torch.Tensor      # float64 holding integers
    scale: torch.Tensor  # float32 scalar
    zp: int

    def dequantize(self) -> torch.Tensor:
        return ((self.q - self.zp).to(f32) * self.scale)


@dataclass
class WeightInts:
    q: torch.Tensor      # float64 integers
    scale: torch.Tensor  # float32 per channel


@dataclass
class Accumulator:
    acc: torch.Tensor    # float64 exact integer sums (bias included)
    in_scale: torch.Tensor
    w_scale: torch.Tensor
    channel_dim: int
    clamps: tuple = ()   # (lo, hi) float clamps ORT drops when the output Q sits inside them

    def dequantize(self) -> torch.Tensor:
        s = (self.in_scale * self.w_scale).to(f32)
        shape = [1] * self.acc.dim()
        shape[self.channel_dim] = -1
        y = self.acc.to(f32) * s.reshape(shape)
        for lo, hi in self.clamps:
            y = y.clamp(lo, hi)
        return y


@dataclass
class PendingAdd:
    a: QTensor
    b: QTensor

    def dequantize(self) -> torch.Tensor:
        return self.a.dequantize() + self.b.dequantize()


@dataclass
class PendingPool:
    x: QTensor
    dims: tuple
    keepdim: bool

    def dequantize(self) -> torch.Tensor:
        return self.x.dequantize().mean(dim=self.dims, keepdim=self.keepdim)


_SPECIAL = (QTensor, WeightInts, Accumulator, PendingAdd, PendingPool)


def _requantize(values_f32: torch.Tensor, q: ActQuantizer) -> QTensor:
    z = int(q.zero_point)
    y = torch.round(values_f32).to(f64) + z
    return QTensor(y.clamp(q.spec.qmin, q.spec.qmax), q.scale.to(f32), z)


def _float(v):
    if isinstance(v, WeightInts):
        shape = [-1] + [1] * (v.q.dim() - 1)
        return v.q.to(f32) * v.scale.reshape(shape)
    if isinstance(v, _SPECIAL):
        return v.dequantize()
    if isinstance(v, (list, tuple)):
        return type(v)(_float(x) for x in v)
    return v


class IntegerEmulator(fx.Interpreter):
    """Run a materialized, calibrated fxq graph with ONNX Runtime's fused integer semantics."""

    def call_module(self, target, args, kwargs):
        mod = self.module.get_submodule(target)
        x = args[0]
        if isinstance(mod, WeightQuantizer):
            return WeightInts(mod.int_weight(x).to(f64), mod.scale.to(f32))
        if isinstance(mod, ActQuantizer) and mod.mode == "quantize" and mod.spec.bits == 8:
            return self._quantize(x, mod)
        return super().call_module(target, tuple(_float(a) for a in args), kwargs)

    def _quantize(self, x, q: ActQuantizer) -> QTensor:
        sy = q.scale.to(f32)
        if isinstance(x, QTensor):
            if x.zp == int(q.zero_point) and torch.equal(x.scale, sy):
                return x  # a shared quantizer called again: already on this grid
            x = x.dequantize()
        if isinstance(x, Accumulator):
            # QLinearConv / QGemm: float32(acc) * float32(s_x * s_w / s_y), round half to even
            mult = (x.in_scale * x.w_scale) / sy
            shape = [1] * x.acc.dim()
            shape[x.channel_dim] = -1
            lo, hi = (q.spec.qmin - int(q.zero_point)) * sy, (q.spec.qmax - int(q.zero_point)) * sy
            if all(clo <= lo and chi >= hi for clo, chi in x.clamps):
                return _requantize(x.acc.to(f32) * mult.reshape(shape).to(f32), q)
            x = x.dequantize()
        if isinstance(x, PendingAdd):
            # QLinearAdd: (a - z_a) * (s_a / s_c) + (b - z_b) * (s_b / s_c)
            ra, rb = (x.a.scale / sy).to(f32), (x.b.scale / sy).to(f32)
            val = (x.a.q - x.a.zp).to(f32) * ra + (x.b.q - x.b.zp).to(f32) * rb
            return _requantize(val, q)
        if isinstance(x, PendingPool):
            # QLinearGlobalAveragePool: exact integer sum, one float32 scale s_x / (s_y * N)
            n = 1
            for d in x.dims:
                n *= x.x.q.shape[d]
            total = (x.x.q - x.x.zp).sum(dim=x.dims, keepdim=x.keepdim)
            scale = (x.x.scale / (sy * n)).to(f32)
            return _requantize(total.to(f32) * scale, q)
        x = _float(x)
        return _requantize(x / sy, q)

    def call_function(self, target, args, kwargs):
        if target in ops.LAYER_OPS and isinstance(args[0], QTensor) and isinstance(args[1], WeightInts):
            return self._layer(target, args, kwargs)
        if target in _CLAMP_OPS and isinstance(args[0], Accumulator):
            acc = args[0]
            if target in (aten.relu.default, aten.relu_.default):
                bounds = (0.0, float("inf"))
            else:
                bounds = (float(args[1]) if len(args) > 1 else -1.0, float(args[2]) if len(args) > 2 else 1.0)
            return Accumulator(acc.acc, acc.in_scale, acc.w_scale, acc.channel_dim, acc.clamps + (bounds,))
        if target in ops.ADD_OPS and len(args) == 2 and all(isinstance(a, QTensor) for a in args) \
                and not kwargs.get("alpha", 1) != 1:
            return PendingAdd(args[0], args[1])
        if target in _POOL_OPS and isinstance(args[0], QTensor):
            x = args[0]
            if target == aten.adaptive_avg_pool2d.default and list(args[1]) == [1, 1]:
                return PendingPool(x, (2, 3), True)
            if target == aten.mean.dim:
                keep = bool(args[2]) if len(args) > 2 else kwargs.get("keepdim", False)
                return PendingPool(x, tuple(d % x.q.dim() for d in args[1]), keep)
        if target == aten.constant_pad_nd.default and isinstance(args[0], QTensor) \
                and (len(args) < 3 or float(args[2]) == 0.0):
            x = args[0]
            return QTensor(F.pad(x.q, list(args[1]), value=float(x.zp)), x.scale, x.zp)
        if target in ops.TRANSPARENT_OPS and isinstance(args[0], QTensor):
            x = args[0]
            return QTensor(target(x.q, *args[1:], **kwargs), x.scale, x.zp)
        return super().call_function(target, tuple(_float(a) for a in args),
                                     {k: _float(v) for k, v in kwargs.items()})

    def _layer(self, target, args, kwargs):
        x, w = args[0], args[1]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        sx = x.scale
        step = (sx.to(f64) * w.scale.to(f64)).to(f32)
        rest = list(args[3:])
        xq = (x.q - x.zp)
        acc = target(xq, w.q, None, *rest) if target != aten.linear.default else F.linear(xq, w.q)
        channel_dim = 1 if target in ops.CONV_OPS else acc.dim() - 1
        if bias is not None:
            b = _float(bias).to(f64)
            qb = torch.round(b / step.to(f64)).clamp(-2**31, 2**31 - 1)
            shape = [1] * acc.dim()
            shape[channel_dim] = -1
            acc = acc + qb.reshape(shape)
        return Accumulator(acc, sx, w.scale, channel_dim)

    def output(self, target, args, kwargs):
        return _float(super().output(target, args, kwargs))


@torch.no_grad()
def emulate(gm: fx.GraphModule, *inputs: torch.Tensor) -> torch.Tensor:
    return IntegerEmulator(gm).run(*inputs)


@torch.no_grad()
def emulate_batched(gm: fx.GraphModule, data: torch.Tensor) -> torch.Tensor:
    """``emulate`` over every sample of ``data`` at the graph's static batch size."""
    from fxq.calibrate import graph_batch_size, map_padded

    return map_padded(lambda chunk: emulate(gm, chunk), data, graph_batch_size(gm))
