"""Relevance masks (fxq.relevance): the reconstruction loss skips output elements that cannot
reach the model's output — padding positions — and only those."""
from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from fxq.options import CompileOptions
from fxq.pipeline import quantize_graph
from fxq.capture import capture
from fxq.region_graph import MemoryBudget
from fxq.relevance import relevance_masks


class _PaddedPool(nn.Module):
    """Rows whose first input feature is 0 are padding: masked out of a mean, as a sentence
    encoder does with padding tokens."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 6)

    def forward(self, x):
        keep = (x[..., :1] != 0).to(x.dtype)
        h = self.fc2(torch.nn.functional.gelu(self.fc1(x)))
        return (h * keep).sum(1) / keep.sum(1).clamp(min=1.0)


class _MaxPooled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return nn.functional.max_pool2d(self.conv(x), 2).flatten(1)


def _padded(n: int, length: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, length, 6, generator=g)
    for i in range(n):
        x[i, 1 + i % (length - 1):] = 0.0  # 1..4 real rows, the rest padding
    return x


def _traced(model, example):
    gm = fx.symbolic_trace(model.eval())
    gm.meta["fxq.example_inputs"] = (example,)
    return gm


def test_padding_rows_are_masked_exactly():
    x = _padded(8)
    gm = _traced(_PaddedPool(), x[:4])
    masks = relevance_masks(gm, x, ["fc2"], MemoryBudget(1 << 26))
    want = (x[..., :1] != 0).expand(-1, -1, 6)
    got = torch.cat([masks.region("fc2")[i] for i in range(2)])
    assert torch.equal(got, want)
    assert masks.fractions["fc2"] == float(want.float().mean())


def test_max_pool_losers_are_not_masked():
    """Their gradient is zero too, but it depends on the values: quantization can make a loser
    the maximum, so reconstruction must keep fitting them."""
    x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    gm = _traced(_MaxPooled(), x[:4])
    masks = relevance_masks(gm, x, ["conv"], MemoryBudget(1 << 26))
    assert "conv" not in masks and masks.fractions == {}


def test_reconstruction_reports_the_relevant_share_of_each_region():
    x = _padded(32, length=8)
    gm = capture(_PaddedPool().eval(), (x[:4],))
    gm, _ = quantize_graph(gm, x, CompileOptions(weight_bits=4, method="brecq", iters=4, first_last_bits=0))
    fractions = [r["relevant_fraction"] for r in gm.meta["fxq.reconstruction"]]
    share = float((x[..., 0] != 0).float().mean())
    assert fractions and all(abs(f - share) < 1e-3 for f in fractions), (fractions, share)


def test_loss_weights_vanish_on_masked_elements_and_average_one():
    """Plain and Fisher-weighted losses alike: zero weight where the mask is off, and a mean
    weight of 1 over all elements, so the loss keeps the scale the regularizer is tuned for."""
    from fxq.fisher import FisherWeights
    from fxq.reconstruct import _RegionWeights
    from fxq.region_graph import ValueStore
    from fxq.relevance import RelevanceMasks

    budget = MemoryBudget(1 << 26)
    mask = torch.tensor([[True, True, False, False]] * 3)
    g2 = torch.rand(3, 4) * mask
    mstore, gstore = ValueStore("m", budget), ValueStore("g", budget)
    mstore.append(mask)
    gstore.append(g2)
    masks = RelevanceMasks({"z": mstore}, {"z": 0.5})
    fisher = FisherWeights({"z": gstore}, {"z": float(g2.mean())})
    for weights in (_RegionWeights(None, masks), _RegionWeights(fisher, masks)):
        w = weights.region("z")[0]
        assert torch.all(w[~mask] == 0) and torch.all(w[mask] > 0)
        assert float(w.mean()) == pytest.approx(1.0, rel=1e-5)
    assert _RegionWeights(None, masks).region("other") is None


def test_bias_correction_averages_only_over_rows_that_reach_the_output(monkeypatch):
    """Padding rows see other inputs than real rows, so their rounding shift differs; correcting
    with a mean over all rows would shift the real rows' outputs by the padding's error."""
    from fxq import relevance
    from fxq.calibrate import run_batched

    torch.manual_seed(0)
    model = _PaddedPool().eval()
    x = _padded(64, length=8)
    x[..., 1:] += (x[..., :1] == 0).to(x.dtype) * 4.0  # padding rows: flag 0, features far off
    with torch.no_grad():
        float_out = model(x)

    def output_shift(bias_correction_masks: bool) -> torch.Tensor:
        if not bias_correction_masks:
            monkeypatch.setattr(relevance, "relevance_masks",
                                lambda *a, **k: relevance.RelevanceMasks({}, {}))
        gm = capture(model, (x[:4],))
        opts = CompileOptions(weight_bits=3, act_bits=32, first_last_bits=0, method="rtn")
        gm, _ = quantize_graph(gm, x, opts)
        monkeypatch.undo()
        assert gm.meta["fxq.bias_correction"]["masked_layers"] == (2 if bias_correction_masks else 0)
        return (run_batched(gm, x) - float_out).mean(0)

    masked, unmasked = output_shift(True), output_shift(False)
    assert float(masked.norm()) < 0.5 * float(unmasked.norm()), (masked, unmasked)


def test_bias_correction_without_gradients_falls_back_to_every_element(monkeypatch):
    """An op with no derivative makes the masks unavailable; the correction still runs, over
    every element, instead of failing the compile."""
    from fxq import relevance

    def no_derivative(*args, **kwargs):
        raise RuntimeError("derivative for aten::some_op is not implemented")

    monkeypatch.setattr(relevance, "relevance_masks", no_derivative)
    x = _padded(16, length=8)
    gm = capture(_PaddedPool().eval(), (x[:4],))
    gm, _ = quantize_graph(gm, x, CompileOptions(weight_bits=3, act_bits=32, first_last_bits=0, method="rtn"))
    stats = gm.meta["fxq.bias_correction"]
    assert stats["corrected_layers"] == 2 and stats["masked_layers"] == 0


class _UnderflowingGelu(_PaddedPool):
    """fc1's output goes through a GELU whose input is below -10 on some real tokens: its
    derivative is exactly 0 there, and the zeros move with the values."""

    def forward(self, x):
        keep = (x[..., :1] != 0).to(x.dtype)
        h = self.fc2(torch.nn.functional.gelu(self.fc1(x) * 20.0))
        return (h * keep).sum(1) / keep.sum(1).clamp(min=1.0)


def test_row_masks_exist_where_element_zeros_move():
    x = _padded(8)
    gm = _traced(_UnderflowingGelu(), x[:4])
    elements = relevance_masks(gm, x, ["fc1"], MemoryBudget(1 << 26))
    assert "fc1" not in elements  # some real tokens' elements have a zero derivative too
    rows = relevance_masks(gm, x, ["fc1"], MemoryBudget(1 << 26), rows=True)
    got = torch.cat([rows.region("fc1")[i] for i in range(2)])
    assert got.shape == (8, 5, 1) and torch.equal(got, x[..., :1] != 0)
