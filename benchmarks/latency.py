"""ONNX Runtime CPU latency of fxq's int8 graphs against float and ORT's own quantizer, per model.

    .venv/bin/python benchmarks/latency.py            # all four models, batch 1 and 8 (~13-20 min, 2 cores)
    .venv/bin/python benchmarks/latency.py --models resnet18 --batches 1 --runs 50 --calib 16   # quick

What it measures: wall-clock time of one ``InferenceSession.run`` call (inputs in memory,
outputs fetched) on ONNX Runtime's CPU provider, every session with the same settings
(``fxq.ort_timing.session``: all graph optimizations, ``--threads`` intra-op threads, default 2,
one inter-op thread, sequential execution). Per model and batch size the variants below are timed
side by side in one process, interleaved: ``--warmup`` untimed runs each, then ``--runs`` timed
runs each, interleaved one run per variant per round in a rotating order (``fxq.ort_timing.timing_report``), so a load
spike on a shared machine hits every variant alike. Reported: the median (and p10/p90/min) per
variant, and the ratios fxq-int8 / quantize_static (≤ 1 means fxq is at least as fast) and
float / fxq-int8 (speed-up), the same two for the TensorRT-flavoured graph.

Variants (W8A8 throughout):

- ``float``: fxq's own float lowering of the captured model (``lower_qdq(..., quantized=False)``,
  the same graph fxq quantizes);
- ``ORT quantize_static``: ONNX Runtime's ``quantize_static`` on that float file, in its documented
  x86 configuration (``benchmarks/baselines.py``: QDQ, per-channel, MinMax, uint8 activations,
  int8 weights, after ``quant_pre_process``);
- ``fxq onnx-qdq``: ``fxq.pipeline.compile_model`` with fxq's defaults (rtn with searched clipping
  and bias correction, ``backend="onnx-qdq"``; weight range ``auto``, i.e. 7-bit weight magnitude
  on CPUs without VNNI);
- ``fxq tensorrt``: the same with ``backend="tensorrt"`` (the explicit-quantization graph for
  TensorRT, timed here in ONNX Runtime). While the installed fxq does not implement a backend,
  ``compile_model`` raises ``FxqError``; that row is recorded as "n/a (reason)" and the run goes on.

Models: ``lite0`` (EfficientNet-Lite0 with its ImageNet weights, inputs in [-1, 1]), and
torchvision's ``resnet18``, ``resnet50``, ``mobilenet_v2`` with random weights
(``torch.manual_seed(0)`` before construction; nothing is downloaded; ImageNet mean/std inputs).
Weights do not change the latency of these graphs. Calibration: ``--calib`` crops of the calib
photos (``photo_crops("calib", N, seed=0)``); timing inputs and the batch check use crops of the
other photos (``photo_crops("eval", max(batches), seed=1)``).

Batch sizes: fxq's ONNX graphs have the static batch of the capture's example input, and
compiling again at batch 8 would calibrate differently (activation statistics are gathered per
batch; on ResNet-18 the activation scales moved by up to 14 %), i.e. it would time a different
quantized model. So every variant is built once at batch 1 and timed at batch B > 1 as the *same
file* with its input/output batch dimension restated to B (``fxq.ort_timing.with_static_batch``;
the graphs are convolutional networks whose classifier reshape is ``Flatten(axis=1)``). Each
rebatched model is checked before it is timed: its outputs on B different crops must match the
batch-1 model run on each crop alone (max |Δ| ≤ 1e-3 of the output range). If that fails (a graph
that hard-codes its batch), the variant is compiled again at batch B instead, and the JSON says so.

Output in ``--out`` (default ``bench-out/latency``): ``latency.json`` (machine, settings, every
timing summary, how each batch was obtained, build times), ``latency.md`` (one table), and per
model ``MODEL/b1/``: ``float.onnx``, ``ort_qs.onnx``, ``fxq-onnx-qdq/`` and ``fxq-tensorrt/``
(``model.onnx``, ``model.pt2``, ``report.json``). Built artifacts are cached there: a later run
reuses a file whose stamp (model, batch, calibration size, versions of torch / onnx /
onnxruntime, and a hash of fxq's sources) matches, so only the timing is repeated; ``--rebuild``
forces a fresh build. Failed builds are never cached.

Default run: four models, batches 1 and 8, 100 timed runs per variant after 10 warm-up runs,
64 calibration crops. On 2 quiet cores, with three variants (tensorrt n/a): about 5 min of
building (one ``compile_model`` per model: 40-50 s, ResNet-50 about 2 min) and 7-8 min of timing
(ResNet-50 at batch 8, about 2.5 s per round of one run each, dominates): about 13 min in all.
Once the tensorrt backend lands, its compiles and runs add about 7 min. A loaded machine takes
longer; the medians stay comparable within a (model, batch) group because of the interleaving.

Threads: unless ``OMP_WAIT_POLICY`` is already set, this script sets it to ``PASSIVE`` before torch
loads (see benchmarks/quality.py). The compile side uses torch's default threads.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch (and its OpenMP runtime) loads

import argparse  # noqa: E402
import datetime  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baselines import cpu_int8_features, ort_quantize_static  # noqa: E402

from fxq.errors import FxqError  # noqa: E402
from fxq.ort_timing import (format_report, optimized_op_counts, session, timing_report,  # noqa: E402
                            with_static_batch)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INPUT_CHW = (3, 224, 224)
RUNS_PER_ROUND = 1       # timed runs of one variant before the next variant's turn: a load spike
                         # on the shared machine then lands on every variant alike
REBATCH_RTOL = 1e-3      # rebatched vs batch-1 outputs: max |Δ| <= this * max |batch-1 output|


@dataclass(frozen=True)
class ModelDef:
    description: str
    make: Callable[[], torch.nn.Module]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _lite0():
    from fxq.examples.efficientnet_lite0 import efficientnet_lite0

    return efficientnet_lite0(pretrained=True)


def _torchvision(name: str) -> Callable[[], torch.nn.Module]:
    def make():
        import torchvision

        torch.manual_seed(0)
        return getattr(torchvision.models, name)(weights=None)
    return make


MODELS = {
    "lite0": ModelDef("EfficientNet-Lite0, ImageNet weights", _lite0, (0.5,) * 3, (0.5,) * 3),
    "resnet18": ModelDef("torchvision ResNet-18, random init (seed 0)", _torchvision("resnet18"),
                         IMAGENET_MEAN, IMAGENET_STD),
    "resnet50": ModelDef("torchvision ResNet-50, random init (seed 0)", _torchvision("resnet50"),
                         IMAGENET_MEAN, IMAGENET_STD),
    "mobilenet_v2": ModelDef("torchvision MobileNetV2, random init (seed 0)", _torchvision("mobilenet_v2"),
                             IMAGENET_MEAN, IMAGENET_STD),
}

# key -> (label, what is built)
VARIANTS = {
    "float": "float",
    "qs": "ORT quantize_static",
    "fxq": "fxq onnx-qdq",
    "trt": "fxq tensorrt",
}
FXQ_BACKENDS = {"fxq": "onnx-qdq", "trt": "tensorrt"}


class BuildFailed(Exception):
    """A variant could not be built; ``status`` is "n/a" (FxqError: not implemented / not
    supported) or "error" (anything else)."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def source_hash() -> str:
    """Hash of fxq's sources (and the baseline's), so a cached artifact is reused only if the
    code that built it is unchanged."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    files = [p for d in ("fxq", "backends", "passes", "examples") for p in sorted((root / d).rglob("*.py"))]
    files.append(root / "benchmarks" / "baselines.py")
    for p in files:
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _versions() -> dict:
    import onnx
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


class Artifacts:
    """Builds (or reuses) one model's ONNX variants at a given static batch, under OUT/MODEL/bB/."""

    def __init__(self, name: str, mdef: ModelDef, calib: torch.Tensor, out: Path, key: dict, rebuild: bool):
        self.name, self.mdef, self.calib, self.out = name, mdef, calib, out
        self.key, self.rebuild = key, rebuild
        self._module = None
        self.info: dict[str, dict] = {}  # "variant@batch" -> build info (json)
        self._failed: dict[str, BuildFailed] = {}

    @property
    def module(self) -> torch.nn.Module:
        if self._module is None:
            self._module = self.mdef.make().eval()
        return self._module

    def _paths(self, variant: str, batch: int) -> tuple[Path, Path]:
        d = self.out / f"b{batch}"
        target = {"float": d / "float.onnx", "qs": d / "ort_qs.onnx",
                  "fxq": d / "fxq-onnx-qdq" / "model.onnx", "trt": d / "fxq-tensorrt" / "model.onnx"}[variant]
        return target, d / f"{variant}.stamp.json"

    def path(self, variant: str, batch: int) -> Path:
        """The ONNX file of ``variant`` at static ``batch``; raises BuildFailed."""
        tag = f"{variant}@{batch}"
        if tag in self._failed:
            raise self._failed[tag]
        target, stamp_path = self._paths(variant, batch)
        stamp = dict(self.key, variant=variant, batch=batch)
        if not self.rebuild and target.exists() and stamp_path.exists():
            try:
                old = json.loads(stamp_path.read_text())
            except (OSError, ValueError):
                old = None
            if old is not None and old.get("key") == stamp:
                self.info.setdefault(tag, dict(old.get("info", {}), cached=True))
                return target
        stamp_path.unlink(missing_ok=True)
        t0 = time.perf_counter()
        print(f"  building {VARIANTS[variant]} at batch {batch} ...", flush=True)
        try:
            info = self._build(variant, batch, target)
        except BuildFailed as exc:
            self._failed[tag] = exc
            raise
        except FxqError as exc:
            self._failed[tag] = BuildFailed("n/a", exc.what)
            raise self._failed[tag] from None
        except Exception as exc:  # noqa: BLE001 - recorded as an error row, traceback on stderr
            traceback.print_exc()
            self._failed[tag] = BuildFailed("error", f"{type(exc).__name__}: {exc}")
            raise self._failed[tag] from None
        info["build_s"] = round(time.perf_counter() - t0, 2)
        info["bytes"] = target.stat().st_size
        stamp_path.parent.mkdir(parents=True, exist_ok=True)
        stamp_path.write_text(json.dumps({"key": stamp, "info": info}, indent=2))
        self.info[tag] = dict(info, cached=False)
        return target

    def _example(self, batch: int) -> tuple[torch.Tensor]:
        return (torch.zeros((batch,) + INPUT_CHW),)

    def _build(self, variant: str, batch: int, target: Path) -> dict:
        target.parent.mkdir(parents=True, exist_ok=True)
        if variant == "float":
            from fxq.backends.lower_qdq import lower_qdq
            from fxq.capture import capture

            gm = capture(self.module, self._example(batch))
            target.write_bytes(lower_qdq(gm, quantized=False).SerializeToString())
            return {"how": "fxq capture + lower_qdq(quantized=False)"}
        if variant == "qs":
            try:
                float_path = self.path("float", batch)
            except BuildFailed as exc:
                raise BuildFailed(exc.status, f"no float model: {exc.reason}") from None
            ort_quantize_static(str(float_path), self.calib.numpy(), str(target))
            return {"how": "benchmarks/baselines.py ort_quantize_static (QDQ, per-channel, MinMax, U8 act, S8 weight)"}
        from fxq.options import CompileOptions
        from fxq.pipeline import compile_model

        out_dir = target.parent
        if out_dir.exists():
            shutil.rmtree(out_dir)
        opts = CompileOptions(out_dir=out_dir, backend=FXQ_BACKENDS[variant], holdout=0, seed=0)
        report = compile_model((self.module, self._example(batch)), self.calib, opts)
        if not target.exists():  # a backend that names its file differently
            found = sorted(out_dir.glob("*.onnx"))
            if not found:
                raise BuildFailed("error", f"compile_model wrote no .onnx file in {out_dir}")
            target = found[0]
            shutil.copyfile(target, out_dir / "model.onnx")
        return {"how": f"fxq.pipeline.compile_model(backend={FXQ_BACKENDS[variant]!r}, method=rtn, W8A8)",
                "weight_range": report.get("weight_range"), "compile_timings_s": report.get("timings_s"),
                "onnx_vs_fake_quant": (report.get("verification") or {}).get("onnx_vs_fake_quant")}


