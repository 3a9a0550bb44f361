"""detect_blocks: partition a captured graph into regions for block-wise reconstruction.

Blocks are found from the graph alone (see ``docs/blocks.md``):

1. a *join* (an add or a concat of two or more distinct activations) closes a region that starts
   after its immediate dominator and holds everything the join post-dominates; nested candidates
   give each node to the smallest one;
2. layers no join region took are grouped by the module hierarchy into chains, or stand alone;
3. the granularity then keeps those regions (``block``), splits them into layers (``layer``),
   merges runs of equal output shape (``stage``) or merges everything (``net``).

The pass only reads the graph: it stamps ``node.meta["fxq.region"]`` and stores the regions in
``gm.meta["fxq.regions"]``.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

import networkx as nx
from torch import fx

from fxq import ops
from fxq.errors import FxqError, PassError
from fxq.options import GRANULARITIES
from fxq.regions import Region, count_kinds

from .infra import REGION, Pass, PassResult

REGIONS_META = "fxq.regions"

# A join is where activation paths meet; its op family names the kind of region it closes.
JOIN_RULES = (
    (ops.ADD_OPS, "residual"),
    (ops.CAT_OPS, "concat"),
)

_SOURCE = "<source>"
_SINK = "<sink>"


# --------------------------------------------------------------------------- the activation DAG

class _Tree:
    """A dominator tree with O(1) ancestor tests (DFS entry/exit times) and depths for LCA."""

    def __init__(self, parent: dict, root):
        self.parent = parent
        children = defaultdict(list)
        for node, p in parent.items():
            if node is not root:
                children[p].append(node)
        self.tin, self.tout, self.depth = {}, {}, {root: 0}
        clock = 0
        stack = [(root, False)]
        while stack:
            node, leaving = stack.pop()
            if leaving:
                self.tout[node] = clock
                continue
            self.tin[node] = clock
            clock += 1
            stack.append((node, True))
            for child in children[node]:
                self.depth[child] = self.depth[node] + 1
                stack.append((child, False))

    def covers(self, a, b) -> bool:
        """``a`` is ``b`` or an ancestor of ``b``."""
        return self.tin[a] <= self.tin[b] < self.tout[a]

    def lca(self, a, b):
        while self.depth[a] > self.depth[b]:
            a = self.parent[a]
        while self.depth[b] > self.depth[a]:
            b = self.parent[b]
        while a is not b:
            a, b = self.parent[a], self.parent[b]
        return a


class ActivationGraph:
    """The activation dataflow of a graph: nodes that depend on a placeholder, in graph order.

    Constant subgraphs (parameters, ``class_token.expand`` ...) are left out, so an add of a
    learned constant is not a join. A virtual source feeds the placeholders and a virtual sink
    takes the outputs and every dead end, so dominators and post-dominators are total.
    """

    def __init__(self, graph: fx.Graph):
        index: dict[fx.Node, int] = {}
        for node in graph.nodes:
            if node.op == "placeholder" or (
                    node.op not in ("get_attr", "output")
                    and any(i in index for i in node.all_input_nodes)):
                index[node] = len(index)
        self.index = index
        self.nodes = list(index)
        dag = nx.DiGraph()
        dag.add_nodes_from([_SOURCE, *self.nodes, _SINK])
        for node in self.nodes:
            if node.op == "placeholder":
                dag.add_edge(_SOURCE, node)
            dag.add_edges_from((i, node) for i in node.all_input_nodes if i in index)
            if not any(u in index for u in node.users) or any(u.op == "output" for u in node.users):
                dag.add_edge(node, _SINK)
        self.dag = dag
        self.idom = nx.immediate_dominators(dag, _SOURCE)
        self.ipdom = nx.immediate_dominators(dag.reverse(copy=False), _SINK)
        self.dom = _Tree(self.idom, _SOURCE)
        self.pdom = _Tree(self.ipdom, _SINK)

    def inputs(self, node: fx.Node) -> list[fx.Node]:
        return [i for i in node.all_input_nodes if i in self.index]

    def users(self, node: fx.Node) -> list[fx.Node]:
        return [u for u in node.users if u in self.index]

    def is_exit(self, node: fx.Node, region: set) -> bool:
        return any(u not in region for u in node.users)

    def sorted(self, nodes: Iterable[fx.Node]) -> list[fx.Node]:
        return sorted(nodes, key=self.index.__getitem__)

    def between(self, nodes: set[fx.Node]) -> set[fx.Node]:
        """``nodes`` plus every node on a path from one of them to another (the convex hull)."""
        order = self.sorted(nodes)
        lo, hi = self.index[order[0]], self.index[order[-1]]
        span = self.nodes[lo:hi + 1]
        after = set(nodes)
        for node in span:
            if node not in after and any(i in after for i in self.inputs(node)):
                after.add(node)
        before = set(nodes)
        for node in reversed(span):
            if node not in before and any(u in before for u in self.users(node)):
                before.add(node)
        return set(nodes) | (after & before)

    def entry(self, region: set[fx.Node]) -> fx.Node | None:
        """The nearest node outside ``region`` that dominates all of it."""
        nodes = iter(region)
        common = next(nodes)
        for node in nodes:
            common = self.dom.lca(common, node)
        while common in region:
            common = self.idom[common]
        return None if common is _SOURCE else common


# --------------------------------------------------------------------------- block-level rules

@dataclass
class _Block:
    kind: str
    nodes: set[fx.Node]
    output: fx.Node | None = None   # None: the last node whose value leaves the region
    join: fx.Node | None = None


def _join_kind(node: fx.Node, ag: ActivationGraph) -> str | None:
    if node.op != "call_function":
        return None
    for family, kind in JOIN_RULES:
        if node.target in family and len(ag.inputs(node)) >= 2:
            return kind
    return None


def _has_layer(nodes: Iterable[fx.Node]) -> bool:
    return any(ops.is_layer(n) for n in nodes)


def _trailing_norm(ag: ActivationGraph, join: fx.Node) -> fx.Node | None:
    """The normalization (LayerNorm, GroupNorm ...) that is the only reader of a residual join,
    or None. Everything after the join then sees only the normalized value (a post-norm
    transformer: ``LayerNorm(x + f(x))``), so the block ends there and is judged by it: the raw
    sum is dominated by a few outlier channels the normalization divides away."""
    users = ag.users(join)
    if len(users) == 1 and len(join.users) == 1 and ops.is_op(users[0], ops.NORM_OPS) \
            and users[0].args and users[0].args[0] is join:
        return users[0]
    return None


def _join_candidates(ag: ActivationGraph) -> list[_Block]:
    """One candidate per join: what lies strictly below its immediate dominator and above it.

    A join whose candidate holds no layer only gathers tensors that stay live elsewhere (a dense
    connection: each layer reads the concat of all earlier outputs). Such a join opens a region
    instead: itself and the chain it dominates, up to the farthest node that still post-dominates
    it and is dominated by it.
    """
    found = []
    for join in ag.nodes:
        kind = _join_kind(join, ag)
        if kind is None:
            continue
        entry = ag.idom[join]
        nodes = {n for n in ag.nodes[:ag.index[join] + 1]
                 if n.op != "placeholder" and n is not entry
                 and ag.dom.covers(entry, n) and ag.pdom.covers(join, n)}
        if _has_layer(nodes):
            norm = _trailing_norm(ag, join) if kind == "residual" else None
            if norm is not None:
                found.append(_Block(kind, nodes | {norm}, norm, join))
            else:
                found.append(_Block(kind, nodes, join, join))
            continue
        exit_ = join
        while ag.ipdom[exit_] is not _SINK and ag.dom.covers(join, ag.ipdom[exit_]):
            exit_ = ag.ipdom[exit_]
        nodes = {n for n in ag.nodes[ag.index[join]:ag.index[exit_] + 1]
                 if ag.dom.covers(join, n) and ag.pdom.covers(exit_, n)}
        if _has_layer(nodes):
            found.append(_Block(kind, nodes, exit_, join))
    return found


def _nest(ag: ActivationGraph, candidates: list[_Block]) -> list[_Block]:
    """Give every node to the smallest candidate holding it.

    A candidate also gives up the nodes that feed a smaller region nested in it: kept, they
    would make the candidate's input depend on its own nodes (not convex), and they go to the
    hierarchy rule instead.
    """
    owner: dict[fx.Node, _Block] = {}
    kept = []
    for cand in sorted(candidates, key=lambda c: (len(c.nodes), ag.index[c.output])):
        taken = {n for n in cand.nodes if n in owner}
        feeds_taken = set(taken)
        for node in reversed(ag.sorted(cand.nodes)):
            if node not in feeds_taken and any(u in feeds_taken for u in ag.users(node)):
                feeds_taken.add(node)
        own = cand.nodes - feeds_taken
        if cand.join in own and cand.output in own and _has_layer(own):
            block = _Block(cand.kind, own, cand.output, cand.join)
            for n in own:
                owner[n] = block
            kept.append(block)
    return kept


class _Hierarchy:
    """The module hierarchy as recorded in ``nn_module_stack``: which layers each module holds."""

    def __init__(self, ag: ActivationGraph):
        self.path = {n: ops.module_path(n) for n in ag.nodes}
        self.layers: dict[str, set[fx.Node]] = defaultdict(set)
        self.members: dict[str, set[fx.Node]] = defaultdict(set)
        for node, path in self.path.items():
            for module in path:
                self.members[module].add(node)
                if ops.is_layer(node):
                    self.layers[module].add(node)

    def exact_module(self, layers: set[fx.Node]) -> str | None:
        """The shallowest module that holds exactly ``layers`` (``layer1.0``, not ``layer1``)."""
        first = next(iter(layers))
        return next((m for m in self.path[first] if self.layers[m] == layers), None)

    def name_for(self, layers: set[fx.Node]) -> str | None:
        """``exact_module``, else the deepest module common to all ``layers``."""
        exact = self.exact_module(layers)
        if exact is not None:
            return exact
        paths = [self.path[n] for n in layers]
        common = paths[0]
        for path in paths[1:]:
            common = [a for a, b in zip(common, path) if a == b]
        return common[-1] if common else None


def _heads(ag: ActivationGraph) -> set[fx.Node]:
    """Layers with no layer after them: they produce the network's outputs."""
    feeds_layer: set[fx.Node] = set()
    heads = set()
    for node in reversed(ag.nodes):
        if any(ops.is_layer(u) or u in feeds_layer for u in ag.users(node)):
            feeds_layer.add(node)
        elif ops.is_layer(node):
            heads.add(node)
    return heads


