"""Empirical bias correction: remove the mean output shift that weight rounding causes.

Rounding a layer's weights changes E[W x] per output channel whenever the layer's inputs have a
non-zero mean (a depthwise conv after a BN with a large gain is the classic case: at 7 bits it
costs EfficientNet-Lite0 a quarter of its top-1 agreement). For each quantized layer we measure,
on calibration data and with the quantized model's own inputs, mean(conv(x, W_q) - conv(x, W))
per output channel, and subtract it from the bias. One streaming pass over the data corrects all
layers at once.
"""
from __future__ import annotations

import torch
from torch import fx, nn

from fxq import ops
from fxq.calibrate import batches, graph_batch_size
from fxq.quantizers import WeightQuantizer


def _get(gm, target):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _set(gm, target, value):
    owner, _, name = target.rpartition(".")
    setattr(gm.get_submodule(owner) if owner else gm, name, value)


class _ShiftRecorder(fx.Interpreter):
    def __init__(self, gm, layers):
        super().__init__(gm)
        self.layers = layers          # node -> (float weight get_attr target)
        self.sums: dict[fx.Node, torch.Tensor] = {}
        self.batches = 0

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.layers:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            args = list(args)
            args[1] = _get(self.module, self.layers[n])
            ref = n.target(*args, **kwargs)
            diff = (out - ref).detach()
            dim = 1 if ops.is_op(n, ops.CONV_OPS) else -1
            mean = diff.movedim(dim, 0).reshape(diff.shape[dim], -1).mean(1)
            self.sums[n] = self.sums.get(n, 0) + mean
        return out


@torch.no_grad()
def correct_biases(gm: fx.GraphModule, data: torch.Tensor, max_samples: int = 64) -> dict:
    layers = {}
    for node in gm.graph.nodes:
        if not ops.is_layer(node):
            continue
        wq = node.args[1]
        if wq.op != "call_module" or not isinstance(gm.get_submodule(wq.target), WeightQuantizer):
            continue
        src = wq.args[0]
        if src.op == "get_attr":
            layers[node] = src.target
    if not layers:
        return {"corrected_layers": 0}
    rec = _ShiftRecorder(gm, layers)
    chunks = list(batches(data[:max_samples], graph_batch_size(gm)))
    for chunk in chunks:
        rec.run(chunk)
    corrected = 0
    for node, total in rec.sums.items():
        shift = total / len(chunks)
        bias = ops.layer_bias(node)
        if bias is not None and bias.op == "get_attr":
            old = _get(gm, bias.target)
            _set(gm, bias.target, nn.Parameter(old.detach() - shift.to(old.dtype), requires_grad=False))
        else:
            name = f"{node.name}_bias_correction"
            gm.register_parameter(name, nn.Parameter(-shift, requires_grad=False))
            with gm.graph.inserting_before(node):
                b = gm.graph.get_attr(name)
            args = list(node.args)
            while len(args) < 3:
                args.append(None)
            args[2] = b
            node.args = tuple(args)
        corrected += 1
    gm.recompile()
    return {"corrected_layers": corrected, "samples": len(chunks) * graph_batch_size(gm)}
