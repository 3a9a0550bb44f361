"""Two small CNNs that fxq trains itself on scikit-learn's handwritten digits.

The data is ``sklearn.datasets.load_digits()``: 1797 real 8x8 grey images of the digits 0-9
(values 0..16), shipped inside scikit-learn, so nothing is downloaded. Each image is scaled to
[0, 1], upsampled to 32x32 (bilinear) and normalised with the training split's mean and standard
deviation (``MEAN``, ``STD``); tensors are ``N x 1 x 32 x 32`` float32.

A fixed, seeded permutation splits the images into a training split (``TRAIN_SIZE`` = 1200) and
a disjoint test split (the other 597). Calibration samples (``calib_samples``) are drawn from the
training split only; the test split is for measuring accuracy.

Two plain BatchNorm + ReLU networks, nothing architecture-specific for fxq to know about. Both
start with a stride-2 stem (the images carry 8x8 pixels of information; 16x16 feature maps keep
training and compiling fast):

    DigitsResNet        stem conv 3x3/2 -> 3 stages of one BasicBlock each (16, 32, 64 channels;
                        the last two start with stride 2 and a 1x1 projection on the skip) ->
                        global average pool -> Linear(64, 10); 78k parameters
    DigitsMobileNetV2   stem conv 3x3/2 -> 6 inverted residual blocks (expand 1x1 -> depthwise
                        3x3 -> linear project 1x1, ``x + y`` when shapes match, ReLU6) -> head
                        conv 1x1 -> global average pool -> Linear(128, 10); 46k parameters

``trained_digits_model(arch)`` trains one deterministically (AdamW, one-cycle schedule, random
+-2 px shifts, 15 epochs, one intra-op thread: 15-30 s on the development machine) to about 99 %
test accuracy, and caches the state dict under ``$FXQ_CACHE_DIR`` or ``~/.cache/fxq``, keyed by
the architecture and a hash of the training recipe.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "ARCHS",
    "INPUT_SHAPE",
    "MEAN",
    "STD",
    "NUM_CLASSES",
    "TRAIN_SIZE",
    "DigitsMobileNetV2",
    "DigitsResNet",
    "accuracy",
    "build_model",
    "cache_path",
    "calib_samples",
    "digits_splits",
    "train_config",
    "trained_digits_model",
]

INPUT_SHAPE = (1, 1, 32, 32)
NUM_CLASSES = 10
TRAIN_SIZE = 1200
# mean / std of the training split's pixels (scaled to [0, 1], upsampled to 32x32); fixed numbers
# so the normalisation does not depend on anything but the training split (a test checks them)
MEAN = 0.3047
STD = 0.3232


# --- data ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _all_images() -> tuple[torch.Tensor, torch.Tensor]:
    """Every digit image (normalised, 32x32) and its label, in scikit-learn's order."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data comes from scikit-learn: pip install 'fxq[examples]'") from exc
    digits = load_digits()
    x = torch.from_numpy(np.asarray(digits.images, dtype=np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=INPUT_SHAPE[-2:], mode="bilinear", align_corners=False)
    x = ((x - MEAN) / STD).contiguous()
    y = torch.from_numpy(np.asarray(digits.target, dtype=np.int64))
    return x, y


@functools.lru_cache(maxsize=4)
def _split_indices(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, _ = _all_images()
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    return perm[:TRAIN_SIZE].sort().values, perm[TRAIN_SIZE:].sort().values


def digits_splits(seed: int = 0) -> dict:
    """``{"train_x", "train_y", "test_x", "test_y", "train_index", "test_index"}``.

    The split is a seeded permutation of the 1797 images: ``TRAIN_SIZE`` for training, the rest
    for testing; ``*_index`` are the positions in ``load_digits()``. Tensors are fresh copies."""
    x, y = _all_images()
    train, test = _split_indices(seed)
    return {"train_x": x[train].clone(), "train_y": y[train].clone(),
            "test_x": x[test].clone(), "test_y": y[test].clone(),
            "train_index": train.clone(), "test_index": test.clone()}


def calib_samples(n: int, seed: int = 0, split_seed: int = 0) -> torch.Tensor:
    """``n`` unlabeled images drawn without replacement from the training split (never the test
    split), in a seeded order."""
    x, _ = _all_images()
    train, _ = _split_indices(split_seed)
    if not 0 < n <= train.numel():
        raise ValueError(f"calib_samples: n must be in 1..{train.numel()} (the training split), got {n}")
    pick = torch.randperm(train.numel(), generator=torch.Generator().manual_seed(seed))[:n]
    return x[train[pick]].clone()


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose arg-max is the label."""
    return float((logits.reshape(logits.shape[0], -1).argmax(1) == labels.reshape(-1)).float().mean())


# --- models -------------------------------------------------------------------------------------

def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
             act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet basic block: conv-bn-relu, conv-bn, plus the input (1x1 projection when the shape
    changes), then relu."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, 3, stride)
        self.conv2 = _conv_bn(cout, cout, 3, act=None)
        self.shortcut = _conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else None
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.shortcut is None else self.shortcut(x)
        return self.relu(self.conv2(self.conv1(x)) + skip)


class DigitsResNet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), num_classes: int = NUM_CLASSES):
        super().__init__()
        self.stem = _conv_bn(INPUT_SHAPE[1], widths[0], 3, stride=2)
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            stages.append(BasicBlock(cin, w, stride=1 if i == 0 else 2))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.classifier(torch.flatten(self.pool(x), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: [expand 1x1] -> depthwise 3x3 -> linear project 1x1, plus ``x`` when
    the shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.expand = _conv_bn(cin, mid, 1, act=nn.ReLU6) if expand != 1 else None
        self.depthwise = _conv_bn(mid, mid, 3, stride, groups=mid, act=nn.ReLU6)
        self.project = _conv_bn(mid, cout, 1, act=None)
        self.use_skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x if self.expand is None else self.expand(x)
        y = self.project(self.depthwise(y))
        return x + y if self.use_skip else y


# (expand ratio, out channels, repeats, stride of the first block), as in the MobileNetV2 paper
MBV2_SETTINGS = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2), (4, 48, 1, 1))


class DigitsMobileNetV2(nn.Module):
    def __init__(self, settings=MBV2_SETTINGS, stem: int = 16, head: int = 128,
                 num_classes: int = NUM_CLASSES):
        super().__init__()
        self.stem = _conv_bn(INPUT_SHAPE[1], stem, 3, stride=2, act=nn.ReLU6)
        blocks, cin = [], stem
        for expand, cout, repeats, stride in settings:
            for i in range(repeats):
                blocks.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = _conv_bn(cin, head, 1, act=nn.ReLU6)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(self.pool(x), 1))


ARCHS = {"resnet": DigitsResNet, "mobilenetv2": DigitsMobileNetV2}


def build_model(arch: str) -> nn.Module:
    """An untrained model of ``arch`` ("resnet" or "mobilenetv2")."""
    if arch not in ARCHS:
        raise ValueError(f"unknown digits architecture {arch!r}; choose from {sorted(ARCHS)}")
    return ARCHS[arch]()


# --- training -----------------------------------------------------------------------------------

# Bump when anything that changes the trained weights changes (model code, data, augmentation):
# it is part of the cache key.
RECIPE_VERSION = 1


def train_config(arch: str, seed: int = 0) -> dict:
    """The training recipe of ``arch``; its hash keys the cache."""
    if arch not in ARCHS:
        raise ValueError(f"unknown digits architecture {arch!r}; choose from {sorted(ARCHS)}")
    return {"recipe": RECIPE_VERSION, "arch": arch, "seed": seed, "split_seed": 0,
            "train_size": TRAIN_SIZE, "epochs": 15, "batch": 64, "optimizer": "adamw",
            "lr": 3e-3, "weight_decay": 5e-4, "schedule": "onecycle", "shift_px": 2,
            "mean": MEAN, "std": STD}


def _config_hash(cfg: dict) -> str:
    # the module tree's repr (layers, channels, strides) joins the recipe, so an architecture
    # edit never loads stale weights even if RECIPE_VERSION was not bumped
    key = json.dumps(cfg, sort_keys=True) + repr(build_model(cfg["arch"]))
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _default_cache_dir() -> Path:
    env = os.environ.get("FXQ_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "fxq"


def cache_path(arch: str, cache_dir: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Where ``trained_digits_model(arch, cache_dir, seed)`` keeps its state dict."""
    cfg = train_config(arch, seed)
    root = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    return root / f"digits-{arch}-{_config_hash(cfg)}.pt"


def _shift(x: torch.Tensor, max_px: int, gen: torch.Generator) -> torch.Tensor:
    """Shift every image by its own random offset in [-max_px, max_px] pixels, filling with the
    background (a raw 0 pixel, normalised)."""
    if max_px <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_px,) * 4, value=(0.0 - MEAN) / STD)
    off = torch.randint(0, 2 * max_px + 1, (n, 2), generator=gen)
    return torch.stack([padded[i, :, oy:oy + h, ox:ox + w] for i, (oy, ox) in enumerate(off.tolist())])


