"""Canonical graph text, diffs, and the --print-diff / --print-after observer."""
from __future__ import annotations

import operator

import torch
from rich.console import Console
from torch import fx, nn

from fxq.capture import capture
from fxq.diff import (CanonLine, canonical_lines, diff_observer, diff_text, graph_diff, listing_text,
                      op_counts, op_name, print_graph)
from fxq.passes.canonicalize import Canonicalize
from fxq.passes.fold_batchnorm import FoldBatchNorm
from fxq.passes.infra import Pass, PassManager, PassResult

aten = torch.ops.aten


class ConvBNReLU(nn.Module):
    def __init__(self, conv_name: str = "conv"):
        super().__init__()
        self.conv_name = conv_name
        setattr(self, conv_name, nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False))
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = torch.relu_(self.bn(getattr(self, self.conv_name)(x)))
        return y + 1


def captured(conv_name: str = "conv") -> fx.GraphModule:
    torch.manual_seed(0)
    return capture(ConvBNReLU(conv_name).eval(), (torch.randn(1, 3, 8, 8),))


def test_canonical_form():
    texts = [line.text for line in canonical_lines(captured())]
    assert texts == [
        "%in0 = input f32[1,3,8,8]",
        "%0 = aten.conv2d(%in0, param f32[8,3,3,3], None, [2,2], [1,1])",
        "%1 = aten.batch_norm(%0, param f32[8], param f32[8], param f32[8], param f32[8], False, 0.1, 1e-05, False)",
        "%2 = aten.relu_(%1)",
        "%3 = aten.add(%2, 1)",
        "return %3",
    ]


def test_renaming_a_parameter_is_not_a_change():
    a, b = captured("conv"), captured("features_0_conv")
    assert [n.target for n in a.graph.nodes if n.op == "get_attr"] != \
        [n.target for n in b.graph.nodes if n.op == "get_attr"]
    assert canonical_lines(a) == canonical_lines(b)
    # Renaming fx nodes changes nothing either.
    for node in b.graph.nodes:
        if node.op == "call_function":
            node.name = f"renamed_{node.name}"
    assert canonical_lines(a) == canonical_lines(b)


def test_canon_line_compares_by_text_only():
    x = CanonLine("%0 = aten.relu(%in0)", "canonicalize.functionalize", "aten.relu", "relu")
    y = CanonLine("%0 = aten.relu(%in0)", None, "other", "relu_1")
    assert x == y and hash(x) == hash(y) and len({x, y}) == 1
    assert x != CanonLine("%0 = aten.relu_(%in0)", "canonicalize.functionalize", "aten.relu")


def test_op_names():
    assert op_name(aten.conv2d.default) == "aten.conv2d"
    assert op_name(aten.add.Tensor) == "aten.add"
    assert op_name(aten.add.Scalar) == "aten.add.Scalar"
    assert op_name(aten.add_.Tensor) == "aten.add_"
    assert op_name(aten.squeeze.dim) == "aten.squeeze.dim"
    assert op_name(aten.flatten.using_ints) == "aten.flatten"
    assert op_name(operator.getitem) == "getitem"


class Described(nn.Module):
    def describe(self) -> str:
        return "wq int8 per-channel axis0"

    def forward(self, x):
        return x


def test_call_module_uses_describe_and_params_are_inlined():
    root = nn.Module()
    root.q = Described()
    root.register_buffer("scale", torch.ones(4, dtype=torch.float16))
    g = fx.Graph()
    x = g.placeholder("x")
    q = g.call_module("q", (x,))
    s = g.get_attr("scale")
    g.output(g.call_function(aten.mul.Tensor, (q, s)))
    texts = [line.text for line in canonical_lines(fx.GraphModule(root, g))]
    assert texts == ["%in0 = input", "%0 = Described[wq int8 per-channel axis0](%in0)",
                     "%1 = aten.mul(%0, param f16[4])", "return %1"]


def folded_pair():
    gm = Canonicalize()(captured()).graph_module
    before = canonical_lines(gm)
    FoldBatchNorm()(gm)
    return before, canonical_lines(gm)


