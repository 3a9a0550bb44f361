"""Numerical guards: NaN/Inf activations, all-zero weights and constant activations never crash a
compile or produce a zero, NaN or infinite scale (in the quantizers or in the ONNX Q/DQ
initializers). NaN/Inf activations are a clear error naming the activation and its source line;
zero weights and constant activations compile with valid scales and keep the float model's output.
"""
from __future__ import annotations

import math
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from fxq.cli import main
from fxq.errors import FxqError, LoweringError
from fxq.quantizers import ActQuantizer, QSpec, WeightQuantizer, range_to_qparams, search_weight_scale

MODULE = "fxq_testmods_numguards"
SOURCE = textwrap.dedent('''
    import torch
    from torch import nn

    INPUT_SHAPE = (1, 3, 8, 8)

    class Base(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.conv2 = nn.Conv2d(4, 4, 1)

    class Overflow(Base):
        def forward(self, x):
            y = torch.relu(self.conv(x))
            y = y * 1e30 * 1e30
            return self.conv2(y)

    class SqrtOfNegative(Base):
        def forward(self, x):
            y = torch.sqrt(self.conv(x))
            return self.conv2(y)

    class ZeroLayer(Base):
        def __init__(self):
            super().__init__()
            with torch.no_grad():
                self.conv2.weight.zero_()
                self.conv2.bias.copy_(torch.tensor([0.5, -0.3, 1.0, 0.2]))

        def forward(self, x):  # calls conv twice: two int32 biases of one layer in the ONNX
            return self.conv2(torch.relu(self.conv(x))) + 0.1 * self.conv(x)

    class ConstantZero(Base):
        def forward(self, x):
            y = torch.relu(self.conv(x))
            z = torch.relu(-y)                      # zero everywhere, computed from the input
            return self.conv2(z) + 0.1 * y

    class ConstantThree(Base):
        def forward(self, x):
            y = torch.relu(self.conv(x))
            z = y * 0.0 + 3.0                       # 3 everywhere
            return self.conv2(z) + 0.1 * y

    class NaNWeights(Base):
        def __init__(self):
            super().__init__()
            with torch.no_grad():
                self.conv2.weight[1, 2] = float("nan")

        def forward(self, x):
            return self.conv2(torch.relu(self.conv(x)))
''')


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("numguards")
    (d / f"{MODULE}.py").write_text(SOURCE)
    sys.path.insert(0, str(d))
    torch.save(torch.randn(12, 3, 8, 8, generator=torch.Generator().manual_seed(0)), d / "calib.pt")
    yield d
    sys.path.remove(str(d))
    sys.modules.pop(MODULE, None)


def compile_(capsys, env, out, model):
    torch.manual_seed(0)
    code = main(["compile", f"{MODULE}:{model}", "--calib", str(env / "calib.pt"), "-o", str(out),
                 "--method", "rtn"])
    stdout, stderr = capsys.readouterr()
    return code, stdout, stderr


def assert_valid_scales(model: onnx.ModelProto) -> int:
    scales = [numpy_helper.to_array(t) for t in model.graph.initializer if "scale" in t.name]
    assert scales
    for s in scales:
        assert np.all(np.isfinite(s)) and np.all(s > 0), s
    return len(scales)


def onnx_vs_float(out) -> float:
    """Largest |ONNX Runtime - float model| on the held-out samples (fxq's own verification)."""
    import json

    report = json.loads((out / "report.json").read_text())
    return report["verification"]["onnx_vs_float"]["max_abs_diff"]


# --------------------------------------------------------------------------- NaN / Inf activations


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("model,line", [("Overflow", "y = y * 1e30 * 1e30"),
                                        ("SqrtOfNegative", "y = torch.sqrt(self.conv(x))")])
def test_nonfinite_activation_is_a_clear_error(capsys, env, tmp_path, model, line):
    """Finite calibration data, but the float model itself overflows / takes sqrt(<0) inside."""
    code, out, err = compile_(capsys, env, tmp_path / "out", model)
    assert code == 2, err
    assert "error:" in err and "NaN or infinite values" in err and "Traceback" not in err
    assert f"{MODULE}.py" in err and line in err  # names the source line of the activation
    assert not (tmp_path / "out").exists()


def test_calibrate_activations_names_the_first_nonfinite_activation():
    from fxq.calibrate import calibrate_activations
    from fxq.capture import capture
    from fxq.errors import CalibrationDataError
    from fxq.options import CompileOptions
    from fxq.pipeline import build_passes
    from fxq.backends.tables import get_backend
    from fxq.passes.infra import PassManager

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 4)
            self.b = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.b(torch.log(self.a(x)))  # log of a negative number: NaN

    torch.manual_seed(0)
    gm = capture(M().eval(), (torch.randn(1, 4),))
    gm = PassManager(build_passes(CompileOptions(), get_backend("onnx-qdq"))).run(gm)
    with pytest.raises(CalibrationDataError, match="activation 'log'.*torch.log"):
        calibrate_activations(gm, torch.randn(8, 4))
    # Observation ended cleanly: the quantizers are back in quantize mode.
    assert all(q.mode == "quantize" for q in gm.modules() if isinstance(q, ActQuantizer))


