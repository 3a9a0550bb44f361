"""Latency cost models for mixed precision: per layer, per precision -> milliseconds.

A *target* is where the compiled model will run. Its cost model turns a captured graph module
(with ``gm.meta["fxq.regions"]``), a set of allowed precisions and a batch size into
:class:`CostTables`: a latency table per quantized layer, the cost of changing precision
between adjacent layers, and the latency of everything outside the layers (``fixed_ms``) --
exactly what ``fxq.search.build_group`` / ``Problem`` take::

    tables = cost_tables(gm, "ort-cpu", batch=1)           # or "bitserial", "trt-a100", ...
    groups = [build_group(r.name, r.layers, sensitivity[r.name],
                          tables.layer_latency(r.layers), tables.transition)
              for r in gm.meta["fxq.regions"]]
    problem = Problem(groups, **tables.problem_kwargs())
    ...
    tables.predict_ms(solution.layers)                      # per-edge exact prediction

Targets (``TARGETS``):

* ``ort-cpu`` (default) -- **measured** on this machine: ONNX Runtime times each of the model's
  fused segments (a layer with its trailing activation; every other computing op) in float and
  in int8 QDQ, interleaved; Q/DQ costs are timed per tensor shape. Cached on disk.
* ``trt-t4``, ``trt-a100``, ``trt-h100``, ``trt-orin`` -- an **estimate**: a roofline
  (max of compute time at the datasheet's dense peak and memory time at its bandwidth).
* ``bitserial`` -- a **model** of a bit-serial accelerator: MACs x weight bits x activation bits
  over a constant throughput (2/4/8 bits all pay off).
* a ``trtexec --exportProfile`` JSON (``latency_table=``): **profile** times per layer.

Precision labels: ``int`` bits for integer precisions (``8`` = int8, ``4`` = int4, ...), a
string for the unquantized one (``"float"`` on ort-cpu and bitserial, ``"fp16"`` on TensorRT).
See docs/mixed_precision.md ("Cost models").
"""
from __future__ import annotations

import hashlib
import json
import math
import operator
import os
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Mapping, Sequence

import numpy as np

from fxq.errors import FxqError

Precision = Hashable
Progress = Callable[[int, int, str], None]

TARGETS = ("ort-cpu", "bitserial", "trt-t4", "trt-a100", "trt-h100", "trt-orin")
DEFAULT_TARGET = "ort-cpu"
FLOAT, FP16 = "float", "fp16"
# bump when segment construction or measurement changes: old cache entries are then ignored
COST_MODEL_VERSION = 5

_ALIASES = {"int8": 8, "int4": 4, "int2": 2, "i8": 8, "i4": 4, "fp32": FLOAT, "float32": FLOAT,
            "half": FP16, "float16": FP16}


def normalize_precision(p: Precision) -> Precision:
    """``"int8"`` -> ``8``, ``"8"`` -> ``8``, ``"fp32"`` -> ``"float"``; other labels unchanged."""
    if isinstance(p, bool):
        raise FxqError(f"{p!r} is not a precision.", "Use bits (2, 4, 8) or 'float' / 'fp16'.")
    if isinstance(p, (int, np.integer)):
        return int(p)
    if isinstance(p, str):
        s = p.strip().lower()
        if s.isdigit():
            return int(s)
        return _ALIASES.get(s, s)
    return p


def is_float(p: Precision) -> bool:
    """Unquantized labels (``"float"``, ``"fp16"``) are strings; integer precisions are bits."""
    return isinstance(p, str)


def precision_order(precisions: Sequence[Precision]) -> list[Precision]:
    """Highest first: unquantized labels, then integer bits descending."""
    floats = [p for p in precisions if is_float(p)]
    ints = sorted((p for p in precisions if not is_float(p)), reverse=True)
    return floats + ints


# =============================================================================================
# The model as segments: what each target prices
# =============================================================================================

@dataclass(frozen=True)
class LayerInfo:
    """Shapes and work of one quantizable layer at the tables' batch size."""

    name: str                       # FX node name, as in Region.layers
    qualname: str                   # owner of the weight, e.g. "layer1.0.conv1"
    op: str                         # "conv" | "conv_transpose" | "linear"
    input_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    macs: int

    @property
    def input_elements(self) -> int:
        return math.prod(self.input_shape)

    @property
    def output_elements(self) -> int:
        return math.prod(self.output_shape)

    @property
    def weight_elements(self) -> int:
        return math.prod(self.weight_shape)

    def to_json(self) -> dict:
        return {"name": self.name, "qualname": self.qualname, "op": self.op,
                "input_shape": list(self.input_shape), "weight_shape": list(self.weight_shape),
                "output_shape": list(self.output_shape), "macs": self.macs}


@dataclass
class Segment:
    """A run of FX nodes a runtime executes as one kernel: a layer or another computing op,
    followed by the pointwise ops (activation, unfolded BatchNorm) it feeds alone."""

    name: str                       # the first node's name (a layer's node name for layers)
    kind: str                       # "layer" | "op"
    nodes: list                     # fx.Node, in order
    inputs: list                    # (fx.Node feeding the segment, producer Segment | None)
    consumers_output: bool = False  # the segment's value is (part of) a graph output


@dataclass
class _Edge:
    producer: str | None            # segment name; None = the model input
    consumer: str | None            # segment name; None = the model output
    shape: tuple[int, ...]

    @property
    def elements(self) -> int:
        return math.prod(self.shape)


_SKIP_OPS = None


def _skip_ops() -> set:
    """Ops that move no data worth timing alone (views, identities, shape arithmetic)."""
    global _SKIP_OPS
    if _SKIP_OPS is None:
        import torch

        from fxq.backends import onnx_ops

        aten = torch.ops.aten
        names = ("view.default", "reshape.default", "_unsafe_view.default", "flatten.using_ints",
                 "squeeze.dim", "squeeze.dims", "squeeze.default", "unsqueeze.default",
                 "expand.default", "t.default")
        extra = set()
        for n in names:
            packet, _, overload = n.partition(".")
            op = getattr(getattr(aten, packet, None), overload, None)
            if op is not None:
                extra.add(op)
        _SKIP_OPS = set(onnx_ops.IDENTITY_OPS) | set(onnx_ops.SHAPE_ONLY_OPS) | extra | {operator.getitem}
    return _SKIP_OPS


def _fusable_ops() -> set:
    import torch

    from fxq import ops

    extra = {torch.ops.aten.relu6.default} if hasattr(torch.ops.aten, "relu6") else set()
    return set(ops.ACTIVATION_OPS) | set(ops.BATCHNORM_OPS) | extra


def _real(node):
    """The value a quantizer (call_module) passes through: its input."""
    while getattr(node, "op", None) == "call_module" and node.args:
        node = node.args[0]
    return node


def _shape(node) -> tuple[int, ...] | None:
    val = node.meta.get("val") if hasattr(node, "meta") else None
    shape = getattr(val, "shape", None)
    return tuple(int(d) for d in shape) if shape is not None else None


def _with_batch(shape: Sequence[int], batch: int, captured: int) -> tuple[int, ...]:
    shape = tuple(int(d) for d in shape)
    if shape and batch != captured and shape[0] == captured:
        return (batch,) + shape[1:]
    return shape


