"""smooth_activations: move the outlier channels of a linear layer's input into its weights.

A per-tensor activation grid (onnx-qdq, TensorRT) spends its range on a few outlier channels:
in MiniLM the LayerNorm output feeding each MLP has one channel reaching 28 while the median
channel stays under 2, so an 8-bit step of 0.11 leaves most channels a few dozen levels. For a
linear ``y = x Wᵀ + b`` and any positive per-input-channel ``s``,
``y = (x / s)(W · s)ᵀ + b``: dividing channel j by ``s_j`` and multiplying weight column j by
``s_j`` changes nothing in float and evens out the channels (SmoothQuant,
``s_j = max|x_j|^α / max|W_:j|^(1-α)``). The division is one ``mul`` by a constant inserted on
the float value in front of the layer(s) -- the value's other readers (a residual add) keep the
unscaled one -- and the weights are rescaled in place. The runtime's integer kernel is the same;
the ``mul`` runs in float before the activation's ``Q``.

Rules, per *group* (the linear layers that read one value: a transformer's Q, K and V
projections share theirs):

* ``α`` is chosen from ``ALPHAS`` by the output error of the group quantized at the compile's
  bits (per-tensor asymmetric activations, per-channel symmetric weights) on calibration rows,
  *no smoothing* included: a group whose channels are already even, or whose weights would lose
  more than its activations gain, is left alone. ``stats["groups"]`` has each group's choice,
  error before and after and the channel imbalance.
* only ``aten.linear`` layers with a parameter weight that no other node reads; convolutions
  are left to their BatchNorm-folded ranges (their inputs come from clamped activations).
* nothing happens when activations are not quantized (``act_bits >= 32``).

The statistics need data: the pass takes the calibration tensor and runs the float graph over it
once (``calib_rows`` rows per group are kept to score the candidates).
"""
from __future__ import annotations

import math

import torch
from torch import fx, nn

from fxq import ops
from fxq.passes.infra import FLOAT, RULE, Pass, PassResult

aten = torch.ops.aten
RULE_NAME = "smooth_activations.linear"
FLOAT_WHY = ("the per-channel division smooth_activations put in front of a linear layer: it runs in "
             "float, before the activation's Q, so the integer kernel is unchanged")
ALPHAS = (None, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9)  # None: leave the group as it is


def _attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _groups(gm: fx.GraphModule) -> tuple[dict[fx.Node, list[fx.Node]], list[dict]]:
    """Input value -> the linear layers reading it that may be rescaled; and the refusals."""
    readers: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            readers.setdefault(n.target, []).extend(n.users)
    groups: dict[fx.Node, list[fx.Node]] = {}
    skipped = []
    for n in gm.graph.nodes:
        if not (ops.is_layer(n) and n.target in ops.LINEAR_OPS):
            continue
        x, w = n.args[0], n.args[1]
        if not isinstance(x, fx.Node) or w.op != "get_attr":
            continue
        val = x.meta.get("val")
        weight = _attr(gm, w.target)
        if val is None or not val.is_floating_point() or weight.dim() != 2 or val.shape[-1] != weight.shape[1]:
            continue
        if len(readers.get(w.target, [])) != 1:
            skipped.append({"layer": n.name, "reason": f"weight '{w.target}' is shared: rescaling it "
                                                        "would change its other readers"})
            continue
        groups.setdefault(x, []).append(n)
    return groups, skipped


def _fake_act(x: torch.Tensor, lo: float, hi: float, bits: int) -> torch.Tensor:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-12) / (2 ** bits - 1)
    zp = round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zp, 0, 2 ** bits - 1) - zp) * scale


def _fake_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    scale = w.abs().amax(1, keepdim=True).clamp_min(1e-12) / qmax
    return torch.clamp(torch.round(w / scale), -qmax, qmax) * scale


