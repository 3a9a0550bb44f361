"""annotate_qspecs: attach quantization decisions to graph edges, from a backend table.

Writes ``node.meta["fxq.qspec"] = {"weight": QSpec | None, "inputs": {arg_index: QSpec},
"rules": [row names]}`` on every consumer the table selects; bits come from the options, with
the first and last layer (in topological order) kept at ``first_last_bits``.

Mixed precision (``layer_precision``: FX node name -> weight bits, or ``"float"`` to leave the
layer unquantized) decides each layer's weight on its own. Activations then follow where the
integer data flows: every value is *integer* when a quantized layer produced it (through ops
whose activation inputs are all integer) and *float* otherwise, and an edge keeps its quantizer
when its producer is integer or its consumer is a quantized layer. So a quantized layer feeding a
float one still ends in a Q/DQ pair — runtimes fuse a layer into an integer kernel only when its
output is requantized — and the float layer reads the dequantized value, as the runtime will. The table's storage
row for each weight may block its scales and make the layer weight-only. A row that matches but
leaves a node in float says why in ``node.meta["fxq.float"]``. Decisions only:
``materialize_quantizers`` creates the quantizer nodes.

Residual joins (a ``"skip"`` row, TensorRT's): of the two activation operands of an add, the
*backbone* is the one a conv/gemm can absorb the add into — a conv/linear/matmul output reaching
the add through single-input ops (BN, bias, scale, permute ...) that nothing else reads — and the
*skip* is the other. When both operands are such branches (a projection shortcut), the backbone
is the one with more layers of its own (not shared with the other operand), ties going to the one
computed later. Only the skip input is quantized.
"""
from __future__ import annotations

from dataclasses import replace

from torch import fx

from fxq import ops
from fxq.passes.infra import FLOAT, QSPEC, Pass, PassResult

SKIP_FLOAT = "annotate_qspecs.add_without_conv_branch"


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


def _is_product(node: fx.Node) -> bool:
    return ops.is_layer(node) or ops.is_op(node, ops.MATMUL_OPS)


def fusable_branch(producer: fx.Node, memo: dict) -> fx.Node | None:
    """The conv/linear/matmul whose output reaches ``producer`` (an operand of a join) through a
    private chain of single-activation-input ops, or None. Private: every node of the chain,
    the layer included, has exactly one user, so a runtime can fuse the join into the layer."""
    node = producer
    while node.op == "call_function" and len(node.users) == 1:
        if _is_product(node):
            return node
        acts = [a for a in node.all_input_nodes if a.op != "get_attr" and _depends_on_input(a, memo)]
        if len(acts) != 1:
            return None
        node = acts[0]
    return None


def _ancestors(node: fx.Node) -> set:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def residual_skip(node: fx.Node, memo: dict, order: dict) -> tuple[object | None, str | None]:
    """(argument position of the skip operand of the join ``node``, why); (None, why) when no
    operand is a fusable conv/gemm branch (the join then stays in float); (None, None) when
    ``node`` does not join two activations (an add of a constant: the row does not apply)."""
    acts = [(pos, p) for pos, p in _activation_args(node, "all") if _depends_on_input(p, memo)]
    if len(acts) != 2:
        return None, None
    branches = [(pos, p, fusable_branch(p, memo)) for pos, p in acts]
    fusable = [b for b in branches if b[2] is not None]
    if not fusable:
        return None, ("neither operand is a conv/gemm output the runtime can fuse the add into "
                      "(both are read elsewhere or computed by other ops): the add runs in float")
    if len(fusable) == 1:
        backbone = fusable[0]
        why = f"{backbone[2].name} fuses into the add; the other operand is the skip"
    else:
        anc = [_ancestors(b[1]) for b in branches]
        own = [sum(1 for n in anc[i] - anc[1 - i] if _is_product(n)) for i in range(2)]
        i = max(range(2), key=lambda k: (own[k], order[branches[k][2]]))
        backbone = branches[i]
        why = (f"both operands are conv/gemm branches; {backbone[2].name} has more layers of its own "
               f"({own[i]} vs {own[1 - i]}) and fuses into the add, the other is the skip")
    skip = next(b for b in branches if b is not backbone)
    return skip[0], why


OUTPUT_FLOAT_WHY = ("no consumer quantizes its output (float ops such as LayerNorm read it), and the "
                    "runtime's integer kernel needs DQ -> op -> Q: quantizing its inputs would only "
                    "lose precision")


def _reads_quantized(consumer: fx.Node, producer: fx.Node, table, kept: set) -> bool:
    """Whether a placement row of ``consumer`` quantizes its input ``producer``."""
    for rule in table.rules_for(consumer):
        if rule.needs_quantized_output and consumer not in kept:
            continue
        if rule.act_inputs != "first":
            return True
        first = _activation_args(consumer, "first")
        if first and first[0][1] is producer:
            return True
    return False