class SegmentGraph:
    """The graph module cut into segments, with the tensors flowing between them."""

    def __init__(self, gm, batch: int | None = None):
        from fxq import ops
        from fxq.calibrate import graph_batch_size

        self.gm = gm
        self.captured_batch = graph_batch_size(gm)
        self.batch = int(batch) if batch is not None else self.captured_batch
        if self.batch < 1:
            raise FxqError(f"batch must be >= 1, got {batch}.", "Pass a positive batch size.")
        nodes = list(gm.graph.nodes)
        live: set = set()
        for n in nodes:
            if n.op == "placeholder" or (n.op in ("call_function", "call_module", "call_method")
                                          and any(a in live for a in n.all_input_nodes)):
                live.add(n)
        self.live = live
        skip, fusable = _skip_ops(), _fusable_ops()
        self.segments: list[Segment] = []
        self.segment_of: dict = {}
        for n in nodes:
            if n.op != "call_function" or n not in live or n in self.segment_of or n.target in skip:
                continue
            chain = [n]
            while True:
                users = list(chain[-1].users)
                if len(users) != 1:
                    break
                u = users[0]
                if u.op == "call_function" and (u.target in fusable or u.target is operator.getitem) \
                        and u not in self.segment_of:
                    chain.append(u)
                    continue
                break
            seg = Segment(n.name, "layer" if ops.is_layer(n) else "op", chain, [])
            for c in chain:
                self.segment_of[c] = seg
            self.segments.append(seg)
        self.by_name = {s.name: s for s in self.segments}
        for seg in self.segments:
            members = set(seg.nodes)
            seen = set()
            for c in seg.nodes:
                for a in c.all_input_nodes:
                    r = _real(a)
                    if r in members or r not in live or r in seen:
                        continue
                    seen.add(r)
                    seg.inputs.append((r, self._producer(r)))
        out = next(n for n in nodes if n.op == "output")
        self.outputs = []
        for a in out.all_input_nodes:
            r = _real(a)
            self.outputs.append((r, self._producer(r)))
            prod = self._producer(r)
            if prod is not None:
                prod.consumers_output = True
        self.layers: dict[str, LayerInfo] = {}
        for seg in self.segments:
            if seg.kind == "layer":
                self.layers[seg.name] = self._layer_info(seg.nodes[0])

    def _producer(self, node) -> Segment | None:
        skip = _skip_ops()
        while True:
            node = _real(node)
            if node in self.segment_of:
                return self.segment_of[node]
            if node.op == "call_function" and node.target in skip and node.all_input_nodes:
                live_inputs = [a for a in node.all_input_nodes if _real(a) in self.live]
                if not live_inputs:
                    return None
                node = live_inputs[0]
                continue
            return None

    def shape(self, node) -> tuple[int, ...]:
        s = _shape(node)
        if s is None:
            raise FxqError(f"Node '{node.name}' has no recorded shape.",
                           "Capture the model with fxq.capture.capture so every node has meta['val'].")
        return _with_batch(s, self.batch, self.captured_batch)

    def _layer_info(self, node) -> LayerInfo:
        from fxq import ops

        x = _real(node.args[0])
        w = _real(node.args[1])
        in_shape, out_shape = self.shape(x), self.shape(node)
        w_shape = _shape(w)
        if w_shape is None and w.op == "get_attr":
            w_shape = tuple(ops.get_attr(self.gm, w.target).shape)
        w_shape = tuple(w_shape)
        transposed = node.target in {t for t in ops.CONV_OPS if "transpose" in str(t)}
        if str(node.target).endswith("convolution.default") and len(node.args) > 6:
            transposed = bool(node.args[6])
        if node.target in ops.LINEAR_OPS:
            kind = "linear"
            macs = math.prod(out_shape) * w_shape[1]
        elif transposed:
            kind = "conv_transpose"
            # every input element meets out_channels/groups x kernel weights
            macs = math.prod(in_shape) * math.prod(w_shape[1:])
        else:
            kind = "conv"
            macs = math.prod(out_shape) * math.prod(w_shape[1:])
        return LayerInfo(node.name, ops.layer_name(node), kind, in_shape, w_shape, out_shape, int(macs))

    def edges(self) -> list[_Edge]:
        out = []
        for seg in self.segments:
            for node, prod in seg.inputs:
                out.append(_Edge(prod.name if prod is not None else None, seg.name, self.shape(node)))
        for node, prod in self.outputs:
            out.append(_Edge(prod.name if prod is not None else None, None, self.shape(node)))
        return out

    def layer_input_edges(self) -> list[_Edge]:
        return [e for e in self.edges() if e.consumer in self.layers]


def describe_layers(gm, batch: int | None = None) -> dict[str, LayerInfo]:
    """Every quantizable layer of ``gm`` in graph order: shapes and MACs at ``batch``."""
    return dict(SegmentGraph(gm, batch).layers)


# =============================================================================================
# Tables: what the search consumes
# =============================================================================================

@dataclass
class CostTables:
    """Per-layer latency tables of one target, plus what links the layers.

    ``latency[layer][precision]`` in ms (only the precisions the target runs that layer at);
    ``transition(a, b)``: the search's cost of a precision change between adjacent layers (the
    mean over the model's layer inputs of the per-tensor cost, see ``edge_ms``); ``fixed_ms``:
    everything outside the layers. ``kind`` says what the numbers are: ``measured``,
    ``estimate``, ``model`` or ``profile``.
    """

    target: str
    kind: str
    batch: int
    precisions: tuple
    float_precision: Precision | None
    layers: dict[str, LayerInfo]
    latency: dict[str, dict]
    fixed_ms: float
    notes: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    # exact pieces for predict_ms
    op_ms: dict = field(default_factory=dict)          # op segment -> {act type: ms}
    overhead_ms: float = 0.0
    edges: list = field(default_factory=list)
    act_type: Callable[[Precision], str] | None = field(default=None, repr=False)
    edge_cost: Callable[[str, str, tuple], float] | None = field(default=None, repr=False)
    _transition: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)

    # -- for fxq.search ----------------------------------------------------------------------
    def transition(self, a: Precision, b: Precision) -> float:
        return self._transition.get((normalize_precision(a), normalize_precision(b)), 0.0)

    def layer_latency(self, layers: Iterable[str]) -> list[dict]:
        """``build_group``'s ``layer_latency`` argument for these layers (FX node names)."""
        out = []
        for name in layers:
            if name not in self.latency:
                raise FxqError(f"Layer '{name}' is not a quantizable layer of this graph "
                               f"(known: {', '.join(list(self.latency)[:8])}...).",
                               "Pass Region.layers (FX node names) of the same graph module.")
            out.append(dict(self.latency[name]))
        return out

    def problem_kwargs(self) -> dict:
        """``Problem(groups, **tables.problem_kwargs())``: transition, fixed_ms and the model's
        input/output precision (float: charging the cast into the first and out of the last
        layer)."""
        has_transitions = any(v > 0 for v in self._transition.values())
        return {"transition": self.transition if has_transitions else None,
                "fixed_ms": self.fixed_ms,
                "input_precision": self.float_precision if has_transitions else None,
                "output_precision": self.float_precision if has_transitions else None}

    # -- prediction --------------------------------------------------------------------------
    def predict_ms(self, assignment: Mapping[str, Precision] | Precision) -> float:
        """Predicted end-to-end latency of one precision per layer (a mapping, or one precision
        for every layer). Unlike the search's additive view, transitions are priced per tensor
        on the real edges of the graph, and non-layer ops at the precision of their inputs."""
        return sum(self.predict_parts(assignment).values())

    def predict_parts(self, assignment: Mapping[str, Precision] | Precision) -> dict[str, float]:
        """``predict_ms`` split by the kind of work: ``{activation type: ms}`` (``"float"``,
        ``"int8"`` ...; one ``"all"`` entry on targets without activation types). The run
        overhead counts as float work, precision changes (Q/DQ) as work of the integer side."""
        if not isinstance(assignment, Mapping):
            p = normalize_precision(assignment)
            assignment = {name: p for name in self.latency}
        assignment = {k: normalize_precision(v) for k, v in assignment.items()}
        missing = [n for n in self.latency if n not in assignment]
        if missing:
            raise FxqError(f"No precision given for layer(s) {', '.join(missing[:5])}.",
                           "Give every layer a precision (or one precision for all).")
        for name, p in assignment.items():
            if name not in self.latency:
                raise FxqError(f"Unknown layer '{name}'.", "Use FX node names from Region.layers.")
            if p not in self.latency[name]:
                raise FxqError(f"Layer '{name}' cannot run at precision {p!r} on {self.target} "
                               f"(it can at {', '.join(map(repr, self.latency[name]))}).",
                               "Pick one of those.")
        if self.act_type is None:
            return {"all": self.overhead_ms + sum(self.latency[n][p] for n, p in assignment.items())
                    + sum(self._op_cost(seg, None) for seg in self.op_ms)}
        base = self.act_type(self.float_precision)
        parts: dict[str, float] = {base: self.overhead_ms}

        def add(kind: str, ms: float) -> None:
            parts[kind] = parts.get(kind, 0.0) + ms

        act: dict[str | None, str] = {None: base}
        for name, p in assignment.items():
            act[name] = self.act_type(p)
            add(act[name], self.latency[name][p])
        # op segments: int8-like when every producer is (and it has one), else float
        by_consumer: dict = {}
        for e in self.edges:
            by_consumer.setdefault(e.consumer, []).append(e)
        for seg in self.op_ms:  # op_ms is in graph order
            prods = [act.get(e.producer, act[None]) for e in by_consumer.get(seg, [])]
            kinds = set(prods)
            act[seg] = prods[0] if len(kinds) == 1 else act[None]
            add(act[seg], self._op_cost(seg, act[seg]))
        if self.edge_cost is not None:
            for e in self.edges:
                a, b = act.get(e.producer, act[None]), act.get(e.consumer, act[None])
                if a != b:
                    add(b if b != base else a, self.edge_cost(a, b, e.shape))
        return parts

    def rescaled(self, scale: Mapping[str, float], note: str | None = None) -> "CostTables":
        """A copy whose costs of each activation type are multiplied by ``scale[type]`` (types
        not named keep theirs): layers, op segments, precision changes (priced as the integer
        side's work, as in ``predict_parts``), the run overhead (float work)."""
        import dataclasses

        if self.act_type is None:
            raise FxqError(f"The {self.target} cost tables have no activation types to rescale.", "")
        base = self.act_type(self.float_precision)

        def k(kind: str) -> float:
            return float(scale.get(kind, 1.0))

        latency = {n: {p: ms * k(self.act_type(p)) for p, ms in t.items()} for n, t in self.latency.items()}
        op_ms = {seg: {t: ms * k(t) for t, ms in costs.items()} for seg, costs in self.op_ms.items()}
        overhead = self.overhead_ms * k(base)
        edge_cost = None
        if self.edge_cost is not None:
            inner = self.edge_cost

            def scaled_edge(a, b, shape):
                return inner(a, b, shape) * k(b if b != base else a)
            edge_cost = scaled_edge
        transition = _summarize_transitions(self.precisions, self.act_type, edge_cost,
                                            [e for e in self.edges if e.consumer in self.latency])
        fixed = overhead + sum(max(v.values()) for v in op_ms.values() if v)
        out = dataclasses.replace(self, latency=latency, op_ms=op_ms, overhead_ms=overhead,
                                  edge_cost=edge_cost, _transition=transition, fixed_ms=fixed,
                                  notes=list(self.notes) + ([note] if note else []),
                                  details=dict(self.details, scale={t: k(t) for t in scale}))
        return out

    def _op_cost(self, seg: str, act: str | None) -> float:
        costs = self.op_ms[seg]
        if act is None or act not in costs:
            return max(costs.values()) if costs else 0.0
        return costs[act]

    def fastest(self) -> dict:
        """The fastest precision of every layer on its own."""
        return {n: min(t, key=t.get) for n, t in self.latency.items()}

    def to_json(self) -> dict:
        labels = {"measured": "measured on this machine", "estimate": "estimate (roofline)",
                  "model": "accelerator model", "profile": "trtexec profile"}
        return {
            "target": self.target, "kind": self.kind, "label": labels.get(self.kind, self.kind),
            "batch": self.batch, "precisions": [str(p) for p in self.precisions],
            "fixed_ms": self.fixed_ms, "overhead_ms": self.overhead_ms,
            "transition_ms": {f"{a}->{b}": v for (a, b), v in self._transition.items()},
            "layers": {n: {"qualname": self.layers[n].qualname,
                           "ms": {str(p): v for p, v in t.items()}} for n, t in self.latency.items()},
            "ops": {n: dict(v) for n, v in self.op_ms.items()},
            "notes": list(self.notes), "stats": dict(self.stats), **self.details,
        }