def _train(arch: str, cfg: dict) -> nn.Module:
    return train_classifier(lambda: build_model(arch), cfg)


def train_classifier(build, cfg: dict) -> nn.Module:
    """``build()`` trained on the digits training split with the recipe ``cfg`` (seed, split_seed,
    epochs, batch, lr, weight_decay, shift_px): AdamW, one-cycle schedule, random shifts.

    One intra-op thread: the same summation order (so the same weights) on every machine, and
    no oversubscription slow-down when the cores are shared -- these layers are too small to
    gain much from a second thread anyway."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_1thread(build, cfg)
    finally:
        torch.set_num_threads(threads)


def _train_1thread(build, cfg: dict) -> nn.Module:
    torch.manual_seed(cfg["seed"])  # before build(): the initial weights come from it too
    gen = torch.Generator().manual_seed(cfg["seed"])
    model = build()
    data = digits_splits(cfg["split_seed"])
    x, y = data["train_x"], data["train_y"]
    steps_per_epoch = -(-x.shape[0] // cfg["batch"])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], epochs=cfg["epochs"],
                                                steps_per_epoch=steps_per_epoch)
    model.train()
    for _ in range(cfg["epochs"]):
        perm = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], cfg["batch"]):
            idx = perm[i:i + cfg["batch"]]
            if idx.numel() < 2:  # BatchNorm needs more than one sample per channel
                continue
            loss = F.cross_entropy(model(_shift(x[idx], cfg["shift_px"], gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def trained_digits_model(arch: str, cache_dir: str | os.PathLike | None = None, seed: int = 0,
                         verbose: bool = True) -> nn.Module:
    """``arch`` ("resnet" or "mobilenetv2") trained on the digits training split, in eval mode.

    Loaded from the cache when a state dict for this exact recipe is there; otherwise trained
    (deterministically for a given seed and torch build) and cached, written atomically. With
    ``verbose`` a one-line message is printed to stderr when training."""
    cfg = train_config(arch, seed)
    path = cache_path(arch, cache_dir, seed)
    model = build_model(arch)
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
        return model.eval()
    t0 = time.perf_counter()
    trained = _train(arch, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_state_dict(trained, path)
    if verbose:
        print(f"fxq.examples.digits: trained {arch} in {time.perf_counter() - t0:.1f} s -> {path}",
              file=sys.stderr)
    model.load_state_dict(trained.state_dict(), strict=True)
    return model.eval()


def save_state_dict(model: nn.Module, path: Path) -> None:
    """Write ``model``'s state dict to ``path`` atomically (a cache another run may be reading)."""
    import io

    from fxq.atomic import atomic_write_bytes

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    atomic_write_bytes(path, buf.getvalue())
