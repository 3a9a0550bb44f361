"""Reconstruction stage: LSQ step sizes, QDrop, Fisher weights, tuning orders, resume and
determinism, on the small residual CNN of test_pipeline (seconds per compile)."""
from __future__ import annotations

import pytest
import torch

import fxq.reconstruct as reconstruct_mod
from fxq.errors import FxqError
from fxq.fisher import _Normalized, prediction_loss
from fxq.options import CompileOptions
from fxq.pipeline import RESUME_DIR, compile_model
from fxq.quantizers import ActQuantizer, QSpec, fake_quantize, lsq_fake_quantize
from fxq.region_graph import MemoryBudget, ValueStore
from test_pipeline import _calib, _model

U8 = QSpec(bits=8, signed=False, symmetric=False, per_channel=False)


def _compile(out, **kw):
    base = dict(weight_bits=3, act_bits=4, first_last_bits=0, holdout=16, method="brecq", iters=40)
    opts = CompileOptions(out_dir=out, **(base | kw))
    return compile_model((_model(), (torch.zeros(1, 3, 16, 16),)), _calib(), opts)


def test_lsq_forward_equals_fake_quantize_and_gradients_pass_straight_through():
    x = torch.linspace(-1.0, 3.0, 101).reshape(1, 101).requires_grad_(True)
    scale = torch.tensor(0.01, requires_grad=True)
    zp = torch.tensor(50.0)
    y = lsq_fake_quantize(x, scale, zp, 0, 255)
    assert torch.equal(y.detach(), fake_quantize(x.detach(), scale.detach(), zp, 0, 255))
    y.sum().backward()
    inside = (x.detach() / 0.01 + 50 >= 0) & (x.detach() / 0.01 + 50 <= 255)
    assert torch.equal(x.grad, inside.float())  # identity inside the range, zero where clipped
    assert scale.grad is not None and float(scale.grad.abs()) > 0


def test_activation_quantizer_lets_gradients_reach_earlier_layers():
    q = ActQuantizer(U8, "x")
    q.scale.fill_(0.05)
    x = torch.randn(4, 16, requires_grad=True)
    q(x).pow(2).sum().backward()
    assert float(x.grad.abs().sum()) > 0  # torch.round alone would give exactly zero


def test_learned_step_size_is_frozen_back_into_the_buffer():
    q = ActQuantizer(U8, "x")
    q.scale.fill_(0.05)
    p = q.start_learning()
    with torch.no_grad():
        p.fill_(0.07)
    q.stop_learning()
    assert float(q.scale) == pytest.approx(0.07) and q.learned_scale is None
    assert "learned_scale" not in dict(q.named_parameters())


def test_qdrop_keeps_about_the_drop_probability_of_elements_float():
    q = ActQuantizer(U8, "x")
    q.scale.fill_(0.3)
    q.drop_prob = 0.5
    x = torch.rand(1, 20000, requires_grad=True) * 2
    torch.manual_seed(0)
    y = q(x)
    quantized = fake_quantize(x.detach(), q.scale, q.zero_point, 0, 255)
    kept_float = (y.detach() == x.detach()) & (quantized != x.detach())
    share = float(kept_float.float().mean() / (quantized != x.detach()).float().mean())
    assert 0.45 < share < 0.55
    with torch.no_grad():  # inference never drops
        assert torch.equal(q(x), quantized)


def test_fisher_weights_have_mean_one_and_a_floor_of_one_half():
    store = ValueStore("g", MemoryBudget(1 << 20))
    g2 = torch.rand(3, 4, 5) ** 4
    for i in range(3):
        store.append(g2[i:i + 1])
    w = _Normalized(store, float(g2.mean()))
    allw = torch.cat([w[i] for i in range(len(w))])
    assert float(allw.mean()) == pytest.approx(1.0, rel=1e-5)
    assert float(allw.min()) >= 0.5
    zero = ValueStore("z", MemoryBudget(1 << 20))
    zero.append(torch.zeros(1, 4))
    assert torch.equal(_Normalized(zero, 0.0)[0], torch.ones(1, 4))  # falls back to plain MSE


