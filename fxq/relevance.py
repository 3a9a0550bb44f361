"""Which elements of a region's output can reach the model's output at all.

A transformer run on padded batches computes hidden states for the padding tokens too, but the
attention mask keeps them out of every real token's attention and the pooling skips them: they
never reach the output. On all-MiniLM-L6-v2 with docstring sentences padded to 64 tokens that is
two thirds of every region's output, and a reconstruction loss summed over all elements spends
two thirds of its weight fitting values nobody reads (docs/transformers.md has the effect).

The rule is generic. In a sample, an element is irrelevant when the gradient of a random
projection of the model's output with respect to it is exactly zero whatever the values are: a
multiplication by a zero that comes from elsewhere (a mask built from the input), a softmax
weight of exactly zero. Zeros that depend on the value itself are not structural — the losers
of a max-pool, a ReLU's negative side — and quantization error moves them; masking those would
let reconstruction drift them freely. So on the first calibration batch the gradients are taken
three times: at the float values, and twice with every region output replaced by random values
of its mean and spread (the replacement keeps the gradient path to earlier regions). A node
whose zero set is the same all three times is masked; one whose zeros move is not. The masks of
the remaining batches then come from one backward pass each, at the float values.

Cost: three backward passes on the first batch; one per batch after it only when some node is
masked (none for convolutional networks, whose zeros come from ReLUs and max-pools).
"""
from __future__ import annotations

import torch
from torch import fx
from torch.utils._pytree import tree_leaves

from fxq.calibrate import batches, graph_batch_size
from fxq.fisher import values_carry_gradients
from fxq.reconstruct import quantizers_off
from fxq.region_graph import MemoryBudget, ValueStore, _Recorder


class RelevanceMasks:
    """Per-region boolean masks per calibration batch, and the fraction of elements they keep."""

    def __init__(self, stores: dict[str, ValueStore], fractions: dict[str, float]):
        self.stores, self.fractions = stores, fractions

    def __contains__(self, name: str) -> bool:
        return name in self.stores

    def region(self, name: str) -> ValueStore:
        return self.stores[name]


class _Tap(_Recorder):
    """Records the values of ``wanted`` nodes; with ``gen``, replaces each by random values of
    its mean and spread whose gradient still flows to the original (value of the noise,
    derivative of the identity)."""

    def __init__(self, gm, wanted: set[str], gen: torch.Generator | None = None):
        super().__init__(gm, wanted, last=None)
        self.gen = gen

    def run_node(self, n):
        out = super().run_node(n)
        if self.gen is not None and n.name in self.wanted and isinstance(out, torch.Tensor) \
                and out.is_floating_point():
            with torch.no_grad():
                noise = torch.randn(out.shape, generator=self.gen).to(out) * out.std() + out.mean()
            out = self.values[n.name] = out + (noise - out).detach()
        return out


def _gradients(gm: fx.GraphModule, chunk: torch.Tensor, names: list[str], seed: int,
               replace: bool) -> list[torch.Tensor]:
    """d<output, r>/d(value) at nodes ``names`` for a random ``r``; a value the output does not
    depend on at all gets ones (counted relevant: there is nothing to mask it against)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.enable_grad(), quantizers_off(gm), values_carry_gradients(gm, chunk) as x:
        tap = _Tap(gm, set(names), gen if replace else None)
        outs = [o for o in tree_leaves(tap.run(x))
                if isinstance(o, torch.Tensor) and o.is_floating_point() and o.requires_grad]
        taps = [tap.values[n] for n in names]
        if not outs:  # no float output depends on the input: nothing to tell apart
            return [torch.ones_like(t) for t in taps]
        projection = sum((o * torch.randn(o.shape, generator=gen).to(o)).sum() for o in outs)
        grads = torch.autograd.grad(projection, taps, allow_unused=True)
    return [torch.ones_like(t) if g is None else g.detach() for t, g in zip(taps, grads)]


def relevance_masks(gm: fx.GraphModule, data: torch.Tensor, names: list[str], budget: MemoryBudget,
                    seed: int = 0, rows: bool = False) -> RelevanceMasks:
    """Masks of the elements of nodes ``names`` that can reach the output (see the module
    docstring), for the nodes where some element structurally cannot.

    With ``rows`` the unit is a row of the last dimension (a token of a linear layer's output;
    masks [..., 1]): a row is irrelevant when none of its elements reaches the output. Element
    zero sets can move where whole rows' do not: GELU's derivative underflows to exactly 0 for
    inputs below about -10, so an MLP's first linear layer has moving zeros inside its real
    tokens, and no element mask, while its padding rows stay zero."""
    if rows:
        def grads(*args, **kwargs):
            return [g.abs().amax(-1, keepdim=True) for g in _gradients(*args, **kwargs)]
    else:
        grads = _gradients
    masked: list[str] = []
    stores: dict[str, ValueStore] = {}
    kept: dict[str, int] = {}
    counts: dict[str, int] = {}
    for i, chunk in enumerate(batches(data, graph_batch_size(gm))):
        if i == 0:
            zero = [g == 0 for g in grads(gm, chunk, names, seed, replace=False)]
            moved = [False] * len(names)
            for trial in (1, 2):
                for j, g in enumerate(grads(gm, chunk, names, seed * 7919 + trial, replace=True)):
                    moved[j] = moved[j] or not torch.equal(zero[j], g == 0)
            masked = [n for n, z, m in zip(names, zero, moved) if not m and bool(z.any()) and not bool(z.all())]
            if not masked:
                return RelevanceMasks({}, {})
            first = dict(zip(names, zero))
            masks = {n: ~first[n] for n in masked}
            stores = {n: ValueStore(f"relevance-{n}", budget) for n in masked}
            kept, counts = dict.fromkeys(masked, 0), dict.fromkeys(masked, 0)
        else:
            masks = {n: g != 0 for n, g in zip(masked, grads(gm, chunk, masked, seed * 7919 + 100 + i,
                                                                  replace=False))}
        for n in masked:
            stores[n].append(masks[n])
            kept[n] += int(masks[n].sum())
            counts[n] += masks[n].numel()
    return RelevanceMasks(stores, {n: kept[n] / counts[n] for n in masked})