def _summarize_transitions(precisions, act_type, edge_cost, edges: Sequence[_Edge]) -> dict:
    """The search's transition(a, b): the mean per-tensor cost over the layers' input edges."""
    out = {}
    if act_type is None or edge_cost is None or not edges:
        return out
    for a in precisions:
        for b in precisions:
            ta, tb = act_type(a), act_type(b)
            if a == b or ta == tb:
                continue
            out[(a, b)] = float(np.mean([edge_cost(ta, tb, e.shape) for e in edges]))
    return out


# =============================================================================================
# Cost models
# =============================================================================================

class CostModel:
    """One target. Subclasses give ``supports``, ``layer_ms`` and optionally the activation
    type of a precision and the cost of converting a tensor between two activation types."""

    target = "?"
    kind = "model"
    precisions: tuple = ()
    default_precisions: tuple = ()
    float_precision: Precision | None = None

    def supports(self, layer: LayerInfo, precision: Precision) -> bool:
        return precision in self.precisions

    def layer_ms(self, layer: LayerInfo, precision: Precision) -> float:  # pragma: no cover
        raise NotImplementedError

    def act_type(self, precision: Precision) -> str | None:
        return None

    def edge_ms(self, a: str, b: str, shape: tuple) -> float:
        return 0.0

    def op_ms(self, graph: SegmentGraph, seg: Segment) -> dict:
        return {}

    # -- precisions ------------------------------------------------------------------------
    def resolve_precisions(self, precisions=None, bits=None) -> tuple:
        """The labels to price: ``precisions`` (labels) or ``bits`` (--bits: integers, the
        unquantized precision added), default the target's own set. A label the target does
        not run raises FxqError."""
        if precisions is not None and bits is not None:
            raise FxqError("Give precisions or bits, not both.", "")
        if bits is not None:
            chosen = [normalize_precision(b) for b in bits]
            if self.float_precision is not None and self.float_precision in self.precisions:
                chosen = [self.float_precision] + chosen
        elif precisions is not None:
            chosen = [normalize_precision(p) for p in precisions]
        else:
            chosen = list(self.default_precisions)
        bad = [p for p in chosen if not self._known(p)]
        if bad:
            raise FxqError(f"Target {self.target} does not run precision(s) "
                           f"{', '.join(map(repr, bad))}.",
                           f"It runs {self.describe_precisions()}.")
        out = []
        for p in chosen:
            if p not in out:
                out.append(p)
        if not out:
            raise FxqError(f"No precisions to price on {self.target}.", "Give at least one.")
        return tuple(out)

    def _known(self, p) -> bool:
        return p in self.precisions

    def describe_precisions(self) -> str:
        return ", ".join(map(repr, self.precisions))

    # -- the tables ------------------------------------------------------------------------
    def tables(self, gm, precisions=None, bits=None, batch: int | None = None,
               progress: Progress | None = None) -> CostTables:
        graph = gm if isinstance(gm, SegmentGraph) else SegmentGraph(gm, batch)
        chosen = self.resolve_precisions(precisions, bits)
        latency, notes = {}, []
        for name, info in graph.layers.items():
            row = {p: float(self.layer_ms(info, p)) for p in chosen if self.supports(info, p)}
            if not row:
                raise FxqError(f"Layer '{info.qualname}' ({info.op}) cannot run at any of "
                               f"{', '.join(map(repr, chosen))} on {self.target}.",
                               f"Allow one it supports ({self.describe_precisions()}).")
            dropped = [p for p in chosen if p not in row]
            if dropped:
                notes.append(f"{info.qualname} ({info.op}): not offered at "
                             f"{', '.join(map(repr, dropped))} on {self.target}")
            latency[name] = row
        op_ms = {s.name: self.op_ms(graph, s) for s in graph.segments if s.kind == "op"}
        edges = graph.edges()
        act = self.act_type if self.act_type(chosen[0]) is not None else None
        transition = _summarize_transitions(chosen, act, self.edge_ms, graph.layer_input_edges())
        fixed = sum(max(v.values()) if v else 0.0 for v in op_ms.values())
        return CostTables(self.target, self.kind, graph.batch, chosen, self.float_precision,
                          dict(graph.layers), latency, fixed, notes, {}, op_ms, 0.0, edges,
                          act, self.edge_ms if act else None, transition)


# ----------------------------------------------------------------------------- bitserial

class BitSerialModel(CostModel):
    """A bit-serial accelerator in the spirit of the simulator BRECQ's mixed-precision
    experiment uses: an array of 1-bit x 1-bit MAC units, so a layer at w-bit weights and a-bit
    activations takes ``MACs x w x a`` unit operations.

    ``time = MACs x w_bits x a_bits / bit_macs_per_s``. The constant is a model of a mid-size
    array (16,384 one-bit MAC units at 250 MHz = 4.096e12 bit-MACs/s), not a measured device.
    Activations are ``act_bits`` (default 8, as fxq's --act-bits) for every integer weight
    precision, or follow the weight bits with ``act_bits="same"``; ``"float"``, when asked for,
    is 32 x 32. No transition cost (the array requantizes in its output stage) and nothing
    outside the layers is charged (``fixed_ms`` = 0): only relative latencies matter.
    """

    target = "bitserial"
    kind = "model"
    default_precisions = (2, 4, 8)
    float_precision = FLOAT
    BIT_MACS_PER_S = 16384 * 250e6

    def __init__(self, act_bits: int | str = 8, bit_macs_per_s: float | None = None):
        if act_bits != "same" and not (isinstance(act_bits, int) and 1 <= act_bits <= 32):
            raise FxqError(f"bitserial act_bits must be 1..32 or 'same', got {act_bits!r}.", "")
        self.act_bits = act_bits
        self.bit_macs_per_s = float(bit_macs_per_s or self.BIT_MACS_PER_S)
        self.precisions = tuple(range(1, 9)) + (FLOAT,)

    def describe_precisions(self) -> str:
        return "integer weight bits 1..8 (default 2, 4, 8) and 'float' (32 x 32)"

    def bits(self, precision) -> tuple[int, int]:
        if precision == FLOAT:
            return 32, 32
        a = precision if self.act_bits == "same" else self.act_bits
        return int(precision), int(a)

    def layer_ms(self, layer, precision) -> float:
        w, a = self.bits(precision)
        return layer.macs * w * a / self.bit_macs_per_s * 1e3


# ----------------------------------------------------------------------------- TensorRT roofline

@dataclass(frozen=True)
class GpuSpec:
    """Published peak numbers of one GPU: dense tensor-core throughput and DRAM bandwidth."""

    device: str
    fp16_tflops: float          # dense FP16 tensor-core, FP32 accumulate where stated
    int8_tops: float            # dense INT8 tensor-core
    bandwidth_gbs: float        # DRAM
    source: str


# Dense (no 2:4 sparsity) peaks; datasheets quote sparse numbers at 2x. Sources named per row.
GPUS = {
    "trt-t4": GpuSpec("NVIDIA T4 (70 W, PCIe)", 65.0, 130.0, 320.0,
                      "NVIDIA T4 Tensor Core GPU datasheet: 65 FP16 TFLOPS (mixed precision), "
                      "130 INT8 TOPS, 320 GB/s GDDR6"),
    "trt-a100": GpuSpec("NVIDIA A100 SXM4 80 GB", 312.0, 624.0, 2039.0,
                        "NVIDIA A100 Tensor Core GPU datasheet: FP16 tensor 312 TFLOPS, INT8 624 "
                        "TOPS (dense; 624/1248 with sparsity), 2,039 GB/s HBM2e"),
    "trt-h100": GpuSpec("NVIDIA H100 SXM5 80 GB", 989.4, 1978.9, 3350.0,
                        "NVIDIA H100 Tensor Core GPU datasheet: FP16 tensor 1,979 TFLOPS and INT8 "
                        "3,958 TOPS with sparsity (half dense), 3.35 TB/s HBM3"),
    "trt-orin": GpuSpec("NVIDIA Jetson AGX Orin 64 GB (GPU only, MAXN)", 42.5, 85.0, 204.8,
                        "NVIDIA Jetson AGX Orin technical brief / module datasheet: GPU 170 sparse "
                        "INT8 TOPS (85 dense); FP16 taken as half the INT8 rate (Ampere tensor "
                        "cores); 204.8 GB/s LPDDR5"),
}


