"""The digits example: data splits, the two small CNNs, training + cache, and one fxq compile.

The ResNet is trained once per test session into a temporary cache (15-30 s on 2 cores); the
MobileNetV2's accuracy check is marked slow."""
from __future__ import annotations

import torch
import pytest

from fxq.examples import digits

N_IMAGES = 1797


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x}


# --- data ---------------------------------------------------------------------------------------

def test_splits_shapes_disjoint_and_deterministic():
    s = digits.digits_splits()
    assert s["train_x"].shape == (digits.TRAIN_SIZE, 1, 32, 32)
    assert s["test_x"].shape == (N_IMAGES - digits.TRAIN_SIZE, 1, 32, 32)
    assert s["train_x"].dtype == torch.float32 and s["train_y"].dtype == torch.int64
    assert s["train_y"].shape == (digits.TRAIN_SIZE,) and s["test_y"].shape == (N_IMAGES - digits.TRAIN_SIZE,)
    train, test = set(s["train_index"].tolist()), set(s["test_index"].tolist())
    assert not train & test and train | test == set(range(N_IMAGES))
    assert not _rows(s["train_x"]) & _rows(s["test_x"])  # no image is in both (no exact duplicates)
    # every class is in both splits, in roughly its share
    for y in (s["train_y"], s["test_y"]):
        counts = torch.bincount(y, minlength=10).float() / y.numel()
        assert counts.min() > 0.07 and counts.max() < 0.13
    again = digits.digits_splits()
    for key in s:
        assert torch.equal(s[key], again[key])
    other = digits.digits_splits(seed=1)
    assert not torch.equal(s["test_index"], other["test_index"])
    # the splits are copies: editing one does not leak into the next call
    s["train_x"].zero_()
    assert not torch.equal(digits.digits_splits()["train_x"], s["train_x"])


def test_normalisation_matches_the_training_split():
    x = digits.digits_splits()["train_x"]
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1.0) < 0.01
    background = (0.0 - digits.MEAN) / digits.STD
    assert float(x.min()) == pytest.approx(background, abs=1e-5)  # the corners are blank


def test_calib_samples_come_from_the_training_split():
    s = digits.digits_splits()
    calib = digits.calib_samples(256, seed=0)
    assert calib.shape == (256, 1, 32, 32)
    rows = _rows(calib)
    assert len(rows) == 256  # drawn without replacement
    assert rows <= _rows(s["train_x"]) and not rows & _rows(s["test_x"])
    assert torch.equal(calib, digits.calib_samples(256, seed=0))
    assert not torch.equal(calib, digits.calib_samples(256, seed=1))
    assert len(_rows(digits.calib_samples(digits.TRAIN_SIZE, seed=3))) == digits.TRAIN_SIZE
    with pytest.raises(ValueError):
        digits.calib_samples(digits.TRAIN_SIZE + 1)


def test_accuracy():
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert digits.accuracy(logits, torch.tensor([1, 0, 0, 0])) == pytest.approx(0.75)


# --- models -------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", sorted(digits.ARCHS))
def test_models_are_small_plain_bn_cnns(arch):
    torch.manual_seed(0)
    model = digits.build_model(arch).eval()
    n_params = sum(p.numel() for p in model.parameters())
    assert 20_000 < n_params < 300_000
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == len(convs)  # every conv is followed by a BatchNorm that fxq folds
    assert all(c.bias is None for c in convs)
    with torch.no_grad():
        assert model(torch.zeros(digits.INPUT_SHAPE)).shape == (1, digits.NUM_CLASSES)
        assert model(torch.zeros(5, *digits.INPUT_SHAPE[1:])).shape == (5, digits.NUM_CLASSES)
    if arch == "mobilenetv2":
        assert any(c.groups == c.in_channels > 1 for c in convs)  # depthwise
        assert sum(isinstance(b, digits.InvertedResidual) and b.use_skip for b in model.modules()) >= 2
    else:
        blocks = [b for b in model.modules() if isinstance(b, digits.BasicBlock)]
        assert len(blocks) == 3 and sum(b.shortcut is not None for b in blocks) == 2
    with pytest.raises(ValueError):
        digits.build_model("vgg")


def test_training_is_deterministic():
    cfg = dict(digits.train_config("resnet"), epochs=1)
    threads = torch.get_num_threads()
    a = digits._train("resnet", cfg).state_dict()
    b = digits._train("resnet", cfg).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.get_num_threads() == threads  # training's single thread is restored


def test_cache_path_keys_and_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FXQ_CACHE_DIR", str(tmp_path / "env"))
    p = digits.cache_path("resnet")
    assert p.parent == tmp_path / "env" and p.name.startswith("digits-resnet-")
    assert digits.cache_path("resnet", tmp_path) != digits.cache_path("mobilenetv2", tmp_path)
    assert digits.cache_path("resnet", tmp_path) != digits.cache_path("resnet", tmp_path, seed=1)
    assert digits.cache_path("resnet", tmp_path) == digits.cache_path("resnet", tmp_path)


# --- trained models -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("digits-cache")


@pytest.fixture(scope="module")
def resnet(cache_dir):
    return digits.trained_digits_model("resnet", cache_dir=cache_dir, verbose=False)


def _test_accuracy(model) -> float:
    s = digits.digits_splits()
    with torch.no_grad():
        return digits.accuracy(model(s["test_x"]), s["test_y"])


def test_trained_resnet_is_accurate_and_cached(resnet, cache_dir, monkeypatch):
    assert not resnet.training
    assert _test_accuracy(resnet) >= 0.95
    files = sorted(p.name for p in cache_dir.iterdir())
    assert files == [digits.cache_path("resnet", cache_dir).name]  # no temp file left behind

    def no_training(*args, **kwargs):
        raise AssertionError("the cached state dict should have been loaded")

    monkeypatch.setattr(digits, "_train", no_training)
    again = digits.trained_digits_model("resnet", cache_dir=cache_dir)
    assert not again.training and again is not resnet
    a, b = resnet.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_trained_mobilenetv2_is_accurate(cache_dir):
    model = digits.trained_digits_model("mobilenetv2", cache_dir=cache_dir, verbose=False)
    assert _test_accuracy(model) >= 0.95


def test_w8a8_compile_keeps_accuracy(resnet, tmp_path, one_thread):
    from fxq.options import CompileOptions
    from fxq.pipeline import compile_model, run_onnx

    s = digits.digits_splits()
    keep: dict = {}
    report = compile_model((resnet, (torch.zeros(digits.INPUT_SHAPE),)), digits.calib_samples(128, seed=0),
                           CompileOptions(out_dir=tmp_path / "out", weight_bits=8, act_bits=8, method="rtn",
                                          holdout=32), keep=keep)
    assert report["calibration_samples"] == 96 and report["verification"]["held_out"]
    assert {row["op"] for row in report["layers"]} >= {"conv2d.default", "linear.default"}
    assert "graph_module" in keep
    assert [p["name"] for p in report["passes"]][:2] == ["canonicalize", "fold_batchnorm"]
    onnx_bytes = (tmp_path / "out" / "model.onnx").read_bytes()
    quant = digits.accuracy(run_onnx(onnx_bytes, s["test_x"], 1), s["test_y"])
    assert quant >= _test_accuracy(resnet) - 0.01