def _outputs(sess, x: np.ndarray) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.asarray(sess.run(None, {name: np.ascontiguousarray(x)})[0])


def check_rebatched(sess_b, sess_1, x: np.ndarray) -> dict:
    """The rebatched session's outputs on ``x`` (B samples) vs the batch-1 session's, one sample
    at a time. Returns {ok, max_abs_diff, ref_max_abs, reason}."""
    ref = np.concatenate([_outputs(sess_1, x[i:i + 1]) for i in range(len(x))])
    got = _outputs(sess_b, x)
    if got.shape != ref.shape:
        return {"ok": False, "reason": f"output shape {list(got.shape)}, expected {list(ref.shape)}"}
    diff = float(np.abs(got.astype(np.float64) - ref).max())
    scale = float(np.abs(ref).max())
    ok = diff <= REBATCH_RTOL * max(scale, 1e-6)
    return {"ok": ok, "max_abs_diff": diff, "ref_max_abs": scale,
            "reason": None if ok else f"max |Δ| {diff:.3g} > {REBATCH_RTOL:g} × {scale:.3g}"}


def _ratio(rep: dict, a: str, b: str) -> float | None:
    if a in rep and b in rep:
        return rep[a]["median_ms"] / rep[b]["median_ms"]
    return None


def machine_info(threads: int) -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "int8_path": cpu_int8_features(),
            "platform": platform.platform(), "python": platform.python_version(), **_versions(),
            "ort_intra_op_threads": threads, "torch_threads": torch.get_num_threads(),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
            "loadavg_start": list(os.getloadavg())}