def test_prediction_loss_is_kl_for_logits_and_zero_at_equality():
    a = torch.randn(4, 10)
    assert float(prediction_loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    b = a + torch.randn(4, 10)
    expected = (a.softmax(1) * (a.log_softmax(1) - b.log_softmax(1))).sum()
    assert float(prediction_loss(a, b)) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("kw", [dict(loss="fisher"), dict(tuning="two-stage"), dict(method="qdrop"),
                                dict(granularity="stage"),
                                # one region for the whole net: a 5-logit output against ~1300
                                # rounding variables needs more steps before the regularizer rules
                                dict(granularity="net", iters=200)])
def test_every_variant_lowers_the_total_region_loss(tmp_path, kw):
    report = _compile(tmp_path / "out", **kw)
    losses = [(r["loss_before"], r["loss_after"]) for r in report["regions"] if r["loss_before"] is not None]
    assert losses and sum(a for _, a in losses) < sum(b for b, _ in losses)
    assert report["reconstruction"]["loss"] == kw.get("loss", "mse")
    assert report["verification"]["onnx_vs_fake_quant"]["mean_cosine"] > 0.999


def test_learned_step_sizes_change_activation_scales(tmp_path):
    keep_rtn, keep_rec = {}, {}
    compile_model((_model(), (torch.zeros(1, 3, 16, 16),)), _calib(),
                  CompileOptions(out_dir=tmp_path / "rtn", weight_bits=3, act_bits=4, first_last_bits=0,
                                 holdout=16, bias_correction=False), keep=keep_rtn)
    compile_model((_model(), (torch.zeros(1, 3, 16, 16),)), _calib(),
                  CompileOptions(out_dir=tmp_path / "rec", weight_bits=3, act_bits=4, first_last_bits=0,
                                 holdout=16, method="brecq", iters=40), keep=keep_rec)

    def scales(gm):
        return {n: float(m.scale) for n, m in gm.named_modules() if isinstance(m, ActQuantizer)}

    a, b = scales(keep_rtn["graph_module"]), scales(keep_rec["graph_module"])
    assert a.keys() == b.keys() and any(abs(a[k] - b[k]) > 1e-6 for k in a)


@pytest.mark.parametrize("method", ["brecq", "qdrop"])
def test_same_seed_same_model_bytes(tmp_path, method):
    _compile(tmp_path / "a", method=method)
    _compile(tmp_path / "b", method=method)
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (tmp_path / "b" / "model.onnx").read_bytes()


def _interrupt_at_second_region(monkeypatch):
    """Make reconstruction raise KeyboardInterrupt when the second region starts."""
    real = reconstruct_mod._reconstruct_region
    calls = []

    def interrupted(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(reconstruct_mod, "_reconstruct_region", interrupted)
    return real, calls


def test_resume_after_an_interrupt_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    _compile(tmp_path / "full", method="qdrop")
    assert not (tmp_path / "full" / RESUME_DIR / "reconstruction.ckpt").exists()  # cleared on success

    real, calls = _interrupt_at_second_region(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        _compile(tmp_path / "cut", method="qdrop")
    assert (tmp_path / "cut" / RESUME_DIR / "reconstruction.ckpt").exists()
    assert not (tmp_path / "cut" / "model.onnx").exists()

    calls.clear()
    monkeypatch.setattr(reconstruct_mod, "_reconstruct_region", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    _compile(tmp_path / "cut", method="qdrop", resume=True)
    assert len(calls) == 2  # the first of the three regions came from the checkpoint
    assert (tmp_path / "cut" / "model.onnx").read_bytes() == (tmp_path / "full" / "model.onnx").read_bytes()


def test_resume_refuses_a_checkpoint_of_another_compile(tmp_path, monkeypatch):
    real, _ = _interrupt_at_second_region(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        _compile(tmp_path / "out")
    monkeypatch.setattr(reconstruct_mod, "_reconstruct_region", real)
    with pytest.raises(FxqError, match="different compile"):
        _compile(tmp_path / "out", iters=41, resume=True)


def test_fisher_weights_flow_from_integer_inputs():
    """Token ids cannot require a gradient: the graph's frozen float parameters carry it for the
    pass (and are frozen again after), so a region output behind an embedding gets real weights."""
    from torch import nn

    from fxq.capture import capture
    from fxq.fisher import fisher_weights

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.lin, self.out = nn.Embedding(50, 16), nn.Linear(16, 16), nn.Linear(16, 4)

        def forward(self, ids):
            h = self.emb(ids)
            return self.out((h + self.lin(h).relu()).mean(1))

    torch.manual_seed(0)
    model = Encoder().eval().requires_grad_(False)
    ids = torch.randint(0, 50, (16, 6))
    gm = capture(model, (ids[:8],))
    gm.requires_grad_(False)
    name = next(n.name for n in gm.graph.nodes if n.op == "call_function" and "add" in str(n.target))
    w = fisher_weights(gm, ids, [name], MemoryBudget(1 << 24))
    g = w.region(name)
    assert len(g) == 2 and g[0].shape == (8, 6, 16)
    assert float(g[0].std()) > 0  # not the all-ones fallback of a missing gradient
    assert not any(p.requires_grad for p in gm.parameters())
