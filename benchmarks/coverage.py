"""Coverage: every torchvision classification model (and two detection backbones) through fxq.

    .venv/bin/python benchmarks/coverage.py [--models 'resnet*,vit_b_16'] [--timeout 900]
        [--out docs/coverage.md] [--work bench-out/coverage] [--calib 8]
        [--resume-rows [--retry-failed] [--rerun GLOBS]]

Models: ``torchvision.models.list_models(module=torchvision.models)`` (random weights, nothing
is ever downloaded) plus the backbone + FPN of Faster R-CNN with ResNet-50 and MobileNetV3-Large
(``fasterrcnn_*_fpn(weights=None, weights_backbone=None).backbone``: a ``BackboneWithFPN`` that
returns an ``OrderedDict`` of feature maps, so a graph with several outputs). ``--models`` takes
comma-separated globs over those names (the backbones are ``fasterrcnn_resnet50_fpn.backbone``
and ``fasterrcnn_mobilenet_v3_large_fpn.backbone``).

Each model runs in its own subprocess (``--timeout`` seconds, default 900), so a hang, a crash
or running out of memory fails that row only and every model starts with fresh memory:

* input 1×3×224×224 — or, where the model rejects 224, the smallest ``min_size`` its torchvision
  weights metadata declares (every model of torchvision 0.29 takes 224; a row at another size
  would say so in the table);
* ``--calib`` (default 8) synthetic calibration samples, ``torch.randn`` with seed 0;
* all-zero weight matrices (torchvision's ViT heads) given random values
  (:func:`reinit_zero_weights`), so no model's output is identically zero;
* BatchNorm running statistics set from those samples (:func:`settle_batchnorm`: random-weight
  networks at their initial BatchNorm statistics shrink activations towards zero with depth);
* ``fxq.pipeline.compile_model`` with ``CompileOptions(method="rtn", weight_bits=8, act_bits=8,
  holdout=0)`` into a temporary folder: capture → canonicalize → fold_batchnorm → detect_blocks →
  annotate_qspecs → materialize_quantizers → calibrate → bias correction → ONNX QDQ → ONNX
  Runtime. With ``holdout=0`` verification reruns the calibration samples: it is a parity check
  of ONNX Runtime against fxq's own fake-quant PyTorch model (the report's
  ``verification.onnx_vs_fake_quant``), which is the fact this table is about. For a model with
  several outputs, every output is compared (the report compares the first).
* one torch thread and one ONNX Runtime thread (this script is meant to share a 2-core machine),
  and the report's latency stage is cut to one untimed run of each model (it still proves that
  the float ONNX model runs); latency is not what this table measures.

A model *passes* when the compile finishes (``model.onnx`` passes ``onnx.checker``, runs in ONNX
Runtime, ``model.pt2`` is written) and ONNX Runtime agrees with the fake-quant model on every
output: identical outputs, or a mean cosine similarity (per sample, averaged) ≥ 0.99, or a
disagreement 1 - cosine at most twice the *noise floor*'s. The noise floor is fxq's fake-quant
model against itself on the same samples moved by a relative 1e-6 (a few float32 ulps): the
fake-quant model computes each layer in float and ONNX Runtime in integers (or in float with
another summation order), so values sitting on a rounding boundary land one step apart; a deep
network with random weights amplifies such one-step differences layer after layer (measured on
EfficientNet-B1: ONNX Runtime with all its fusions off diverges from the fake-quant model exactly
as much as with them on, and as much as the fake-quant model from itself under the 1e-6 move,
cosine 0.986). A lowering error is not hidden by this: it shows at the first layer it touches
and far above the floor. Top-1 agreement (classifiers) and the max abs difference are reported
as well; random-weight classifiers often have near-tied logits, so top-1 on 8 samples is noisy.

Output: ``--work`` holds ``results.jsonl`` (one row per model, appended as each finishes;
``--resume-rows`` keeps finished rows and skips those models, except failed ones with
``--retry-failed`` and those matching ``--rerun``) and the per-model logs; ``--out`` (markdown,
all rows of ``results.jsonl`` that match ``--models``) is rewritten after every row.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see benchmarks/quality.py)

import argparse  # noqa: E402
import datetime  # noqa: E402
import fnmatch  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DETECTION_BACKBONES = ("fasterrcnn_resnet50_fpn.backbone", "fasterrcnn_mobilenet_v3_large_fpn.backbone")
DEFAULT_SIZE = 224
COSINE_PASS = 0.99
# The noise floor: fxq's own fake-quant model on the samples times (1 + FLOOR_EPS * randn), a
# perturbation of a few float32 ulps — the size of the differences two float kernels' summation
# orders make. ONNX Runtime passes when it is within FLOOR_FACTOR of that floor.
FLOOR_EPS = 1e-6
FLOOR_FACTOR = 2.0


def all_models() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models)) + list(DETECTION_BACKBONES)


def select(names: list[str], patterns: str | None) -> list[str]:
    if not patterns:
        return names
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in pats)]


def size_hint(name: str) -> float:
    """Parameter count from the weights metadata (nothing downloaded), to run small models first."""
    import torchvision

    base = name.split(".")[0]
    try:
        weights = list(torchvision.models.get_model_weights(base))
    except (ValueError, KeyError):
        return 0.0
    return float(weights[0].meta.get("num_params", 0)) if weights else 0.0


def min_input_size(name: str) -> int:
    """The smallest input size any torchvision weights of the architecture declare (their
    ``min_size`` metadata; reading an enum downloads nothing), 0 if none."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name.split(".")[0])
    except (ValueError, KeyError):
        return 0
    return min((max(w.meta.get("min_size", (0, 0))) for w in weights), default=0)