class RooflineModel(CostModel):
    """An **estimate** of TensorRT layer latency on a GPU from its datasheet numbers:
    ``max(2 x MACs / peak ops of the precision, bytes moved / DRAM bandwidth)``.

    Precisions: ``"fp16"`` (fp16 activations and weights), ``8`` (int8 activations and
    weights: the explicit-quantization engines fxq's tensorrt backend emits), ``4`` (int4
    weight-only: fp16 activations, weights read at 0.5 byte and dequantized in the GEMM, so
    compute runs at the fp16 rate -- linear layers only: TensorRT has no int4 conv kernel).
    Bytes moved = input + output activations + weights, once each (perfect reuse, no
    launch overhead): the estimate is a lower bound a real engine does not reach.

    Transitions: a reformat kernel reading and writing the tensor (memory-bound). Non-layer
    ops (pooling, unfused adds ...) are charged as memory-bound fp16 passes in ``fixed_ms``;
    activations and BatchNorm are fused into the layer (free).
    """

    kind = "estimate"
    default_precisions = (FP16, 8, 4)
    float_precision = FP16
    _ACT_BYTES = {"fp16": 2.0, "int8": 1.0}

    def __init__(self, target: str, efficiency: float = 1.0):
        if target not in GPUS:
            raise FxqError(f"No GPU numbers for target {target!r}.", f"Known: {', '.join(GPUS)}.")
        if not 0 < efficiency <= 1:
            raise FxqError(f"efficiency must be in (0, 1], got {efficiency}.", "")
        self.target = target
        self.gpu = GPUS[target]
        self.efficiency = float(efficiency)
        self.precisions = (FP16, 8, 4)

    def describe_precisions(self) -> str:
        return "'fp16', 8 (int8) and 4 (int4 weight-only, linear layers only)"

    def supports(self, layer, precision) -> bool:
        if precision == 4:
            return layer.op == "linear"
        return precision in (FP16, 8)

    def act_type(self, precision) -> str:
        return "int8" if precision == 8 else "fp16"

    def _peak_ops(self, precision) -> float:
        tera = self.gpu.int8_tops if precision == 8 else self.gpu.fp16_tflops
        return tera * 1e12 * self.efficiency

    def _bandwidth(self) -> float:
        return self.gpu.bandwidth_gbs * 1e9 * self.efficiency

    def layer_bytes(self, layer, precision) -> float:
        act = self._ACT_BYTES[self.act_type(precision)]
        w = {FP16: 2.0, 8: 1.0, 4: 0.5}[precision]
        return (layer.input_elements + layer.output_elements) * act + layer.weight_elements * w

    def layer_ms(self, layer, precision) -> float:
        if not self.supports(layer, precision):
            raise FxqError(f"{self.target} has no {precision!r} kernel for {layer.op} "
                           f"'{layer.qualname}'.", "int4 is weight-only and for linear layers.")
        compute = 2.0 * layer.macs / self._peak_ops(precision)
        memory = self.layer_bytes(layer, precision) / self._bandwidth()
        return max(compute, memory) * 1e3

    def edge_ms(self, a, b, shape) -> float:
        n = math.prod(shape)
        return n * (self._ACT_BYTES[a] + self._ACT_BYTES[b]) / self._bandwidth() * 1e3

    def op_ms(self, graph, seg) -> dict:
        n_in = sum(math.prod(graph.shape(node)) for node, _ in seg.inputs)
        n_out = math.prod(graph.shape(seg.nodes[-1])) if _shape(seg.nodes[-1]) else 0
        return {"fp16": (n_in + n_out) * 2.0 / self._bandwidth() * 1e3,
                "int8": (n_in + n_out) * 1.0 / self._bandwidth() * 1e3}


# ----------------------------------------------------------------------------- trtexec profile

def _profile_entries(path) -> list[dict]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise FxqError(f"Cannot read the latency table {path}: {exc}.",
                       "Give the JSON written by trtexec --exportProfile.") from None
    if isinstance(data, dict):
        data = data.get("layers", data.get("profile", []))
    if not isinstance(data, list):
        raise FxqError(f"{path} is not a trtexec profile (a JSON list of layers).",
                       "Give the JSON written by trtexec --exportProfile.")
    out = []
    for item in data:
        if not isinstance(item, dict) or "name" not in item:
            continue  # the leading {"count": N}
        if "averageMs" in item:
            ms = float(item["averageMs"])
        elif "timeMs" in item:
            ms = float(item["timeMs"]) / max(float(item.get("count", 1) or 1), 1.0)
        else:
            raise FxqError(f"{path}: layer {item['name']!r} has no averageMs.",
                           "Give the JSON written by trtexec --exportProfile.")
        out.append({"name": str(item["name"]), "ms": ms})
    if not out:
        raise FxqError(f"{path} lists no layers.", "Give the JSON written by trtexec --exportProfile.")
    return out


_REFORMAT = re.compile(r"^\s*Reformatting CopyNode for (Input|Output) Tensor \d+ to ", re.I)


def _name_parts(name: str) -> list[str]:
    """A TensorRT layer name cut into the ONNX node names it was fused from."""
    s = name.strip()
    s = re.sub(r"^\{?ForeignNode\[", "", s)
    s = re.sub(r"\]\}?$", "", s)
    s = re.sub(r"^PWN\((.*)\)$", r"\1", s)
    parts = re.split(r"\s*\+\s*|\.\.\.|,\s*", s)
    return [p.strip().strip("()") for p in parts if p.strip()]


def _tokens(text: str) -> list[str]:
    return [t for t in re.split(r"[/.:]+", text.strip("/")) if t]


class LayerMatcher:
    """Which fxq layers a TensorRT layer name refers to (see docs: "Matching rule").

    1. A part of the name (split on `` + `` and ``...``) whose ONNX node name, minus its last
       ``/OpType``, equals a layer's FX node name (how fxq names ONNX nodes) matches that layer.
    2. Otherwise the part's path tokens (split on ``/`` ``.`` ``:``) are compared with each
       layer's qualified module name: a layer matches when its name's tokens are a suffix of
       the part's tokens (``/layer1/layer1.0/conv1/Conv`` -> ``layer1.0.conv1``); the longest
       such name wins, so ``conv1`` does not steal ``layer1.0.conv1``.
    """

    def __init__(self, layers: Mapping[str, LayerInfo]):
        self.by_node = {name: name for name in layers}
        self.qual = [(name, _tokens(info.qualname)) for name, info in layers.items()]

    def match_part(self, part: str) -> str | None:
        base = part.rsplit("/", 1)[0] if "/" in part.strip("/") else part
        base = base.strip()
        if base in self.by_node:
            return base
        if part in self.by_node:
            return part
        toks = _tokens(base)
        best, best_len, tie = None, 0, False
        for name, q in self.qual:
            if q and len(q) <= len(toks) and toks[-len(q):] == q:
                if len(q) > best_len:
                    best, best_len, tie = name, len(q), False
                elif len(q) == best_len and name != best:
                    tie = True
        return None if tie else best

    def match(self, name: str) -> list[str]:
        out = []
        for part in _name_parts(name):
            hit = self.match_part(part)
            if hit is not None and hit not in out:
                out.append(hit)
        return out


class LatencyTableModel(CostModel):
    """Per-layer times from ``trtexec --exportProfile`` JSON files, one per precision.

    ``profiles``: ``{precision: path}`` (a profile of an engine built with every layer at that
    precision), or one path (taken as the int8 engine fxq's tensorrt backend builds). A
    profile entry's time goes to the layers its name matches (split evenly when it names
    several); entries that match no layer -- pooling, reformats, the network's input/output
    casts -- are summed into ``fixed_ms`` (the largest sum over the profiles) and listed in
    ``details["unmatched_entries"]``; layers no entry names get 0 ms and are listed in
    ``details["unmatched_layers"]`` (TensorRT fused them into a neighbour whose entry does not
    name them). No transition cost: reformat layers are in the profile itself.
    """

    kind = "profile"
    float_precision = FP16

    def __init__(self, profiles: Mapping[Precision, Any] | str | os.PathLike, target: str = "latency-table"):
        if isinstance(profiles, (str, os.PathLike)):
            profiles = {8: profiles}
        if not profiles:
            raise FxqError("No latency table given.", "Pass --latency-table FILE.")
        self.profiles = {normalize_precision(p): Path(f) for p, f in profiles.items()}
        self.entries = {p: _profile_entries(f) for p, f in self.profiles.items()}
        self.precisions = tuple(self.profiles)
        self.default_precisions = self.precisions
        self.float_precision = FP16 if FP16 in self.precisions else None
        self.target = target

    def describe_precisions(self) -> str:
        return "the precisions of the profiles given: " + ", ".join(map(repr, self.precisions))

    def tables(self, gm, precisions=None, bits=None, batch=None, progress=None) -> CostTables:
        graph = gm if isinstance(gm, SegmentGraph) else SegmentGraph(gm, batch)
        chosen = self.resolve_precisions(precisions, bits)
        matcher = LayerMatcher(graph.layers)
        latency = {name: {} for name in graph.layers}
        unmatched_entries, unmatched_layers, fixed = {}, {}, {}
        for p in chosen:
            per_layer = {name: 0.0 for name in graph.layers}
            seen = set()
            rest = []
            for e in self.entries[p]:
                hits = [] if _REFORMAT.match(e["name"]) else matcher.match(e["name"])
                if not hits:
                    rest.append(e)
                    continue
                for h in hits:
                    per_layer[h] += e["ms"] / len(hits)
                    seen.add(h)
            for name in graph.layers:
                latency[name][p] = per_layer[name]
            unmatched_entries[str(p)] = [{"name": e["name"], "ms": e["ms"]} for e in rest]
            unmatched_layers[str(p)] = [graph.layers[n].qualname for n in graph.layers if n not in seen]
            fixed[p] = sum(e["ms"] for e in rest)
        notes = [f"{len(v)} layer(s) named by no entry of the {k} profile (0 ms): {', '.join(v[:6])}"
                 for k, v in unmatched_layers.items() if v]
        tables = CostTables(self.target, self.kind, graph.batch, chosen, self.float_precision,
                            dict(graph.layers), latency, max(fixed.values()), notes)
        tables.details = {"profiles": {str(p): str(f) for p, f in self.profiles.items()},
                          "unmatched_entries": unmatched_entries, "unmatched_layers": unmatched_layers,
                          "fixed_ms_by_profile": {str(p): v for p, v in fixed.items()}}
        tables.op_ms = {"(unmatched profile entries)": {str(p): v for p, v in fixed.items()}}
        return tables


