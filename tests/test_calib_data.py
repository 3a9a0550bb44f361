"""Calibration data: every DATA form loads to [N, ...] float32, every bad input is explained."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from fxq.calib_data import IMAGENET_MEAN, IMAGENET_STD, load_calibration
from fxq.errors import CalibrationDataError

SHAPE = (1, 3, 8, 8)


def _image(path, size=(12, 10), mode="RGB", value=None):
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    channels = 3 if mode == "RGB" else 1
    arr = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    if value is not None:
        arr[:] = value
    Image.fromarray(arr if channels == 3 else arr[..., 0], mode).save(path)


def _err(spec, shape=SHAPE, **kw) -> str:
    with pytest.raises(CalibrationDataError) as info:
        load_calibration(spec, shape, **kw)
    return info.value.message


# ----------------------------------------------------------------------------- image folders


def test_image_folder_sorted_recursive_and_normalized(tmp_path, caplog):
    (tmp_path / "b").mkdir()
    _image(tmp_path / "b" / "z.png", value=255)          # sorts after a.jpg by relative path
    _image(tmp_path / "a.jpg", size=(30, 9), value=0)
    _image(tmp_path / "c.bmp", mode="L")
    (tmp_path / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="fxq"):
        x = load_calibration(tmp_path, SHAPE)
    assert x.shape == (3, 3, 8, 8) and x.dtype == torch.float32
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(x[0], (0 - mean) / std * torch.ones(3, 8, 8), atol=1e-5)     # a.jpg: black
    assert torch.allclose(x[1], (1 - mean) / std * torch.ones(3, 8, 8), atol=1e-5)     # b/z.png: white
    assert "Ignoring 1 non-image file" in caplog.text


def test_image_folder_preprocess_none_and_grayscale_model(tmp_path):
    _image(tmp_path / "a.png", size=(20, 16))
    x = load_calibration(tmp_path, (1, 1, 16, 16), preprocess="none")
    assert x.shape == (1, 1, 16, 16)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_image_folder_calib_size_takes_first_files(tmp_path):
    for name in ("c.png", "a.png", "b.png"):
        _image(tmp_path / name, value={"a.png": 0, "b.png": 128, "c.png": 255}[name])
    x = load_calibration(tmp_path, SHAPE, size=2, preprocess="none")
    assert x.shape[0] == 2
    assert float(x[0].max()) == 0.0 and abs(float(x[1].mean()) - 128 / 255) < 1e-6


def test_empty_folder(tmp_path):
    assert "contains nothing (it is empty)" in _err(tmp_path)


def test_folder_without_images(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.csv").write_text("x")
    assert "no image files (only 2 other files)" in _err(tmp_path)


def test_corrupt_image_is_named(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "b.jpg").write_bytes(b"definitely not a jpeg")
    msg = _err(tmp_path)
    assert "b.jpg" in msg and "cannot be read" in msg


def test_image_folder_needs_image_model(tmp_path):
    _image(tmp_path / "a.png")
    assert "needs a model whose input is images" in _err(tmp_path, shape=(1, 10))


def test_single_image_file(tmp_path):
    _image(tmp_path / "a.png")
    assert "single image file" in _err(tmp_path / "a.png")


# ----------------------------------------------------------------------------- tensor files


def test_pt_and_npz_files(tmp_path):
    x = torch.randn(5, 3, 8, 8)
    torch.save(x, tmp_path / "x.pt")
    torch.save({"x": x, "y": torch.zeros(5)}, tmp_path / "xy.pt")
    np.savez(tmp_path / "one.npz", data=x.numpy())
    np.savez(tmp_path / "named.npz", x=x.double().numpy(), labels=np.zeros(5))
    np.save(tmp_path / "x.npy", x.numpy())
    for name in ("x.pt", "xy.pt", "one.npz", "named.npz", "x.npy"):
        got = load_calibration(tmp_path / name, SHAPE)
        assert got.dtype == torch.float32 and torch.allclose(got, x), name
    assert load_calibration(str(tmp_path / "x.pt"), SHAPE, size=3).shape[0] == 3


def test_iterable_of_tensors():
    batches = [torch.randn(2, 3, 8, 8), torch.randn(3, 8, 8), (torch.randn(1, 3, 8, 8), torch.tensor([1]))]
    x = load_calibration(batches, SHAPE)
    assert x.shape == (4, 3, 8, 8)
    assert load_calibration(iter(batches), SHAPE, size=2).shape[0] == 2


def test_npz_with_several_arrays_and_no_x(tmp_path):
    np.savez(tmp_path / "two.npz", a=np.zeros((2, 3, 8, 8)), b=np.zeros(2))
    msg = _err(tmp_path / "two.npz")
    assert "2 arrays (a, b)" in msg and "named 'x'" in msg


def test_wrong_shape_names_both(tmp_path):
    torch.save(torch.randn(4, 3, 9, 9), tmp_path / "x.pt")
    msg = _err(tmp_path / "x.pt")
    assert "[4, 3, 9, 9]" in msg and "[N, 3, 8, 8]" in msg
    torch.save(torch.randn(4, 8, 8, 3), tmp_path / "nhwc.pt")
    assert "permute" in _err(tmp_path / "nhwc.pt")
    torch.save(torch.randn(3, 8, 8), tmp_path / "single.pt")
    assert "unsqueeze(0)" in _err(tmp_path / "single.pt")


def test_integer_dtype(tmp_path):
    torch.save(torch.randint(0, 255, (4, 3, 8, 8), dtype=torch.uint8), tmp_path / "u8.pt")
    msg = _err(tmp_path / "u8.pt")
    assert "integer dtype uint8" in msg and "x.float() / 255" in msg
    np.savez(tmp_path / "i.npz", x=np.zeros((4, 3, 8, 8), dtype=np.int64))
    assert "integer dtype int64" in _err(tmp_path / "i.npz")


def test_nan_and_inf_are_counted(tmp_path):
    x = torch.randn(6, 3, 8, 8)
    x[0, 0, 0, :2] = float("nan")
    x[3, 1, 1, 1] = float("-inf")
    torch.save(x, tmp_path / "x.pt")
    msg = _err(tmp_path / "x.pt")
    assert "2 NaN and 1 infinite values (in 2 of 6 samples)" in msg


@pytest.mark.parametrize("size", [0, -3])
def test_bad_calib_size(tmp_path, size):
    torch.save(torch.randn(4, 3, 8, 8), tmp_path / "x.pt")
    assert "--calib-size must be a positive" in _err(tmp_path / "x.pt", size=size)


def test_fewer_samples_than_asked_warns(tmp_path, caplog):
    torch.save(torch.randn(4, 3, 8, 8), tmp_path / "x.pt")
    with caplog.at_level(logging.WARNING, logger="fxq"):
        x = load_calibration(tmp_path / "x.pt", SHAPE, size=10)
    assert x.shape[0] == 4
    assert "asks for 10 samples" in caplog.text and "only 4" in caplog.text


def test_file_problems(tmp_path):
    assert "does not exist" in _err(tmp_path / "missing.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    assert "empty" in _err(tmp_path / "empty.pt")
    (tmp_path / "data.csv").write_text("1,2,3")
    assert "unsupported type" in _err(tmp_path / "data.csv")
    (tmp_path / "bad.pt").write_text("garbage")
    assert "is a text file, not a torch.save file" in _err(tmp_path / "bad.pt")
    (tmp_path / "binary.pt").write_bytes(b"\x00\x01garbage\xff")
    assert "could not be read" in _err(tmp_path / "binary.pt")
    torch.save(torch.zeros(4, 3, 8, 8), tmp_path / "whole.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:300])
    assert "truncated or corrupt zip archive" in _err(tmp_path / "cut.pt")
    torch.save(torch.nn.ReLU(), tmp_path / "module.pt")
    assert "pickled Python objects" in _err(tmp_path / "module.pt")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert "pickled objects" in _err(tmp_path / "obj.npy")
    torch.save(torch.zeros(0, 3, 8, 8), tmp_path / "none.pt")
    assert "holds no samples" in _err(tmp_path / "none.pt")