def _chains_and_layers(ag: ActivationGraph, hier: _Hierarchy, assigned: set[fx.Node]) -> list[_Block]:
    """Group the layers no join region took: the shallowest module whose layers are all free and
    number at least two becomes a chain, provided its nodes (with what lies between them) form a
    convex set that holds no foreign layer; any other layer is a region of its own.

    A head (a layer with no layer after it) always stands alone: it is judged by the task loss
    itself and kept at the boundary bit width, so it should not share a block loss with the
    feature layers before it.
    """
    heads = _heads(ag) - assigned
    blocks = [_Block("layer", {h}) for h in heads]
    taken = set(assigned) | heads

    def chain_nodes(module: str) -> set[fx.Node] | None:
        layers = hier.layers[module]
        if len(layers) < 2 or layers & taken:
            return None
        own = {n for n in hier.members[module] if n not in taken and n.op != "placeholder"}
        hull = ag.between(own)
        if any(n in taken or (ops.is_layer(n) and n not in layers) for n in hull - own):
            return None
        return hull

    for layer in ag.nodes:
        if not ops.is_layer(layer) or layer in taken:
            continue
        for module in hier.path[layer]:
            nodes = chain_nodes(module)
            if nodes is not None:
                blocks.append(_Block("chain", nodes))
                break
        else:
            nodes = {layer}
            blocks.append(_Block("layer", nodes))
        taken |= nodes
    return blocks


