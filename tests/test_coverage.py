"""Coverage: structurally different torchvision models compile end to end and ONNX Runtime agrees.

The fast subset of ``benchmarks/coverage.py`` (its docstring has the method; docs/coverage.md the
full table): random weights with BatchNorm statistics from the calibration samples, 8 synthetic
samples, rtn W8A8, ``compile_model`` -> ONNX QDQ -> ONNX Runtime vs fxq's fake-quant model, at a
reduced input size that every one of these models accepts.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _coverage():
    spec = importlib.util.spec_from_file_location("fxq_coverage_bench", ROOT / "benchmarks" / "coverage.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


coverage = _coverage()


def _check(row: dict, kinds: set[str]) -> None:
    assert row["ok"], f"{row['model']} failed at {row['stage']}: {row.get('error')}\n{row.get('traceback', '')}"
    # the benchmark's parity rule: cosine >= COSINE_PASS, or within a factor of the measured noise
    # floor (deep random-weight nets such as the Faster R-CNN FPN amplify one-step rounding
    # differences past 0.99; docs/coverage.md)
    assert row["onnx_ok"] and all(coverage.agrees(o) for o in row["all_outputs"]), row["all_outputs"]
    assert kinds <= set(row["region_kinds"]), row["region_kinds"]


# (model, region kinds it must show): a concat net, channel shuffle (view -> transpose ->
# contiguous -> view), squeeze-excite with hardswish/hardsigmoid, a plain residual net
FAST = [
    ("squeezenet1_0", {"concat"}),
    ("shufflenet_v2_x0_5", {"concat"}),
    ("mobilenet_v3_small", {"residual", "chain"}),
    ("resnet18", {"residual"}),
]


@pytest.mark.parametrize("name,kinds", FAST, ids=[m for m, _ in FAST])
def test_torchvision_model_compiles_and_ort_agrees(name, kinds, one_thread):
    row = coverage.run_one(name, n_calib=8, size=64)
    _check(row, kinds)
    assert row["top1_agreement"] >= 0.75  # 8 samples of a random classifier: a rounding flip may tie


@pytest.mark.slow
@pytest.mark.parametrize("name", coverage.DETECTION_BACKBONES)
def test_detection_backbone_with_fpn_compiles(name, one_thread):
    """BackboneWithFPN returns an OrderedDict of feature maps: a graph with several outputs,
    all lowered and all compared with ONNX Runtime."""
    row = coverage.run_one(name, n_calib=8, size=128)
    _check(row, {"residual"})
    assert row["outputs"] == 5 if "resnet50" in name else row["outputs"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("name,kinds", [("regnet_x_400mf", {"residual"}), ("googlenet", {"concat"}),
                                        ("efficientnet_b0", {"residual", "chain"}), ("vit_b_16", {"residual"}),
                                        ("swin_t", {"residual"}), ("maxvit_t", {"residual"})])
def test_torchvision_model_at_224(name, kinds, one_thread):
    _check(coverage.run_one(name, n_calib=8), kinds)


def test_capture_records_its_method():
    import torch
    from torch import nn

    from fxq.capture import CAPTURE_METHOD, CAPTURED_ARCHIVE, CAPTURED_EXPORT, capture

    model, x = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval(), torch.randn(1, 3, 8, 8)
    assert capture(model, (x,)).meta[CAPTURE_METHOD] == CAPTURED_EXPORT
    ep = torch.export.export(model, (x,), strict=False)
    assert capture(ep).meta[CAPTURE_METHOD] == CAPTURED_ARCHIVE
