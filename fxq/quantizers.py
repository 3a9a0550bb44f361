"""Quantization specs and the fake-quantizer modules that materialize them in the graph.

A ``QSpec`` is a frozen decision (bits, signedness, granularity); backends' placement tables
produce them, ``annotate_qspecs`` attaches them to graph edges, ``materialize_quantizers`` turns
them into the modules below. Quantizers are ``call_module`` nodes so that one module called
twice means one set of shared scales (a quantizer shared across transparent ops, a weight shared
by a module called twice).

Numerics follow ONNX QuantizeLinear/DequantizeLinear exactly: q = clamp(round_half_even(x / s)
+ z, qmin, qmax); x' = (q - z) * s. ``torch.round`` rounds half to even, like ONNX.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class QSpec:
    bits: int
    signed: bool          # int grid (weights) or uint grid (activations)
    symmetric: bool       # zero point fixed at 0
    per_channel: bool
    axis: int | None = None
    narrow: bool = False  # signed grid without its most negative value ([-127, 127] at 8 bits)
    # Blocked (weights of 2-D layers only): one scale per output channel (``axis``) *and* per run
    # of ``block_size`` consecutive inputs, i.e. a scale tensor [out, in / block_size].
    block_size: int | None = None

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow else 0)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2 ** self.bits - 1

    def describe(self) -> str:
        kind = ("int" if self.signed else "uint") + str(self.bits)
        gran = f"per-channel axis{self.axis}" if self.per_channel else "per-tensor"
        if self.block_size:
            gran += f" block{self.block_size}"
        sym = "sym" if self.symmetric else "asym"
        return f"{kind} {sym} {gran}"

    def to_json(self) -> dict:
        return asdict(self) | {"qmin": self.qmin, "qmax": self.qmax}


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass (straight-through estimator):
    ``torch.round`` alone has a zero gradient and would cut every path through a quantizer."""
    return x + (torch.round(x) - x).detach()


def scale_grad(t: torch.Tensor, factor: float) -> torch.Tensor:
    """``t`` unchanged in the forward pass, its gradient multiplied by ``factor``."""
    return (t - t * factor).detach() + t * factor


def lsq_fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """The values of ``fake_quantize``, differentiable in ``x`` (straight-through inside the
    clipping range, zero outside) and in ``scale`` (the LSQ step-size gradient, Esser et al.
    2020, scaled by 1 / sqrt(elements per sample * qmax) so step and weight updates balance).

    Runs PyTorch's fused LSQ kernel (2x faster forward+backward than the composite on Lite0's
    largest activations); it multiplies by 1/scale where ``fake_quantize`` divides, so an exact
    tie can round the other way (about 2e-7 of elements) — training only, never the lowering."""
    per_sample = x[0].numel() if x.dim() > 1 else x.numel()
    factor = 1.0 / math.sqrt(max(per_sample * qmax, 1))
    if x.dtype == torch.float32:
        return torch._fake_quantize_learnable_per_tensor_affine(
            x, scale.reshape(1), zero_point.reshape(1).to(x.dtype), qmin, qmax, factor)
    s = scale_grad(scale, factor)
    q = torch.clamp(round_ste(x / s) + zero_point, qmin, qmax)
    return (q - zero_point) * s


LP_NORM = 2.4  # the reference's clipping-search exponent: between MSE and max-error
DEAD_CHANNEL_FLOOR = 1e-3


def _broadcast_shape(t: torch.Tensor, axis: int) -> list[int]:
    shape = [1] * t.dim()
    shape[axis] = -1
    return shape


def search_weight_scale(w: torch.Tensor, spec: QSpec, grid: int = 50, p: float = LP_NORM) -> torch.Tensor:
    """Per-channel symmetric scale minimizing the Lp rounding error over clipping ratios.

    Returns a 1-D scale tensor (one per channel of ``spec.axis``); for a blocked spec the scale
    is [out, in / block_size], one per block of consecutive inputs of a channel."""
    axis = spec.axis or 0
    if spec.block_size:
        rows, cols = w.shape[0], w.shape[1] // spec.block_size
        flat = w.detach().float().reshape(rows * cols, spec.block_size)
        scale = search_weight_scale(flat, QSpec(spec.bits, spec.signed, spec.symmetric, True, 0, spec.narrow),
                                    grid, p)
        return scale.reshape(rows, cols)
    wc = w.detach().float().transpose(0, axis).reshape(w.shape[axis], -1)
    # Floor dead channels (all-zero weights, e.g. a BN gain of 0 folded in) at a small fraction
    # of the layer's largest channel: a near-zero scale would make the int32 bias b / (s_x * s_w)
    # overflow in the runtime. Any scale represents zero weights exactly, so nothing is lost.
    amax = wc.abs().amax(dim=1)
    layer_max = float(amax.max()) if amax.numel() else 0.0
    if not math.isfinite(layer_max):
        raise ValueError("search_weight_scale: the weights hold NaN or infinite values")
    # A layer whose weights are all zero gets the grid of [-1, 1]: exact for its zeros and a
    # scale the int32 bias grid (s_x * s_w) can hold any sane bias on.
    amax = amax.clamp_min(max(layer_max * DEAD_CHANNEL_FLOOR, 1e-8) if layer_max > 0 else 1.0)
    best_err = torch.full_like(amax, float("inf"))
    best_scale = amax / spec.qmax
    for ratio in torch.linspace(1.0, 0.3, grid):
        scale = (amax * ratio / spec.qmax).clamp_min(1e-12)
        err = (fake_quantize(wc, scale[:, None], torch.zeros(()), spec.qmin, spec.qmax) - wc).abs().pow(p).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    return best_scale