def valid_size(module, size: int) -> bool:
    import torch

    try:
        with torch.no_grad():
            module(torch.zeros(1, 3, size, size))
        return True
    except Exception:  # noqa: BLE001 — any failure means "not at this size"
        return False


def build_model(name: str, size: int | None = None):
    """``(module, example_inputs)`` with random weights (seed 0), at ``size``, else 224, else
    (where the model rejects 224) its own minimum size."""
    import torch
    import torchvision

    torch.manual_seed(0)
    if name in DETECTION_BACKBONES:
        from torchvision.models import detection

        factory = getattr(detection, name.split(".")[0])
        module = factory(weights=None, weights_backbone=None).backbone
    else:
        module = torchvision.models.get_model(name, weights=None)
    module.eval()
    reinit_zero_weights(module)
    if size is None:
        size = DEFAULT_SIZE
        if not valid_size(module, size) and min_input_size(name) > 0:
            size = min_input_size(name)
    return module, (torch.zeros(1, 3, size, size),)


def reinit_zero_weights(module) -> int:
    """Give every all-zero weight matrix random values (seed 0). torchvision zero-initialises some
    classifier heads (the ViTs'), so with random weights their logits are identically zero and a
    parity check of the quantized model would compare zeros with zeros."""
    import torch

    count = 0
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2 and name.endswith("weight") and not p.any():
                torch.nn.init.kaiming_uniform_(p, a=5 ** 0.5)
                count += 1
    return count


def settle_batchnorm(module, data) -> int:
    """Set every BatchNorm's running statistics from ``data`` (one pass, BatchNorm layers alone in
    train mode, cumulative average). Random-weight networks with BatchNorm at its initial
    statistics (mean 0, var 1) shrink their activations layer after layer — MobileNetV3-Small's
    logits end near 1e-10 — so both quantized models would just agree on zero; with statistics of
    the data every block sees unit-scale activations, as in a trained network. Weights stay random."""
    import torch
    from torch import nn

    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        with torch.no_grad():
            module(data)
    finally:
        module.eval()
    return len(bns)