def _fmt_ms(row: dict) -> str:
    if row.get("status") == "ok":
        return f"{row['median_ms']:.2f}"
    return row.get("status", "–")


def _fmt_ratio(r: float | None, times: bool = False) -> str:
    if r is None:
        return "–"
    return f"{r:.2f}×" if times else f"{r:.3f}"


def markdown(result: dict) -> str:
    s, m = result["settings"], result["machine"]
    lines = ["# ONNX Runtime CPU latency across models", "",
             f"`benchmarks/latency.py`, {result['started']}. CPU: {m['cpu']} ({m['cores']} cores, int8 path: "
             f"{m['int8_path']}); ONNX Runtime {m['onnxruntime']} CPU provider, {s['threads']} intra-op "
             f"threads; median of {s['runs']} runs per variant after {s['warmup']} warm-up runs, interleaved "
             f"in rounds of {RUNS_PER_ROUND}; W8A8; {s['calib']} calibration crops. Load average at start: "
             f"{', '.join(f'{v:.2f}' for v in m['loadavg_start'])}.", "",
             "| model | batch | float ms | quantize_static ms | fxq onnx-qdq ms | fxq tensorrt ms "
             "| fxq / quantize_static | float / fxq | tensorrt / quantize_static | float / tensorrt |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    notes: dict[str, list[str]] = {}
    for name, mres in result["models"].items():
        for b, bres in mres["batches"].items():
            v, r = bres["variants"], bres["ratios"]
            lines.append(f"| {name} | {b} | " + " | ".join(_fmt_ms(v.get(k, {})) for k in VARIANTS) + " | "
                         f"{_fmt_ratio(r.get('fxq/qs'))} | {_fmt_ratio(r.get('float/fxq'), True)} | "
                         f"{_fmt_ratio(r.get('trt/qs'))} | {_fmt_ratio(r.get('float/trt'), True)} |")
            for k, row in v.items():
                if row.get("status") != "ok":
                    notes.setdefault(f"{VARIANTS[k]}: {row['status']} ({row['reason']})", []).append(f"{name} b{b}")
    if notes:
        lines += [""] + [f"- {what}: {', '.join(where)}" for what, where in notes.items()]
    same = {name: mres.get("same_kernels_as_quantize_static") for name, mres in result["models"].items()}
    if any(v is not None for v in same.values()):
        lines += ["", "After ONNX Runtime's graph optimizer, fxq onnx-qdq runs the same op types and counts as "
                  "quantize_static (so a latency ratio away from 1 is machine noise) on: "
                  + (", ".join(n for n, v in same.items() if v) or "none")
                  + ("; different ops on: " + ", ".join(n for n, v in same.items() if v is False)
                     if any(v is False for v in same.values()) else "") + " (`optimized_ops` in latency.json)."]
    how = sorted({f"{VARIANTS[k]}: {h}" for mres in result["models"].values()
                  for bres in mres["batches"].values() for k, h in bres["batch_handling"].items()
                  if not h.startswith("built at batch 1") and not h.startswith("rebatched")})
    if any(int(b) > 1 for mres in result["models"].values() for b in mres["batches"]):
        lines += ["", "Batch > 1: each variant's batch-1 file with its batch dimension restated "
                  "(`with_static_batch`), outputs checked against batch-1 runs."
                  + (" Exceptions: " + "; ".join(how) if how else "")]
    return "\n".join(lines) + "\n"


def _csv_models(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in MODELS]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"unknown models {bad}; choose from {', '.join(MODELS)}")
    return items