# --------------------------------------------------------------------------- regions

class _Namer:
    """Unique region names: later regions that would repeat a name get ``#2``, ``#3`` ..."""

    def __init__(self):
        self.seen: dict[str, int] = defaultdict(int)

    def __call__(self, name: str) -> str:
        self.seen[name] += 1
        return name if self.seen[name] == 1 else f"{name}#{self.seen[name]}"


def _topological(ag: ActivationGraph, blocks: list[_Block]) -> list[_Block]:
    where = {n: i for i, b in enumerate(blocks) for n in b.nodes}
    quotient = nx.DiGraph()
    quotient.add_nodes_from(range(len(blocks)))
    for i, block in enumerate(blocks):
        for node in block.nodes:
            quotient.add_edges_from((where[p], i) for p in ag.inputs(node)
                                    if p in where and where[p] != i)
    last = [max(ag.index[n] for n in b.nodes) for b in blocks]
    try:
        order = list(nx.lexicographical_topological_sort(quotient, key=last.__getitem__))
    except nx.NetworkXUnfeasible as exc:  # regions are convex by construction; a cycle is a bug
        raise PassError("detect_blocks built regions that depend on each other in a cycle.",
                        "Please report this with the model.") from exc
    return [blocks[i] for i in order]


def _output(ag: ActivationGraph, block: _Block) -> fx.Node:
    if block.output is not None:
        return block.output
    nodes = ag.sorted(block.nodes)
    exits = [n for n in nodes if ag.is_exit(n, block.nodes)]
    return exits[-1] if exits else nodes[-1]


