"""fxq's graph passes, each usable on its own from Python."""
from .detect_blocks import DetectBlocks, detect_blocks
