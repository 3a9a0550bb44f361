"""Block sensitivity for mixed precision: how much each region's bit configurations cost in
quality, measured once per model and calibration set.

For a search group (a region's quantized layers, in graph order) and every *configuration* —
one precision per layer — the sensitivity is the region's Fisher-weighted output error with the
region quantized that way and everything else float:

    s = E_x [ 1/2 * sum_i F_i(x) * (z_q(x)_i - z(x)_i)^2 ]

z is the region's output in the float model, z_q the same region run on the same (float) inputs
with its layers at the configuration's precisions, and F_i the diagonal of the model's Fisher
information with respect to z: the squared gradient of -log p(y | x) at z with the label y
drawn from the float model's own prediction (one draw per sample; a model whose output is not a
[batch, classes] tensor uses a unit-variance Gaussian around its output instead). With this F,
``s`` is the second-order estimate of the increase in KL(float || quantized) of the model's
predictions, in nats per sample — so sensitivities of different regions are on one scale and add
up (BRECQ's block-wise approximation), and the search minimises the predicted KL. Unlike the
reconstruction loss (``fxq.fisher``) nothing is normalised per region: that would break the
additivity across regions.

Configurations: with the allowed precisions ordered from highest to lowest (float first), for
each pair of adjacent precisions (hi, lo) every one of the 2^k choices of which layers drop to
``lo`` (the others at ``hi``). A region with more than ``max_layers`` quantized layers is split
into consecutive chunks of at most ``max_layers``, each its own search group, measured with the
region's other layers at float; chunks are then treated as additive, like regions.

A configuration quantizes what the compiled model would: weights of the layers not at float, and
activations where integer data flows (``annotate_qspecs``' rule, with the region's inputs
counted as float). Results are cached on
disk (``~/.cache/fxq/sensitivity``) by a digest of the model's tensors, the calibration samples
used and every setting.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable, Mapping, Sequence

import torch
from torch import fx

from fxq import ops
from fxq.cost_models import is_float, precision_order
from fxq.errors import FxqError

Precision = Hashable
SENSITIVITY_VERSION = 2
MAX_LAYERS = 6          # per search group: 2^6 = 64 configurations per pair of precisions
DEFAULT_SAMPLES = 64


def configurations(k: int, precisions: Sequence[Precision]) -> list[tuple]:
    """Every configuration of k layers measured: per adjacent pair (hi, lo) of the ordered
    precisions, the 2^k choices of which layers drop to lo; each listed once."""
    order = precision_order(precisions)
    pairs = list(zip(order, order[1:])) or [(order[0], order[0])]
    out, seen = [], set()
    for hi, lo in pairs:
        for combo in itertools.product((hi, lo), repeat=k):
            if combo not in seen:
                seen.add(combo)
                out.append(combo)
    return out


@dataclass(frozen=True)
class SearchGroup:
    """A search group: the region it belongs to and its quantized layers (FX node names)."""

    name: str
    region: str
    layers: tuple[str, ...]


def search_groups(regions, layer_order: Sequence[str], max_layers: int = MAX_LAYERS) -> list[SearchGroup]:
    """Regions in graph order, split into chunks of at most ``max_layers`` layers; a layer no
    region holds becomes its own group."""
    if max_layers < 1:
        raise ValueError("max_layers must be >= 1")
    rank = {name: i for i, name in enumerate(layer_order)}
    groups, covered = [], set()
    for region in regions:
        layers = sorted((n for n in region.layers if n in rank), key=rank.__getitem__)
        covered.update(layers)
        chunks = [layers[i:i + max_layers] for i in range(0, len(layers), max_layers)]
        for j, chunk in enumerate(chunks):
            name = region.name if len(chunks) == 1 else f"{region.name}.{j}"
            groups.append(SearchGroup(name, region.name, tuple(chunk)))
    for name in layer_order:
        if name not in covered:
            groups.append(SearchGroup(name, "", (name,)))
    first = {g.name: min(rank[n] for n in g.layers) for g in groups}
    return sorted(groups, key=lambda g: first[g.name])


@dataclass
class Sensitivity:
    """Per search group, ``table[group][configuration] = sensitivity`` (nats per sample)."""

    groups: list[SearchGroup]
    table: dict[str, dict[tuple, float]]
    precisions: tuple
    samples: int
    seconds: float = 0.0
    cached: bool = False
    meta: dict = field(default_factory=dict)

    def uniform(self, precision: Precision) -> float | None:
        """Total sensitivity of every layer at ``precision`` (None if never measured)."""
        total = 0.0
        for g in self.groups:
            v = self.table[g.name].get((precision,) * len(g.layers))
            if v is None:
                return None
            total += v
        return total

    def to_json(self) -> dict:
        return {"precisions": [str(p) for p in self.precisions], "samples": self.samples,
                "seconds": round(self.seconds, 3), "cached": self.cached, **self.meta,
                "groups": [{"name": g.name, "region": g.region, "layers": list(g.layers),
                            "configurations": [{"precisions": [_label(p) for p in c], "sensitivity": v}
                                               for c, v in self.table[g.name].items()]}
                           for g in self.groups]}

    @classmethod
    def from_json(cls, data: dict, precisions: tuple) -> "Sensitivity":
        by_label = {str(p): p for p in precisions}
        groups, table = [], {}
        for g in data["groups"]:
            sg = SearchGroup(g["name"], g["region"], tuple(g["layers"]))
            groups.append(sg)
            table[sg.name] = {tuple(by_label[str(p)] for p in c["precisions"]): float(c["sensitivity"])
                              for c in g["configurations"]}
        meta = {k: v for k, v in data.items() if k not in ("groups", "precisions", "samples", "seconds", "cached")}
        return cls(groups, table, precisions, int(data["samples"]), float(data["seconds"]), True, meta)


def _label(p: Precision):
    return p if isinstance(p, (int, str)) else str(p)


# ---------------------------------------------------------------------------------------------
# Fisher of the float model at the region outputs
# ---------------------------------------------------------------------------------------------

def model_fisher(gm: fx.GraphModule, data: torch.Tensor, names: list[str], budget, seed: int = 0):
    """Per batch, the squared gradient of -log p(y|x) at nodes ``names``, y drawn from the float
    model's prediction (see the module doc). ``gm`` runs as is: pass the float graph."""
    from fxq.calibrate import batches, graph_batch_size
    from fxq.fisher import values_carry_gradients
    from fxq.region_graph import ValueStore, _Recorder

    gen = torch.Generator().manual_seed(seed)
    stores = {n: ValueStore(f"sens-fisher-{n}", budget) for n in names}
    for chunk in batches(data, graph_batch_size(gm)):
        with torch.enable_grad(), values_carry_gradients(gm, chunk) as x:
            tap = _Recorder(gm, set(names), last=None)
            out = tap.run(x)
            out = out[0] if isinstance(out, (tuple, list)) else out
            if out.dim() == 2 and out.shape[1] > 1:
                probs = out.detach().float().softmax(1)
                y = torch.multinomial(probs, 1, generator=gen).squeeze(1)
                loss = torch.nn.functional.cross_entropy(out, y, reduction="sum")
            else:  # a unit-variance Gaussian around the output: the gradient of -log p is J^T eps
                eps = torch.randn(out.shape, generator=gen, dtype=out.dtype)
                loss = (out * eps).sum()
            taps = [tap.values[n] for n in names]
            grads = torch.autograd.grad(loss, taps, allow_unused=True)
        for name, z, g in zip(names, taps, grads):
            stores[name].append(torch.zeros_like(z) if g is None else g.detach().pow(2))
    return stores


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    root = os.environ.get("FXQ_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                          os.path.expanduser("~/.cache"), "fxq")
    return Path(root) / "sensitivity"


def _digest(gm: fx.GraphModule, data: torch.Tensor, settings: str) -> str:
    from fxq.resume import fingerprint

    h = hashlib.sha256(fingerprint(gm, data, settings).encode())
    h.update(gm.code.encode())
    return h.hexdigest()[:24]


def _variant(sub: fx.GraphModule, chosen: Mapping[str, Precision], weight_q) -> fx.GraphModule:
    """``sub`` with its layers at ``chosen``: weight quantizers of that bit-width (none for
    float), and activation quantizers only where integer data flows (annotate_qspecs' rule: the
    producer is integer or a consumer is a quantized layer; the region's inputs count as float)."""
    from fxq.quantizers import ActQuantizer, WeightQuantizer

    graph = copy.deepcopy(sub.graph)
    integer: set = set()
    bypass = []
    for node in graph.nodes:
        if ops.is_layer(node):
            if not is_float(chosen.get(node.name, "float")):
                integer.add(node)
        elif node.op == "call_module" and isinstance(sub.get_submodule(node.target), ActQuantizer):
            if node.args[0] in integer:
                integer.add(node)
            bypass.append(node)
        elif node.op == "call_function":
            acts = [a for a in node.all_input_nodes if a.op != "get_attr"]
            if acts and all(a in integer for a in acts):
                integer.add(node)
    for q in bypass:
        if q not in integer and not any(ops.is_layer(u) and u in integer for u in q.users):
            q.replace_all_uses_with(q.args[0])
            graph.erase_node(q)
    variant = fx.GraphModule(sub, graph)
    for node in graph.nodes:
        if not ops.is_layer(node) or len(node.args) < 2:
            continue
        wq = node.args[1]
        if not (isinstance(wq, fx.Node) and wq.op == "call_module"
                and isinstance(variant.get_submodule(wq.target), WeightQuantizer)):
            continue
        p = chosen.get(node.name, "float")
        ops.set_attr(variant, wq.target, _Identity() if is_float(p) else weight_q[p][wq.target])
    return variant


def measure_sensitivity(base: fx.GraphModule, calib: torch.Tensor, precisions: Sequence[Precision],
                        quantized: Callable[[int], fx.GraphModule], *, settings: str = "",
                        samples: int = DEFAULT_SAMPLES, max_layers: int = MAX_LAYERS, seed: int = 0,
                        cache: bool | str | os.PathLike = True, progress=None,
                        cache_bytes: int = 1 << 30) -> Sensitivity:
    """Sensitivities of every search group of ``base`` (the float graph after detect_blocks,
    ``base.meta["fxq.regions"]``) at ``precisions``. ``quantized(bits)`` returns a calibrated
    copy of ``base`` with every layer's weight at ``bits`` (the pipeline's own passes), so the
    quantizers measured are the ones the compile will use. ``settings`` goes into the cache key
    (backend, activation bits ...)."""
    from fxq.region_graph import MemoryBudget, extract_region, record_values
    from fxq.regions import Region

    precisions = tuple(precision_order(precisions))
    ints = [p for p in precisions if not is_float(p)]
    if not ints:
        raise FxqError("Mixed precision needs at least one integer precision to measure.",
                       "Allow e.g. --bits 8.")
    data = calib[:samples]
    layer_order = [n.name for n in base.graph.nodes if ops.is_layer(n)]
    groups = search_groups([r for r in base.meta.get("fxq.regions", []) if r.layers], layer_order, max_layers)
    regions = {r.name: r for r in base.meta.get("fxq.regions", [])}
    key = repr((SENSITIVITY_VERSION, [str(p) for p in precisions], max_layers, seed, settings,
                [(g.name, g.layers) for g in groups]))
    path = None
    if cache:
        directory = cache_dir() if cache is True else Path(cache)
        path = directory / f"{_digest(base, data, key)}.json"
        if path.is_file():
            try:
                return Sensitivity.from_json(json.loads(path.read_text()), precisions)
            except (ValueError, KeyError, TypeError):
                pass  # unreadable or stale: measure again
    start = time.perf_counter()
    budget = MemoryBudget(cache_bytes)
    try:
        graphs = {p: quantized(p) for p in ints}
        evaluation = graphs[ints[0]]
        weight_q = {p: {t: m for t, m in g.named_modules()} for p, g in graphs.items()}

        def region_of(g: SearchGroup) -> Region:
            if g.region in regions:
                return regions[g.region]
            node = next(n for n in base.graph.nodes if n.name == g.layers[0])
            return Region(name=g.name, kind="layer", nodes=(node.name,), layers=(node.name,),
                          inputs=tuple(a.name for a in node.all_input_nodes if a.op != "get_attr"),
                          output=node.name)

        region_list = [region_of(g) for g in groups]
        names = sorted({n for r in region_list for n in r.inputs} | {r.output for r in region_list})
        placeholders = [n.name for n in base.graph.nodes if n.op == "placeholder"]
        values = record_values(base, data, sorted(set(names) | set(placeholders)), budget)
        fisher = model_fisher(base, data, sorted({r.output for r in region_list}), budget, seed)
        total = sum(len(configurations(len(g.layers), precisions)) for g in groups)
        task = progress.add_task("measuring sensitivity", total=total) if progress else None
        table: dict[str, dict[tuple, float]] = {}
        with torch.no_grad():
            for g, region in zip(groups, region_list):
                sub, inputs = extract_region(evaluation, region.output, list(region.inputs))
                table[g.name] = {}
                for config in configurations(len(g.layers), precisions):
                    # the region's layers outside this chunk stay float
                    variant = _variant(sub, dict(zip(g.layers, config)), weight_q)
                    table[g.name][config] = _error(variant, inputs, values, fisher[region.output],
                                                   values[region.output])
                    if progress:
                        progress.advance(task)
        if progress:
            progress.remove_task(task)
    finally:
        budget.cleanup()
    result = Sensitivity(groups, table, precisions, int(data.shape[0]), time.perf_counter() - start,
                         False, {"max_layers": max_layers, "fisher": "sampled-label", "seed": seed})
    if path is not None:
        from fxq.atomic import atomic_write_text

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(result.to_json()))
        except OSError:
            pass  # a read-only cache only costs the next run the measurement
    return result


def _error(sub, inputs, values, fisher, targets) -> float:
    """Mean over samples of 1/2 sum F * (z_q - z)^2."""
    total, count = 0.0, 0
    for i in range(len(targets)):
        out = sub(*[values[n][i] for n in inputs])
        total += 0.5 * float(((out - targets[i]).pow(2) * fisher[i]).sum())
        count += out.shape[0]
    return total / max(count, 1)


class _Identity(torch.nn.Module):
    def forward(self, w):
        return w
