"""Calibration of activation quantizers: stream the calibration set through the graph once
with every ActQuantizer observing, then fix scales by the Lp clipping search."""
from __future__ import annotations

from typing import Iterator

import torch
from torch import fx

from fxq.quantizers import ActQuantizer


def batches(data: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Fixed-size batches (the captured graph has a static batch); a short tail is dropped
    unless it is the only batch, in which case it is repeated up to size."""
    n = data.shape[0]
    if n < batch_size:
        reps = -(-batch_size // max(n, 1))
        yield data.repeat(reps, *([1] * (data.dim() - 1)))[:batch_size]
        return
    for i in range(0, n - batch_size + 1, batch_size):
        yield data[i:i + batch_size]


def graph_batch_size(gm: fx.GraphModule) -> int:
    ex = gm.meta.get("fxq.example_inputs")
    return int(ex[0].shape[0]) if ex else 1


def set_act_mode(gm: fx.GraphModule, mode: str) -> None:
    for mod in gm.modules():
        if isinstance(mod, ActQuantizer):
            mod.mode = mode


@torch.no_grad()
def calibrate_activations(gm: fx.GraphModule, data: torch.Tensor, search: bool = True,
                          progress=None) -> dict:
    quantizers = [m for m in gm.modules() if isinstance(m, ActQuantizer)]
    if not quantizers:
        return {"activation_quantizers": 0}
    for q in quantizers:
        q._reset_observations()
    set_act_mode(gm, "observe")
    bs = graph_batch_size(gm)
    chunks = list(batches(data, bs))
    task = progress.add_task("calibrating activations", total=len(chunks)) if progress else None
    try:
        for chunk in chunks:
            gm(chunk)
            if progress:
                progress.advance(task)
    finally:
        set_act_mode(gm, "quantize")
    _refuse_nonfinite(gm)
    for q in quantizers:
        q.finalize_calibration(search=search)
    return {"activation_quantizers": len(quantizers), "batches": len(chunks),
            "nonfinite_values": sum(q.nonfinite for q in quantizers)}


def _user_line(node: fx.Node | None) -> str:
    """``file:line: `code``` of the user's source that made ``node``, when export recorded it."""
    import re

    trace = (node.meta.get("stack_trace") or "") if node is not None else ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in \S+\n\s*(.*)', trace)
    if not frames:
        return ""
    filename, line, code = frames[-1]
    return f" at {filename}:{line}" + (f": `{code.strip()}`" if code.strip() else "")


def _refuse_nonfinite(gm: fx.GraphModule) -> None:
    """A NaN or Inf reached an activation quantizer: its range (and every later one) would be
    computed from whatever was finite, and the quantized model would silently clip what the float
    model turns into Inf/NaN. Name the first such activation in graph order instead."""
    from fxq import ops
    from fxq.errors import CalibrationDataError

    hit = []
    seen = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in seen:
            continue
        seen.add(node.target)
        mod = gm.get_submodule(node.target)
        if isinstance(mod, ActQuantizer) and mod.nonfinite:
            hit.append((node, mod))
    if not hit:
        return
    node, mod = hit[0]
    source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    path = ops.module_path(source) if source is not None else []
    where = f" (module '{path[-1]}'{_user_line(source)})" if path else _user_line(source)
    others = (f" ({len(hit) - 1} later activation{'s' if len(hit) > 2 else ''} hold some too)"
              if len(hit) > 1 else "")
    raise CalibrationDataError(
        "The model produces NaN or infinite values on the calibration data, so their quantization "
        f"ranges cannot be calibrated. The first is activation '{mod.source}'{where}, with "
        f"{mod.nonfinite} such values{others}.",
        "The float model overflows (or divides by zero) there: check that the calibration data "
        "is scaled and normalized the way the model was trained, and that its weights are sane.")


def map_padded(fn, data: torch.Tensor, batch: int) -> torch.Tensor:
    """``fn`` over ``data`` in fixed-size batches (graphs have a static batch): the last batch is
    padded by repeating its final sample and the padding is dropped from the result. ``fn`` may
    return a tuple; its first element is kept."""
    outs = []
    for i in range(0, data.shape[0], batch):
        chunk = data[i:i + batch]
        real = chunk.shape[0]
        if real < batch:
            chunk = torch.cat([chunk, chunk[-1:].expand(batch - real, *chunk.shape[1:])])
        out = fn(chunk)
        outs.append((out[0] if isinstance(out, (tuple, list)) else out)[:real])
    return torch.cat(outs)


@torch.no_grad()
def run_batched(gm: fx.GraphModule, data: torch.Tensor) -> torch.Tensor:
    """Outputs of ``gm`` on every sample of ``data`` (the static batch is respected)."""
    return map_padded(gm, data, graph_batch_size(gm))