def parse_latency_tables(values: Sequence[str]) -> dict:
    """``["int8=a.json", "fp16=b.json"]`` (the repeatable ``--latency-table [PREC=]FILE``) ->
    ``{8: "a.json", "fp16": "b.json"}``; a bare FILE is the int8 profile."""
    out: dict = {}
    for v in values:
        prec, sep, path = v.partition("=")
        if not sep:
            prec, path = "8", v
        p = normalize_precision(prec)
        if p in out:
            raise FxqError(f"Two latency tables for precision {p!r}.", "Give one file per precision.")
        if not Path(path).is_file():
            raise FxqError(f"Latency table {path} does not exist.",
                           "Give the JSON written by trtexec --exportProfile.")
        out[p] = path
    return out


# ----------------------------------------------------------------------------- ort-cpu, measured

def _machine() -> dict:
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "machine": platform.machine(),
            "onnxruntime": ort.__version__, "version": COST_MODEL_VERSION}


def default_cache_dir() -> Path:
    base = os.environ.get("FXQ_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fxq")
    return Path(base) / "cost-ort-cpu"


# ops ONNX Runtime inserts to change a lone segment's memory layout (see OrtCpuModel._layout_ms)
_LAYOUT_OPS = {"Transpose", "ReorderInput", "ReorderOutput"}


def timing_session(model, threads: int = 2, profile_prefix: str | None = None):
    """An ONNX Runtime CPU session with ``ort_timing.session``'s settings, its intra-op pool's
    spin-waiting off.

    Two live sessions that spin-wait take turns stealing each other's cores on a small
    machine: interleaving a float and an int8 conv on 2 cores measured a 2 ms conv at 4-7 ms,
    and a session left alive (not yet garbage-collected) made a whole-model measurement read
    26 or 42 ms from run to run. Without spinning a pair times as each alone does; alone, on
    ResNet-18, spinning on or off gave the same latency (within noise)."""
    from fxq.ort_timing import session

    return session(model, threads, spinning=False, profile_prefix=profile_prefix)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


