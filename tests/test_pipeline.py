"""The compile recipe end to end: capture -> passes -> calibrate -> ONNX QDQ -> ONNX Runtime.

A small residual CNN covers structure, determinism and numerics quickly; EfficientNet-Lite0 with
its real weights checks that every conv fuses into QLinearConv in ONNX Runtime."""
from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from fxq.cli import main
from fxq.options import CompileOptions
from fxq.pipeline import compile_model


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        y = self.stem(x)
        y = torch.relu(self.body(y) + y)
        y = self.pool(y)
        return self.head(y.mean((2, 3)))


def _model():
    torch.manual_seed(0)
    m = TinyResNet().eval()
    with torch.no_grad():  # non-trivial BN statistics, so folding matters
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return m


def _calib(n=48):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _compile(tmp_path, name="out", **kw):
    opts = CompileOptions(out_dir=tmp_path / name, **kw)
    return compile_model((_model(), (torch.zeros(1, 3, 16, 16),)), _calib(), opts), tmp_path / name


def test_artifacts_report_and_numerics(tmp_path):
    report, out = _compile(tmp_path, debug=True)  # debug: lint/verify the graph after every pass
    assert {p.name for p in out.iterdir()} == {"model.onnx", "model.pt2", "report.json"}
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["verification"] == json.loads(json.dumps(report["verification"]))
    layers = {row["name"]: row for row in report["layers"]}
    assert set(layers) == {"stem.0", "body.0", "body.3", "head"}
    assert all(row["weight_bits"] in (7, 8) and row["act_bits"] == 8 for row in layers.values())
    v = report["verification"]["onnx_vs_fake_quant"]
    assert v["max_abs_diff"] < 0.05 and v["mean_cosine"] > 0.999
    assert report["verification"]["onnx_vs_integer_emulation"]["max_abs_diff"] == 0.0
    assert report["verification"]["onnx_vs_float"]["mean_cosine"] > 0.99
    assert [p["name"] for p in report["passes"]] == ["canonicalize", "fold_batchnorm", "decompose_attention", "smooth_activations", "detect_blocks",
                                                     "annotate_qspecs", "materialize_quantizers"]
    assert {r["kind"] for r in report["regions"]} == {"residual", "layer"}
    # the fake-quantized torch.export archive runs and matches the ONNX model
    ep = torch.export.load(str(out / "model.pt2"))
    x = _calib(4)[:1]
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(ep.module()(x).detach().numpy(), sess.run(None, {"input": x.numpy()})[0], atol=0.05)


def test_onnx_structure_weights_are_integers_with_explicit_axis(tmp_path):
    _, out = _compile(tmp_path, weight_range="full")
    model = onnx.load(str(out / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    float_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2]
    assert float_weights == []  # every weight is stored as integers
    weight_dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                  and inits[n.input[0]].data_type == onnx.TensorProto.INT8]
    assert len(weight_dqs) == 4
    for n in weight_dqs:
        assert [a.i for a in n.attribute if a.name == "axis"] == [0]
        assert len(n.input) == 3  # explicit zero point
    biases = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
              and inits[n.input[0]].data_type == onnx.TensorProto.INT32]
    assert len(biases) == 4  # conv and Gemm biases in int32 for QLinearConv/QGemm
    onnx.checker.check_model(model, full_check=True)


def test_reduced_weight_range_stays_within_seven_bits(tmp_path):
    _, out = _compile(tmp_path, weight_range="reduced")
    model = onnx.load(str(out / "model.onnx"))
    for t in model.graph.initializer:
        if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2:
            w = numpy_helper.to_array(t)
            assert w.min() >= -64 and w.max() <= 63


def test_four_bit_weights_are_stored_as_int4(tmp_path):
    _, out = _compile(tmp_path, weight_bits=4, first_last_bits=0)
    model = onnx.load(str(out / "model.onnx"))
    kinds = collections.Counter(t.data_type for t in model.graph.initializer if len(t.dims) >= 2)
    assert kinds[onnx.TensorProto.INT4] == 4


def test_same_seed_same_bytes(tmp_path):
    _, a = _compile(tmp_path, "a")
    _, b = _compile(tmp_path, "b")
    assert (a / "model.onnx").read_bytes() == (b / "model.onnx").read_bytes()


