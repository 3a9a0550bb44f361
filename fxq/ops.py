"""Op vocabulary shared by the passes: which ATen ops are layers, joins, or shape-only.

The canonical graph is ATen-level (see ``fxq.capture``), so ``x + y``, ``torch.add(x, y)`` and
``x += y`` all arrive as ``aten.add.Tensor`` / ``aten.add_.Tensor``; this module names such
families once so no pass matches on node names.
"""
from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten

# Ops that own a weight (argument 1) and optional bias (argument 2): the quantizable layers.
CONV_OPS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
            aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input,
            aten.convolution.default}
LINEAR_OPS = {aten.linear.default}
LAYER_OPS = CONV_OPS | LINEAR_OPS
# Activation x activation products (attention); quantized on both inputs where a backend allows.
MATMUL_OPS = {aten.matmul.default, aten.bmm.default, aten.mm.default}

ADD_OPS = {aten.add.Tensor, aten.add_.Tensor}
BATCHNORM_OPS = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default,
                 aten.native_batch_norm.default}
# Pointwise activations (a runtime may fuse them into the producing conv/gemm).
ACTIVATION_OPS = {aten.relu.default, aten.hardtanh.default, aten.clamp.default, aten.sigmoid.default,
                  aten.silu.default, aten.gelu.default, aten.hardswish.default, aten.hardsigmoid.default,
                  aten.leaky_relu.default, aten.tanh.default, aten.elu.default, aten.mish.default}
CAT_OPS = {aten.cat.default, aten.concat.default, aten.concatenate.default}
# Normalizations over the feature dimension (no running statistics to fold into a layer).
NORM_OPS = {aten.layer_norm.default, aten.native_layer_norm.default, aten.group_norm.default,
            aten.native_group_norm.default}
if hasattr(aten, "rms_norm"):
    NORM_OPS.add(aten.rms_norm.default)
# Clamping activations a runtime drops in front of a QuantizeLinear whose range they do not restrict.
CLAMP_OPS = {aten.relu.default, aten.hardtanh.default, aten.clamp.default}

# In-place op -> functional twin (canonicalize rewrites them when nothing reads the old value).
INPLACE_TO_FUNCTIONAL = {
    aten.add_.Tensor: aten.add.Tensor,
    aten.mul_.Tensor: aten.mul.Tensor,
    aten.relu_.default: aten.relu.default,
    aten.hardtanh_.default: aten.hardtanh.default,
    aten.hardswish_.default: aten.hardswish.default,
    aten.hardsigmoid_.default: aten.hardsigmoid.default,
    aten.silu_.default: aten.silu.default,
    aten.sigmoid_.default: aten.sigmoid.default,
    aten.clamp_.default: aten.clamp.default,
    aten.sub_.Tensor: aten.sub.Tensor,
    aten.div_.Tensor: aten.div.Tensor,
    aten.leaky_relu_.default: aten.leaky_relu.default,
    aten.gelu_.default: aten.gelu.default,
}

# Ops that move or select values without changing them: max(Q(x)) == Q(max(x)), so a tensor
# quantized before them needs no new scale after them (the quantizer is shared across them).
TRANSPARENT_OPS = {
    aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default,
    aten.flatten.using_ints, aten.view.default, aten.reshape.default, aten._unsafe_view.default,
    aten.permute.default, aten.transpose.int, aten.squeeze.dim, aten.squeeze.dims,
    aten.unsqueeze.default, aten.contiguous.default, aten.clone.default, aten.dropout.default,
    aten.alias.default, aten.t.default,
}


def is_op(node: fx.Node, ops) -> bool:
    return node.op == "call_function" and node.target in ops


def is_layer(node: fx.Node) -> bool:
    """A conv or linear with a parameter weight: the unit fxq quantizes and reconstructs."""
    return is_op(node, LAYER_OPS) and len(node.args) > 1 and isinstance(node.args[1], fx.Node)


def layer_weight(node: fx.Node) -> fx.Node:
    return node.args[1]


def layer_bias(node: fx.Node) -> fx.Node | None:
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return b if isinstance(b, fx.Node) else None


def module_path(node: fx.Node) -> list[str]:
    """Qualified names of the modules that produced ``node``, outermost first (root excluded)."""
    stack = node.meta.get("nn_module_stack") or {}
    names = []
    for value in stack.values():
        qualname = value[0] if isinstance(value, tuple) else str(value)
        if qualname:
            names.append(_normalize_qualname(qualname))
    return names


def _normalize_qualname(name: str) -> str:
    # export spells nested names like "L['self'].features[0]" in some versions.
    for a, b in (("L['self'].", ""), ("L['self']", ""), ("[", "."), ("]", ""), ("'", "")):
        name = name.replace(a, b)
    return name.strip(".")


def layer_name(node: fx.Node) -> str:
    """A stable, readable layer name: the qualified name of the weight parameter's owner."""
    w = node.args[1] if len(node.args) > 1 else None
    if isinstance(w, fx.Node) and w.op == "get_attr":
        return w.target.rsplit(".", 1)[0] if "." in w.target else w.target
    path = module_path(node)
    return path[-1] if path else node.name


def get_attr(gm, target: str):
    """The object at dotted ``target`` inside ``gm`` (what a ``get_attr`` node reads)."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def set_attr(gm, target: str, value) -> None:
    owner, _, name = target.rpartition(".")
    setattr(gm.get_submodule(owner) if owner else gm, name, value)
