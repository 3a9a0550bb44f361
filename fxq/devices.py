"""Where reconstruction runs: ``--device auto|cpu|cuda[:N]``.

Everything but reconstruction (capture, passes, calibration, lowering, verification) runs on the
CPU: those are one or two passes over the calibration set. Reconstruction is thousands of small
training steps per region, which is what a GPU is for; ``on_device`` moves the graph module
there for its duration and back afterwards, so the rest of the pipeline never sees a CUDA
tensor.
"""
from __future__ import annotations

import contextlib

import torch
from torch import fx

from fxq import ops
from fxq.errors import FxqError

DEVICES_HELP = "auto (a CUDA GPU when PyTorch sees one, else the CPU), cpu, cuda or cuda:N"


def resolve_device(name: str) -> torch.device:
    """The torch device for ``name``; a clear error when the request cannot be met."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise FxqError(f"--device {name!r} is not a device fxq knows.", f"Use {DEVICES_HELP}.") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise FxqError(f"--device {name!r}: fxq reconstructs on the CPU or on CUDA GPUs only.",
                       f"Use {DEVICES_HELP}.")
    if not torch.cuda.is_available():
        raise FxqError(f"--device {name!r} was asked for, but this PyTorch sees no CUDA GPU "
                       f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}).",
                       "Run with --device cpu (or auto), or install a CUDA build of PyTorch on a GPU machine.")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise FxqError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s).",
                       f"Use cuda:0 .. cuda:{torch.cuda.device_count() - 1}.")
    return dev


def cache_cap(device: torch.device, requested: int) -> int:
    """Bytes of region inputs/targets kept in memory on ``device`` before spilling to disk: the
    configured cap on the CPU; on a GPU, at least half of its free memory (the cache is what
    saves each training step a host-to-device copy)."""
    if device.type != "cuda":
        return requested
    free, _total = torch.cuda.mem_get_info(device)
    return max(requested, free // 2)


def _device_kwargs(gm: fx.GraphModule) -> list[fx.Node]:
    # tensors created inside the graph (zeros, arange, full) carry the capture's device
    return [n for n in gm.graph.nodes if n.op == "call_function" and "device" in n.kwargs]


def _plain_tensor_attrs(gm: fx.GraphModule) -> list[str]:
    # constants a get_attr reads that are neither parameters nor buffers: Module.to skips them
    registered = {name for name, _ in gm.named_parameters()} | {name for name, _ in gm.named_buffers()}
    return sorted({n.target for n in gm.graph.nodes if n.op == "get_attr" and n.target not in registered
                   and isinstance(ops.get_attr(gm, n.target), torch.Tensor)})


@contextlib.contextmanager
def on_device(gm: fx.GraphModule, device: torch.device):
    """``gm`` with its parameters, buffers and in-graph tensor factories on ``device``, moved
    back to the CPU on exit (also on an interrupt, so a checkpoint or a retry sees CPU tensors)."""
    if device.type == "cpu":
        yield gm
        return
    factories = _device_kwargs(gm)
    saved = [(n, n.kwargs["device"]) for n in factories]
    for n in factories:
        n.update_kwarg("device", device)
    if factories:
        gm.recompile()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    # reproducible convolutions (same seed, same GPU -> same result) over autotuned ones
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    constants = {t: ops.get_attr(gm, t) for t in _plain_tensor_attrs(gm)}
    gm.to(device)
    for target, value in constants.items():
        ops.set_attr(gm, target, value.to(device))
    try:
        yield gm
    finally:
        gm.to("cpu")
        for target, value in constants.items():
            ops.set_attr(gm, target, value)
        for n, value in saved:
            n.update_kwarg("device", value)
        if factories:
            gm.recompile()
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
        for mod in gm.modules():  # cached fake-quantized weights would pin GPU memory
            if hasattr(mod, "_cache"):
                mod._cache = None
