"""Options of ``fxq compile`` / ``fxq.compile_model``: one dataclass the CLI fills and the
pipeline reads, so Python users and the CLI get the same defaults."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

BACKENDS = ("onnx-qdq", "tensorrt")
METHODS = ("rtn", "gptq", "adaround", "brecq", "qdrop")
GRANULARITIES = ("layer", "block", "stage", "net")
LOSSES = ("mse", "fisher")
PRESETS = ("fast", "paper")
TUNINGS = ("joint", "two-stage")
PREPROCESS = ("imagenet", "none")
SEARCHES = ("ga", "exact")
TARGETS = ("ort-cpu", "bitserial", "trt-t4", "trt-a100", "trt-h100", "trt-orin")  # = fxq.cost_models.TARGETS (kept torch-free)
WEIGHT_RANGES = ("auto", "full", "reduced")


@dataclass
class CompileOptions:
    out_dir: Path = Path("fxq-out")
    backend: str = "onnx-qdq"
    target: str = "ort-cpu"
    weight_bits: int = 8
    act_bits: int = 8            # 32 = float activations (weight-only)
    first_last_bits: int = 8     # first conv and last linear stay at this width (0 = no exception)
    method: str = "rtn"
    granularity: str = "block"
    loss: str = "mse"
    iters: int | None = None
    drop_prob: float = 0.5       # qdrop: chance an activation stays float while a region trains
    tuning: str = "joint"        # reconstruction: rounding and step sizes "joint" or "two-stage"
    preset: str = "fast"
    device: str = "auto"         # where reconstruction trains: auto (CUDA if available) | cpu | cuda[:N]
    seed: int = 0
    calib_size: int | None = None
    preprocess: str = "imagenet"
    weight_range: str = "auto"  # 8-bit weights: full int8, or 7-bit magnitude where int8 kernels saturate
    smooth: bool = True  # move outlier channels of linear layers' inputs into their weights (smooth_activations)
    bias_correction: bool = True  # remove the mean output shift weight rounding causes, per channel
    holdout: int = 32            # calibration samples held back to verify fidelity
    bits: tuple[int, ...] | None = None  # mixed precision: candidate integer bit-widths (--bits)
    budget_ms: float | None = None       # mixed precision: latency budget on `target` (--budget-ms)
    batch: int = 1                       # the batch size the budget refers to
    search: str = "ga"                   # ga | exact
    pins: tuple = ()                     # ((layer glob, precision), ...) from --pin NAME=BITS
    latency_table: str | None = None     # trtexec --exportProfile JSON for the cost model
    sensitivity_samples: int = 64        # calibration samples the sensitivity measurement uses
    budget_check_rounds: int = 3         # ort-cpu: timings of the chosen assignment (0: trust the tables)
    layer_precision: dict | None = None  # FX node name -> bits or "float" (set by the search)
    print_diff: bool = False
    print_summary: bool = False
    print_after: tuple[str, ...] = ()
    debug: bool = False
    json: bool = False
    resume: bool = False
    extra: dict = field(default_factory=dict)