class OrtCpuModel(CostModel):
    """**Measured** latency on this machine's ONNX Runtime CPU provider.

    Each segment of the model (a layer with its fused trailing activation/BatchNorm, or another
    computing op with its trailing activation) is lowered on its own with fxq's ONNX emitters at
    its real shapes and timed twice, interleaved (``fxq.ort_timing.timing_report``, medians): in
    float, and in int8 exactly as fxq's onnx-qdq backend emits it -- uint8 input (DQ), int8
    per-channel weight (DQ, axis 0), int32 bias, Q to uint8 at the end -- which ONNX Runtime
    fuses into QLinearConv / QGemm / QLinearAdd ... The fixed cost of one ``run`` call (timed on
    a one-element graph) is subtracted from every segment and added once to ``fixed_ms``; so is
    the share of layout conversions ONNX Runtime adds around a lone conv (``_layout_share``).
    Sessions have spin-waiting off (``timing_session``) so the interleaved pair does not compete.

    Precisions ``"float"`` and ``8``. Transitions: a QuantizeLinear (float -> int8) or
    DequantizeLinear (int8 -> float) of the tensor crossing the boundary, timed per tensor shape.
    This assumes the mixed-precision lowering quantizes an int8 layer's output even when its
    consumer is float (so the layer still runs as QLinearConv and the consumer pays one DQ).

    Results are cached in ``cache_dir`` (default ``$FXQ_CACHE_DIR`` or ``~/.cache/fxq``) in one
    JSON file per machine (CPU model, core count, ONNX Runtime version, threads), keyed by the
    segment's ops, attributes and shapes (batch included) -- not its weights: a rerun, or
    another model sharing a layer shape, times nothing again.

    Time is bounded: each item gets about ``seconds_per_item`` of timed runs (at least
    ``min_runs``); once ``max_seconds`` would be exceeded the remaining items share what is left
    (still ``min_runs`` each). ``progress(done, total, what)`` is called after each item.
    """

    target = "ort-cpu"
    kind = "measured"
    precisions = (FLOAT, 8)
    default_precisions = (FLOAT, 8)
    float_precision = FLOAT

    def __init__(self, threads: int = 2, cache_dir: str | os.PathLike | None = None,
                 seconds_per_item: float = 0.25, max_seconds: float = 300.0, min_runs: int = 5,
                 max_runs: int = 400, use_cache: bool = True, exclude_layout: bool = True):
        if threads < 1:
            raise FxqError(f"threads must be >= 1, got {threads}.", "")
        self.threads = int(threads)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.seconds_per_item = float(seconds_per_item)
        self.max_seconds = float(max_seconds)
        self.min_runs = max(1, int(min_runs))
        self.max_runs = max(self.min_runs, int(max_runs))
        self.use_cache = use_cache
        self.exclude_layout = exclude_layout
        self.timed = 0          # items timed (not from cache) by this object, for tests/reports
        self._cache = None
        self._seed = 0

    def describe_precisions(self) -> str:
        return ("'float' and 8 (int8 QDQ); ONNX Runtime runs 4-bit weights unfused in float, so "
                "they are not offered")

    def act_type(self, precision) -> str:
        return "int8" if precision == 8 else "float"

    # -- cache -------------------------------------------------------------------------------
    def machine(self) -> dict:
        return dict(_machine(), threads=self.threads)

    def _cache_path(self) -> Path:
        return self.cache_dir / f"{_hash(self.machine())}.json"

    def _load_cache(self) -> dict:
        if self._cache is None:
            self._cache = {}
            path = self._cache_path()
            if self.use_cache and path.is_file():
                try:
                    data = json.loads(path.read_text())
                    if data.get("machine") == self.machine():
                        self._cache = data.get("entries", {})
                except (OSError, ValueError):
                    self._cache = {}
        return self._cache

    def _save_cache(self) -> None:
        if not self.use_cache:
            return
        from fxq.atomic import atomic_write_text

        self.cache_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self._cache_path(), json.dumps(
            {"machine": self.machine(),
             "entries": {k: v for k, v in self._cache.items() if "error" not in v}},  # failures: not kept
            indent=0, sort_keys=True))

    # -- segment signatures and graphs -------------------------------------------------------
    def _signature(self, graph: SegmentGraph, seg: Segment) -> dict:
        import torch.fx as fx

        index = {n: i for i, n in enumerate(seg.nodes)}
        inputs = {node: i for i, (node, _) in enumerate(seg.inputs)}

        def enc(a):
            if isinstance(a, fx.Node):
                r = _real(a)
                if r in index:
                    return ["n", index[r]]
                if r in inputs:
                    return ["in", inputs[r]]
                return ["const", list(_shape(r) or ()), str(getattr(r.meta.get("val"), "dtype", ""))]
            if isinstance(a, (list, tuple)):
                return [enc(x) for x in a]
            if isinstance(a, dict):
                return {str(k): enc(v) for k, v in a.items()}
            return repr(a)

        return {"v": COST_MODEL_VERSION,
                "ops": [[str(n.target), enc(list(n.args)), enc(dict(n.kwargs))] for n in seg.nodes],
                "inputs": [[list(graph.shape(node)), str(node.meta["val"].dtype)] for node, _ in seg.inputs]}

    def _const(self, graph, node, memo):
        import torch
        import torch.fx as fx

        from fxq import ops

        node = _real(node)
        if node in memo:
            return memo[node]
        if node.op == "get_attr":
            value = ops.get_attr(graph.gm, node.target)
        elif node.op == "call_function":
            args = fx.node.map_arg(node.args, lambda a: self._const(graph, a, memo))
            kwargs = fx.node.map_arg(node.kwargs, lambda a: self._const(graph, a, memo))
            value = node.target(*args, **kwargs)
        else:
            raise ValueError(f"cannot evaluate constant {node.name}")
        if isinstance(value, torch.Tensor):
            value = value.detach()
        memo[node] = value
        return value

    def _segment_onnx(self, graph: SegmentGraph, seg: Segment):
        """The float ONNX model of one segment at the tables' batch (inputs ``input``...)."""
        import torch
        import torch.fx as fx

        from fxq.backends.lower_qdq import OPSET, fold_zero_pad_into_conv, prune_initializers
        from fxq.backends.onnx_builder import lower_to_onnx
        from fxq.ort_timing import with_static_batch

        root = torch.nn.Module()
        g = fx.Graph()
        env: dict = {}
        examples = []
        memo: dict = {}
        inputs = {node for node, _ in seg.inputs}

        def arg(a):
            if a in env:
                return env[a]
            r = _real(a)
            if r in env:
                return env[r]
            if r in inputs:
                p = g.placeholder(f"in_{len(examples)}")
                p.meta["val"] = r.meta["val"]
                examples.append(torch.zeros(tuple(r.meta["val"].shape), dtype=r.meta["val"].dtype))
                env[r] = p
                return p
            value = self._const(graph, r, memo)
            if not isinstance(value, torch.Tensor):
                return value
            name = f"c_{len(memo)}_{len(env)}"
            root.register_buffer(name, value.clone())
            node = g.get_attr(name)
            node.meta["val"] = value
            env[r] = node
            return node

        for node, _ in seg.inputs:  # placeholders in a fixed order
            arg(node)
        for n in seg.nodes:
            env[n] = g.node_copy(n, arg)
        g.output(env[seg.nodes[-1]])
        sub = fx.GraphModule(root, g)
        model = lower_to_onnx(sub, tuple(examples), opset=OPSET, check=False)
        fold_zero_pad_into_conv(model)
        prune_initializers(model)
        if graph.batch != graph.captured_batch:
            model = with_static_batch(model, graph.batch)
        return model

    @staticmethod
    def _output_grid(seg: Segment) -> tuple[float, int]:
        """(scale, zero point) of the segment's output Q, chosen as calibration would: inside a
        trailing ReLU / ReLU6 / clamp's range, so ONNX Runtime drops the clamp and fuses."""
        import torch

        aten = torch.ops.aten
        last = seg.nodes[-1]
        if last.target == aten.relu.default:
            return 0.05, 0
        if last.target == getattr(getattr(aten, "relu6", None), "default", None):
            return 6.0 / 255.0, 0
        if last.target in (aten.hardtanh.default, aten.clamp.default):
            def arg(i, *names):
                if len(last.args) > i:
                    return last.args[i]
                return next((last.kwargs[n] for n in names if n in last.kwargs), None)

            lo = arg(1, "min", "min_val")
            hi = arg(2, "max", "max_val")
            if last.target == aten.hardtanh.default:
                lo = -1.0 if lo is None else lo
                hi = 1.0 if hi is None else hi
            if lo is not None and hi is not None and float(lo) >= 0 and float(hi) > float(lo):
                return (float(hi) - float(lo)) / 255.0, int(round(float(lo) * 255.0 / (float(hi) - float(lo))))
        return 0.05, 128

    @staticmethod
    def _transparent(seg: Segment) -> bool:
        """Max-pooling and other value-moving ops: fxq quantizes their output with their input's
        quantizer (same scale and zero point)."""
        from fxq import ops

        return all(n.target in ops.TRANSPARENT_OPS for n in seg.nodes)

    def _int8_onnx(self, float_model, seg: Segment, layer: bool, rng: np.random.Generator):
        """The segment as fxq's onnx-qdq emits it at int8: uint8 inputs through DQ, int8
        per-channel weight through DQ, int32 bias (quantize_biases), Q to uint8 at the end."""
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        from fxq.backends.lower_qdq import dedicate_dequantize, prune_initializers, quantize_biases

        m = onnx.ModelProto()
        m.CopyFrom(float_model)
        g = m.graph
        inits = {t.name: t for t in g.initializer}
        front = []
        new_inputs = []
        for vi in g.input:
            if vi.type.tensor_type.elem_type != TensorProto.FLOAT:
                new_inputs.append(vi)
                continue
            shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
            qname = vi.name + "_q"
            g.initializer.extend([numpy_helper.from_array(np.array(0.02, np.float32), vi.name + "_s"),
                                  numpy_helper.from_array(np.array(128, np.uint8), vi.name + "_z")])
            front.append(helper.make_node("DequantizeLinear", [qname, vi.name + "_s", vi.name + "_z"],
                                          [vi.name], name=vi.name + "/DequantizeLinear"))
            new_inputs.append(helper.make_tensor_value_info(qname, TensorProto.UINT8, shape))
        del g.input[:]
        g.input.extend(new_inputs)
        if layer:
            node = next((n for n in g.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")
                         and len(n.input) > 1 and n.input[1] in inits), None)
            if node is not None:
                w = numpy_helper.to_array(inits[node.input[1]])
                axis = 1 if node.op_type == "MatMul" else 0
                q = rng.integers(-63, 64, size=w.shape, dtype=np.int8)
                base = node.input[1] + "_int8"
                g.initializer.extend([
                    numpy_helper.from_array(q, base),
                    numpy_helper.from_array(np.full((w.shape[axis],), 0.01, np.float32), base + "_s"),
                    numpy_helper.from_array(np.zeros((w.shape[axis],), np.int8), base + "_z")])
                front.append(helper.make_node("DequantizeLinear", [base, base + "_s", base + "_z"],
                                              [base + "_dq"], axis=axis, name=base + "/DequantizeLinear"))
                node.input[1] = base + "_dq"
        nodes = front + list(g.node)
        outs = []
        scale, zp = self._output_grid(seg)
        if self._transparent(seg):  # fxq shares the input's quantizer: ORT then drops the Q/DQ
            zp, scale = 128, 0.02
        for vi in g.output:
            if vi.type.tensor_type.elem_type != TensorProto.FLOAT:
                outs.append(vi)
                continue
            shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
            g.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), vi.name + "_qs"),
                                  numpy_helper.from_array(np.array(zp, np.uint8), vi.name + "_qz")])
            nodes.append(helper.make_node("QuantizeLinear", [vi.name, vi.name + "_qs", vi.name + "_qz"],
                                          [vi.name + "_q"], name=vi.name + "/QuantizeLinear"))
            outs.append(helper.make_tensor_value_info(vi.name + "_q", TensorProto.UINT8, shape))
        del g.node[:]
        g.node.extend(nodes)
        del g.output[:]
        g.output.extend(outs)
        if self._transparent(seg):
            self._nhwc_max_pool(m)
        if layer:
            quantize_biases(m)
        dedicate_dequantize(m)
        prune_initializers(m)
        return m

    @staticmethod
    def _nhwc_max_pool(model) -> None:
        """uint8 DQ -> MaxPool -> Q of one 2-D max-pool as the kernel ONNX Runtime runs inside a
        quantized model: Transpose -> NhwcMaxPool -> Transpose. Between NHWC QLinearConvs its
        layout pass makes that choice; alone it keeps a slow NCHW uint8 MaxPool (about 50x
        slower on ResNet-18's stem pool). The transposes are layout conversions and are taken
        off like the others."""
        from onnx import helper

        g = model.graph
        pools = [n for n in g.node if n.op_type == "MaxPool"]
        if len(pools) != 1 or len(pools[0].output) != 1 or len(g.input) != 1 or len(g.output) != 1:
            return
        pool = pools[0]
        if len(g.input[0].type.tensor_type.shape.dim) != 4:
            return
        attrs = {a.name: helper.get_attribute_value(a) for a in pool.attribute}
        if attrs.get("storage_order", 0) != 0:
            return
        attrs.pop("storage_order", None)
        x, y = g.input[0].name, g.output[0].name
        nodes = [helper.make_node("Transpose", [x], ["nhwc_in"], perm=[0, 2, 3, 1], name="Transpose_in"),
                 helper.make_node("NhwcMaxPool", ["nhwc_in"], ["nhwc_out"], domain="com.microsoft",
                                  name="NhwcMaxPool", **attrs),
                 helper.make_node("Transpose", ["nhwc_out"], [y], perm=[0, 3, 1, 2], name="Transpose_out")]
        del g.node[:]
        g.node.extend(nodes)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))

    @staticmethod
    def _qdq_models(shape):
        from onnx import TensorProto, helper, numpy_helper

        from fxq.backends.lower_qdq import OPSET

        def model(op, in_type, out_type, in_name):
            s = numpy_helper.from_array(np.array(0.02, np.float32), "s")
            z = numpy_helper.from_array(np.array(128, np.uint8), "z")
            node = helper.make_node(op, [in_name, "s", "z"], ["y"])
            g = helper.make_graph([node], op, [helper.make_tensor_value_info(in_name, in_type, list(shape))],
                                  [helper.make_tensor_value_info("y", out_type, list(shape))], [s, z])
            return helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])

        return (model("QuantizeLinear", TensorProto.FLOAT, TensorProto.UINT8, "tq_in"),
                model("DequantizeLinear", TensorProto.UINT8, TensorProto.FLOAT, "tdq_in"))

    @staticmethod
    def _overhead_model():
        from onnx import TensorProto, helper, numpy_helper

        from fxq.backends.lower_qdq import OPSET

        one = numpy_helper.from_array(np.array([1.0], np.float32), "one")
        g = helper.make_graph([helper.make_node("Add", ["ov_in", "one"], ["y"])], "overhead",
                              [helper.make_tensor_value_info("ov_in", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [one])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])

    # -- timing ------------------------------------------------------------------------------
    def _feed(self, sess, rng) -> dict:
        feeds = {}
        for i in sess.get_inputs():
            shape = [d if isinstance(d, int) else 1 for d in i.shape]
            if i.type == "tensor(uint8)":
                feeds[i.name] = rng.integers(0, 256, size=shape, dtype=np.uint8)
            elif i.type in ("tensor(int64)", "tensor(int32)"):
                feeds[i.name] = np.zeros(shape, dtype=np.int64 if "64" in i.type else np.int32)
            elif i.type == "tensor(bool)":
                feeds[i.name] = np.zeros(shape, dtype=bool)
            else:
                feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
        return feeds

    def _time(self, models: Mapping[str, Any], seconds: float, layout: bool = False) -> dict[str, float]:
        """Interleaved medians (ms) of several small models, about ``seconds`` of timed runs."""
        from fxq.ort_timing import timing_report

        rng = np.random.default_rng(self._seed)
        self._seed += 1
        sessions = {k: self._session(m) for k, m in models.items()}
        feeds = {}
        for s in sessions.values():
            feeds.update(self._feed(s, rng))
        per_run = 0.0
        for s in sessions.values():  # warm up, and size the number of runs
            mine = {i.name: feeds[i.name] for i in s.get_inputs()}
            s.run(None, mine)
            t0 = time.perf_counter()
            s.run(None, mine)
            per_run += time.perf_counter() - t0
        runs = int(min(self.max_runs, max(self.min_runs, seconds / max(per_run, 1e-6))))
        report = timing_report(sessions, feeds, threads=self.threads, warmup=1, runs=runs,
                               rounds=min(runs, 5))
        out = {k: v["median_ms"] for k, v in report.items()}
        if layout:
            for k, m in models.items():
                out[k + ":layout"] = self._layout_share(m, feeds)
        return out

    def _session(self, model, profile_prefix: str | None = None):
        return timing_session(model, self.threads, profile_prefix)

    def _layout_share(self, model, feeds, runs: int = 7) -> float:
        """The share of kernel time ONNX Runtime spends, around a lone segment, in layout
        conversions it inserted itself (NCHW <-> NCHWc reorders for float convs, NCHW <-> NHWC
        transposes for QLinearConv), from its profiler. Inside a whole model consecutive
        segments share one layout and these conversions cancel, so they are not the segment's
        cost. A share, not a time: the profiler slows every kernel down alike."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            sess = self._session(model, os.path.join(tmp, "segment"))
            mine = {i.name: feeds[i.name] for i in sess.get_inputs()}
            for _ in range(runs + 1):
                sess.run(None, mine)
            with open(sess.end_profiling()) as fh:
                events = json.load(fh)
        layout = total = 0.0
        first = True
        for e in events:
            if e.get("cat") == "Session" and e.get("name") == "model_run":
                first = False  # the first run pays one-time costs
                continue
            if e.get("cat") != "Node" or first or not e.get("name", "").endswith("_kernel_time"):
                continue
            dur = float(e.get("dur", 0))
            total += dur
            # fxq names every node it emits "<fx node>/<Op>"; ORT's own inserts have no "/"
            if e.get("args", {}).get("op_name") in _LAYOUT_OPS and "/" not in e["name"]:
                layout += dur
        return layout / total if total > 0 else 0.0

    # -- the tables --------------------------------------------------------------------------
    def tables(self, gm, precisions=None, bits=None, batch=None, progress: Progress | None = None) -> CostTables:
        graph = gm if isinstance(gm, SegmentGraph) else SegmentGraph(gm, batch)
        chosen = self.resolve_precisions(precisions, bits)
        cache = self._load_cache()
        t_start = time.perf_counter()
        edges = graph.edges()
        shapes = sorted({e.shape for e in edges}, key=lambda s: (math.prod(s), s))
        items = [("overhead", None)] + [("segment", s) for s in graph.segments] + \
                [("qdq", s) for s in shapes]
        keys = []
        for kind, obj in items:
            if kind == "overhead":
                keys.append("overhead")
            elif kind == "segment":
                keys.append("seg:" + _hash(self._signature(graph, obj)))
            else:
                keys.append("qdq:" + _hash({"v": COST_MODEL_VERSION, "shape": list(obj)}))
        todo = [i for i, k in enumerate(keys) if k not in cache]
        notes = []
        timed = 0
        for done, i in enumerate(todo):
            kind, obj = items[i]
            elapsed = time.perf_counter() - t_start
            left = len(todo) - done
            budget = min(self.seconds_per_item, max(self.max_seconds - elapsed, 0.0) / left)
            what = "run overhead" if kind == "overhead" else (
                f"segment {obj.name}" if kind == "segment" else f"Q/DQ {list(obj)}")
            try:
                if kind == "overhead":
                    res = self._time({"overhead": self._overhead_model()}, max(budget, 0.05))
                    entry = {"ms": res["overhead"]}
                elif kind == "segment":
                    fm = self._segment_onnx(graph, obj)
                    rng = np.random.default_rng(int(keys[i][4:12], 16))
                    qm = self._int8_onnx(fm, obj, obj.kind == "layer", rng)
                    res = self._time({"float": fm, "int8": qm}, budget, layout=True)
                    entry = {"float": res["float"], "int8": res["int8"], "what": what,
                             "float_layout_share": res["float:layout"], "int8_layout_share": res["int8:layout"]}
                else:
                    qm, dqm = self._qdq_models(obj)
                    res = self._time({"q": qm, "dq": dqm}, budget)
                    entry = {"q": res["q"], "dq": res["dq"]}
            except Exception as exc:  # noqa: BLE001 -- a segment ORT cannot run alone is reported
                if kind == "overhead":
                    raise
                entry = {"error": f"{type(exc).__name__}: {str(exc)[:200]}", "what": what}
            entry["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            cache[keys[i]] = entry
            timed += 1
            self.timed += 1
            self._save_cache()
            if progress is not None:
                progress(done + 1, len(todo), what)
        seconds = time.perf_counter() - t_start
        overhead = cache["overhead"]["ms"]

        def net(ms):
            return max(float(ms) - overhead, 0.0)

        latency, op_ms, seg_ms = {}, {}, {}
        for (kind, obj), key in zip(items, keys):
            if kind != "segment":
                continue
            entry = cache[key]
            if "error" in entry:
                notes.append(f"{entry.get('what', obj.name)} could not be timed alone "
                             f"({entry['error']}); counted as 0 ms")
                costs = {"float": 0.0, "int8": 0.0}
            else:
                keep = {t: 1.0 - entry[t + "_layout_share"] if self.exclude_layout else 1.0
                        for t in ("float", "int8")}
                costs = {t: net(entry[t]) * keep[t] for t in ("float", "int8")}
            seg_ms[obj.name] = costs
            if obj.kind == "layer":
                latency[obj.name] = {p: costs[self.act_type(p)] for p in chosen}
            else:
                op_ms[obj.name] = costs
        qdq = {}
        for (kind, obj), key in zip(items, keys):
            if kind == "qdq":
                entry = cache[key]
                qdq[obj] = (0.0, 0.0) if "error" in entry else (net(entry["q"]), net(entry["dq"]))

        def edge_cost(a, b, shape):
            q, dq = qdq.get(tuple(shape), (0.0, 0.0))
            if a == b:
                return 0.0
            return q if b == "int8" else dq

        act = self.act_type
        transition = _summarize_transitions(chosen, act, edge_cost, graph.layer_input_edges())
        fixed = overhead + sum(max(v.values()) for v in op_ms.values())
        tables = CostTables(self.target, self.kind, graph.batch, chosen, FLOAT, dict(graph.layers),
                            latency, fixed, notes,
                            {"timed": timed, "cached": len(items) - timed, "seconds": round(seconds, 3),
                             "items": len(items)},
                            op_ms, overhead, edges, act, edge_cost, transition)
        tables.details = {"machine": self.machine(), "cache": str(self._cache_path()),
                          # what the tables were built from: keys a cached end-to-end fit
                          "signature": _hash({"v": COST_MODEL_VERSION, "keys": keys, "batch": graph.batch,
                                              "precisions": [str(p) for p in chosen]}),
                          "fixed_ms_by_precision": {
                              "float": overhead + sum(v["float"] for v in op_ms.values()),
                              "int8": overhead + sum(v["int8"] for v in op_ms.values())},
                          "qdq_ms": {"x".join(map(str, s)): {"q": v[0], "dq": v[1]} for s, v in qdq.items()}}
        return tables


# =============================================================================================
# Entry points
# =============================================================================================

def get_cost_model(target: str = DEFAULT_TARGET, *, latency_table=None, **options) -> CostModel:
    """The cost model of ``target`` (one of ``TARGETS``, or a trtexec profile ``.json`` path);
    ``latency_table`` (``{precision: path}`` or one path) selects the profile model. ``options``
    go to the model's constructor (ort-cpu: threads, cache_dir, seconds_per_item, max_seconds;
    bitserial: act_bits, bit_macs_per_s; trt-*: efficiency)."""
    if latency_table is not None:
        return LatencyTableModel(latency_table, target=target if target not in (None, DEFAULT_TARGET)
                                 else "latency-table")
    if isinstance(target, (str, os.PathLike)) and str(target).lower().endswith(".json"):
        return LatencyTableModel(target, target=str(target))
    if target == "ort-cpu":
        return OrtCpuModel(**options)
    if target == "bitserial":
        return BitSerialModel(**options)
    if target in GPUS:
        return RooflineModel(target, **options)
    import difflib

    close = difflib.get_close_matches(str(target), TARGETS, n=2)
    hint = f"Did you mean {' or '.join(close)}? " if close else ""
    raise FxqError(f"Unknown latency target '{target}'.",
                   f"{hint}Known targets: {', '.join(TARGETS)}; or a trtexec --exportProfile JSON "
                   "(--latency-table FILE).")


def cost_tables(gm, target: str = DEFAULT_TARGET, precisions: Sequence[Precision] | None = None, *,
                bits: Sequence[int] | None = None, batch: int | None = None,
                latency_table=None, progress: Progress | None = None, **options) -> CostTables:
    """Latency tables of every quantizable layer of ``gm`` on ``target`` (see module doc).

    ``precisions``: labels to price (default: the target's own set); or ``bits`` (``--bits``:
    integers, the target's unquantized precision added). ``batch``: default the captured one.
    """
    model = get_cost_model(target, latency_table=latency_table, **options)
    return model.tables(gm, precisions=precisions, bits=bits, batch=batch, progress=progress)


def calibrate_end_to_end(tables: CostTables, models: Mapping[Precision, Any] | Callable[[], Mapping[Precision, Any]],
                         *, threads: int = 2, runs: int = 100, warmup: int = 5,
                         use_cache: bool = True) -> tuple[CostTables, dict]:
    """Fit measured tables to whole-model latencies: ``models`` maps a precision to the ONNX
    model with every layer at it (the float one is required), or is a callable returning that
    map (called only when the fit is not cached). All are timed interleaved; each activation
    type's costs are then scaled so ``predict_ms`` of each uniform model equals its measured
    median -- the float type from the float model, each integer type from its uniform model
    given the float scale.

    The fit is cached beside the segment times (``<cache>.fits.json``, keyed by the tables'
    ``signature``: the same segments, batch and precisions), so every compile of a model on this
    machine plans with the same numbers; delete the file to measure again.

    Why: segments timed alone pay what the whole model does not (the Q of a lone int8 segment's
    input and the DQ of its output, cold caches, a session's per-run work), so the sum of the
    parts overestimated Lite0 by 21 % in float and 55 % in int8 on a quiet machine. One scale
    per type keeps the tables additive and keeps their relative costs, which is what the
    search ranks. Returns the rescaled tables and a record for the report."""
    from fxq.ort_timing import timing_report

    if tables.act_type is None:
        raise FxqError(f"The {tables.target} cost tables have no activation types to calibrate.", "")
    fits_path = Path(tables.details["cache"] + ".fits.json") if use_cache and tables.details.get("cache") else None
    key = tables.details.get("signature")
    fits: dict = {}
    if fits_path is not None and key and fits_path.is_file():
        try:
            fits = json.loads(fits_path.read_text())
        except (OSError, ValueError):
            fits = {}
        if key in fits:
            record = dict(fits[key], cached=True)
            return _apply_fit(tables, record), record
    if callable(models):
        models = models()
    base_p = tables.float_precision
    order = [base_p] + [p for p in models if p != base_p]
    if base_p not in models:
        raise FxqError("calibrate_end_to_end needs the float model.", "")
    onnx_models = {str(p): _timing_model(models[p], tables.batch) for p in order}
    feeds = _random_feeds(onnx_models[str(base_p)], tables.batch)
    timing = timing_report(onnx_models, feeds, threads=threads, warmup=warmup, runs=runs,
                           rounds=max(1, runs // 10), spinning=False)
    scale: dict[str, float] = {}
    record = {"models": {}, "scale": scale, "runs": runs, "threads": threads,
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "clamped": []}
    clamped = []
    for p in order:
        parts = tables.predict_parts(p)
        measured = timing[str(p)]["median_ms"]
        known = sum(ms * scale[t] for t, ms in parts.items() if t in scale)
        unknown = {t: ms for t, ms in parts.items() if t not in scale}
        if unknown:
            rest = sum(unknown.values())
            k = (measured - known) / rest if rest > 0 else 1.0
            if not 0.25 <= k <= 4.0:  # a fit this far off means the parts are not comparable
                clamped.append(f"{'/'.join(unknown)} scale {k:.3g}")
                k = min(max(k, 0.25), 4.0)
            for t in unknown:
                scale[t] = k
        record["models"][str(p)] = {"measured_ms": measured, "p10_ms": timing[str(p)]["p10_ms"],
                                    "p90_ms": timing[str(p)]["p90_ms"],
                                    "predicted_ms_before": sum(parts.values())}
    record["clamped"] = clamped
    out = _apply_fit(tables, record)
    for p in order:
        record["models"][str(p)]["predicted_ms_after"] = out.predict_ms(p)
    if fits_path is not None and key:
        from fxq.atomic import atomic_write_text

        fits_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(fits_path, json.dumps(dict(fits, **{key: record}), indent=0, sort_keys=True))
    record = dict(record, cached=False)
    return out, record


def _timing_model(model, batch: int) -> bytes | str:
    """``model`` (ModelProto, bytes or path) at a static ``batch``, as bytes or a path for ONNX Runtime."""
    from fxq.ort_timing import with_static_batch

    model = with_static_batch(model, batch)
    return model if isinstance(model, (bytes, bytearray, str, os.PathLike)) else model.SerializeToString()


def _random_feeds(model: bytes | str, batch: int) -> dict:
    """Seeded inputs for timing: standard normal floats, zeros for integer inputs (token ids)."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    feeds = {}
    for inp in ort.InferenceSession(model, providers=["CPUExecutionProvider"]).get_inputs():
        shape = [d if isinstance(d, int) else batch for d in inp.shape]
        feeds[inp.name] = (rng.standard_normal(shape).astype(np.float32) if inp.type == "tensor(float)"
                           else np.zeros(shape, dtype=np.int64))
    return feeds


def measure_against_uniform(tables: CostTables, candidate, uniform: Mapping[Precision, Any], *,
                            threads: int = 2, runs: int = 120, warmup: int = 5) -> dict:
    """Time ``candidate`` (a mixed-precision ONNX model) interleaved with the ``uniform`` models
    (precision -> ONNX model with every layer at it) and express it on the tables' clock.

    The fitted tables predict the uniform models' latencies as they were measured when the fit
    was taken; the machine may run faster or slower now (a shared 2-core machine drifts by a
    tenth within minutes). ``drift`` = the uniform models' predicted / measured total in this
    run, and ``corrected_ms`` = the candidate's measured median times ``drift``: what the
    candidate would have measured beside the fit, comparable with the budget and the
    prediction. Returns ``measured_ms``, ``corrected_ms``, ``drift`` and the references."""
    from fxq.ort_timing import timing_report

    models = {"candidate": _timing_model(candidate, tables.batch)}
    models.update({f"uniform {p}": _timing_model(m, tables.batch) for p, m in uniform.items()})
    timing = timing_report(models, _random_feeds(models["candidate"], tables.batch), threads=threads,
                           warmup=warmup, runs=runs, rounds=max(1, runs // 10), spinning=False)
    refs = {str(p): {"predicted_ms": tables.predict_ms(p), "measured_ms": timing[f"uniform {p}"]["median_ms"]}
            for p in uniform}
    drift = sum(r["predicted_ms"] for r in refs.values()) / sum(r["measured_ms"] for r in refs.values())
    measured = timing["candidate"]["median_ms"]
    return {"measured_ms": measured, "corrected_ms": measured * drift, "drift": drift, "references": refs,
            "runs": runs, "threads": threads}


def _apply_fit(tables: CostTables, record: dict) -> CostTables:
    models = record["models"]
    note = ("end-to-end calibration" + (" (cached)" if record.get("cached") else "") + ": " + ", ".join(
        f"{p} measured {m['measured_ms']:.3g} ms vs the parts' {m['predicted_ms_before']:.3g} ms"
        for p, m in models.items())
        + "; scales " + ", ".join(f"{t} x{k:.3f}" for t, k in record["scale"].items())
        + (f" (clamped: {'; '.join(record['clamped'])})" if record.get("clamped") else ""))
    out = tables.rescaled(record["scale"], note)
    out.details["end_to_end_calibration"] = record
    return out


def check_end_to_end(onnx_model, predicted_ms: float, *, batch: int | None = None, threads: int = 2,
                     runs: int = 50, warmup: int = 10, inputs=None) -> dict:
    """Time the emitted model (bytes, path or ModelProto) on ONNX Runtime CPU and compare it
    with the cost model's prediction: ``{predicted_ms, measured_ms, error_ms, error_pct, p10_ms,
    p90_ms, runs, threads, batch}`` (error = predicted - measured). Median of ``runs`` after
    ``warmup``, in a session set up like the segments' (``timing_session``)."""
    import gc

    from fxq.ort_timing import measure_latency, with_static_batch

    model = with_static_batch(onnx_model, batch) if batch is not None else onnx_model
    if not isinstance(model, (bytes, bytearray, str, os.PathLike)):
        model = model.SerializeToString()
    gc.collect()  # sessions of earlier measurements must not compete for the cores
    sess = timing_session(model, threads)
    if inputs is None:
        rng = np.random.default_rng(0)
        inputs = {}
        for i in sess.get_inputs():
            shape = [d if isinstance(d, int) else (batch or 1) for d in i.shape]
            inputs[i.name] = rng.standard_normal(shape).astype(np.float32)
    r = measure_latency(sess, inputs, threads=threads, warmup=warmup, runs=runs)
    measured = r["median_ms"]
    shape0 = sess.get_inputs()[0].shape
    return {"predicted_ms": float(predicted_ms), "measured_ms": measured,
            "error_ms": float(predicted_ms) - measured,
            "error_pct": 100.0 * (float(predicted_ms) - measured) / measured,
            "p10_ms": r["p10_ms"], "p90_ms": r["p90_ms"], "runs": r["runs"], "threads": threads,
            "batch": batch if batch is not None else (shape0[0] if shape0 and isinstance(shape0[0], int) else None)}