def test_diff_tags_added_lines_and_counts_ops():
    before, after = folded_pair()
    text = diff_text(before, after)
    assert "- %1 = aten.batch_norm(" in text
    assert "+ %0 = aten.conv2d(%in0, param f32[8,3,3,3], param f32[8], [2,2], [1,1])  # fold_batchnorm.conv_bn" in text
    summary = text.split("\n\n")[-1].splitlines()
    assert summary[0].split() == ["op", "before", "after", "Δ"]
    assert summary[1].split() == ["aten.batch_norm", "1", "0", "-1"]
    assert summary[-1].split() == ["total", "4", "3", "-1"]
    assert len(summary) == 3  # unchanged ops are not listed


def test_survivors_keep_their_numbers():
    before, after = folded_pair()
    text = diff_text(before, after, context=0)
    # The add is untouched by the fold: it keeps %3 and its line does not appear.
    assert "%3 = aten.add" not in text
    assert "+ %2 = aten.relu(%0)" in text


def test_pass_name_limits_rule_tags():
    before, after = folded_pair()
    assert "# canonicalize" not in diff_text(before, after, pass_name="fold_batchnorm")
    assert diff_text(after, after) == "no change\n"


def test_rich_renderables():
    before, after = folded_pair()
    console = Console(record=True, width=200, color_system=None)
    console.print(graph_diff(before, after, "fold_batchnorm"))
    console.print(print_graph(captured(), "graph"))
    out = console.export_text()
    assert "fold_batchnorm.conv_bn" in out and "aten.batch_norm" in out and "total" in out
    assert "%3 = aten.add(%2, 1)" in out


def test_listing_text_and_op_counts():
    gm = Canonicalize()(captured()).graph_module
    lines = canonical_lines(gm)
    assert "%2 = aten.relu(%1)  # canonicalize.functionalize" in listing_text(lines)
    assert op_counts(lines) == {"aten.conv2d": 1, "aten.batch_norm": 1, "aten.relu": 1, "aten.add": 1}


class NoOp(Pass):
    name = "no_op"

    def call(self, gm):
        return PassResult(gm, False)


def test_observer_prints_diffs_and_graph_after():
    console = Console(record=True, width=200, color_system=None)
    obs = diff_observer(console, None, {"fold_batchnorm"})
    pm = PassManager([Canonicalize(), NoOp(), FoldBatchNorm()], observers=[obs],
                     wants_snapshots=obs.wants_snapshots)
    pm.run(captured())
    out = console.export_text()
    assert "+ %2 = aten.relu(%1)  # canonicalize.functionalize" in out
    assert "no_op: no change" in out
    assert "graph after fold_batchnorm" in out
    assert "stats: fold_batchnorm.conv_bn=1" in out


def test_observer_off_when_nothing_asked():
    console = Console(record=True, width=200, color_system=None)
    obs = diff_observer(console, set(), set())
    assert not obs.wants_snapshots
    PassManager([Canonicalize()], observers=[obs], wants_snapshots=obs.wants_snapshots).run(captured())
    assert console.export_text() == ""


class ScaleWeights(Pass):
    """Changes parameter values only, as a bias-correction pass would."""

    name = "scale_weights"

    def call(self, gm):
        conv = next(n for n in gm.graph.nodes if n.target == aten.conv2d.default)
        gm.conv.weight = nn.Parameter(gm.conv.weight.detach() * 2)
        conv.meta["fxq.rule"] = "scale_weights.double"
        return PassResult(gm, True)


def test_value_only_rewrite_shows_as_tilde_line():
    gm = captured()
    before = canonical_lines(gm)
    ScaleWeights()(gm)
    text = diff_text(before, canonical_lines(gm), context=0)
    assert "~ %0 = aten.conv2d(%in0, param f32[8,3,3,3], None, [2,2], [1,1])  # scale_weights.double" in text
    assert text.splitlines()[-1].split() == ["total", "4", "4", "+0"]


def test_hand_built_lines_diff_positionally():
    before = [CanonLine("%0 = aten.relu(%in0)"), CanonLine("return %0")]
    after = [CanonLine("%0 = aten.relu(%in0)"), CanonLine("%1 = aten.neg(%0)"), CanonLine("return %1")]
    text = diff_text(before, after)
    assert "+ %1 = aten.neg(%0)" in text and "- return %0" in text and "+ return %1" in text
