"""canonicalize: one spelling per computation, so later passes match fewer forms.

Rules, applied in this order:

``canonicalize.functionalize``
    ``aten.relu_(x)`` becomes ``aten.relu(x)`` (and every other in-place op its functional twin)
    when nothing reads the old storage of ``x`` after the op: no later node reads ``x`` or a view
    of it, and ``x`` is not a graph input or a parameter (the caller would see the mutation).
    Otherwise the op stays and ``stats["skipped"]`` says why. Twins come from
    ``fxq.ops.INPLACE_TO_FUNCTIONAL``, else from the op's own name (``foo_.X`` -> ``foo.X``) when
    the schemas agree (argument types, and names after the first: ``dropout_(self, ...)`` has
    the twin ``dropout(input, ...)``).
``canonicalize.drop_identity``
    ``clone``, ``alias``, ``contiguous``, ``detach`` and eval-mode dropout are replaced by their
    input, unless an in-place op left by the first rule mutates the input or the result (then the
    copy is load-bearing). Readers of the removed node are stamped with the rule. A copy also
    fixes the memory layout: ``x.transpose(1, 2).contiguous().view(n, -1, h, w)`` (a channel
    shuffle) only works on the contiguous copy, so every ``view`` that reads the removed node,
    directly or through further views, becomes a ``reshape`` (same values on any layout).

Unused ``get_attr`` nodes (``num_batches_tracked`` loads, for instance) are removed as well.
"""
from __future__ import annotations

import torch
from torch import fx

from fxq.ops import INPLACE_TO_FUNCTIONAL
from fxq.passes.infra import RULE, Pass, PassResult

aten = torch.ops.aten

FUNCTIONALIZE = "canonicalize.functionalize"
DROP_IDENTITY = "canonicalize.drop_identity"


def _eval_mode(node: fx.Node) -> str | None:
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train")
    if train is False:
        return None
    if train is True:
        return "dropout in training mode"
    return "dropout's train flag is not a constant"


def _always(node: fx.Node) -> str | None:
    return None


# Identity-valued ops and the check that must pass (None = no objection) before dropping one.
IDENTITY_OPS = {
    aten.clone.default: _always,
    aten.alias.default: _always,
    aten.contiguous.default: _always,
    aten.detach.default: _always,
    aten.dropout.default: _eval_mode,
    aten.feature_dropout.default: _eval_mode,
    aten.alpha_dropout.default: _eval_mode,
    aten.feature_alpha_dropout.default: _eval_mode,
}


# ---------------------------------------------------------------------------------------------
# Alias facts, read from the op schemas: `Tensor(a) self` means the result may share storage
# with self (views), `Tensor(a!) self` that the op also writes it (in-place ops).

def _schema_inputs(node: fx.Node):
    """(schema argument, value) pairs of an ATen call."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return []
    pairs = []
    for i, arg in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            pairs.append((arg, node.args[i]))
        elif arg.name in node.kwargs:
            pairs.append((arg, node.kwargs[arg.name]))
    return pairs


def aliased_inputs(node: fx.Node) -> list[fx.Node]:
    """Inputs whose storage ``node``'s result may share."""
    if node.op == "call_function" and getattr(node.target, "__name__", "") == "getitem":
        return [node.args[0]] if isinstance(node.args[0], fx.Node) else []
    return [v for arg, v in _schema_inputs(node) if arg.alias_info is not None and isinstance(v, fx.Node)]


def mutated_inputs(node: fx.Node) -> list[fx.Node]:
    return [v for arg, v in _schema_inputs(node)
            if arg.alias_info is not None and arg.alias_info.is_write and isinstance(v, fx.Node)]


def is_inplace(node: fx.Node) -> bool:
    return (node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
            and node.target._schema.name.endswith("_") and bool(mutated_inputs(node)))


class AliasSets:
    """Union-find of nodes that may share storage."""

    def __init__(self, graph: fx.Graph):
        self.parent: dict[fx.Node, fx.Node] = {}
        for node in graph.nodes:
            for src in aliased_inputs(node):
                self.union(node, src)

    def find(self, n: fx.Node) -> fx.Node:
        root = n
        while self.parent.get(root, root) is not root:
            root = self.parent[root]
        while n is not root:
            self.parent[n], n = root, self.parent.get(n, n)
        return root

    def union(self, a: fx.Node, b: fx.Node) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra is not rb:
            self.parent[ra] = rb

    def members(self, graph: fx.Graph, n: fx.Node) -> set[fx.Node]:
        root = self.find(n)
        return {m for m in graph.nodes if self.find(m) is root}


# ---------------------------------------------------------------------------------------------
# Rule: functionalize

def functional_twin(op) -> object | None:
    """The out-of-place op computing what in-place ``op`` writes, or None."""
    if op in INPLACE_TO_FUNCTIONAL:
        return INPLACE_TO_FUNCTIONAL[op]
    name = op._schema.name.split("::")[-1]
    if not name.endswith("_") or name.endswith("__"):
        return None
    packet = getattr(getattr(torch.ops, op.namespace), name[:-1], None)
    twin = getattr(packet, op._overloadname, None) if packet is not None else None
    if twin is None:
        return None

    def shape(o):  # the mutated first argument may be named differently (dropout_: self, dropout: input)
        return [(a.name if i else "", str(a.type)) for i, a in enumerate(o._schema.arguments)]

    return twin if shape(twin) == shape(op) else None