# --------------------------------------------------------------------------- zero weights, constants


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("model", ["ZeroLayer", "ConstantZero", "ConstantThree"])
def test_zero_weights_and_constant_activations_compile_with_valid_scales(capsys, env, tmp_path, model):
    out = tmp_path / "out"
    code, stdout, err = compile_(capsys, env, out, model)
    assert code == 0, err
    assert_valid_scales(onnx.load(str(out / "model.onnx")))
    # The layer after the degenerate value keeps its bias: a scale of ~1e-10 there used to push
    # the int32 bias (bias / (s_x * s_w)) out of range, and it was clipped.
    assert onnx_vs_float(out) < 0.03


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_all_zero_weights_get_a_unit_grid(bits):
    spec = QSpec(bits, True, True, True, 0, narrow=bits == 8)
    q = WeightQuantizer(spec, torch.zeros(4, 3, 3, 3), "zeros")
    assert torch.allclose(q.scale, torch.full((4,), 1.0 / spec.qmax))
    assert torch.all(q(torch.zeros(4, 3, 3, 3)) == 0)
    # A bias of 10 on an activation grid of 0.01 still fits the int32 bias grid.
    assert abs(10.0 / (0.01 * float(q.scale.min()))) < 2**31 - 1
    blocked = QSpec(bits, True, True, True, 0, block_size=4)
    assert torch.all(search_weight_scale(torch.zeros(2, 8), blocked) > 0)


def test_constant_activation_ranges():
    act = QSpec(8, False, False, False)
    scale, zp = range_to_qparams(0.0, 0.0, act)   # constant zero: the grid of [0, 1]
    assert math.isclose(float(scale), 1 / 255, rel_tol=1e-6) and float(zp) == 0
    scale, zp = range_to_qparams(3.0, 3.0, act)   # constant 3: [0, 3], 3 is on the grid
    assert math.isclose(float(scale), 3 / 255, rel_tol=1e-6)
    sym = QSpec(8, True, True, False)
    assert float(range_to_qparams(0.0, 0.0, sym)[0]) == pytest.approx(1 / 127)
    for lo, hi in [(float("nan"), 1.0), (0.0, float("inf")), (float("-inf"), 0.0)]:
        with pytest.raises(ValueError, match="not finite"):
            range_to_qparams(lo, hi, act)
    a = ActQuantizer(act, "zeros")
    a.mode = "observe"
    a(torch.zeros(2, 5))
    a(torch.zeros(0, 5))  # an empty activation carries no range and must not crash
    a.finalize_calibration()
    assert float(a.scale) > 0 and math.isfinite(float(a.scale))


def test_nan_weights_are_refused_with_the_layer_name(capsys, env, tmp_path):
    with pytest.raises(FxqError, match="Layer 'conv' has 1 NaN or infinite weight value"):
        w = torch.randn(4, 3)
        w[0, 0] = float("inf")
        WeightQuantizer(QSpec(8, True, True, True, 0), w, "conv")
    code, out, err = compile_(capsys, env, tmp_path / "out", "NaNWeights")
    assert code == 2 and "Layer 'conv2' has 1 NaN or infinite weight value" in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_diverged_learned_step_keeps_the_calibrated_one():
    a = ActQuantizer(QSpec(8, False, False, False), "x")
    a.scale.fill_(0.05)
    p = a.start_learning()
    with torch.no_grad():
        p.fill_(float("nan"))
    a.stop_learning()
    assert float(a.scale) == pytest.approx(0.05)
    p = a.start_learning()
    with torch.no_grad():
        p.fill_(-1.0)  # a negative step is floored, never written as is
    a.stop_learning()
    assert float(a.scale) > 0


@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf"), -0.1])
def test_lowering_refuses_a_broken_scale(bad):
    from fxq.backends.lower_qdq import check_scale, lower_qdq
    from fxq.capture import capture
    from fxq.options import CompileOptions
    from fxq.pipeline import quantize_graph

    check_scale(np.array([0.1, 0.2], np.float32), "fine")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).eval()
    gm, _ = quantize_graph(capture(net, (torch.randn(1, 4),)), torch.randn(8, 4), CompileOptions())
    aq = next(m for m in gm.modules() if isinstance(m, ActQuantizer))
    aq.scale.fill_(bad)
    with pytest.raises(LoweringError, match=f"activation '{aq.source}'"):
        lower_qdq(gm, CompileOptions())
