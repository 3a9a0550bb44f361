"""smooth_activations: outlier channels of a linear layer's input move into its weights, exactly
in float, only where that lowers the quantized error; the ONNX model still matches."""
from __future__ import annotations


import pytest
import torch
from torch import nn

from fxq.capture import capture
from fxq.options import CompileOptions
from fxq.passes.smooth_activations import SmoothActivations


class PostNorm(nn.Module):
    """LayerNorm whose output has one outlier channel (as BERT's do), read by two linear layers
    (one input value: a group) and by a residual add that must keep the unscaled value."""

    def __init__(self, width: int = 32, outlier: float = 40.0):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        with torch.no_grad():
            self.norm.weight[3] = outlier
        self.a, self.b = nn.Linear(width, width), nn.Linear(width, width)
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        h = self.norm(x)
        y = h + torch.relu(self.a(h)) * torch.sigmoid(self.b(h))
        return self.head(y.mean(1))


def _captured(model=None, width: int = 32):
    torch.manual_seed(0)
    model = (model or PostNorm()).eval()
    data = torch.randn(32, 6, width)
    return capture(model, (data[:8],)), data


def _smooth(gm, data, **kw):
    return SmoothActivations(data, **kw)(gm)


def test_float_model_unchanged_and_outlier_group_smoothed():
    gm, data = _captured()
    ref = gm(data[:8])
    result = _smooth(gm, data, weight_bits=8, act_bits=8)
    st = result.stats
    group = next(g for g in st["groups"] if len(g["layers"]) == 2)  # a and b share the LayerNorm output
    assert group["alpha"] is not None and group["channel_imbalance"] > 10
    errors = group["relative_error"]
    assert errors[f"{group['alpha']:g}"] < errors["none"] / 2
    muls = [n for n in gm.graph.nodes if n.meta.get("fxq.rule") == "smooth_activations.linear"
            and n.target == torch.ops.aten.mul.Tensor]
    assert len(muls) >= 1
    # the residual add still reads the LayerNorm output itself, not the scaled copy
    norm = next(n for n in gm.graph.nodes if "layer_norm" in str(n.target))
    assert any("add" in str(u.target) for u in norm.users)
    torch.testing.assert_close(gm(data[:8]), ref, rtol=1e-4, atol=1e-4)


def test_nothing_happens_without_activation_quantization():
    gm, data = _captured()
    before = [n.format_node() for n in gm.graph.nodes]
    result = _smooth(gm, data, weight_bits=8, act_bits=32)
    assert not result.modified and result.stats["smoothed"] == 0
    assert [n.format_node() for n in gm.graph.nodes] == before


def test_a_shared_weight_is_left_alone_with_the_reason():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.lin = nn.LayerNorm(16), nn.Linear(16, 16)
            with torch.no_grad():
                self.norm.weight[0] = 50.0

        def forward(self, x):
            h = self.norm(x)
            return self.lin(h) + self.lin(torch.relu(h))

    gm, data = _captured(Tied(), width=16)
    result = _smooth(gm, data, weight_bits=8, act_bits=8)
    assert result.stats["smoothed"] == 0
    assert all("shared" in s["reason"] for s in result.stats["skipped"])


def test_compile_with_smoothing_is_closer_and_onnx_runtime_agrees(tmp_path):
    from fxq.pipeline import compile_model

    torch.manual_seed(0)
    model = PostNorm().eval()
    data = torch.randn(64, 6, 32)
    reports = {}
    for smooth in (False, True):
        opts = CompileOptions(out_dir=tmp_path / str(smooth), smooth=smooth, holdout=16, seed=0)
        reports[smooth] = compile_model((model, (data[:8],)), data, opts)
    on, off = reports[True]["verification"], reports[False]["verification"]
    assert on["fake_quant_vs_float"]["mean_cosine"] > off["fake_quant_vs_float"]["mean_cosine"]
    assert on["onnx_vs_fake_quant"]["mean_cosine"] > 0.999
    passes = {p["name"]: p for p in reports[True]["passes"]}
    assert passes["smooth_activations"]["stats"]["smoothed"] >= 1
    assert reports[True]["float_nodes"]["by_rule"].get("smooth_activations.linear", 0) >= 1  # and why
    assert "smooth_activations" not in {p["name"] for p in reports[False]["passes"]}


@pytest.mark.parametrize("flag,expected", [([], True), (["--no-smooth"], False)])
def test_cli_flag(flag, expected):
    from fxq.cli import build_parser

    args = build_parser().parse_args(["compile", "m.pt", "--calib", "c.pt", *flag])
    assert args.smooth is expected