def search_activation_range(sample: torch.Tensor, lo: float, hi: float, spec: QSpec,
                            grid: int = 80, p: float = LP_NORM) -> tuple[float, float]:
    """Clipping range [lo', hi'] ⊆ [lo, hi] minimizing the Lp error on ``sample``.

    All candidate ratios are scored in one vectorized pass ([grid, samples])."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)  # the grid must represent 0 exactly (padding, ReLU)
    if hi - lo < 1e-12:
        return lo, hi
    ratios = torch.linspace(1.0, 0.2, grid, dtype=torch.float64)
    los, his = lo * ratios, hi * ratios
    if spec.symmetric:
        scales = (torch.maximum(los.abs(), his.abs()) / spec.qmax).clamp_min(1e-8)
        zps = torch.zeros_like(scales)
    else:
        scales = ((his - los) / (spec.qmax - spec.qmin)).clamp_min(1e-8)
        zps = torch.clamp(torch.round(spec.qmin - los / scales), spec.qmin, spec.qmax)
    x = sample.float()[None, :]
    scales, zps = scales.float(), zps.float()
    err = (fake_quantize(x, scales[:, None], zps[:, None], spec.qmin, spec.qmax) - x).abs().pow(p).mean(1)
    best = int(torch.argmin(err))
    return float(los[best]), float(his[best])


def range_to_qparams(lo: float, hi: float, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for the range [lo, hi] (widened to hold 0). A range that is not
    finite is refused (a NaN/Inf scale would poison the model); an all-zero range (a constant
    zero activation) gets the grid of [0, 1] rather than a scale of ~0, which would push the
    int32 bias of the next layer (bias / (s_x * s_w)) out of range."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"range_to_qparams: the range [{lo}, {hi}] is not finite")
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo == 0.0:
        hi = 1.0
    if spec.symmetric:
        amax = max(abs(lo), abs(hi))
        scale = max(amax / spec.qmax, 1e-8)
        zp = 0.0
    else:
        scale = max((hi - lo) / (spec.qmax - spec.qmin), 1e-8)
        zp = float(min(max(round(spec.qmin - lo / scale), spec.qmin), spec.qmax))
    return torch.tensor(scale, dtype=torch.float32), torch.tensor(zp, dtype=torch.float32)


class WeightQuantizer(nn.Module):
    """Per-channel symmetric fake-quantizer for a layer weight (round-to-nearest).

    ``scale`` is frozen at materialization by the Lp clipping search. Reconstruction methods
    subclass or replace the rounding; the lowering only reads ``int_weight()`` and ``scale``.
    """

    def __init__(self, spec: QSpec, weight: torch.Tensor, layer: str):
        super().__init__()
        self.spec = spec
        self.layer = layer
        finite = torch.isfinite(weight.detach())
        if not bool(finite.all()):
            from fxq.errors import FxqError

            bad = int((~finite).sum())
            raise FxqError(
                f"Layer '{layer}' has {bad} NaN or infinite weight value{'s' if bad != 1 else ''} "
                f"(of {weight.numel()}); it cannot be quantized.",
                "The checkpoint is corrupt or its training diverged: load finite weights.")
        self.register_buffer("scale", search_weight_scale(weight, spec))
        self.enabled = True
        self._cache: tuple | None = None  # (weight identity, fake-quantized weight)

    def _scale_view(self, w: torch.Tensor) -> torch.Tensor:
        if self.spec.block_size:  # [out, in / block] -> [out, in]
            return self.scale.repeat_interleave(self.spec.block_size, dim=1)
        return self.scale.reshape(_broadcast_shape(w, self.spec.axis or 0))

    def int_weight(self, w: torch.Tensor) -> torch.Tensor:
        q = torch.round(w / self._scale_view(w))
        return torch.clamp(q, self.spec.qmin, self.spec.qmax).to(torch.int32)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self._fake_quantize(w)
        # Inference with frozen scales: the quantized weight only changes when weight or scale do.
        key = (w.data_ptr(), w._version, self.scale._version, w.shape)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._fake_quantize(w))
        return self._cache[1]

    def _fake_quantize(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quantize(w, self._scale_view(w), torch.zeros((), device=w.device), self.spec.qmin, self.spec.qmax)

    def describe(self) -> str:
        return f"wq {self.spec.describe()}"

    def extra_repr(self) -> str:
        return f"{self.layer}: {self.spec.describe()}"


class ActQuantizer(nn.Module):
    """Per-tensor fake-quantizer for an activation.

    Modes: ``observe`` (records min/max and a random value sample, passes x through unchanged),
    ``quantize`` (fake-quantizes), ``off``. ``finalize_calibration`` turns observations into
    scale/zero point with the Lp clipping search.
    """

    SAMPLE_PER_CALL = 2048
    SAMPLE_CAP = 1 << 16

    def __init__(self, spec: QSpec, source: str):
        super().__init__()
        self.spec = spec
        self.source = source
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0.0))
        self.mode = "quantize"
        self.calibrated = False
        # Set by reconstruction only: a learnable copy of ``scale`` (kept out of the module's
        # parameters so state dicts and the lowering only ever see the frozen buffer), and the
        # QDrop probability of passing an element through unquantized while training.
        self.__dict__["learned_scale"] = None
        self.drop_prob = 0.0
        self._reset_observations()

    def _reset_observations(self):
        self._lo = float("inf")
        self._hi = float("-inf")
        self._samples: list[torch.Tensor] = []
        self._sampled = 0
        self.nonfinite = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "observe":
            self._observe(x)
            return x
        if self.mode == "off":
            return x
        if torch.is_grad_enabled() and (x.requires_grad or self.learned_scale is not None):
            scale = self.scale if self.learned_scale is None else self.learned_scale
            q = lsq_fake_quantize(x, scale, self.zero_point, self.spec.qmin, self.spec.qmax)
            if self.drop_prob > 0.0:
                q = torch.where(torch.rand_like(x) < self.drop_prob, x, q)
            return q
        return fake_quantize(x, self.scale, self.zero_point, self.spec.qmin, self.spec.qmax)

    def start_learning(self) -> torch.nn.Parameter:
        """A trainable step size initialised from the calibrated one (LSQ)."""
        p = nn.Parameter(self.scale.detach().clone())
        self.__dict__["learned_scale"] = p
        return p

    def stop_learning(self) -> None:
        """Freeze the learned step size into ``scale`` (floored: a step must stay positive)."""
        p = self.learned_scale
        if p is not None and bool(torch.isfinite(p.detach()).all()):  # diverged: keep the calibrated step
            with torch.no_grad():
                self.scale.copy_(p.detach().clamp_min(1e-8))
        self.__dict__["learned_scale"] = None
        self.drop_prob = 0.0

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).float()
        if flat.numel() == 0:  # an empty tensor carries no range
            return
        lo, hi = torch.aminmax(flat)
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi)):  # rare: pay for the mask only then
            finite = torch.isfinite(flat)
            self.nonfinite += int((~finite).sum())
            flat = flat[finite]
            if flat.numel() == 0:
                return
            lo, hi = float(flat.min()), float(flat.max())
        self._lo = min(self._lo, lo)
        self._hi = max(self._hi, hi)
        if self._sampled < self.SAMPLE_CAP:
            take = min(self.SAMPLE_PER_CALL, flat.numel())
            # a strided, seeded-offset sample: deterministic and cheaper than random indices; the
            # stride is coprime with every dimension but the batch, so it walks through all channels
            # (a stride of 96 over [8, 64, 384] saw 4 of 384 channels and missed the outliers)
            step = max(flat.numel() // take, 1)
            while step > 1 and any(math.gcd(step, int(d)) > 1 for d in x.shape[1:]):
                step -= 1
            offset = (len(self._samples) * 7919) % step
            self._samples.append(flat[offset::step][:take].cpu().clone())
            self._sampled += take

    def finalize_calibration(self, search: bool = True) -> None:
        if self._lo == float("inf"):  # never saw a finite value: keep a harmless unit grid
            lo, hi = 0.0, 1.0
        else:
            lo, hi = self._lo, self._hi
            if search and self._samples:
                lo, hi = search_activation_range(torch.cat(self._samples), lo, hi, self.spec)
        scale, zp = range_to_qparams(lo, hi, self.spec)
        self.scale.copy_(scale)
        self.zero_point.copy_(zp)
        self.calibrated = True
        self.observed_range = (self._lo, self._hi)
        self._samples = []

    def describe(self) -> str:
        return f"aq {self.spec.describe()}"

    def extra_repr(self) -> str:
        return f"{self.source}: {self.spec.describe()}"