def _outputs(value) -> list:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    out = []
    for v in value:
        out += _outputs(v)
    return out


def agrees(row: dict) -> bool:
    """ONNX Runtime agrees with the fake-quant model on one output: identical, cosine ≥
    COSINE_PASS, or a disagreement (1 - cosine) within FLOOR_FACTOR of the noise floor's."""
    if row["max_abs_diff"] == 0:
        return True
    gap = 1.0 - row["mean_cosine"]
    floor = 1.0 - row.get("floor_cosine", 1.0)
    return gap <= max(1.0 - COSINE_PASS, FLOOR_FACTOR * floor)


def compare_all_outputs(gm, onnx_path: Path, data) -> list[dict]:
    """fidelity() of ONNX Runtime against the fake-quant graph for every output, with the noise
    floor (``floor_cosine``: the fake-quant model against itself on inputs moved by FLOOR_EPS)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from fxq.pipeline import fidelity

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    batch = int(gm.meta["fxq.example_inputs"][0].shape[0])
    moved = data * (1 + FLOOR_EPS * torch.randn(data.shape, generator=torch.Generator().manual_seed(1)))
    ort_outs, fq_outs, floor_outs = [], [], []
    with torch.no_grad():
        for i in range(0, data.shape[0], batch):
            chunk = data[i:i + batch]
            if chunk.shape[0] < batch:
                break
            ort_outs.append([torch.from_numpy(np.asarray(o)) for o in sess.run(None, {name: chunk.numpy()})])
            fq_outs.append(_outputs(gm(chunk)))
            floor_outs.append(_outputs(gm(moved[i:i + batch])))
    rows = []
    for k in range(len(ort_outs[0])):
        fq, onnx_out = torch.cat([f[k] for f in fq_outs]), torch.cat([o[k] for o in ort_outs])
        row = fidelity(fq, onnx_out)
        row["floor_cosine"] = fidelity(fq, torch.cat([f[k] for f in floor_outs]))["mean_cosine"]
        if fq.dim() != 2:  # top-1 is a classifier's notion, not a feature map's
            row["top1_agreement"] = None
            row.pop("mean_kl", None)
        rows.append(row)
    return rows


# --- one model (runs in the worker subprocess) ------------------------------------------------

def run_one(name: str, n_calib: int = 8, size: int | None = None, threads: int = 1) -> dict:
    """Compile ``name`` (see the module docstring) and return its row; never raises."""
    import torch

    import fxq.ort_timing
    import fxq.pipeline

    torch.set_num_threads(threads)
    # latency is not measured here: one untimed run of each ONNX model (it still has to run)
    real_latency, real_run_onnx = fxq.ort_timing.measure_latency, fxq.pipeline.run_onnx
    fxq.ort_timing.measure_latency = lambda model, x, threads=2, warmup=10, runs=50: \
        real_latency(model, x, threads=1, warmup=0, runs=1)
    fxq.pipeline.run_onnx = lambda model_bytes, data, batch, threads=2: real_run_onnx(model_bytes, data, batch, 1)
    try:
        return _run_one(name, n_calib, size)
    finally:
        fxq.ort_timing.measure_latency, fxq.pipeline.run_onnx = real_latency, real_run_onnx


def _run_one(name: str, n_calib: int, size: int | None) -> dict:
    import torch

    import fxq.pipeline
    from fxq.options import CompileOptions

    row: dict = {"model": name, "ok": False, "stage": "build"}
    t0 = time.perf_counter()
    try:
        module, example = build_model(name, size)
        row["input"] = list(example[0].shape)
        row["params_m"] = round(sum(p.numel() for p in module.parameters()) / 1e6, 1)
        calib = torch.randn(n_calib, *example[0].shape[1:], generator=torch.Generator().manual_seed(0))
        row["stage"] = "batchnorm statistics"
        settle_batchnorm(module, calib)
        with tempfile.TemporaryDirectory(prefix="fxq-coverage-") as tmp:
            keep: dict = {}
            row["stage"] = "compile"
            opts = CompileOptions(out_dir=Path(tmp) / "out", method="rtn", weight_bits=8, act_bits=8, holdout=0)
            report = fxq.pipeline.compile_model((module, example), calib, opts, keep=keep)
            gm = keep["graph_module"]
            row["stage"] = "verify"
            row["capture"] = gm.meta.get("fxq.capture", "?")
            row["regions"] = len(report["regions"])
            kinds: dict = {}
            for r in report["regions"]:
                kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
            row["region_kinds"] = kinds
            row["layers"] = len(report["layers"])
            row["onnx_ok"] = True
            row["timings_s"] = report["timings_s"]
            row["onnx_mb"] = round(report["artifacts"]["model.onnx"] / 1e6, 1)
            fid = compare_all_outputs(gm, Path(tmp) / "out" / "model.onnx", calib)
            row["outputs"] = len(fid)
            row["onnx_vs_fake_quant"] = report["verification"]["onnx_vs_fake_quant"]
            row["all_outputs"] = fid
            row["top1_agreement"] = fid[0]["top1_agreement"]
            row["max_abs_diff"] = max(f["max_abs_diff"] for f in fid)
            row["min_cosine"] = min(f["mean_cosine"] for f in fid)
            row["floor_cosine"] = min(f["floor_cosine"] for f in fid)
            row["fake_quant_vs_float_cosine"] = report["verification"]["fake_quant_vs_float"]["mean_cosine"]
            row["onnx_vs_integer_emulation"] = report["verification"].get("onnx_vs_integer_emulation")
            row["ok"] = all(agrees(f) for f in fid)
            if not row["ok"]:
                row["error"] = (f"ONNX Runtime disagrees with the fake-quant model: cosine {row['min_cosine']:.4f} "
                                f"(noise floor {row['floor_cosine']:.4f})")
            row["stage"] = "done"
    except BaseException as exc:  # noqa: BLE001 — every failure is a row
        text = f"{type(exc).__name__}: {exc}".strip()
        row["error"] = text.splitlines()[0][:400]
        row["traceback"] = traceback.format_exc()[-4000:]
        row["onnx_ok"] = row.get("onnx_ok", False)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


# --- driver -------------------------------------------------------------------------------------

def run_subprocess(name: str, args, work: Path) -> dict:
    result = work / "rows" / f"{name}.json"
    log = work / "logs" / f"{name}.log"
    result.parent.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--calib", str(args.calib),
           "--result", str(result)]
    if args.size:
        cmd += ["--size", str(args.size)]
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=str(ROOT), start_new_session=True)
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            rc = None
    seconds = round(time.perf_counter() - t0, 1)
    if result.is_file():
        row = json.loads(result.read_text())
    elif rc is None:
        row = {"model": name, "ok": False, "error": f"timeout (> {args.timeout} s)"}
    else:
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:]
        why = "killed (out of memory?)" if rc in (-9, 137) else f"worker exited with code {rc}"
        row = {"model": name, "ok": False, "error": why + (f": {tail[0][:300]}" if tail else "")}
    row["wall_s"] = seconds
    return row


def load_rows(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


# What running this table changed in fxq (general rules, no per-model cases); rendered into --out.
FINDINGS = [
    "ShuffleNetV2's channel shuffle (`view → transpose → contiguous → view`) failed in calibration: "
    "canonicalize dropped the `contiguous` copy and the `view` after it then met a non-contiguous "
    "tensor. Now every `view` reading a dropped copy, directly or through other views, becomes a "
    "`reshape` (`passes/canonicalize.py`, test in `tests/test_canonicalize.py`).",
    "`nn.Dropout(inplace=True)` (EfficientNet, MNASNet classifiers) stayed in the graph as "
    "`dropout_` because its functional twin `dropout` names its first argument `input`, not `self`; "
    "twins are now matched by argument types (and names after the first), so it is functionalized "
    "and then dropped like any eval-mode dropout.",
    "`fxq.capture` records how a graph was captured in `gm.meta[\"fxq.capture\"]` (the *capture* "
    "column): every model here is captured by non-strict `torch.export`; no fallback was needed.",
]


def _fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def render(rows: list[dict], order: list[str], command: str, meta: dict) -> str:
    by = {r["model"]: r for r in rows}
    missing = [n for n in order if n not in by]
    rows = [by[n] for n in order if n in by]
    classif = [r for r in rows if r["model"] not in DETECTION_BACKBONES]
    passed = sum(r["ok"] for r in classif)
    total = sum(n not in DETECTION_BACKBONES for n in order)
    total_s = sum(r.get("wall_s", r.get("seconds", 0)) for r in rows)
    lines = [
        "# Coverage: torchvision models through fxq",
        "",
        "Generated by [`benchmarks/coverage.py`](../benchmarks/coverage.py) (its docstring has the method):",
        "",
        f"    {command}",
        "",
        f"**{passed} / {len(classif)} torchvision classification models pass**"
        + (f" ({passed / len(classif):.0%})" if classif else "")
        + (f"; {len(classif)} of {total} have been run ({len(missing)} not yet: see the end)"
           if missing else f"; all {total} run")
        + f"; detection backbones: {sum(r['ok'] for r in rows if r['model'] in DETECTION_BACKBONES)}"
        f" / {sum(r['model'] in DETECTION_BACKBONES for r in rows)}. "
        f"Run time (sum over the models) {total_s / 60:.0f} min ({meta}).",
        "",
        "Each model: random weights (seed 0), input 1×3×224×224, 8 synthetic calibration samples "
        "(`torch.randn`; BatchNorm statistics set from them; all-zero weight matrices, the ViT heads, given random values), `--method rtn` W8A8, `fxq.pipeline.compile_model` in its own subprocess. "
        "*Pass* = the compile finishes (ONNX QDQ model checked, run in ONNX Runtime, `model.pt2` "
        f"written) and ONNX Runtime agrees with fxq's fake-quant PyTorch model on every output: mean "
        f"cosine ≥ {COSINE_PASS}, or 1 - cosine at most {FLOOR_FACTOR:g}× the *noise floor*'s (the fake-quant "
        f"model against itself on the samples moved by a relative {FLOOR_EPS:g}: deep random-weight "
        "networks amplify one-step rounding differences between float and integer kernels; see the "
        "script's docstring). Agreement columns compare ONNX Runtime with the fake-quant model on the "
        "8 samples (`verification.onnx_vs_fake_quant`; worst output for several outputs; top-1 for "
        "classifiers only). "
        "*Regions* = `detect_blocks` regions at block granularity (residual / concat / chain / layer). "
        "*Time* = the whole subprocess on one core (model build, compile, verification).",
        "",
        "| model | params (M) | regions | res/cat/chain/layer | capture | ONNX ok | top-1 agr. | max abs diff | cosine | noise floor | time (s) | result |",
        "|---|---:|---:|---|---|:-:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        k = r.get("region_kinds") or {}
        kinds = "/".join(str(k.get(x, 0)) for x in ("residual", "concat", "chain", "layer")) if k else ""
        result = "pass" if r["ok"] else "FAIL: " + r.get("error", "?").replace("|", "\\|")
        name = r["model"] + (f" ({r['outputs']} outputs)" if r.get("outputs", 1) > 1 else "")
        if r.get("input") and r["input"][2:] != [DEFAULT_SIZE, DEFAULT_SIZE]:
            name += f" ({r['input'][2]}×{r['input'][3]} input)"
        lines.append(
            f"| {name} | {_fmt(r.get('params_m'), '.1f')} | {r.get('regions', '')} | {kinds} | "
            f"{r.get('capture', '')} | {'yes' if r.get('onnx_ok') else 'no'} | "
            f"{_fmt(r.get('top1_agreement'), '.0%')} | {_fmt(r.get('max_abs_diff'), '.3g')} | "
            f"{_fmt(r.get('min_cosine'), '.4f')} | {_fmt(r.get('floor_cosine'), '.4f')} | {_fmt(r.get('wall_s', r.get('seconds')), '.0f')} | {result} |")
    fails = [r for r in rows if not r["ok"]]
    lines += ["", "## What the table changed in fxq", ""] + [f"- {f}" for f in FINDINGS]
    lines += ["", "## Failures", ""]
    if not fails:
        lines.append("None.")
    for r in fails:
        lines.append(f"- **{r['model']}**: {r.get('error', '?')}")
    if missing:
        lines += ["", "## Not run yet", "",
                  "Selected but without a row in `results.jsonl` (the largest models run last; "
                  "`--resume-rows` continues): " + ", ".join(missing) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", help="comma-separated globs over the model names (default: all)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per model (default 900)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "coverage.md", help="markdown table")
    ap.add_argument("--work", type=Path, default=ROOT / "bench-out" / "coverage", help="rows and logs")
    ap.add_argument("--calib", type=int, default=8, help="synthetic calibration samples (default 8)")
    ap.add_argument("--size", type=int, default=None, help="input size instead of 224 (smoke runs)")
    ap.add_argument("--resume-rows", action="store_true", help="keep finished rows, skip those models")
    ap.add_argument("--retry-failed", action="store_true", help="with --resume-rows: rerun the failed rows")
    ap.add_argument("--rerun", help="with --resume-rows: comma-separated globs of models to rerun anyway")
    ap.add_argument("--list", action="store_true", help="print the selected model names and exit")
    ap.add_argument("--render-only", action="store_true", help="rewrite --out from results.jsonl, run nothing")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        row = run_one(args.worker, args.calib, args.size)
        args.result.write_text(json.dumps(row, indent=1))
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}))
        if "traceback" in row:
            print(row["traceback"])
        return 0

    names = select(all_models(), args.models)
    if args.list:
        print("\n".join(names))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    jsonl = args.work / "results.jsonl"
    keep = args.resume_rows or args.render_only
    rows = list({r["model"]: r for r in load_rows(jsonl)}.values()) if keep else []  # last row wins
    if not keep and jsonl.is_file():
        jsonl.replace(args.work / "results.prev.jsonl")
    done = {r["model"] for r in rows if r["ok"] or not args.retry_failed}
    done -= set(select(sorted(done), args.rerun)) if args.rerun else set()
    # the options that decide the rows (--resume-rows and friends only decide which rows rerun)
    shown = f"--timeout {args.timeout:g}" + (f" --calib {args.calib}" if args.calib != 8 else "") \
        + (f" --size {args.size}" if args.size else "") + (f" --models '{args.models}'" if args.models else "")
    command = f"OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/coverage.py {shown}"
    meta = (f"{datetime.date.today()}, {platform.machine()} with {os.cpu_count()} cores shared with other "
            f"work, one thread per model, timeout {args.timeout:g} s per model")
    order = [n for n in all_models() if n in names]  # table order; models run smallest first
    names = [] if args.render_only else sorted(names, key=size_hint)
    for i, name in enumerate(names):
        if name in done:
            continue
        print(f"[{i + 1}/{len(names)}] {name} ...", end=" ", flush=True)
        row = run_subprocess(name, args, args.work)
        print(("pass" if row["ok"] else "FAIL " + row.get("error", "")) + f" ({row['wall_s']} s)", flush=True)
        rows = [r for r in rows if r["model"] != name] + [row]
        with open(jsonl, "a") as fh:
            fh.write(json.dumps({k: v for k, v in row.items() if k != "traceback"}) + "\n")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(render(rows, order, command, meta))
    if not order:
        print("no model matches", args.models, file=sys.stderr)
        return 2
    args.out.write_text(render(rows, order, command, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
