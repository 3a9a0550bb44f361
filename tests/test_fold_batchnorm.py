"""fold_batchnorm: golden text, numerics on torchvision nets, and the folds it must refuse."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from fxq.capture import capture
from fxq.diff import canonical_lines, diff_text, listing_text, op_counts
from fxq.passes.canonicalize import canonicalize
from fxq.passes.fold_batchnorm import CONV_BN, LINEAR_BN, FoldBatchNorm, fold_batchnorm
from fxq.passes.infra import RULE

GOLDEN = Path(__file__).parent / "golden"
aten = torch.ops.aten


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("FXQ_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"missing {path}; run with FXQ_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), f"{name} differs; rerun with FXQ_UPDATE_GOLDEN=1 if intended"


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial statistics: with the defaults (mean 0, var 1) folding is nearly a no-op."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


def assert_rel_close(out, ref, rel=1e-5):
    for o, r in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
        err = float((o - r).abs().max() / r.abs().max().clamp_min(1e-12))
        assert err < rel, f"relative error {err:.2e}"


def fold(model: nn.Module, *inputs, canon: bool = True):
    """Capture (and canonicalize), fold, check numerics; return (gm, stats, lines before fold)."""
    gm = capture(randomize_bn(model), inputs)
    if canon:
        gm = canonicalize(gm)
    before = canonical_lines(gm)
    with torch.no_grad():
        ref = gm(*inputs)
    result = FoldBatchNorm()(gm)
    with torch.no_grad():
        assert_rel_close(result.graph_module(*inputs), ref)
    return result.graph_module, result.stats, before


class TinyResidual(nn.Module):
    """conv-bn-relu stem, one residual block with `out += identity`, linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU(inplace=True))
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        out = self.relu(out)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def test_golden_tiny_residual():
    torch.manual_seed(0)
    gm, stats, before = fold(TinyResidual(), torch.randn(1, 3, 8, 8))
    after = canonical_lines(gm)
    text = (diff_text(before, after, pass_name="fold_batchnorm") + "\n# graph after fold_batchnorm\n"
            + listing_text(after))
    check_golden("fold_batchnorm_tiny_residual.txt", text)
    assert stats[CONV_BN] == 3 and stats["skipped"] == []