def test_bias_correction_reduces_output_error(tmp_path):
    with_bc, _ = _compile(tmp_path, "bc", weight_bits=3, act_bits=32, first_last_bits=0)
    without, _ = _compile(tmp_path, "nobc", weight_bits=3, act_bits=32, first_last_bits=0, bias_correction=False)
    assert with_bc["bias_correction"]["corrected_layers"] == 4
    assert (with_bc["verification"]["fake_quant_vs_float"]["mean_cosine"]
            > without["verification"]["fake_quant_vs_float"]["mean_cosine"])


def test_mixed_precision_options_need_a_budget(tmp_path):
    from fxq.errors import FxqError

    with pytest.raises(FxqError, match="which needs a budget"):
        _compile(tmp_path, bits=(4, 8))
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_lite0_w8a8_every_conv_fuses_in_onnx_runtime(tmp_path, capsys):
    from fxq.examples.photos import photo_crops

    torch.save(photo_crops("calib", 48, seed=0), tmp_path / "calib.pt")
    out = tmp_path / "lite0"
    code = main(["compile", "fxq.examples.efficientnet_lite0:efficientnet_lite0", "--input-shape", "1,3,224,224",
                 "--calib", str(tmp_path / "calib.pt"), "-o", str(out), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verification"]["onnx_vs_fake_quant"]["mean_cosine"] > 0.99
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(out / "model.onnx"), so, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    assert ops["QLinearConv"] == 49 and ops["Conv"] == 0 and ops["FusedConv"] == 0
    assert ops["QLinearAdd"] == 9
    assert ops["QGemm"] == 1 and ops["Gemm"] == 0  # the classifier runs in integers too


@pytest.mark.parametrize("method", ["brecq", "adaround"])
def test_reconstruction_lowers_region_loss_and_beats_round_to_nearest(tmp_path, method):
    common = dict(weight_bits=3, act_bits=32, first_last_bits=0, holdout=16)
    rtn, _ = _compile(tmp_path, "rtn", bias_correction=False, **common)
    rec, out = _compile(tmp_path, method, method=method, iters=150, **common)
    losses = [(r["loss_before"], r["loss_after"]) for r in rec["regions"] if r["loss_before"] is not None]
    assert len(losses) == (3 if method == "brecq" else 4)  # stem, residual block, head; or 4 layers
    assert sum(a for _, a in losses) < sum(b for b, _ in losses)
    if method == "brecq":  # block-wise: every region's output error goes down
        assert all(after < before for before, after in losses)
    q_rec = rec["verification"]["fake_quant_vs_float"]["mean_cosine"]
    assert q_rec > rtn["verification"]["fake_quant_vs_float"]["mean_cosine"]
    # the learned rounding reaches the ONNX model: ONNX Runtime agrees with the fake-quant model
    assert rec["verification"]["onnx_vs_fake_quant"]["mean_cosine"] > 0.999


def test_gptq_beats_round_to_nearest_and_reaches_onnx_runtime(tmp_path):
    common = dict(weight_bits=3, act_bits=8, first_last_bits=0, holdout=16)
    rtn, _ = _compile(tmp_path, "rtn", **common)  # with bias correction, rtn's best
    gptq, out = _compile(tmp_path, "gptq", method="gptq", **common)
    assert gptq["gptq"]["rounded_layers"] == 4 and gptq["bias_correction"] is None  # GPTQ fits the biases
    assert (gptq["verification"]["fake_quant_vs_float"]["mean_cosine"]
            > rtn["verification"]["fake_quant_vs_float"]["mean_cosine"])
    assert gptq["verification"]["onnx_vs_fake_quant"]["mean_cosine"] > 0.999
    weights = [numpy_helper.to_array(t) for t in onnx.load(str(out / "model.onnx")).graph.initializer
               if t.data_type == onnx.TensorProto.INT4]
    assert weights and all(np.abs(w).max() <= 4 for w in weights)  # the 3-bit grid, stored as int4


def test_python_api_takes_any_iterable_of_tensors_and_calib_size(tmp_path):
    samples = list(_calib(40))  # 40 tensors [3, 16, 16]
    opts = CompileOptions(out_dir=tmp_path / "it", calib_size=32, holdout=8)
    report = compile_model((_model(), (torch.zeros(1, 3, 16, 16),)), iter(samples), opts)
    assert report["calibration_samples"] == 24 and report["verification"]["holdout_samples"] == 8
    bad = samples[:3] + [torch.full((3, 16, 16), float("nan"))]
    with pytest.raises(Exception, match="NaN"):
        compile_model((_model(), (torch.zeros(1, 3, 16, 16),)), bad, CompileOptions(out_dir=tmp_path / "bad"))
    assert not (tmp_path / "bad" / "model.onnx").exists()
