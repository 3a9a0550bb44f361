"""Quantized-model values for region after region, each graph node computed about once.

Region k trains on its inputs as the model computes them with regions before k already
reconstructed. Rerunning the model from its inputs for every region costs O(regions x model).
Instead the ``Frontier`` keeps the values it last produced (the previous region's inputs, plus
the graph inputs) and computes the next region's inputs from them: it cuts out the segment of the
graph between the kept values and the wanted node (``extract_region``) and runs only that, on
many cached samples per call. The segment passes through the regions reconstructed since, so
their new rounding and step sizes are in the values.

Segments run batched (cached samples concatenated) when that is exact: the first chunk is also
run one cached batch at a time and compared; a graph with its batch size baked into a reshape,
or a shape error, falls back to one call per cached batch.
"""
from __future__ import annotations

import torch
from torch import fx

from fxq.calibrate import batches, graph_batch_size
from fxq.region_graph import MemoryBudget, ValueStore, extract_region

CHUNK = 32  # cached batches per segment call


def _reached_inputs(gm: fx.GraphModule, output: str, available: set[str]) -> list[str]:
    """The available values a walk back from ``output`` stops at, in graph order."""
    nodes = {n.name: n for n in gm.graph.nodes}
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    seen, reached, stack = set(), set(), [nodes[output]]
    while stack:
        n = stack.pop()
        if n.name in seen:
            continue
        seen.add(n.name)
        if n.name in available:
            reached.add(n.name)
            continue
        stack.extend(n.all_input_nodes)
    return sorted(reached, key=order.__getitem__)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    # batched and single convolutions may differ in the last float bit, which can move a few
    # activations by one quantization step; a baked-in batch size changes values wholesale
    if a.shape != b.shape:
        return False
    scale = float(b.abs().mean()) + 1e-12
    return float((a - b).abs().mean()) <= 1e-3 * scale


class Frontier:
    def __init__(self, gm: fx.GraphModule, data: torch.Tensor, budget: MemoryBudget):
        self.gm = gm
        self.budget = budget
        self.placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        if len(self.placeholders) != 1:
            raise ValueError("the frontier recorder expects a graph with one input")
        store = ValueStore(self.placeholders[0], budget)
        for chunk in batches(data, graph_batch_size(gm)):
            store.append(chunk)
        self.values: dict[str, ValueStore] = {self.placeholders[0]: store}
        self.batched: dict[str, bool] = {}

    def get(self, names: list[str]) -> dict[str, ValueStore]:
        """Stores of ``names`` (computed if not kept); afterwards only they and the graph inputs
        are kept."""
        order = {n.name: i for i, n in enumerate(self.gm.graph.nodes)}
        out = {}
        for name in sorted(names, key=order.__getitem__):
            out[name] = self.values[name] if name in self.values else self._compute(name)
        for name in list(self.values):
            if name not in out and name not in self.placeholders:
                self.values.pop(name).release()
        self.values.update(out)
        return out

    def forget(self, produced_by_modules: set[str]) -> None:
        """Drop kept values computed by call_module nodes of ``produced_by_modules`` (their
        modules just trained, so the kept values are stale)."""
        for node in self.gm.graph.nodes:
            if node.op == "call_module" and node.target in produced_by_modules and node.name in self.values:
                self.values.pop(node.name).release()

    def release(self) -> None:
        for store in self.values.values():
            store.release()
        self.values = {}

    @torch.no_grad()
    def _compute(self, name: str) -> ValueStore:
        inputs = _reached_inputs(self.gm, name, set(self.values))
        seg, names = extract_region(self.gm, name, inputs)
        stores = [self.values[n] for n in names]
        n_items = len(stores[0])
        result = ValueStore(name, self.budget)
        key = f"{name}<-{','.join(names)}"
        batched = self.batched.get(key, True)
        start = 0
        while start < n_items:
            stop = min(start + (CHUNK if batched else 1), n_items)
            items = range(start, stop)
            if batched:
                try:
                    out = seg(*[torch.cat([s[i] for i in items]) for s in stores])
                    sizes = [stores[0][i].shape[0] for i in items]
                    pieces = list(torch.split(out, sizes)) if out.shape[0] == sum(sizes) else None
                    if pieces is not None and key not in self.batched:
                        single = seg(*[s[start] for s in stores])
                        if not _close(pieces[0], single):
                            pieces = None
                        self.batched[key] = pieces is not None
                except RuntimeError:
                    pieces = None
                if pieces is None:
                    batched = self.batched[key] = False
                    continue  # redo this chunk one cached batch at a time
                for p in pieces:
                    result.append(p)
            else:
                result.append(seg(*[s[start] for s in stores]))
            start = stop
        return result