class SmoothActivations(Pass):
    """Rescale linear layers' inputs and weights (see the module doc)."""

    name = "smooth_activations"

    def __init__(self, calib: torch.Tensor, weight_bits: int = 8, act_bits: int = 8,
                 calib_rows: int = 2048, alphas=ALPHAS):
        self.calib = calib
        self.weight_bits, self.act_bits = int(weight_bits), int(act_bits)
        self.calib_rows = int(calib_rows)
        self.alphas = tuple(alphas)

    def call(self, gm: fx.GraphModule) -> PassResult:
        if self.act_bits >= 32:
            return PassResult(gm, modified=False, stats={"smoothed": 0, "why": "activations are not quantized"})
        groups, skipped = _groups(gm)
        if not groups:
            return PassResult(gm, modified=False, stats={"smoothed": 0, "skipped": skipped})
        stats = self._statistics(gm, list(groups))
        report, done = [], 0
        for index, (x, layers) in enumerate(groups.items()):
            weight = torch.cat([_attr(gm, n.args[1].target).detach().float() for n in layers])
            choice = self._choose(stats[x.name], weight)
            choice.update(value=x.name, layers=[ops.layer_name(n) for n in layers])
            report.append(choice)
            if choice["alpha"] is None:
                continue
            self._rescale(gm, x, layers, choice.pop("s"), index)
            done += 1
        for r in report:
            r.pop("s", None)
        if done:
            gm.graph.lint()
            gm.recompile()
        out = {"smoothed": done, "groups": report}
        if skipped:
            out["skipped"] = skipped
        return PassResult(gm, modified=bool(done), stats=out)

    # -- statistics ------------------------------------------------------------------------------
    @torch.no_grad()
    def _statistics(self, gm: fx.GraphModule, values: list[fx.Node]) -> dict[str, dict]:
        """Per value: channel min/max over the calibration set and a strided sample of rows."""
        from fxq.calibrate import batches, graph_batch_size
        from fxq.region_graph import _Recorder

        batch = graph_batch_size(gm)
        n_batches = max(1, self.calib.shape[0] // batch)
        names = {v.name for v in values}
        out: dict[str, dict] = {}
        for chunk in batches(self.calib, batch):
            rec = _Recorder(gm, names, last=None)
            rec.run(chunk)
            for name, v in rec.values.items():
                rows = v.detach().float().reshape(-1, v.shape[-1])
                st = out.setdefault(name, {"lo": None, "hi": None, "rows": [],
                                           "stride": max(1, math.ceil(n_batches * rows.shape[0] / self.calib_rows))})
                lo, hi = rows.amin(0), rows.amax(0)
                st["lo"] = lo if st["lo"] is None else torch.minimum(st["lo"], lo)
                st["hi"] = hi if st["hi"] is None else torch.maximum(st["hi"], hi)
                st["rows"].append(rows[len(st["rows"]) % st["stride"]::st["stride"]].clone())
        for st in out.values():
            st["rows"] = torch.cat(st["rows"])[: self.calib_rows]
        return out

    def _choose(self, st: dict, weight: torch.Tensor) -> dict:
        x = st["rows"]
        amax = torch.maximum(st["lo"].abs(), st["hi"].abs()).clamp_min(1e-5)
        wmax = weight.abs().amax(0).clamp_min(1e-5)
        ref = x @ weight.T
        norm = float(ref.pow(2).mean()) or 1.0
        best = None
        errors = {}
        for alpha in self.alphas:
            s = torch.ones_like(amax) if alpha is None else (amax.pow(alpha) / wmax.pow(1 - alpha)).clamp_min(1e-5)
            lo, hi = float((st["lo"] / s).min()), float((st["hi"] / s).max())
            approx = _fake_act(x / s, lo, hi, self.act_bits) @ _fake_weight(weight * s, self.weight_bits).T
            err = float((approx - ref).pow(2).mean()) / norm
            errors["none" if alpha is None else f"{alpha:g}"] = round(err, 8)
            if best is None or err < best[0] - 1e-12:
                best = (err, alpha, s)
        return {"alpha": best[1], "s": best[2], "relative_error": errors,
                "channel_imbalance": round(float(amax.max() / amax.median()), 3)}

    # -- graph edit ------------------------------------------------------------------------------
    def _rescale(self, gm: fx.GraphModule, x: fx.Node, layers: list[fx.Node], s: torch.Tensor, index: int) -> None:
        for layer in layers:
            target = layer.args[1].target
            owner_path, _, attr = target.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            old = getattr(owner, attr)
            new = (old.detach().float() * s.to(old.device)[None, :]).to(old.dtype)
            setattr(owner, attr, nn.Parameter(new, requires_grad=old.requires_grad)
                    if isinstance(old, nn.Parameter) else new)
        name = f"fxq_smooth_{index}"
        while hasattr(gm, name):
            name += "_"
        val = x.meta["val"]
        gm.register_buffer(name, (1.0 / s).to(val.dtype))
        first = min(layers, key=lambda n: list(gm.graph.nodes).index(n))
        with gm.graph.inserting_before(first):
            inv = gm.graph.get_attr(name)
            inv.meta["val"] = torch.empty(s.shape, dtype=val.dtype, device="meta")
            mul = gm.graph.call_function(aten.mul.Tensor, (x, inv))
        mul.meta["val"] = torch.empty(val.shape, dtype=val.dtype, device="meta")
        for key in ("nn_module_stack", "stack_trace"):
            if key in first.meta:
                mul.meta[key] = first.meta[key]
        mul.meta[RULE] = RULE_NAME
        mul.meta[FLOAT] = {"rule": RULE_NAME, "why": FLOAT_WHY}
        for layer in layers:
            layer.args = (mul,) + tuple(layer.args[1:])
            layer.meta[RULE] = RULE_NAME
