"""fxq.emulate reproduces ONNX Runtime's fused integer kernels (QLinearConv, QLinearAdd,
QLinearGlobalAveragePool, QGemm) on a model built from them: same logits, bit for bit."""
import numpy as np
import onnxruntime as ort
import torch

from fxq.backends.lower_qdq import lower_qdq
from fxq.calibrate import run_batched
from fxq.capture import capture
from fxq.emulate import emulate
from fxq.options import CompileOptions
from fxq.pipeline import quantize_graph
from test_pipeline import _calib, _model


def test_integer_emulation_matches_fused_onnx_runtime_exactly():
    gm = capture(_model(), (torch.zeros(1, 3, 16, 16),))
    gm, _ = quantize_graph(gm, _calib(), CompileOptions(weight_range="reduced"))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(lower_qdq(gm).SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = _calib(24)
    ours = torch.cat([emulate(gm, x[i:i + 1]) for i in range(len(x))]).numpy()
    theirs = np.concatenate([sess.run(None, {"input": x[i:i + 1].numpy()})[0] for i in range(len(x))])
    np.testing.assert_array_equal(ours, theirs)
    # the plain fake-quant model is close but not bit-exact: that is what the emulator is for
    assert np.abs(run_batched(gm, x).numpy() - theirs).max() < 0.1
