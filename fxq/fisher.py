"""Diagonal-Fisher weights for the block reconstruction loss (``--loss fisher``).

BRECQ approximates the Hessian of the task loss w.r.t. a region's output z by the diagonal
Fisher: each output element's squared error is weighted by (dL/dz)^2. Without labels, L is the KL
divergence between the float model's and the quantized model's predictions.

How fxq computes it: one streaming pass over the calibration set, before any region is
reconstructed, with every quantizer at its calibrated round-to-nearest setting. Per sample,
L = KL(softmax(float logits) || softmax(quantized logits)) summed over the sample (so the gradient
at a sample's z is that sample's own KL gradient, independent of the batch size); the gradients at
all region outputs come from one backward pass, the quantizers passing gradients straight through.
Models whose output is not a [batch, classes] tensor use half the squared error of the output
instead of the KL (the Fisher of a unit-variance Gaussian).

Normalization: with g2 = (dL/dz)^2 and m its mean over all elements and samples of the region,
the weight is w = 1/2 + 1/2 * g2 / m. The mean weight is 1, so the loss has the scale of plain
MSE and the same rounding-regularizer weight and learning rate work for both losses; the floor of
1/2 keeps every output element in the loss, because a gradient that is zero on a few hundred
calibration samples (a feature these images never use) is not zero on the data the model will
see, and pure Fisher weights fitted to a small set overfit it. A region whose gradient is zero
everywhere (the quantized model already matches) falls back to plain MSE.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import fx

from fxq.calibrate import batches, graph_batch_size
from fxq.region_graph import MemoryBudget, ValueStore, _Recorder
from fxq.reconstruct import quantizers_off


def prediction_loss(reference: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """Per-sample-summed divergence of ``output`` from ``reference`` (see the module docstring)."""
    if output.dim() == 2 and output.shape[1] > 1:
        return F.kl_div(output.log_softmax(1), reference.log_softmax(1), log_target=True, reduction="sum")
    return 0.5 * (output - reference).pow(2).sum()


class FisherWeights:
    """Per-region stores of (dL/dz)^2 and their means; ``region(name)`` yields the weights."""

    def __init__(self, stores: dict[str, ValueStore], means: dict[str, float]):
        self.stores, self.means = stores, means

    def region(self, name: str, relevant_fraction: float = 1.0) -> "_Normalized":
        """``relevant_fraction``: the share of elements that reach the output at all
        (``fxq.relevance``); the others have zero gradient, so the mean is taken over these."""
        return _Normalized(self.stores[name], self.means[name] / relevant_fraction)


class _Normalized:
    def __init__(self, store: ValueStore, mean: float):
        self.store, self.mean = store, mean

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> torch.Tensor:
        g2 = self.store[i]
        if not self.mean > 0.0:
            return torch.ones_like(g2)
        return 0.5 + 0.5 * g2 / self.mean


@contextlib.contextmanager
def values_carry_gradients(gm: fx.GraphModule, chunk: torch.Tensor):
    """Make every value computed from the input carry a gradient: a float input requires one; an
    integer input (token ids) cannot, so the graph's float parameters do for the duration (an
    embedding lookup then carries it to everything downstream)."""
    if chunk.is_floating_point():
        yield chunk.clone().requires_grad_(True)
        return
    frozen = [p for p in gm.parameters() if p.is_floating_point() and not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield chunk
    finally:
        for p in frozen:
            p.requires_grad_(False)


def fisher_weights(gm: fx.GraphModule, data: torch.Tensor, names: list[str], budget: MemoryBudget,
                   reference: ValueStore | None = None) -> FisherWeights:
    """Squared KL gradients at nodes ``names`` for every calibration batch (one pass).
    ``reference``: the float model's outputs per batch, if already recorded."""
    stores = {n: ValueStore(f"fisher-{n}", budget) for n in names}
    sums = dict.fromkeys(names, 0.0)
    counts = dict.fromkeys(names, 0)
    for i, chunk in enumerate(batches(data, graph_batch_size(gm))):
        if reference is not None:
            float_out = reference[i]
        else:
            with torch.no_grad(), quantizers_off(gm):
                float_out = gm(chunk)
        with torch.enable_grad(), values_carry_gradients(gm, chunk) as x:
            tap = _Recorder(gm, set(names), last=None)  # records the values, keeps their graph
            out = tap.run(x)
            taps = [tap.values[n] for n in names]
            grads = torch.autograd.grad(prediction_loss(float_out, out), taps, allow_unused=True)
        for name, z, g in zip(names, taps, grads):
            g2 = torch.zeros_like(z) if g is None else g.detach().pow(2)
            stores[name].append(g2)
            sums[name] += float(g2.sum())
            counts[name] += g2.numel()
    return FisherWeights(stores, {n: sums[n] / max(counts[n], 1) for n in names})