def _why_not_functionalize(graph: fx.Graph, node: fx.Node, order: dict[fx.Node, int]) -> str | None:
    """None when rewriting ``node`` to its functional twin keeps every value the same."""
    if functional_twin(node.target) is None:
        return "no functional twin"
    mutated = mutated_inputs(node)[0]
    aliases = AliasSets(graph)
    storage = aliases.members(graph, mutated)
    external = [m for m in storage if m.op in ("placeholder", "get_attr")]
    if external:
        kind = "a graph input" if external[0].op == "placeholder" else "a parameter or buffer"
        return f"mutates {kind} ({external[0].name}); the caller would see the change"
    # Values computed from the op's result are rewired with it; anything else in the same
    # storage that is read after the op would see the mutation.
    derived = {node}
    for m in graph.nodes:
        if order[m] > order[node] and any(src in derived for src in aliased_inputs(m)):
            derived.add(m)
    stale = storage - derived
    for reader in graph.nodes:
        if order[reader] > order[node]:
            seen = [n for n in reader.all_input_nodes if n in stale]
            if seen:
                return (f"{reader.name} reads {seen[0].name} after it is mutated in place; the "
                        f"functional form would give it the old value")
    return None


def _functionalize(gm: fx.GraphModule, stats: dict) -> int:
    graph = gm.graph
    count = 0
    for node in list(graph.nodes):
        if not is_inplace(node):
            continue
        order = {n: i for i, n in enumerate(graph.nodes)}
        why = _why_not_functionalize(graph, node, order)
        if why is not None:
            stats["skipped"].append({"node": node.name, "rule": FUNCTIONALIZE, "reason": why})
            continue
        with graph.inserting_before(node):
            new = graph.call_function(functional_twin(node.target), node.args, dict(node.kwargs))
        new.meta.update(node.meta)
        new.meta[RULE] = FUNCTIONALIZE
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        count += 1
    return count


# ---------------------------------------------------------------------------------------------
# Rule: drop identity

# Views that need a compatible memory layout; ``reshape`` computes the same values on any layout.
STRIDE_SENSITIVE_VIEWS = {aten.view.default, aten._unsafe_view.default}


def _views_to_reshape(start: fx.Node) -> None:
    """Every ``view`` reading ``start``, directly or through other views/aliases, becomes a
    ``reshape``: ``start`` no longer has the layout of the copy it replaced."""
    todo, derived = list(start.users), {start}
    while todo:
        node = todo.pop()
        if node in derived or not any(src in derived for src in aliased_inputs(node)):
            continue
        derived.add(node)
        if node.target in STRIDE_SENSITIVE_VIEWS:
            node.target = aten.reshape.default
            node.meta[RULE] = DROP_IDENTITY
        todo.extend(node.users)


def _drop_identities(gm: fx.GraphModule, stats: dict) -> int:
    graph = gm.graph
    aliases = AliasSets(graph)
    written = {aliases.find(m) for n in graph.nodes if is_inplace(n) for m in mutated_inputs(n)}
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in IDENTITY_OPS:
            continue
        src = node.args[0] if node.args else None
        why = IDENTITY_OPS[node.target](node)
        if why is None and not isinstance(src, fx.Node):
            why = "input is not a graph value"
        if why is None and (aliases.find(src) in written or aliases.find(node) in written):
            why = "an in-place op writes its input or its result, so the copy matters"
        returned = any(u.op == "output" for u in node.users)
        if why is None and returned and src.op in ("placeholder", "get_attr"):
            why = "the graph would return its input or a parameter itself instead of a copy"
        if why is not None:
            stats["skipped"].append({"node": node.name, "rule": DROP_IDENTITY, "reason": why})
            continue
        for user in list(node.users):
            user.meta[RULE] = DROP_IDENTITY
        node.replace_all_uses_with(src)
        graph.erase_node(node)
        _views_to_reshape(src)
        count += 1
    return count


def _drop_unused_get_attr(gm: fx.GraphModule) -> int:
    dead = [n for n in gm.graph.nodes if n.op == "get_attr" and not n.users]
    for n in dead:
        gm.graph.erase_node(n)
    return len(dead)


class Canonicalize(Pass):
    name = "canonicalize"

    def call(self, gm: fx.GraphModule) -> PassResult:
        stats: dict = {"skipped": []}
        stats[FUNCTIONALIZE] = _functionalize(gm, stats)
        stats[DROP_IDENTITY] = _drop_identities(gm, stats)
        stats["unused_get_attr_removed"] = _drop_unused_get_attr(gm)
        modified = any(stats[k] for k in (FUNCTIONALIZE, DROP_IDENTITY, "unused_get_attr_removed"))
        if modified:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified, stats)


def canonicalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Run ``Canonicalize`` on ``gm`` (in place) and return it."""
    return Canonicalize()(gm).graph_module
