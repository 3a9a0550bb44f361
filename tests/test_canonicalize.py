"""canonicalize: golden text on a tiny residual net, numerics, and the cases it must leave alone."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fxq.capture import capture
from fxq.diff import canonical_lines, diff_text, listing_text, op_counts
from fxq.passes.canonicalize import DROP_IDENTITY, FUNCTIONALIZE, Canonicalize, canonicalize, functional_twin
from fxq.passes.infra import RULE

GOLDEN = Path(__file__).parent / "golden"
aten = torch.ops.aten


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("FXQ_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"missing {path}; run with FXQ_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), f"{name} differs; rerun with FXQ_UPDATE_GOLDEN=1 if intended"


class TinyResidual(nn.Module):
    """conv-bn-relu stem, one residual block with `out += identity`, eval dropout, linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU(inplace=True))
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        out = self.relu(out)
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.fc(self.drop(out))


def run(model: nn.Module, *inputs):
    """Capture, canonicalize; return (gm, stats, before lines, reference output)."""
    gm = capture(model.eval(), inputs)
    before = canonical_lines(gm)
    with torch.no_grad():
        ref = gm(*inputs)
    result = Canonicalize()(gm)
    with torch.no_grad():
        out = result.graph_module(*inputs)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    return result.graph_module, result.stats, before


def test_golden_tiny_residual():
    torch.manual_seed(0)
    gm, stats, before = run(TinyResidual(), torch.randn(1, 3, 8, 8))
    after = canonical_lines(gm)
    text = (diff_text(before, after, pass_name="canonicalize") + "\n# graph after canonicalize\n"
            + listing_text(after))
    check_golden("canonicalize_tiny_residual.txt", text)
    assert stats[FUNCTIONALIZE] == 4 and stats[DROP_IDENTITY] == 1 and stats["skipped"] == []
    counts = op_counts(after)
    assert counts["aten.relu_"] == 0 and counts["aten.add_"] == 0 and counts["aten.dropout"] == 0


def test_new_nodes_carry_their_rule():
    gm, _, _ = run(TinyResidual(), torch.randn(1, 3, 8, 8))
    rules = {n.meta.get(RULE) for n in gm.graph.nodes if n.target in (aten.relu.default, aten.add.Tensor)}
    assert rules == {FUNCTIONALIZE}
    # The readers of the removed dropout are stamped with the rule that rewired them.
    linear = next(n for n in gm.graph.nodes if n.target == aten.linear.default)
    assert linear.meta[RULE] == DROP_IDENTITY


class ReadAfterMutation(nn.Module):
    def forward(self, x):
        a = x * 2
        flat = a.view(-1)
        a.relu_()
        return flat + 1  # the view made before relu_ sees its effect; the functional form would not


def test_inplace_with_later_reader_is_left_alone():
    gm, stats, _ = run(ReadAfterMutation(), torch.randn(2, 5))
    assert op_counts(canonical_lines(gm))["aten.relu_"] == 1
    assert stats[FUNCTIONALIZE] == 0
    (skip,) = stats["skipped"]
    assert skip["rule"] == FUNCTIONALIZE and "after it is mutated in place" in skip["reason"]


class MutateThroughView(nn.Module):
    def forward(self, x):
        a = x + 1
        a.view(-1).add_(1)  # writes `a` through a view
        return a * 3


def test_mutation_through_a_view_is_left_alone():
    gm, stats, _ = run(MutateThroughView(), torch.randn(2, 3))
    assert op_counts(canonical_lines(gm))["aten.add_"] == 1
    assert "after it is mutated in place" in stats["skipped"][0]["reason"]


class MutateInput(nn.Module):
    def forward(self, x):
        x.relu_()
        return x * 2


def test_mutating_a_graph_input_is_left_alone():
    gm = capture(MutateInput().eval(), (torch.randn(2, 3),))
    result = Canonicalize()(gm)
    assert "graph input" in result.stats["skipped"][0]["reason"]