def test_folded_parameters_keep_their_names():
    torch.manual_seed(0)
    model = randomize_bn(TinyResidual())
    original = {k: v.clone() for k, v in model.state_dict().items()}
    gm, _, _ = fold(model, torch.randn(1, 3, 8, 8))
    names = set(dict(gm.named_parameters()))
    # Weights replaced under their own names, a bias added where the conv had none, no BN left.
    assert {"stem.0.weight", "stem.0.bias", "conv1.weight", "conv1.bias", "conv2.weight",
            "conv2.bias"} <= names
    assert not any(n.startswith(("stem.1.", "bn1.", "bn2.")) for n in names)
    convs = [n for n in gm.graph.nodes if n.target == aten.conv2d.default]
    assert all(n.meta[RULE] == CONV_BN for n in convs)
    # The user's model is untouched.
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k]), k


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_numerics(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    gm, stats, before = fold(model, torch.randn(2, 3, 64, 64))
    n_bn = op_counts(before)["aten.batch_norm"]
    assert n_bn > 0 and stats[CONV_BN] == n_bn and stats["skipped"] == []
    assert op_counts(canonical_lines(gm))["aten.batch_norm"] == 0


class CalledTwice(nn.Module):
    """One conv+bn module applied twice: the shared weight must stay shared and correct."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))

    def forward(self, x):
        return self.block(torch.relu(self.block(x)))


def test_module_called_twice_folds_once_and_stays_shared():
    gm, stats, _ = fold(CalledTwice(), torch.randn(1, 4, 6, 6))
    assert stats[CONV_BN] == 2 and stats["shared_weights_folded"] == 1
    convs = [n for n in gm.graph.nodes if n.target == aten.conv2d.default]
    assert len({c.args[1].target for c in convs}) == 1 and len({c.args[2].target for c in convs}) == 1


class SharedConvTwoNorms(nn.Module):
    """One conv applied twice, each time followed by a different batch norm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn_a, self.bn_b = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn_b(self.conv(torch.relu(self.bn_a(self.conv(x)))))


def test_shared_weight_with_different_norms_is_not_corrupted():
    model = SharedConvTwoNorms()
    weight = model.conv.weight.detach().clone()
    gm, stats, _ = fold(model, torch.randn(1, 4, 6, 6))
    assert stats[CONV_BN] == 0 and len(stats["skipped"]) == 2
    assert all("shared" in s["reason"] and "module called twice" in s["reason"] for s in stats["skipped"])
    assert torch.equal(gm.conv.weight, weight)


class ConvTwoUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_conv_with_two_users_is_left_alone():
    gm, stats, _ = fold(ConvTwoUsers(), torch.randn(1, 3, 5, 5))
    assert stats[CONV_BN] == 0
    assert stats["skipped"] == [{"node": "batch_norm", "reason": "producer has other users"}]
    assert op_counts(canonical_lines(gm))["aten.batch_norm"] == 1


class NormAfterPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(F.max_pool2d(x, 2))


def test_bn_without_conv_producer_is_left_alone():
    _, stats, _ = fold(NormAfterPool(), torch.randn(1, 3, 4, 4))
    assert stats["skipped"][0]["reason"].startswith("producer is not a conv/linear")


class OtherLayers(nn.Module):
    """Grouped transposed conv, conv1d and linear, each followed by its batch norm."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, bias=False)
        self.bn_up = nn.BatchNorm2d(6)
        self.c1 = nn.Conv1d(6, 5, 3)
        self.bn_c1 = nn.BatchNorm1d(5)
        self.fc = nn.Linear(5, 3)
        self.bn_fc = nn.BatchNorm1d(3)

    def forward(self, x):
        y = self.bn_up(self.up(x))                   # [1, 6, 9, 9]
        y = self.bn_c1(self.c1(y.flatten(2)))        # [1, 5, 79]
        return self.bn_fc(self.fc(y.mean(-1)))       # [1, 3]


def test_transposed_conv_conv1d_and_linear_fold():
    gm, stats, _ = fold(OtherLayers(), torch.randn(1, 4, 4, 4))
    assert stats[CONV_BN] == 2 and stats[LINEAR_BN] == 1 and stats["skipped"] == []


class LinearOn3D(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):  # x: [N, 3, 4]; the batch norm normalizes dim 1, not the features
        return self.bn(self.fc(x))


def test_linear_with_3d_output_is_left_alone():
    _, stats, _ = fold(LinearOn3D(), torch.randn(2, 3, 4))
    assert "not 2-D" in stats["skipped"][0]["reason"]


def test_native_batch_norm_form_after_decompositions():
    class ConvBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x))

    x = torch.randn(1, 3, 6, 6)
    ep = torch.export.export(randomize_bn(ConvBN()), (x,)).run_decompositions()
    gm = capture(ep)
    with torch.no_grad():
        ref = gm(x)
    ops_before = op_counts(canonical_lines(gm))
    assert ops_before["aten._native_batch_norm_legit_no_training"] == 1
    gm = fold_batchnorm(gm)
    with torch.no_grad():
        assert_rel_close(gm(x), ref)
    assert set(op_counts(canonical_lines(gm))) == {"aten.convolution"}


def test_bn_in_training_mode_is_left_alone():
    class TrainBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return F.batch_norm(y, self.bn.running_mean, self.bn.running_var, training=True)

    gm = capture(TrainBN().eval(), (torch.randn(2, 3, 5, 5),))
    result = FoldBatchNorm()(gm)
    assert result.stats["skipped"][0]["reason"] == "batch norm in training mode"
    assert not result.modified
