"""fold_batchnorm: fold eval-mode batch norm into the conv or linear that feeds it.

With s = gamma / sqrt(running_var + eps), ``bn(layer(x))`` equals ``layer'(x)`` where the weight's
output channels are scaled by s and the bias becomes ``(bias - running_mean) * s + beta``. The
folded weight replaces the layer's own parameter under the same qualified name
(``features.0.0.weight``), so later passes and reports keep readable names; a layer without a bias
gets one (``features.0.0.bias``). Folded values are computed in float64 and stored in the
weight's dtype; the original model's tensors are never written.

A batch norm stays, with the reason in ``stats["skipped"]``, when:

* it is in training mode or has no running statistics (it then normalizes with batch stats);
* its input is not a conv/linear with parameter weights (``producer is not a conv/linear``);
* the layer's output has other users (``producer has other users``): they need the unscaled value;
* the weight is shared (a module called twice) and not every use folds with the same batch norm:
  rewriting the shared parameter would change the other uses. When every use folds with the same
  batch-norm statistics, the shared weight is folded once and stays shared.

Transposed convs are folded too: their weight is ``[in, out/groups, k...]``, so the scale is
applied per group along dim 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from fxq.diff import op_name
from fxq.ops import CONV_OPS, LINEAR_OPS
from fxq.passes.infra import RULE, Pass, PassResult

aten = torch.ops.aten

CONV_BN = "fold_batchnorm.conv_bn"
LINEAR_BN = "fold_batchnorm.linear_bn"

# Batch-norm ops and whether they return a (out, mean, invstd) tuple read through getitem.
BATCH_NORM_OPS = {
    aten.batch_norm.default: False,
    aten._native_batch_norm_legit_no_training.default: True,
    aten.native_batch_norm.default: True,
}
_TRANSPOSED_CONV_OPS = {aten.conv_transpose1d.default, aten.conv_transpose2d.input,
                        aten.conv_transpose3d.input}


# ---------------------------------------------------------------------------------------------
# Arguments by schema name, so one rule covers conv2d, convolution, conv_transpose and linear.

def arg(node: fx.Node, name: str, default=None):
    for i, a in enumerate(node.target._schema.arguments):
        if a.name == name:
            if i < len(node.args):
                return node.args[i]
            return node.kwargs.get(name, a.default_value if a.has_default_value() else default)
    return default


def set_arg(node: fx.Node, name: str, value) -> None:
    schema = node.target._schema.arguments
    index = next(i for i, a in enumerate(schema) if a.name == name)
    if index < len(node.args):
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    elif name in node.kwargs or schema[index].kwarg_only:
        node.kwargs = {**node.kwargs, name: value}
    else:
        # Positional slots before ``index`` are missing: fill them with their schema defaults.
        pad = [schema[i].default_value for i in range(len(node.args), index)]
        node.args = (*node.args, *pad, value)


def _attr(gm: fx.GraphModule, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


# ---------------------------------------------------------------------------------------------
# Matching: each check returns None when it has no objection, else the reason.

@dataclass(frozen=True)
class Match:
    bn: fx.Node
    out: fx.Node | None   # the node whose users read the normalized value
    layer: fx.Node
    key: tuple            # batch-norm constants: equal keys fold to equal weights

    @property
    def weight(self) -> fx.Node:
        return arg(self.layer, "weight")

    @property
    def bias(self) -> fx.Node | None:
        return arg(self.layer, "bias")


def _const(node) -> bool:
    return node is None or (isinstance(node, fx.Node) and node.op == "get_attr")


def _bn_output(bn: fx.Node) -> tuple[fx.Node | None, str | None]:
    if not BATCH_NORM_OPS[bn.target]:
        return bn, None
    items = {u.args[1]: u for u in bn.users if getattr(u.target, "__name__", "") == "getitem"}
    if len(items) != len(bn.users) or any(i != 0 and items[i].users for i in items):
        return None, "the batch norm's mean/invstd outputs are used"
    return items.get(0), None


def _channels(node: fx.Node) -> int | None:
    val = node.meta.get("val")
    return val.numel() if val is not None else None


def match_bn(bn: fx.Node) -> tuple[Match | None, str | None]:
    if arg(bn, "training", False) is not False:
        return None, "batch norm in training mode"
    stats = [arg(bn, n) for n in ("running_mean", "running_var")]
    if any(s is None for s in stats):
        return None, "batch norm has no running statistics; it normalizes with batch statistics"
    affine = [arg(bn, n) for n in ("weight", "bias")]
    if not all(_const(x) for x in stats + affine):
        return None, "batch-norm statistics are computed, not parameters"
    out, why = _bn_output(bn)
    if why:
        return None, why
    layer = arg(bn, "input")
    if not (isinstance(layer, fx.Node) and layer.op == "call_function"
            and layer.target in CONV_OPS | LINEAR_OPS):
        what = (op_name(layer.target) if layer.op == "call_function" else layer.op) \
            if isinstance(layer, fx.Node) else type(layer).__name__
        return None, f"producer is not a conv/linear ({what})"
    if len(layer.users) > 1:
        return None, "producer has other users"
    weight = arg(layer, "weight")
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return None, "producer's weight is not a parameter"
    if not _const(arg(layer, "bias")):
        return None, "producer's bias is not a parameter"
    val = layer.meta.get("val")
    if layer.target in LINEAR_OPS:
        if val is None:
            return None, "linear output shape is unknown (no meta['val'])"
        if val.dim() != 2:
            return None, ("linear output is not 2-D, so batch norm's channel dim (1) is not the "
                          "linear's feature dim")
    channels = _channels(arg(bn, "running_mean"))
    if val is not None and channels is not None and val.shape[1] != channels:
        return None, f"batch norm has {channels} channels, its producer {val.shape[1]}"
    key = (bn.target, *(x.target if x is not None else None for x in affine + stats), arg(bn, "eps"))
    return Match(bn, out, layer, key), None


# ---------------------------------------------------------------------------------------------
# Folding arithmetic

def _is_transposed(layer: fx.Node) -> bool:
    return layer.target in _TRANSPOSED_CONV_OPS or (
        layer.target == aten.convolution.default and bool(arg(layer, "transposed")))


def _out_channels(layer: fx.Node, w: torch.Tensor) -> int:
    return w.shape[1] * int(arg(layer, "groups", 1)) if _is_transposed(layer) else w.shape[0]


def scale_out_channels(w: torch.Tensor, s: torch.Tensor, transposed: bool, groups: int) -> torch.Tensor:
    """``w`` with each output channel multiplied by ``s``, for either weight layout."""
    if not transposed:
        return w * s.reshape(-1, *[1] * (w.dim() - 1))
    cin, cout_per_group = w.shape[:2]
    wg = w.reshape(groups, cin // groups, cout_per_group, *w.shape[2:])
    sg = s.reshape(groups, 1, cout_per_group, *[1] * (w.dim() - 2))
    return (wg * sg).reshape(w.shape)


def folded(gm: fx.GraphModule, m: Match) -> tuple[torch.Tensor, torch.Tensor]:
    """The folded (weight, bias), computed in float64 and returned in the layer's dtypes."""
    w = _attr(gm, m.weight.target).detach()
    n = _out_channels(m.layer, w)

    def f64(node: fx.Node | None, fill: float) -> torch.Tensor:
        if node is None:
            return torch.full((n,), fill, dtype=torch.float64)
        return _attr(gm, node.target).detach().double()

    gamma, beta = f64(arg(m.bn, "weight"), 1.0), f64(arg(m.bn, "bias"), 0.0)
    mean, var = f64(arg(m.bn, "running_mean"), 0.0), f64(arg(m.bn, "running_var"), 1.0)
    s = gamma / torch.sqrt(var + float(arg(m.bn, "eps")))
    new_w = scale_out_channels(w.double(), s, _is_transposed(m.layer), int(arg(m.layer, "groups", 1)))
    new_b = (f64(m.bias, 0.0) - mean) * s + beta
    bias_dtype = _attr(gm, m.bias.target).dtype if m.bias is not None else w.dtype
    return new_w.to(w.dtype), new_b.to(bias_dtype)


