"""fxq: post-training quantization compiler for PyTorch built as torch.fx passes."""
__version__ = "0.1.0"
