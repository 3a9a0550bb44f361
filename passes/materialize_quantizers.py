"""materialize_quantizers: turn the ``fxq.qspec`` annotations into quantizer nodes.

* weights: a ``WeightQuantizer`` call after the parameter's ``get_attr`` (one module per
  parameter, so a module called twice shares its weight quantizer);
* activations: one ``ActQuantizer`` per *source* tensor. A consumer whose input reaches it
  through transparent ops (max-pool, flatten, reshape ...) gets a second call of the same module
  right before it: one scale for the whole run, which is what a runtime needs to keep the data
  in integers across those ops (and a no-op numerically, since quantizing is idempotent).

All quantizers live under the submodule ``fxq_q``; call nodes carry the table row that asked for
them in ``fxq.rule``.
"""
from __future__ import annotations

import re
from collections import defaultdict

from torch import fx, nn

from fxq import ops
from fxq.passes.infra import QSPEC, RULE, Pass, PassResult
from fxq.quantizers import ActQuantizer, WeightQuantizer

QUANT_ROOT = "fxq_q"


def _safe(name: str) -> str:
    return re.sub(r"[^0-9a-zA-Z_]", "_", name)


def _arg_at(node: fx.Node, pos):
    if isinstance(pos, tuple):
        return node.args[pos[0]][pos[1]]
    return node.args[pos]


def _set_arg(node: fx.Node, pos, value: fx.Node) -> None:
    if isinstance(pos, tuple):
        seq = list(node.args[pos[0]])
        seq[pos[1]] = value
        node.update_arg(pos[0], type(node.args[pos[0]])(seq) if isinstance(node.args[pos[0]], tuple) else seq)
    else:
        node.update_arg(pos, value)


def _trace_source(producer: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """Walk up single-input transparent ops; return (source, transparent path source->consumer)."""
    path = []
    node = producer
    while ops.is_op(node, ops.TRANSPARENT_OPS) and node.args and isinstance(node.args[0], fx.Node):
        path.append(node)
        node = node.args[0]
    return node, list(reversed(path))


def _insert_point(graph: fx.Graph, node: fx.Node) -> fx.Node:
    """Placeholders must stay first: a quantizer of an input goes after the last placeholder."""
    if node.op != "placeholder":
        return node
    last = node
    for n in graph.nodes:
        if n.op == "placeholder":
            last = n
    return last


def quantizers_of(gm: fx.GraphModule):
    """(qualified name, module) of every fxq quantizer in ``gm``."""
    for name, mod in gm.named_modules():
        if isinstance(mod, (WeightQuantizer, ActQuantizer)):
            yield name, mod


class MaterializeQuantizers(Pass):
    name = "materialize_quantizers"

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        if not hasattr(gm, QUANT_ROOT):
            gm.add_module(QUANT_ROOT, nn.Module())
        root = getattr(gm, QUANT_ROOT)
        n_weight = n_act = n_shared_calls = 0

        weight_calls: dict[fx.Node, fx.Node] = {}
        for node in list(graph.nodes):
            spec = node.meta.get(QSPEC)
            if not spec or spec["weight"] is None:
                continue
            w = ops.layer_weight(node)
            if w.op != "get_attr":
                continue
            mname = "w_" + _safe(w.target)
            if not hasattr(root, mname):
                root.add_module(mname, WeightQuantizer(spec["weight"], ops.get_attr(gm, w.target), ops.layer_name(node)))
                n_weight += 1
            if w not in weight_calls:
                with graph.inserting_after(w):
                    call = graph.call_module(f"{QUANT_ROOT}.{mname}", (w,))
                call.meta[RULE] = spec["rules"][0]
                weight_calls[w] = call
            node.replace_input_with(w, weight_calls[w])

        # Activation edges grouped by source tensor, so each source gets one quantizer.
        edges = defaultdict(list)
        for node in list(graph.nodes):
            spec = node.meta.get(QSPEC)
            if not spec:
                continue
            for pos, qspec in spec["inputs"].items():
                source, path = _trace_source(_arg_at(node, pos))
                edges[source].append((node, pos, path, qspec, spec["rules"][0]))

        for source, uses in edges.items():
            qspec = max((u[3] for u in uses), key=lambda s: s.bits)
            mname = "a_" + _safe(source.name)
            root.add_module(mname, ActQuantizer(qspec, source.name))
            n_act += 1
            target = f"{QUANT_ROOT}.{mname}"
            with graph.inserting_after(_insert_point(graph, source)):
                qsrc = graph.call_module(target, (source,))
            qsrc.meta[RULE] = uses[0][4]
            if "val" in source.meta:
                qsrc.meta["val"] = source.meta["val"]
            qsrc.meta["nn_module_stack"] = source.meta.get("nn_module_stack", {})
            requant: dict[fx.Node, fx.Node] = {}
            for consumer, pos, path, _, rule in uses:
                if not path:
                    _set_arg(consumer, pos, qsrc)
                    continue
                first = path[0]
                if first.args[0] is source:
                    first.update_arg(0, qsrc)
                last = path[-1]
                if last not in requant:
                    with graph.inserting_after(last):
                        again = graph.call_module(target, (last,))
                    again.meta[RULE] = rule
                    if "val" in last.meta:
                        again.meta["val"] = last.meta["val"]
                    again.meta["nn_module_stack"] = last.meta.get("nn_module_stack", {})
                    requant[last] = again
                    n_shared_calls += 1
                _set_arg(consumer, pos, requant[last])
        graph.lint()
        gm.recompile()
        return PassResult(gm, modified=bool(n_weight or n_act),
                          stats={"weight_quantizers": n_weight, "activation_quantizers": n_act,
                                 "shared_calls": n_shared_calls})