def requantized(gm: fx.GraphModule, table) -> set:
    """The nodes with a ``needs_quantized_output`` row whose output a consumer quantizes, reached
    through transparent ops and clamps (a runtime drops a ReLU in front of a Q). Decided in
    reverse order, so a chain of such ops (the residual adds of a pre-norm transformer) is kept
    as long as its last member is."""
    kept: set = set()
    passthrough = ops.TRANSPARENT_OPS | ops.CLAMP_OPS
    for node in reversed(gm.graph.nodes):
        if not any(r.needs_quantized_output for r in table.rules_for(node)):
            continue
        stack, seen = [node], set()
        while stack:
            value = stack.pop()
            for user in value.users:
                if user in seen:
                    continue
                seen.add(user)
                if ops.is_op(user, passthrough):
                    stack.append(user)
                elif _reads_quantized(user, value, table, kept):
                    kept.add(node)
                    stack.clear()
                    break
    return kept


class AnnotateQSpecs(Pass):
    name = "annotate_qspecs"

    def __init__(self, table, weight_bits: int = 8, act_bits: int = 8, first_last_bits: int = 8,
                 layer_precision: dict[str, int | str] | None = None, reduce_range: bool = False):
        self.table = table
        self.weight_bits = weight_bits
        self.act_bits = act_bits
        self.first_last_bits = first_last_bits
        self.layer_precision = dict(layer_precision or {})
        self.reduce_range = reduce_range

    def _integer_values(self, gm: fx.GraphModule, memo: dict) -> set | None:
        """The nodes whose value is integer data at run time (see the module doc); None when
        every layer is quantized (then the table alone decides)."""
        if not any(isinstance(p, str) for p in self.layer_precision.values()):
            return None
        integer = set()
        for node in gm.graph.nodes:
            if ops.is_layer(node):
                if not isinstance(self.layer_precision.get(node.name, self.weight_bits), str):
                    integer.add(node)
            elif node.op == "call_function":
                acts = [a for a in node.all_input_nodes if a.op != "get_attr" and _depends_on_input(a, memo)]
                if acts and all(a in integer for a in acts):
                    integer.add(node)
        return integer

    def call(self, gm: fx.GraphModule) -> PassResult:
        layers = [n for n in gm.graph.nodes if ops.is_layer(n)]
        edge_layers = {layers[0], layers[-1]} if layers and self.first_last_bits else set()
        memo: dict = {}
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        count_w = count_a = 0
        skipped, skips, storage = [], 0, {}
        integer = self._integer_values(gm, memo)
        requant = requantized(gm, self.table)

        def keep(consumer: fx.Node, producer: fx.Node) -> bool:
            if integer is None:
                return True
            return producer in integer or (ops.is_layer(consumer) and consumer in integer)

        for node in gm.graph.nodes:
            rules = self.table.rules_for(node)
            if not rules:
                continue
            # the graph output is quantized at the precision of the layer that produces it
            boundary = node in edge_layers or node.op == "output"
            chosen = self.layer_precision.get(node.name) if ops.is_layer(node) else None
            if chosen is not None:  # the search already applied the first/last floor
                wbits = 32 if isinstance(chosen, str) else int(chosen)
            else:
                wbits = max(self.weight_bits, self.first_last_bits) if boundary else self.weight_bits
            abits = max(self.act_bits, self.first_last_bits) if (boundary and self.act_bits < 32) else self.act_bits
            spec = {"weight": None, "inputs": {}, "rules": []}
            weight_only = False
            for rule in rules:
                spec["rules"].append(rule.name)
                if rule.weight and ops.is_layer(node) and wbits < 32:
                    wspec = self.table.weight_spec(wbits, self.reduce_range)
                    if self.table.storage:
                        shape = tuple(ops.get_attr(gm, ops.layer_weight(node).target).shape) \
                            if ops.layer_weight(node).op == "get_attr" else ()
                        row, block = self.table.storage_for(node.target, wspec.bits, shape)
                        if block:
                            wspec = replace(wspec, block_size=block)
                        weight_only = weight_only or row.weight_only
                        spec["rules"].append(row.name)
                        storage[row.name] = storage.get(row.name, 0) + 1
                    spec["weight"] = wspec
                    count_w += 1
            for rule in rules:
                if abits >= 32 or weight_only:
                    continue
                if rule.needs_quantized_output and node not in requant:
                    node.meta[FLOAT] = {"rule": rule.name, "why": OUTPUT_FLOAT_WHY}
                    continue
                if rule.act_inputs == "skip":
                    pos, why = residual_skip(node, memo, order)
                    if pos is not None and not keep(node, dict(_activation_args(node, "all"))[pos]):
                        continue
                    if pos is None:
                        if why is not None:
                            node.meta[FLOAT] = {"rule": SKIP_FLOAT, "why": why}
                            skipped.append({"node": node.name, "reason": why})
                        continue
                    spec["inputs"][pos] = self.table.act_spec(abits)
                    spec["skip"] = {"input": pos, "why": why}
                    skips += 1
                    count_a += 1
                    continue
                for pos, producer in _activation_args(node, rule.act_inputs):
                    if _depends_on_input(producer, memo) and keep(node, producer):
                        spec["inputs"][pos] = self.table.act_spec(abits)
                        count_a += 1
            if spec["weight"] is not None or spec["inputs"]:
                node.meta[QSPEC] = spec
        stats = {"weights": count_w, "activation_edges": count_a}
        if skips:
            stats["skip_inputs"] = skips
        if storage:
            stats["storage"] = storage
        if skipped:
            stats["skipped"] = skipped
        return PassResult(gm, modified=bool(count_w or count_a), stats=stats)