class CloneThenMutate(nn.Module):
    def forward(self, x):
        a = x + 1
        b = a.clone()
        flat = b.view(-1)
        b.mul_(2)
        return a + flat  # flat is read after mul_: both the in-place op and the copy must stay


def test_clone_written_in_place_is_kept():
    gm, stats, _ = run(CloneThenMutate(), torch.randn(3))
    counts = op_counts(canonical_lines(gm))
    assert counts["aten.clone"] == 1 and counts["aten.mul_"] == 1
    reasons = {s["rule"]: s["reason"] for s in stats["skipped"]}
    assert "copy matters" in reasons[DROP_IDENTITY]


class Identities(nn.Module):
    def forward(self, x):
        y = (x * 2).clone().contiguous().detach()
        y = torch.ops.aten.alias(y)
        return F.dropout(y, 0.5, training=False) + 1


def test_identities_are_dropped():
    gm, stats, _ = run(Identities(), torch.randn(2, 3))
    assert set(op_counts(canonical_lines(gm))) == {"aten.mul", "aten.add"}
    assert stats[DROP_IDENTITY] >= 3


class TrainingDropout(nn.Module):
    def forward(self, x):
        return F.dropout(x * 2, 0.5, training=True)


def test_training_dropout_is_kept_with_reason():
    gm = capture(TrainingDropout(), (torch.randn(2, 3),))
    result = Canonicalize()(gm)
    assert op_counts(canonical_lines(gm))["aten.dropout"] == 1
    assert result.stats["skipped"][0]["reason"] == "dropout in training mode"


def test_functional_twin_falls_back_to_the_op_name():
    assert functional_twin(aten.relu_.default) is aten.relu.default
    assert functional_twin(aten.clamp_min_.default) is aten.clamp_min.default
    assert functional_twin(aten.add_.Scalar) is aten.add.Scalar


def test_inplace_eval_dropout_is_functionalized_then_dropped():
    """nn.Dropout(inplace=True) (EfficientNet's classifier) exports as dropout_(self, ...), whose
    twin dropout(input, ...) names its first argument differently."""
    assert functional_twin(aten.dropout_.default) is aten.dropout.default
    assert functional_twin(aten.feature_alpha_dropout_.default) is aten.feature_alpha_dropout.default
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.2, inplace=True), nn.Linear(4, 2))
    gm, stats, _ = run(model, torch.randn(2, 4))
    assert set(op_counts(canonical_lines(gm))) == {"aten.linear"} and stats["skipped"] == []


def test_plain_function_and_second_run_is_a_no_op():
    gm = canonicalize(capture(TinyResidual().eval(), (torch.randn(1, 3, 8, 8),)))
    lines = canonical_lines(gm)
    result = Canonicalize()(gm)
    assert not result.modified and canonical_lines(gm) == lines


class ChannelShuffle(nn.Module):
    """ShuffleNet's channel shuffle: the view after the transpose needs the contiguous copy."""

    def forward(self, x):
        n, c, h, w = x.shape
        y = (x * 2).view(n, 2, c // 2, h, w).transpose(1, 2).contiguous()
        z = y.view(n, c, h, w)
        return z.view(n, c, h * w)[..., :3] + 1  # a view of the view: also stride-sensitive


def test_dropped_contiguous_turns_its_views_into_reshapes():
    x = torch.randn(2, 4, 3, 3)
    gm, _, before = run(ChannelShuffle(), x)  # run() checks the outputs are unchanged
    counts = op_counts(canonical_lines(gm))
    assert op_counts(before)["aten.view"] == 3
    assert "aten.contiguous" not in counts and "aten.clone" not in counts
    assert counts["aten.reshape"] == 2 and counts["aten.view"] == 1  # the first view stays
    assert all(n.meta.get(RULE) == DROP_IDENTITY for n in gm.graph.nodes if n.target == aten.reshape.default)
