"""annotate_qspecs: attach quantization decisions to graph edges, from a backend table.

Writes ``node.meta["fxq.qspec"] = {"weight": QSpec | None, "inputs": {arg_index: QSpec},
"rules": [row names]}`` on every consumer the table selects; bits come from the options, with
the first and last layer (in topological order) kept at ``first_last_bits``. Decisions only:
``materialize_quantizers`` creates the quantizer nodes.
"""
from __future__ import annotations

from torch import fx

from fxq import ops
from fxq.passes.infra import QSPEC, Pass, PassResult


def _activation_args(node: fx.Node, how: str) -> list[tuple[object, fx.Node]]:
    """(arg position, producer) pairs of tensor activation inputs; list args (cat) use (0, i)."""
    out = []
    for i, arg in enumerate(node.args):
        if isinstance(arg, fx.Node) and arg.op != "get_attr":
            out.append((i, arg))
        elif isinstance(arg, (list, tuple)):
            out.extend(((i, j), a) for j, a in enumerate(arg) if isinstance(a, fx.Node) and a.op != "get_attr")
        if how == "first" and out:
            break
    return out


def _depends_on_input(node: fx.Node, memo: dict) -> bool:
    if node in memo:
        return memo[node]
    if node.op == "placeholder":
        memo[node] = True
        return True
    memo[node] = False  # DAG: no cycles, the placeholder flag only flows forward
    memo[node] = any(_depends_on_input(a, memo) for a in node.all_input_nodes)
    return memo[node]


class AnnotateQSpecs(Pass):
    name = "annotate_qspecs"

    def __init__(self, table, weight_bits: int = 8, act_bits: int = 8, first_last_bits: int = 8,
                 layer_bits: dict[str, int] | None = None, reduce_range: bool = False):
        self.table = table
        self.weight_bits = weight_bits
        self.act_bits = act_bits
        self.first_last_bits = first_last_bits
        self.layer_bits = dict(layer_bits or {})
        self.reduce_range = reduce_range

    def call(self, gm: fx.GraphModule) -> PassResult:
        layers = [n for n in gm.graph.nodes if ops.is_layer(n)]
        edge_layers = {layers[0], layers[-1]} if layers and self.first_last_bits else set()
        memo: dict = {}
        count_w = count_a = 0
        for node in gm.graph.nodes:
            rules = self.table.rules_for(node)
            if not rules:
                continue
            # the graph output is quantized at the precision of the layer that produces it
            boundary = node in edge_layers or node.op == "output"
            wbits = self.layer_bits.get(ops.layer_name(node)) if ops.is_layer(node) else None
            if wbits is None:
                wbits = max(self.weight_bits, self.first_last_bits) if boundary else self.weight_bits
            abits = max(self.act_bits, self.first_last_bits) if (boundary and self.act_bits < 32) else self.act_bits
            spec = {"weight": None, "inputs": {}, "rules": []}
            for rule in rules:
                spec["rules"].append(rule.name)
                if rule.weight and ops.is_layer(node) and wbits < 32:
                    spec["weight"] = self.table.weight_spec(wbits, self.reduce_range)
                    count_w += 1
                if abits < 32:
                    for pos, producer in _activation_args(node, rule.act_inputs):
                        if _depends_on_input(producer, memo):
                            spec["inputs"][pos] = self.table.act_spec(abits)
                            count_a += 1
            if spec["weight"] is not None or spec["inputs"]:
                node.meta[QSPEC] = spec
        return PassResult(gm, modified=bool(count_w or count_a),
                          stats={"weights": count_w, "activation_edges": count_a})
