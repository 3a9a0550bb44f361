"""Empirical bias correction: remove the mean output shift that weight rounding causes.

Rounding a layer's weights changes E[W x] per output channel whenever the layer's inputs have a
non-zero mean (a depthwise conv after a BN with a large gain is the classic case: at 7 bits it
costs EfficientNet-Lite0 a quarter of its top-1 agreement). For each quantized layer we measure,
on calibration data and with the quantized model's own inputs, mean(conv(x, W_q) - conv(x, W))
per output channel, and subtract it from the bias. One streaming pass over the data corrects all
layers at once.

The mean is taken over the output elements that can reach the model's output
(``fxq.relevance``). A transformer on padded batches computes rows for its padding tokens too;
their inputs look nothing like real tokens', and on all-MiniLM-L6-v2 they are two thirds of the
rows, so a mean over every row shifted real tokens' outputs by the padding's error: at W4A32,
correcting with it lowered the mean cosine to float from 0.9505 (no correction) to 0.9208.
"""
from __future__ import annotations

import logging

import torch
from torch import fx, nn

from fxq import ops
from fxq.calibrate import batches, graph_batch_size
from fxq.quantizers import WeightQuantizer

log = logging.getLogger(__name__)


class _ShiftRecorder(fx.Interpreter):
    def __init__(self, gm, layers, masks):
        super().__init__(gm)
        self.layers = layers          # node -> (float weight get_attr target)
        self.masks = masks            # fxq.relevance.RelevanceMasks of the layers' outputs
        self.sums: dict[fx.Node, torch.Tensor] = {}
        self.counts: dict[fx.Node, torch.Tensor] = {}
        self.batch = 0

    def run(self, *args):
        out = super().run(*args)
        self.batch += 1
        return out

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.layers:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            args = list(args)
            args[1] = ops.get_attr(self.module, self.layers[n])
            ref = n.target(*args, **kwargs)
            diff = (out - ref).detach()
            dim = 1 if ops.is_op(n, ops.CONV_OPS) else -1

            def per_channel(t):
                return t.movedim(dim, 0).reshape(t.shape[dim], -1).sum(1)

            if n.name in self.masks:
                keep = self.masks.region(n.name)[self.batch].to(diff)
                total, count = per_channel(diff * keep), per_channel(keep)
            else:
                total, count = per_channel(diff), diff.numel() // diff.shape[dim]
            self.sums[n] = self.sums.get(n, 0) + total
            self.counts[n] = self.counts.get(n, 0) + count
        return out


def set_layer_bias(gm: fx.GraphModule, node: fx.Node, value: torch.Tensor) -> None:
    """Make ``value`` the bias of layer ``node``: replace its constant bias, or give a layer
    without one its own parameter (a computed bias is the caller's to rule out)."""
    bias = ops.layer_bias(node)
    assert bias is None or bias.op == "get_attr", f"{node.name}'s bias is computed"
    if bias is not None:
        old = ops.get_attr(gm, bias.target)
        ops.set_attr(gm, bias.target, nn.Parameter(value.detach().to(old.dtype), requires_grad=False))
        return
    name = f"{node.name}_bias_correction"
    gm.register_parameter(name, nn.Parameter(value.detach().clone(), requires_grad=False))
    with gm.graph.inserting_before(node):
        b = gm.graph.get_attr(name)
    args = list(node.args)
    while len(args) < 3:
        args.append(None)
    args[2] = b
    node.args = tuple(args)


@torch.no_grad()
def correct_biases(gm: fx.GraphModule, data: torch.Tensor, max_samples: int = 64) -> dict:
    layers = {}
    for node in gm.graph.nodes:
        if not ops.is_layer(node):
            continue
        wq = node.args[1]
        if wq.op != "call_module" or not isinstance(gm.get_submodule(wq.target), WeightQuantizer):
            continue
        src, bias = wq.args[0], ops.layer_bias(node)
        if src.op == "get_attr" and (bias is None or bias.op == "get_attr"):
            layers[node] = src.target
    if not layers:
        return {"corrected_layers": 0}
    from fxq.region_graph import MemoryBudget
    from fxq.relevance import RelevanceMasks, relevance_masks

    data = data[:max_samples]
    budget = MemoryBudget(2 << 30)
    try:
        try:
            masks = relevance_masks(gm, data, [n.name for n in layers], budget)
        except (RuntimeError, NotImplementedError) as exc:
            # an op without a derivative: no masks, the mean over every element (as before masks)
            log.debug("bias correction without relevance masks (%s)", exc)
            masks = RelevanceMasks({}, {})
        rec = _ShiftRecorder(gm, layers, masks)
        chunks = list(batches(data, graph_batch_size(gm)))
        for chunk in chunks:
            rec.run(chunk)
    finally:
        budget.cleanup()
    corrected = 0
    for node, total in rec.sums.items():
        # a channel no relevant element reaches keeps its bias
        shift = total / torch.as_tensor(rec.counts[node]).clamp(min=1)
        bias = ops.layer_bias(node)
        old = ops.get_attr(gm, bias.target).detach() if bias is not None else 0.0
        set_layer_bias(gm, node, old - shift)
        corrected += 1
    gm.recompile()
    return {"corrected_layers": corrected, "samples": len(chunks) * graph_batch_size(gm),
            "masked_layers": len(masks.fractions)}


@torch.no_grad()
def snap_biases_to_int32_grid(gm: fx.GraphModule) -> int:
    """Round each quantized layer's bias onto the grid the runtime uses (scale s_in * s_w, int32).

    The ONNX model stores such biases as int32 (so ONNX Runtime can fold them into QLinearConv /
    QGemm); snapping the PyTorch bias to the same values keeps fxq's fake-quant model and the
    ONNX model numerically identical there, instead of differing by up to half a step.
    """
    from fxq.quantizers import ActQuantizer

    snapped = 0
    for node in gm.graph.nodes:
        if not ops.is_layer(node):
            continue
        x, w, b = node.args[0], node.args[1], ops.layer_bias(node)
        if b is None or b.op != "get_attr" or x.op != "call_module" or w.op != "call_module":
            continue
        aq, wq = gm.get_submodule(x.target), gm.get_submodule(w.target)
        if not (isinstance(aq, ActQuantizer) and isinstance(wq, WeightQuantizer)):
            continue
        old = ops.get_attr(gm, b.target)
        step = (aq.scale.double() * wq.scale.double()).to(old.dtype)
        if step.numel() not in (1, old.numel()):
            continue
        new = torch.round(old.detach().double() / step.double()).clamp(-2**31, 2**31 - 1) * step.double()
        ops.set_attr(gm, b.target, nn.Parameter(new.to(old.dtype), requires_grad=False))
        snapped += 1
    return snapped
