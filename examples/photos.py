"""Real photo crops for calibration and evaluation, from images that ship inside scikit-image.

Only images stored in the installed ``skimage/data`` folder are used; scikit-image's other
datasets (``eagle``, ``lily``, ``skin``, ``kidney`` ...) need a download and are never touched.
Near-duplicates (the right image of the motorcycle stereo pair), synthetic pictures (colour
wheel, logo, chessboards, phantom), binary masks (horse) and tiny images (microaneurysms) are left
out.

The two splits share no photo, so an evaluation never sees a picture that calibration saw. Each
split mixes the same kinds of picture: recognisable objects, textures, printed text and
scientific imagery, in colour and in grey (grey is repeated to three channels)::

    calib  astronaut  motorcycle  hubble_deep_field  immunohistochemistry   (colour)
           camera  coins  brick  grass  page                                (grey)
    eval   chelsea  coffee  rocket  retina                                  (colour)
           clock  moon  gravel  text  cell                                  (grey)

Crops mimic the random-resized-crop used to train ImageNet models, but gentler: a square-ish
window covering 30-100 % of the photo's shorter side, anywhere in the photo, flipped left-right
half of the time, resized to ``size`` with an antialiased bilinear filter. Photos are taken in
turn (in a seeded order) so every photo contributes an equal share.
"""
from __future__ import annotations

import functools
import math
import os

import numpy as np
import torch

__all__ = ["SPLITS", "center_crop", "load_photo", "photo_crops", "photo_names"]

# photo name -> file inside skimage/data
_FILES = {
    "astronaut": "astronaut.png",
    "coffee": "coffee.png",
    "motorcycle": "motorcycle_left.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "camera": "camera.png",
    "coins": "coins.png",
    "brick": "brick.png",
    "grass": "grass.png",
    "page": "page.png",
    "chelsea": "chelsea.png",
    "rocket": "rocket.jpg",
    "retina": "retina.jpg",
    "immunohistochemistry": "ihc.png",
    "clock": "clock_motion.png",
    "moon": "moon.png",
    "gravel": "gravel.png",
    "text": "text.png",
    "cell": "cell.png",
}

SPLITS = {
    "calib": (
        "astronaut", "motorcycle", "hubble_deep_field", "immunohistochemistry",
        "camera", "coins", "brick", "grass", "page",
    ),
    "eval": (
        "chelsea", "coffee", "rocket", "retina",
        "clock", "moon", "gravel", "text", "cell",
    ),
}

# Larger photos are shrunk once when loaded: crops are at most this many pixels on the short
# side before the final resize, which keeps 2000 crops fast without visible loss at 224 px.
_MAX_SHORT_SIDE = 640

_SCALE_RANGE = (0.3, 1.0)
_ASPECT_RANGE = (3 / 4, 4 / 3)


def _data_dir() -> str:
    import skimage

    return os.path.join(os.path.dirname(skimage.__file__), "data")


def photo_names(split: str) -> tuple[str, ...]:
    """The photos a split draws from."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    return SPLITS[split]


@functools.lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
    """A photo as uint8 RGB, ``[H, W, 3]``, read from the scikit-image package folder."""
    if name not in _FILES:
        raise ValueError(f"unknown photo {name!r}; known: {sorted(_FILES)}")
    from skimage import io

    path = os.path.join(_data_dir(), _FILES[name])
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing; is scikit-image fully installed?")
    img = np.asarray(io.imread(path))
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    img = img[:, :, :3]  # drop alpha if any
    img.setflags(write=False)
    return img


@functools.lru_cache(maxsize=None)
def _pil(name: str):
    """The photo as a PIL image, shrunk once if large (cached; PIL resizes uint8 fast)."""
    from PIL import Image

    im = Image.fromarray(load_photo(name))
    short = min(im.size)
    if short > _MAX_SHORT_SIDE:
        w, h = (round(s * _MAX_SHORT_SIDE / short) for s in im.size)
        im = im.resize((w, h), Image.BILINEAR)
    return im


def _to_float(pixels: np.ndarray, mean, std) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> normalised float32 ``[N, 3, H, W]``."""
    # one float buffer, filled in place: at n = 2000 each extra copy would cost 1.2 GB
    x = torch.empty(pixels.shape[0], 3, *pixels.shape[1:3], dtype=torch.float32)
    x.copy_(torch.from_numpy(pixels).permute(0, 3, 1, 2))
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
    return x.sub_(m).div_(s)


def center_crop(name: str, size: int = 224, mean=(0.5,) * 3, std=(0.5,) * 3) -> torch.Tensor:
    """The largest centred square of a photo, resized and normalised: ``[1, 3, size, size]``."""
    from PIL import Image

    im = _pil(name)
    w, h = im.size
    s = min(h, w)
    left, top = (w - s) / 2, (h - s) / 2
    px = np.array(im.resize((size, size), Image.BILINEAR, box=(left, top, left + s, top + s)))
    return _to_float(px[None], mean, std)


def photo_crops(
    split: str,
    n: int,
    size: int = 224,
    seed: int = 0,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
) -> torch.Tensor:
    """``n`` random crops from the photos of ``split``, as float32 ``[n, 3, size, size]``.

    Pixels are ``(rgb / 255 - mean) / std``; the defaults give [-1, 1], what EfficientNet-Lite
    expects. The result depends only on the arguments.
    """
    names = photo_names(split)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.empty((n, size, size, 3), dtype=np.uint8)
    order: list[str] = []
    for i in range(n):
        # fresh permutation each round, so photo counts differ by at most one at any n
        if not order:
            order = [names[j] for j in rng.permutation(len(names))]
        im = _pil(order.pop())
        w, h = im.size
        side = min(h, w) * rng.uniform(*_SCALE_RANGE)
        aspect = math.exp(rng.uniform(math.log(_ASPECT_RANGE[0]), math.log(_ASPECT_RANGE[1])))
        ch = min(float(h), side / math.sqrt(aspect))
        cw = min(float(w), side * math.sqrt(aspect))
        top = rng.uniform(0.0, h - ch)
        left = rng.uniform(0.0, w - cw)
        # PIL's bilinear filter widens its support when shrinking, i.e. it antialiases
        crop = im.resize((size, size), Image.BILINEAR, box=(left, top, left + cw, top + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        pixels[i] = np.asarray(crop)
    return _to_float(pixels, mean, std)