# ---------------------------------------------------------------------------------------------
# Graph edits

def _readers(gm: fx.GraphModule, target: str) -> list[fx.Node]:
    return [u for n in gm.graph.nodes if n.op == "get_attr" and n.target == target for u in n.users]


def _replace_attr(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    old = getattr(owner, name)
    if isinstance(old, nn.Parameter):
        value = nn.Parameter(value, requires_grad=old.requires_grad)
    setattr(owner, name, value)


def _new_attr(gm: fx.GraphModule, owner_path: str, base: str, value: torch.Tensor, like) -> str:
    owner = gm.get_submodule(owner_path) if owner_path else gm
    name, k = base, 0
    while hasattr(owner, name):
        k += 1
        name = f"{base}_folded" if k == 1 else f"{base}_folded_{k}"
    if isinstance(like, nn.Parameter):
        owner.register_parameter(name, nn.Parameter(value, requires_grad=like.requires_grad))
    else:
        owner.register_buffer(name, value)
    return f"{owner_path}.{name}" if owner_path else name


def _get_attr_node(gm: fx.GraphModule, target: str, before: fx.Node) -> fx.Node:
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(target)
    node.meta["val"] = torch.empty_like(_attr(gm, target), device="meta")
    return node


def _remove_bn(gm: fx.GraphModule, m: Match, rule: str) -> set[str]:
    """Rewire the batch norm's readers to the layer; return the attributes it no longer reads."""
    if m.out is not None:
        for user in list(m.out.users):
            user.meta[RULE] = rule
        m.out.replace_all_uses_with(m.layer)
    consts = [a for a in m.bn.all_input_nodes if a.op == "get_attr"]
    for item in list(m.bn.users):  # the getitems of the tuple form
        gm.graph.erase_node(item)
    gm.graph.erase_node(m.bn)
    orphaned = set()
    for c in consts:
        if not c.users:
            orphaned.add(c.target)
            gm.graph.erase_node(c)
    return orphaned


def _fold_group(gm: fx.GraphModule, group: list[Match]) -> str:
    """Fold batch norms that all read the same weight with the same statistics."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    first = min(group, key=lambda m: order[m.layer])
    new_w, new_b = folded(gm, first)
    _replace_attr(gm, first.weight.target, new_w)
    layers = {m.layer for m in group}
    old_bias = first.bias
    if old_bias is not None and set(_readers(gm, old_bias.target)) <= layers:
        _replace_attr(gm, old_bias.target, new_b)
        bias = old_bias
    else:
        # No bias, or one shared beyond this group: the folded bias gets its own attribute.
        owner = first.weight.target.rpartition(".")[0]
        target = _new_attr(gm, owner, "bias", new_b, like=_attr(gm, first.weight.target))
        bias = _get_attr_node(gm, target, first.layer)
    rule = CONV_BN if first.layer.target in CONV_OPS else LINEAR_BN
    orphaned = set()
    for m in group:
        set_arg(m.layer, "bias", bias)
        m.layer.meta[RULE] = rule
        orphaned |= _remove_bn(gm, m, rule)
    if old_bias is not None and old_bias is not bias and not old_bias.users:
        orphaned.add(old_bias.target)
        gm.graph.erase_node(old_bias)
    still_read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in orphaned - still_read:
        owner_path, _, name = target.rpartition(".")
        delattr(gm.get_submodule(owner_path) if owner_path else gm, name)
    return rule


def _group_of(gm: fx.GraphModule, m: Match, by_layer: dict[fx.Node, Match]) -> tuple[list[Match], str | None]:
    """Every match that reads ``m``'s weight; a reason when they cannot fold as one."""
    target = m.weight.target
    group = []
    for reader in _readers(gm, target):
        other = by_layer.get(reader)
        if other is None or other.weight.target != target:
            return [], (f"weight '{target}' is shared with {reader.name}, which does not fold into "
                        f"a batch norm; folding would change it")
        group.append(other)
    same = (len({x.key for x in group}) == 1
            and len({x.bias.target if x.bias is not None else None for x in group}) == 1
            and len({x.layer.target for x in group}) == 1)
    if not same:
        return [], (f"weight '{target}' is shared by {len(group)} layers that fold with different "
                    f"batch norms (a module called twice?); folding would change the others")
    return group, None


class FoldBatchNorm(Pass):
    name = "fold_batchnorm"

    def call(self, gm: fx.GraphModule) -> PassResult:
        stats: dict = {CONV_BN: 0, LINEAR_BN: 0, "shared_weights_folded": 0, "skipped": []}
        matches: dict[fx.Node, Match] = {}
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in BATCH_NORM_OPS:
                m, why = match_bn(node)
                if m is None:
                    stats["skipped"].append({"node": node.name, "reason": why})
                else:
                    matches[node] = m
        by_layer = {m.layer: m for m in matches.values()}
        done: set[fx.Node] = set()
        for bn, m in matches.items():
            if bn in done:
                continue
            group, why = _group_of(gm, m, by_layer)
            if why is not None:
                stats["skipped"].append({"node": bn.name, "reason": why})
                done.add(bn)
                continue
            done |= {x.bn for x in group}
            rule = _fold_group(gm, group)
            stats[rule] += len(group)
            stats["shared_weights_folded"] += len(group) > 1
        modified = bool(stats[CONV_BN] or stats[LINEAR_BN])
        if modified:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified, stats)


def fold_batchnorm(gm: fx.GraphModule) -> fx.GraphModule:
    """Run ``FoldBatchNorm`` on ``gm`` (in place) and return it."""
    return FoldBatchNorm()(gm).graph_module