def _csv_ints(text: str) -> list[int]:
    try:
        items = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not items or any(b < 1 for b in items):
        raise argparse.ArgumentTypeError("batch sizes must be >= 1")
    return sorted(set(items))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=_csv_models, default=list(MODELS),
                    help=f"comma-separated, from {','.join(MODELS)} (default: all)")
    ap.add_argument("--batches", type=_csv_ints, default=[1, 8], help="batch sizes (default 1,8)")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    ap.add_argument("--runs", type=int, default=100, help="timed runs per variant and batch (default 100)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed runs per variant first (default 10)")
    ap.add_argument("--calib", type=int, default=64, help="calibration crops (default 64)")
    ap.add_argument("--out", default="bench-out/latency")
    ap.add_argument("--rebuild", action="store_true", help="ignore cached artifacts in --out")
    args = ap.parse_args(argv)
    if args.threads < 1 or args.runs < 1 or args.calib < 1:
        ap.error("--threads, --runs and --calib must be >= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from fxq.examples.photos import photo_crops

    t_start = time.perf_counter()
    key = {"calib": args.calib, "calib_seed": 0, "source": source_hash(), **_versions()}
    result = {"started": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": machine_info(args.threads),
              "settings": {"models": args.models, "batches": args.batches, "threads": args.threads,
                           "runs": args.runs, "warmup": args.warmup, "runs_per_round": RUNS_PER_ROUND,
                           "calib": args.calib, "rebatch_rtol": REBATCH_RTOL, "source_hash": key["source"]},
              "models": {}}
    failed = False
    print(f"ONNX Runtime CPU, {args.threads} intra-op threads, {args.runs} runs per variant after "
          f"{args.warmup} warm-up, interleaved; int8 path: {result['machine']['int8_path']}", flush=True)

    for name in args.models:
        mdef = MODELS[name]
        print(f"\n### {name}: {mdef.description}  [{time.perf_counter() - t_start:.0f} s]", flush=True)
        calib = photo_crops("calib", args.calib, seed=0, mean=mdef.mean, std=mdef.std)
        x_all = photo_crops("eval", max(args.batches), seed=1, mean=mdef.mean, std=mdef.std).numpy()
        arts = Artifacts(name, mdef, calib, out / name, dict(key, model=name), args.rebuild)
        mres = {"description": mdef.description, "artifacts": arts.info, "batches": {}}
        result["models"][name] = mres

        # every variant at batch 1: the source of every batch size
        sess1: dict[str, object] = {}
        status1: dict[str, dict] = {}
        for v in VARIANTS:
            try:
                sess1[v] = session(arts.path(v, 1), args.threads)
            except BuildFailed as exc:
                status1[v] = {"status": exc.status, "reason": _short(exc.reason)}
            except Exception as exc:  # noqa: BLE001 - ORT refused the file
                traceback.print_exc()
                status1[v] = {"status": "error", "reason": _short(f"ONNX Runtime: {type(exc).__name__}: {exc}")}
            if status1.get(v, {}).get("status") == "error":
                failed = True

        # what ONNX Runtime runs for each int8 file: equal counts mean equal kernels
        mres["optimized_ops"] = {v: optimized_op_counts(arts.path(v, 1)) for v in ("qs", "fxq")
                                 if v in sess1}
        if len(mres["optimized_ops"]) == 2:
            same = mres["optimized_ops"]["qs"] == mres["optimized_ops"]["fxq"]
            mres["same_kernels_as_quantize_static"] = same
            print(f"  after ONNX Runtime's optimizer, fxq onnx-qdq and quantize_static run "
                  f"{'the same ops' if same else 'different ops'}: {mres['optimized_ops']['fxq']}"
                  + ("" if same else f" vs {mres['optimized_ops']['qs']}"), flush=True)

        for b in args.batches:
            sessions, rows, handling = {}, {}, {}
            for v in VARIANTS:
                if v in status1:
                    rows[v] = dict(status1[v])
                    continue
                if b == 1:
                    sessions[v], handling[v] = sess1[v], "built at batch 1"
                    continue
                try:
                    s = session(with_static_batch(arts.path(v, 1), b), args.threads)
                    check = check_rebatched(s, sess1[v], x_all[:b])
                except Exception as exc:  # noqa: BLE001 - e.g. a hard-coded batch ORT rejects
                    s, check = None, {"ok": False, "reason": _short(f"{type(exc).__name__}: {exc}")}
                if check["ok"]:
                    sessions[v] = s
                    handling[v] = (f"rebatched batch-1 file, outputs match per-sample batch-1 runs "
                                   f"(max |Δ| {check['max_abs_diff']:.2g})")
                    continue
                print(f"  {VARIANTS[v]}: rebatching to {b} failed ({check['reason']}); compiling at batch {b}",
                      flush=True)
                try:
                    sessions[v] = session(arts.path(v, b), args.threads)
                    handling[v] = f"compiled at batch {b} (rebatching failed: {check['reason']})"
                except BuildFailed as exc:
                    rows[v] = {"status": exc.status, "reason": _short(exc.reason)}
                    failed |= exc.status == "error"
                except Exception as exc:  # noqa: BLE001
                    traceback.print_exc()
                    rows[v] = {"status": "error", "reason": _short(f"ONNX Runtime: {type(exc).__name__}: {exc}")}
                    failed = True
            print(f"\n{name}, batch {b}  [{time.perf_counter() - t_start:.0f} s]", flush=True)
            rep = {}
            if sessions:
                rounds = max(1, args.runs // RUNS_PER_ROUND)
                rep = timing_report(sessions, x_all[:b], threads=args.threads, warmup=args.warmup,
                                    runs=args.runs, rounds=rounds)
                print(format_report({VARIANTS[k]: r for k, r in rep.items()}))
            for k, r in rep.items():
                r.pop("speedup_vs_first", None)
                rows[k] = dict(r, status="ok")
            ratios = {"fxq/qs": _ratio(rep, "fxq", "qs"), "float/fxq": _ratio(rep, "float", "fxq"),
                      "trt/qs": _ratio(rep, "trt", "qs"), "float/trt": _ratio(rep, "float", "trt")}
            for lbl, a, q in (("fxq onnx-qdq", "fxq/qs", "float/fxq"), ("fxq tensorrt", "trt/qs", "float/trt")):
                v = "fxq" if a == "fxq/qs" else "trt"
                if rows.get(v, {}).get("status") != "ok":
                    print(f"{lbl}: {rows[v]['status']} ({rows[v]['reason']})")
                    continue
                print(f"{lbl} / quantize_static median: {_fmt_ratio(ratios[a])}; "
                      f"speed-up over float: {_fmt_ratio(ratios[q], True)}")
            mres["batches"][str(b)] = {"variants": {k: rows[k] for k in VARIANTS if k in rows},
                                       "ratios": ratios, "batch_handling": handling}
            # written after every (model, batch): a long run can be followed
            result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
            result["machine"]["loadavg_now"] = list(os.getloadavg())
            (out / "latency.json").write_text(json.dumps(result, indent=2))
            (out / "latency.md").write_text(markdown(result))
        del sess1

    print(f"\n{markdown(result)}")
    print(f"wrote {out / 'latency.json'} and {out / 'latency.md'}  [{time.perf_counter() - t_start:.0f} s]")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
