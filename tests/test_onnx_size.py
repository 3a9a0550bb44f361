"""Models past protobuf's 2 GB limit are checked and run from a file with external data
(``fxq.onnx_size``); the limit is lowered here so a small model takes that path."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import fxq.onnx_size as onnx_size
from fxq.backends.lower_qdq import lower_qdq
from fxq.capture import capture


@pytest.fixture
def small_limit(monkeypatch):
    monkeypatch.setattr(onnx_size, "LIMIT", 4096)


def _float_model():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(16 * 6 * 6, 10)).eval()
    gm = capture(net, (torch.randn(1, 3, 8, 8),))
    return gm, lower_qdq(gm, quantized=False)


def _run(model, x):
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_oversized_model_runs_from_external_data(small_limit, tmp_path):
    gm, model = _float_model()
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    want = _run(model.SerializeToString(), x)
    assert onnx_size.oversized(model) and onnx_size.payload_bytes(model) > 4096
    ref = onnx_size.runnable(model, tmp_path)
    assert isinstance(ref, str) and (tmp_path / "model.onnx.data").is_file()
    assert (tmp_path / "model.onnx").stat().st_size < 4096  # the tensors live in the .data file
    np.testing.assert_array_equal(_run(ref, x), want)


def test_check_model_of_oversized_model_keeps_its_tensors(small_limit):
    _, model = _float_model()
    before = [bytes(t.raw_data) for t in model.graph.initializer]
    onnx_size.check_model(model, full_check=True)
    assert [bytes(t.raw_data) for t in model.graph.initializer] == before
    assert all(t.data_location == onnx.TensorProto.DEFAULT and not t.external_data
               for t in model.graph.initializer)
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    broken.graph.node[0].input[0] = "no_such_value"
    with pytest.raises(Exception, match="no_such_value"):
        onnx_size.check_model(broken)


def test_small_model_stays_in_memory(tmp_path):
    _, model = _float_model()
    assert not onnx_size.oversized(model)
    assert isinstance(onnx_size.runnable(model, tmp_path), bytes)
    assert not any(tmp_path.iterdir())
