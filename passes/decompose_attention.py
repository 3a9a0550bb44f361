"""decompose_attention: split fused attention into the products a backend can quantize.

``torch.export`` keeps ``F.scaled_dot_product_attention`` (torchvision's ViT, ``nn.MultiheadAttention``,
Hugging Face's ``sdpa`` attention) as one op, so its two activation x activation products, Q·Kᵀ
and attention·V, are invisible to the placement table. A backend whose table has a rewrite row
for the op (``BackendTable.rewrites``; ``onnx-qdq`` has one, ``tensorrt`` keeps attention fused)
gets it rewritten, with the op's exact semantics, into

    scores = matmul(Q, transpose(K, -2, -1)) * scale        scale: the op's, else 1/sqrt(E)
    scores = where(mask, scores, -inf)                      boolean ``attn_mask``
    scores = scores + mask                                  float ``attn_mask`` that is a constant
    scores = where(causal, scores, -inf)                    ``is_causal``: a constant lower triangle
    out    = matmul(softmax(scores, -1), V)

after which the table's matmul row quantizes both inputs of both matmuls and Softmax stays float.
The new nodes keep the fused op's module stack, so block detection sees the same regions.

Left fused (``stats["skipped"]`` says why): dropout during training, grouped-query attention with
fewer key/value heads, and a float mask computed from the graph input (an add of two activations
would read as a residual join and be quantized; boolean padding masks are the common form).
"""
from __future__ import annotations

import math

import torch
from torch import fx

from fxq.passes.infra import RULE, Pass, PassResult

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
RULE_NAME = "decompose_attention.sdpa"


def _meta(val):
    return torch.empty(val.shape, dtype=val.dtype, device="meta") if isinstance(val, torch.Tensor) else val


def _depends_on_input(node: fx.Node, memo: dict) -> bool:
    if node not in memo:
        memo[node] = node.op == "placeholder"  # DAG: a provisional False cannot loop
        memo[node] = node.op == "placeholder" or any(_depends_on_input(a, memo) for a in node.all_input_nodes)
    return memo[node]


def _sdpa_args(node: fx.Node) -> dict:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    out = dict(zip(names, node.args))
    out.update(node.kwargs)
    return {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False,
            **out}


def why_not(node: fx.Node, memo: dict) -> str | None:
    """Why the fused op ``node`` cannot be rewritten (None: it can)."""
    a = _sdpa_args(node)
    q, k, v = (a[n].meta.get("val") if isinstance(a[n], fx.Node) else None for n in ("query", "key", "value"))
    if q is None or k is None or v is None:
        return "no shape information (meta['val']) on its inputs"
    if a["dropout_p"] not in (0, 0.0):
        return f"attention dropout {a['dropout_p']} (training mode)"
    if a["enable_gqa"] and q.dim() >= 3 and q.shape[-3] != k.shape[-3]:
        return "grouped-query attention (fewer key/value heads than query heads)"
    mask = a["attn_mask"]
    if isinstance(mask, fx.Node):
        val = mask.meta.get("val")
        if val is None:
            return "no shape information on its mask"
        if val.dtype != torch.bool and _depends_on_input(mask, memo):
            return ("a float attention mask computed from the input: its add would read as a residual "
                    "join of two activations and be quantized")
    return None


class DecomposeAttention(Pass):
    """Rewrite the fused attention ops ``table.rewrites`` names (see the module doc)."""

    name = "decompose_attention"

    def __init__(self, table):
        self.table = table
        self.targets = {op for row in getattr(table, "rewrites", ()) for op in row.ops}
        self.rows = {op: row.name for row in getattr(table, "rewrites", ()) for op in row.ops}

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        memo: dict = {}
        done, skipped = 0, []
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in self.targets or node.target is not SDPA:
                continue
            why = why_not(node, memo)
            if why is not None:
                skipped.append({"node": node.name, "reason": why})
                continue
            self._rewrite(gm, node, len(skipped) + done)
            done += 1
        if done:
            graph.lint()
            gm.recompile()
        stats = {"decomposed": done}
        if skipped:
            stats["skipped"] = skipped
        return PassResult(gm, modified=bool(done), stats=stats)

    def _rewrite(self, gm: fx.GraphModule, node: fx.Node, index: int) -> None:
        graph = gm.graph
        a = _sdpa_args(node)
        q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
        qv = q.meta["val"]
        scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(qv.shape[-1])
        rule = self.rows.get(node.target, RULE_NAME)
        keep = {key: node.meta[key] for key in ("nn_module_stack", "stack_trace", "source_fn_stack")
                if key in node.meta}

        def emit(target, *args, **kwargs) -> fx.Node:
            new = graph.call_function(target, args, kwargs)
            new.meta.update(keep)
            new.meta[RULE] = rule
            margs = [_meta(x.meta["val"]) if isinstance(x, fx.Node) else x for x in args]
            new.meta["val"] = target(*margs, **kwargs)
            return new

        with graph.inserting_before(node):
            k_t = emit(aten.transpose.int, k, -2, -1)
            scores = emit(aten.mul.Tensor, emit(aten.matmul.default, q, k_t), float(scale))
            if isinstance(mask, fx.Node):
                if mask.meta["val"].dtype == torch.bool:
                    scores = emit(aten.where.ScalarOther, mask, scores, float("-inf"))
                else:
                    scores = emit(aten.add.Tensor, scores, mask)
            if a["is_causal"]:
                length, source = qv.shape[-2], k.meta["val"].shape[-2]
                target = f"_fxq_causal_mask_{index}"
                gm.register_buffer(target, torch.ones(length, source, dtype=torch.bool).tril())
                causal = graph.get_attr(target)
                causal.meta["val"] = _meta(getattr(gm, target))
                scores = emit(aten.where.ScalarOther, causal, scores, float("-inf"))
            probs = emit(aten.softmax.int, scores, -1)
            out = emit(aten.matmul.default, probs, v)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