def _region(ag: ActivationGraph, block: _Block, name: str) -> Region:
    nodes = ag.sorted(block.nodes)
    inside = block.nodes
    inputs = ag.sorted({i for n in nodes for i in ag.inputs(n) if i not in inside})
    output = _output(ag, block)
    entry = ag.entry(inside)
    return Region(name=name, kind=block.kind, nodes=[n.name for n in nodes],
                  layers=[n.name for n in nodes if ops.is_layer(n)],
                  inputs=[n.name for n in inputs], output=output.name,
                  entry=entry.name if entry is not None else None)


def _block_name(block: _Block, hier: _Hierarchy, ag: ActivationGraph) -> str:
    layers = {n for n in block.nodes if ops.is_layer(n)}
    if block.kind == "layer":
        return ops.layer_name(next(iter(layers)))
    name = hier.name_for(layers)
    return name or (block.output or ag.sorted(block.nodes)[-1]).name


def _output_shape(ag: ActivationGraph, block: _Block) -> tuple | None:
    """The block's output shape without the batch dimension; None when unknown."""
    shape = getattr(_output(ag, block).meta.get("val"), "shape", None)
    return tuple(shape[1:]) if shape is not None else None


def _check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise FxqError(f"Unknown granularity {granularity!r}.",
                       f"Use one of {', '.join(GRANULARITIES)}.")


