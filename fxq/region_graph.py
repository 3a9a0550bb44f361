"""Regions as runnable sub-graphs, and streaming caches of the values that feed them.

Block reconstruction needs, for region k, its inputs as the *quantized* model computes them and
its output as the *float* model computes it, on every calibration sample. ``extract_region``
cuts the region out of the graph module (sharing its parameters and quantizer modules, so
training the sub-graph trains the model); ``record_values`` streams the calibration set once
through an ``fx.Interpreter``, stops each sample as soon as the requested nodes are computed,
and keeps the values in a ``ValueStore`` that spills to disk past a memory cap. Kept values live
on the budget's device (the GPU when reconstruction runs there), so training batches are gathered
without host-to-device copies.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from torch import fx

from fxq.calibrate import batches, graph_batch_size


def extract_region(gm: fx.GraphModule, output: str, inputs: list[str]) -> tuple[fx.GraphModule, list[str]]:
    """A GraphModule computing node ``output`` from the nodes named in ``inputs``.

    Walks back from the output; input nodes become placeholders (in the given order, plus any
    graph input the walk reaches that was not listed), parameters and quantizer calls are kept.
    Returns the sub-module and the names of its placeholders in order."""
    nodes = {n.name: n for n in gm.graph.nodes}
    out_node = nodes[output]
    boundary = [nodes[name] for name in inputs]
    needed: set[fx.Node] = set()
    stack = [out_node]
    extra_inputs = []
    while stack:
        n = stack.pop()
        if n in needed or n in boundary:
            continue
        if n.op == "placeholder":
            extra_inputs.append(n)
            boundary.append(n)
            continue
        needed.add(n)
        stack.extend(n.all_input_nodes)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for b in boundary:
        env[b] = graph.placeholder(b.name)
        env[b].meta = dict(b.meta)
    for n in gm.graph.nodes:  # original order is a topological order
        if n in needed:
            env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[out_node])
    sub = fx.GraphModule(gm, graph)
    sub.meta["fxq.example_inputs"] = None
    return sub, [b.name for b in boundary]


class ValueStore:
    """Per-batch tensors of one node, in memory up to a shared budget, then on disk."""

    def __init__(self, name: str, budget: "MemoryBudget"):
        self.name = name
        self.budget = budget
        self._items: list[torch.Tensor | Path] = []

    def append(self, t: torch.Tensor) -> None:
        t = t.detach()
        nbytes = t.numel() * t.element_size()
        if self.budget.take(nbytes):
            self._items.append(t.to(self.budget.device, copy=True))
        else:
            path = self.budget.spill_path(self.name, len(self._items))
            torch.save(t.cpu().clone(), path)
            self._items.append(path)

    def __len__(self) -> int:
        return len(self._items)

    def release(self) -> None:
        """Give the memory back to the budget and delete spilled files."""
        for item in self._items:
            if isinstance(item, Path):
                item.unlink(missing_ok=True)
            else:
                self.budget.used -= item.numel() * item.element_size()
        self._items = []

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self._items[i]
        return torch.load(item, weights_only=True, map_location=self.budget.device) if isinstance(item, Path) else item

    @property
    def spilled(self) -> int:
        return sum(isinstance(i, Path) for i in self._items)


class MemoryBudget:
    """A byte cap shared by the stores of one job, on one device (host memory for "cpu")."""

    def __init__(self, max_bytes: int, spill_dir: str | Path | None = None, device: str | torch.device = "cpu"):
        self.max_bytes = max_bytes
        self.device = torch.device(device)
        self.used = 0
        self._dir = Path(spill_dir) if spill_dir else None
        self._own_dir = spill_dir is None
        self._serial = 0  # stores of the same node (float target, quantized input) never share files

    def take(self, nbytes: int) -> bool:
        if self.used + nbytes > self.max_bytes:
            return False
        self.used += nbytes
        return True

    def spill_path(self, name: str, index: int) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="fxq-cache-"))
        self._dir.mkdir(parents=True, exist_ok=True)
        self._serial += 1
        return self._dir / f"{name}-{index}-{self._serial}.pt"

    def cleanup(self) -> None:
        if self._own_dir and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


class _StopEarly(Exception):
    pass


class _Recorder(fx.Interpreter):
    def __init__(self, gm, wanted: set[str], last: str):
        super().__init__(gm)
        self.wanted = wanted
        self.last = last
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.wanted:
            self.values[n.name] = out
        if n.name == self.last:
            raise _StopEarly
        return out


@torch.no_grad()
def record_values(gm: fx.GraphModule, data: torch.Tensor, names: list[str], budget: MemoryBudget) -> dict[str, ValueStore]:
    """One streaming pass: the values of nodes ``names`` for every batch of ``data``. Each batch
    stops at the last requested node, so caching the inputs of an early region is cheap."""
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    missing = [n for n in names if n not in order]
    if missing:
        raise KeyError(f"no node named {missing[0]!r} in the graph")
    last = max(names, key=order.__getitem__)
    stores = {name: ValueStore(name, budget) for name in names}
    for chunk in batches(data, graph_batch_size(gm)):
        rec = _Recorder(gm, set(names), last)
        try:
            rec.run(chunk)
        except _StopEarly:
            pass
        for name in names:
            stores[name].append(rec.values[name])
    return stores
