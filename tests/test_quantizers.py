"""Quantizer numerics: fxq's fake-quant equals ONNX QuantizeLinear/DequantizeLinear in ONNX
Runtime, scales come from the clipping search, degenerate inputs never give a broken scale."""
import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from fxq.quantizers import (ActQuantizer, QSpec, WeightQuantizer, fake_quantize, range_to_qparams,
                            search_weight_scale)

ACT8 = QSpec(bits=8, signed=False, symmetric=False, per_channel=False)
W8 = QSpec(bits=8, signed=True, symmetric=True, per_channel=True, axis=0, narrow=True)
W4 = QSpec(bits=4, signed=True, symmetric=True, per_channel=True, axis=0)


def _ort_qdq(x: np.ndarray, scale: float, zp: int) -> np.ndarray:
    inits = [numpy_helper.from_array(np.array(scale, np.float32), "s"),
             numpy_helper.from_array(np.array(zp, np.uint8), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_fake_quantize_matches_onnx_runtime_including_ties():
    scale, zp = 0.05, 17
    # exact ties (k + 0.5) * scale exercise round-half-to-even
    ties = (np.arange(-40, 40) + 0.5).astype(np.float32) * np.float32(scale)
    x = np.concatenate([ties, np.random.default_rng(0).normal(0, 3, 2000).astype(np.float32)])
    ours = fake_quantize(torch.from_numpy(x), torch.tensor(scale), torch.tensor(float(zp)), 0, 255).numpy()
    np.testing.assert_array_equal(ours, _ort_qdq(x, scale, zp))


def test_weight_scale_search_beats_min_max_in_lp_error():
    torch.manual_seed(0)
    w = torch.randn(16, 64) * torch.linspace(0.1, 2, 16)[:, None]
    w[:, 0] *= 8  # an outlier per channel makes plain min/max wasteful at 4 bits
    searched = search_weight_scale(w, W4)
    minmax = w.abs().amax(1) / W4.qmax

    def err(s):
        return (fake_quantize(w, s[:, None], torch.zeros(()), W4.qmin, W4.qmax) - w).abs().pow(2.4).sum()

    assert err(searched) < err(minmax)
    assert torch.all(searched <= minmax + 1e-9)


def test_int_weight_lands_on_grid_and_dequantizes_to_forward():
    w = torch.randn(8, 3, 3, 3)
    q = WeightQuantizer(W8, w, "conv")
    ints = q.int_weight(w)
    assert ints.min() >= -127 and ints.max() <= 127
    np.testing.assert_allclose((ints * q.scale.view(-1, 1, 1, 1)).numpy(), q(w).numpy(), rtol=0, atol=1e-7)


def test_zero_weights_and_constant_activations_give_positive_finite_scales():
    q = WeightQuantizer(W8, torch.zeros(4, 2, 1, 1), "zeros")
    assert torch.all(q.scale > 0) and torch.all(torch.isfinite(q.scale))
    a = ActQuantizer(ACT8, "const")
    a.mode = "observe"
    a(torch.full((2, 8), 3.0))
    a.finalize_calibration()
    assert float(a.scale) > 0 and np.isfinite(float(a.scale))
    a.mode = "quantize"
    assert torch.allclose(a(torch.full((2, 8), 3.0)), torch.full((2, 8), 3.0), atol=float(a.scale))


def test_nan_in_calibration_is_counted_not_propagated():
    a = ActQuantizer(ACT8, "nan")
    a.mode = "observe"
    x = torch.randn(1000)
    x[::10] = float("nan")
    a(x)
    a.finalize_calibration()
    assert a.nonfinite == 100
    assert np.isfinite(float(a.scale)) and float(a.scale) > 0


@pytest.mark.parametrize("lo,hi", [(0.0, 6.0), (-1.0, 3.0), (-2.0, -1.0), (0.5, 0.5)])
def test_range_always_represents_zero(lo, hi):
    scale, zp = range_to_qparams(lo, hi, ACT8)
    assert float(scale) > 0
    assert 0 <= float(zp) <= 255 and float(zp) == round(float(zp))
    zero = fake_quantize(torch.zeros(1), scale, zp, 0, 255)
    assert float(zero) == 0.0


def test_dead_channel_gets_a_scale_that_keeps_its_int32_bias_in_range():
    w = torch.randn(4, 8)
    w[2] = 0.0  # a channel whose BN gain folded to zero
    q = WeightQuantizer(W8, w, "dead")
    assert float(q.scale[2]) >= float(q.scale.max()) * 1e-3
    act_scale, bias = 0.02, 0.6
    assert abs(bias / (act_scale * float(q.scale[2]))) < 2**31 - 1
    assert torch.all(q(w)[2] == 0)
