"""The example model, the photo data, ORT timing and the ORT baseline (fast checks only)."""
from __future__ import annotations

import importlib.util
import math
import os

import numpy as np
import pytest
import torch

from fxq.examples import efficientnet_lite0 as lite
from fxq.examples import photos

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model():
    return lite.efficientnet_lite0()


def _tiny_onnx(path: str | None = None):
    """Conv -> Relu -> GlobalAveragePool, small enough to time and quantize in milliseconds."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.normal(size=(8,)).astype(np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("GlobalAveragePool", ["r"], ["y"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 1, 1])],
        [w, b],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    if path is not None:
        onnx.save(m, path)
    return m


# --- EfficientNet-Lite0 -------------------------------------------------------------------------

def test_checkpoint_loads_strictly():
    raw = torch.load(lite.checkpoint_path(), map_location="cpu", weights_only=True)
    renamed = lite.load_checkpoint()
    assert len(renamed) == len(raw)  # the renaming is one-to-one
    m = lite.EfficientNetLite0()
    result = m.load_state_dict(renamed, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    bns = [mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    assert bns and all(bn.eps == 1e-3 for bn in bns)
    assert not any(isinstance(mod, (torch.nn.SiLU, torch.nn.Sigmoid)) for mod in m.modules())


def test_architecture_matches_lite0(model):
    assert len(model.blocks) == 16
    assert model.stem.conv.out_channels == 32 and model.head.conv.out_channels == 1280
    n_params = sum(p.numel() for p in model.parameters())
    assert 4.6e6 < n_params < 4.7e6
    # TF "same": stride-2 convs on even sizes pad more after than before, i.e. explicitly
    strided = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)]
    assert len(strided) == 5
    pads = [m for m in model.modules() if isinstance(m, torch.nn.ZeroPad2d)]
    assert len(pads) == 5 and all(p.padding[1] == p.padding[0] + 1 for p in pads)


@pytest.mark.parametrize("size,kernel,stride,expected", [
    (224, 3, 2, (0, 1)), (56, 5, 2, (1, 2)), (28, 3, 2, (0, 1)), (14, 5, 2, (1, 2)),
    (112, 3, 1, (1, 1)), (7, 5, 1, (2, 2)), (15, 3, 2, (1, 1)),
])
def test_same_padding(size, kernel, stride, expected):
    assert lite._same_padding(size, kernel, stride) == expected
    before, after = expected
    assert (size + before + after - kernel) // stride + 1 == math.ceil(size / stride)


# top-1 must be one of these on the photo's centre crop (ImageNet class indices)
PLAUSIBLE = {
    "chelsea": set(range(281, 288)),      # tabby, tiger cat, Persian, Siamese, Egyptian cat, lynx
    "coffee": {967, 968, 504, 925},       # espresso, cup, coffee mug, consomme
    "rocket": {657, 744, 812},            # missile, projectile, space shuttle
    "motorcycle": {665, 670, 671},        # moped, motor scooter, mountain bike
    "camera": {872, 759, 732},            # tripod, reflex camera, Polaroid camera
}


def test_plausible_predictions(model):
    names = list(PLAUSIBLE)
    x = torch.cat([photos.center_crop(n) for n in names])
    with torch.no_grad():
        probs = model(x).softmax(-1)
    for name, p in zip(names, probs):
        top5 = p.topk(5).indices.tolist()
        assert top5[0] in PLAUSIBLE[name], (name, top5)
    # the cat's probability mass is on cat classes, not just its argmax
    cat = probs[names.index("chelsea")][281:288].sum()
    assert cat > 0.8
    assert probs[names.index("coffee")][967] > 0.5


def test_torch_export(model):
    x = torch.zeros(lite.INPUT_SHAPE)
    ep = torch.export.export(model, (x,), strict=False)
    gm = ep.module()
    y = photos.center_crop("chelsea")
    with torch.no_grad():
        torch.testing.assert_close(gm(y), model(y), rtol=1e-4, atol=1e-4)
    stacks = [n.meta.get("nn_module_stack", {}) for n in ep.graph.nodes if n.op == "call_function"]
    paths = {path for s in stacks for path, _ in s.values()}
    assert {"stem", "blocks.0", "blocks.15", "head", "classifier"} <= paths
    adds = [n for n in ep.graph.nodes if n.target == torch.ops.aten.add.Tensor]
    assert len(adds) == 9  # the residual blocks: 16 blocks minus 7 stage entries


# --- photo crops --------------------------------------------------------------------------------

def test_photo_splits_are_disjoint_and_on_disk():
    calib, ev = photos.photo_names("calib"), photos.photo_names("eval")
    assert len(calib) >= 8 and len(ev) >= 8
    assert not set(calib) & set(ev)
    for name in calib + ev:
        img = photos.load_photo(name)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert min(img.shape[:2]) >= 150
    with pytest.raises(ValueError):
        photos.photo_names("train")


def test_photo_crops_shape_range_determinism():
    a = photos.photo_crops("calib", 20, seed=3)
    b = photos.photo_crops("calib", 20, seed=3)
    c = photos.photo_crops("calib", 20, seed=4)
    assert a.shape == (20, 3, 224, 224) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.min() >= -1.0 and a.max() <= 1.0
    assert a.min() < -0.9 and a.max() > 0.9  # normalisation maps [0, 255] to [-1, 1]
    # crops differ from each other (varied positions and scales)
    flat = a.flatten(1)
    assert torch.cdist(flat, flat).fill_diagonal_(float("inf")).min() > 1.0


def test_photo_crops_split_and_normalisation():
    ev = photos.photo_crops("eval", 9, size=64, seed=0)
    cal = photos.photo_crops("calib", 9, size=64, seed=0)
    assert ev.shape == (9, 3, 64, 64)
    assert not torch.equal(ev, cal)
    unit = photos.photo_crops("eval", 9, size=64, seed=0, mean=(0, 0, 0), std=(1, 1, 1))
    assert unit.min() >= 0 and unit.max() <= 1
    torch.testing.assert_close((unit - 0.5) / 0.5, ev)
    assert photos.photo_crops("eval", 0).shape == (0, 3, 224, 224)


# --- ORT timing and baseline --------------------------------------------------------------------

def test_measure_latency_on_tiny_model(tmp_path):
    from fxq.ort_timing import format_report, measure_latency, session, timing_report

    m = _tiny_onnx(str(tmp_path / "tiny.onnx"))
    x = np.random.default_rng(0).normal(size=(1, 3, 16, 16)).astype(np.float32)
    for form in (m, m.SerializeToString(), str(tmp_path / "tiny.onnx")):
        r = measure_latency(form, x, threads=1, warmup=2, runs=5)
        assert r["runs"] == 5 and r["threads"] == 1
        assert 0 < r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
    r = measure_latency(session(m, 1), {"x": x}, warmup=1, runs=3)
    assert r["median_ms"] > 0
    with pytest.raises(ValueError):
        measure_latency(m, {"wrong": x}, runs=1)
    rep = timing_report({"a": m, "b": m}, x, threads=1, warmup=1, runs=6, rounds=3)
    assert set(rep) == {"a", "b"} and rep["a"]["speedup_vs_first"] == 1.0
    assert all(v["runs"] == 6 for v in rep.values())
    assert "median ms" in format_report(rep)



def test_with_static_batch_restates_the_batch_of_a_static_graph(tmp_path):
    from fxq.ort_timing import session, with_static_batch

    m = _tiny_onnx()
    x = np.random.default_rng(2).normal(size=(4, 3, 16, 16)).astype(np.float32)
    m4 = with_static_batch(m, 4)
    assert m4.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 4
    assert m4.graph.output[0].type.tensor_type.shape.dim[0].dim_value == 4
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1  # the original is untouched
    one = session(m, 1)
    ref = np.concatenate([one.run(None, {"x": x[i:i + 1]})[0] for i in range(4)])
    np.testing.assert_allclose(session(m4, 1).run(None, {"x": x})[0], ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        with_static_batch(m, 0)

def _baselines():
    spec = importlib.util.spec_from_file_location(
        "fxq_bench_baselines", os.path.join(ROOT, "benchmarks", "baselines.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ort_quantize_static_on_tiny_model(tmp_path):
    import onnx

    from fxq.ort_timing import session

    bl = _baselines()
    src = str(tmp_path / "tiny.onnx")
    _tiny_onnx(src)
    calib = np.random.default_rng(1).normal(size=(16, 3, 16, 16)).astype(np.float32)
    out = bl.ort_quantize_static(src, calib, str(tmp_path / "tiny_q.onnx"))
    q = onnx.load(out)
    ops = [n.op_type for n in q.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    inits = {i.name: i for i in q.graph.initializer}
    # activations pass through QuantizeLinear (uint8); weights are stored quantized (int8)
    act_zps = [inits[n.input[2]] for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert act_zps and all(z.data_type == onnx.TensorProto.UINT8 for z in act_zps)
    dq_of_init = [inits[n.input[0]] for n in q.graph.node
                  if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert any(w.data_type == onnx.TensorProto.INT8 and len(w.dims) == 4 for w in dq_of_init)
    # per-channel: one scale per output channel of the conv weight
    assert any(len(inits[n.input[1]].dims) == 1 and inits[n.input[1]].dims[0] == 8
               for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits)
    x = calib[:1]
    yf = session(src, 1).run(None, {"x": x})[0]
    yq = session(out, 1).run(None, {"x": x})[0]
    assert np.abs(yf - yq).max() < 0.05 * np.abs(yf).max()
    # what ONNX Runtime runs: the float file as float convs, the QDQ file fused into integer kernels
    from fxq.ort_timing import optimized_op_counts

    float_ops, q_ops = optimized_op_counts(src), optimized_op_counts(out)
    assert "QLinearConv" not in float_ops and float_ops.get("Conv", 0) + float_ops.get("FusedConv", 0) >= 1
    assert q_ops.get("QLinearConv", 0) >= 1 and "DequantizeLinear" not in float_ops


@pytest.mark.slow
def test_baseline_script_end_to_end(capsys):
    result = _baselines()._main(["--calib", "16", "--eval", "32", "--runs", "5"])
    assert 0.2 < result["agreement"] <= 1.0
    assert result["latency"]["float"]["median_ms"] > 0
    assert "top-1 agreement" in capsys.readouterr().out