class BlockFinder:
    """Everything ``detect_blocks`` computes for one graph; build once, ask per granularity."""

    def __init__(self, gm: fx.GraphModule):
        self.ag = ActivationGraph(gm.graph)
        self.hier = _Hierarchy(self.ag)
        joins = _nest(self.ag, _join_candidates(self.ag))
        assigned = set().union(*(b.nodes for b in joins))
        self.blocks = _topological(self.ag, joins + _chains_and_layers(self.ag, self.hier, assigned))

    def regions(self, granularity: str = "block") -> list[Region]:
        _check_granularity(granularity)
        return getattr(self, f"_{granularity}")()

    def _block(self) -> list[Region]:
        name = _Namer()
        return [_region(self.ag, b, name(_block_name(b, self.hier, self.ag))) for b in self.blocks]

    def _layer(self) -> list[Region]:
        name = _Namer()
        layers = [n for n in self.ag.nodes if ops.is_layer(n)]
        return [_region(self.ag, _Block("layer", {n}), name(ops.layer_name(n))) for n in layers]

    def _stage(self) -> list[Region]:
        """Runs of consecutive blocks whose output shape (batch excluded) does not change."""
        runs: list[list[tuple[Region, _Block]]] = []
        previous = None
        for region, block in zip(self._block(), self.blocks):
            shape = _output_shape(self.ag, block)
            if runs and shape is not None and shape == previous:
                runs[-1].append((region, block))
            else:
                runs.append([(region, block)])
            previous = shape
        name = _Namer()
        stages = []
        for run, nodes in (piece for r in runs for piece in self._single_exit_pieces(r)):
            if len(run) == 1:
                label = run[0][0].name
            else:
                label = (self.hier.exact_module({n for n in nodes if ops.is_layer(n)})
                         or f"{run[0][0].name}..{run[-1][0].name}")
            stages.append(_region(self.ag, _Block("stage", nodes), name(label)))
        return stages

    def _stage_nodes(self, run) -> set[fx.Node]:
        return self._close_exits(self.ag.between(set().union(*(b.nodes for _, b in run))))

    def _single_exit_pieces(self, run) -> list[tuple[list, set[fx.Node]]]:
        """The run as one stage when that has a single exit; else split greedily into the
        longest consecutive pieces that do (blocks on parallel branches of one shape: a piece
        that would leave two values to the rest of the graph is no region)."""
        nodes = self._stage_nodes(run)
        if self._exits(nodes) <= 1 or len(run) == 1:
            return [(run, nodes)]
        pieces, current = [], [run[0]]
        for item in run[1:]:
            if self._exits(self._stage_nodes(current + [item])) <= 1:
                current.append(item)
            else:
                pieces.append(current)
                current = [item]
        pieces.append(current)
        return [(piece, self._stage_nodes(piece)) for piece in pieces]

    def _exits(self, nodes: set[fx.Node]) -> int:
        return sum(1 for n in nodes if self.ag.is_exit(n, nodes))

    def _close_exits(self, nodes: set[fx.Node]) -> set[fx.Node]:
        """Give a run with several exits (dense layers whose outputs are concatenated after
        the run) the node where those exits meet, when that adds no layer and no block node."""
        exits = [n for n in nodes if self.ag.is_exit(n, nodes)]
        if len(exits) < 2:
            return nodes
        meet = exits[0]
        for node in exits[1:]:
            meet = self.ag.pdom.lca(meet, node)
        if meet is _SINK:
            return nodes
        closed = self.ag.between(nodes | {meet})
        in_blocks = set().union(*(b.nodes for b in self.blocks))
        if any(ops.is_layer(n) or n in in_blocks for n in closed - nodes):
            return nodes
        return closed

    def _net(self) -> list[Region]:
        nodes = {n for n in self.ag.nodes if n.op != "placeholder"}
        return [_region(self.ag, _Block("net", nodes), "net")] if nodes else []


# --------------------------------------------------------------------------- the pass

def _stamp(gm: fx.GraphModule, regions: list[Region]) -> None:
    by_name = {n.name: n for n in gm.graph.nodes}
    for node in gm.graph.nodes:
        node.meta.pop(REGION, None)
    for region in regions:
        for name in region.nodes:
            by_name[name].meta[REGION] = region.name
    gm.meta[REGIONS_META] = regions


class DetectBlocks(Pass):
    """Find the regions of ``gm`` at ``granularity`` (layer, block, stage or net).

    Leaves the graph unchanged; stamps ``fxq.region`` on every node of every region and keeps the
    list in ``gm.meta["fxq.regions"]``. ``stats``: ``regions`` and ``counts`` per kind.
    """

    name = "detect_blocks"

    def __init__(self, granularity: str = "block"):
        _check_granularity(granularity)
        self.granularity = granularity

    def call(self, gm: fx.GraphModule) -> PassResult:
        regions = BlockFinder(gm).regions(self.granularity)
        _stamp(gm, regions)
        return PassResult(gm, modified=False,
                          stats={"regions": regions, "counts": count_kinds(regions)})


def detect_blocks(gm: fx.GraphModule, granularity: str = "block") -> list[Region]:
    """Python entry point: run ``DetectBlocks`` on ``gm`` and return its regions."""
    return DetectBlocks(granularity)(gm).stats["regions"]
