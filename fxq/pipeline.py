"""The compile recipe: a short, readable list of passes and stages.

    capture -> canonicalize -> fold_batchnorm -> detect_blocks -> annotate_qspecs
            -> materialize_quantizers -> calibrate -> lower (ONNX QDQ) -> verify in ONNX Runtime

Everything here is callable from Python: ``compile_model(loaded, calib, CompileOptions(...))``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import fx

from fxq import ops
from fxq.errors import FxqError
from fxq.options import CompileOptions


class StageTimer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 3)


VERIFY_CAP = 32  # samples verified when none are held out
RECONSTRUCTING = ("adaround", "brecq", "qdrop")
RESUME_DIR = ".fxq-resume"  # inside OUT: the reconstruction checkpoint of an unfinished compile


def _check_mixed(opts: CompileOptions) -> None:
    if opts.budget_ms is None and (opts.bits is not None or opts.pins):
        raise FxqError("--bits and --pin choose among precisions for the latency search, which needs "
                       "a budget.", "Add --budget-ms X (and --target T), or use --weight-bits for "
                       "uniform precision.")


def split_holdout(data: torch.Tensor, holdout: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Hold back the last samples for verification; with too few samples, verify on calib data."""
    n = data.shape[0]
    hold = min(holdout, n // 4)
    if hold < 1:  # verification then reuses (at most 32) calibration samples: it is a parity check
        return data, data[:VERIFY_CAP], False
    return data[:-hold], data[-hold:], True


def graph_passes(opts: CompileOptions, table, calib: torch.Tensor | None = None) -> list:
    """The passes before any quantization decision: they end with the regions found. With
    ``calib``, linear layers' inputs are smoothed (``opts.smooth``; it needs the data)."""
    from fxq.passes.canonicalize import Canonicalize
    from fxq.passes.detect_blocks import DetectBlocks
    from fxq.passes.fold_batchnorm import FoldBatchNorm

    passes = [Canonicalize()]
    if table.fold_batchnorm:
        passes.append(FoldBatchNorm())
    if table.rewrites:  # fused attention split into the matmuls the table quantizes
        from fxq.passes.decompose_attention import DecomposeAttention

        passes.append(DecomposeAttention(table))
    if calib is not None and opts.smooth and opts.act_bits < 32:
        from fxq.backends.tables import resolve_weight_range
        from fxq.passes.smooth_activations import SmoothActivations

        # candidates are scored on the weight grid the backend will use (7-bit magnitude if reduced)
        reduced, _ = resolve_weight_range(opts.weight_range, table)
        bits = opts.weight_bits - 1 if reduced and opts.weight_bits == 8 else opts.weight_bits
        passes.append(SmoothActivations(calib, bits, opts.act_bits))
    # layer-wise AdaRound is reconstruction on single-layer regions
    passes.append(DetectBlocks("layer" if opts.method == "adaround" else opts.granularity))
    return passes


def quantization_passes(opts: CompileOptions, table, reduce_range: bool = False) -> list:
    from fxq.passes.annotate_qspecs import AnnotateQSpecs
    from fxq.passes.materialize_quantizers import MaterializeQuantizers

    return [AnnotateQSpecs(table, weight_bits=opts.weight_bits, act_bits=opts.act_bits,
                           first_last_bits=opts.first_last_bits, layer_precision=opts.layer_precision,
                           reduce_range=reduce_range),
            MaterializeQuantizers()]


def build_passes(opts: CompileOptions, table, reduce_range: bool = False, calib: torch.Tensor | None = None):
    return graph_passes(opts, table, calib) + quantization_passes(opts, table, reduce_range)


def plan_mixed_precision(gm: fx.GraphModule, calib: torch.Tensor, opts: CompileOptions, progress=None):
    """Run the latency search (``fxq.mixed_precision``) on a copy of the captured graph; returns
    the plan whose ``assignment`` becomes ``opts.layer_precision``."""
    from fxq import mixed_precision
    from fxq.backends.tables import get_backend, resolve_weight_range
    from fxq.calibrate import calibrate_activations
    from fxq.passes.infra import PassManager

    table = get_backend(opts.backend)
    reduced, _ = resolve_weight_range(opts.weight_range, table)
    base = PassManager(graph_passes(opts, table, calib)).run(copy.deepcopy(gm))

    def quantized(bits: int) -> fx.GraphModule:
        uniform = CompileOptions(weight_bits=bits, act_bits=opts.act_bits, first_last_bits=0)
        q = PassManager(quantization_passes(uniform, table, reduced)).run(copy.deepcopy(base))
        calibrate_activations(q, calib)
        return q

    def timing_onnx(options: CompileOptions):
        """The model lowered under ``options``, for timing only: its scales need not be good, so
        a few samples calibrate it."""
        from fxq.backends import lowering

        q = PassManager(quantization_passes(options, table, reduced)).run(copy.deepcopy(base))
        calibrate_activations(q, calib[:8])
        return lowering(opts.backend).lower(q, options)

    def uniform_onnx(precision):
        """The whole model with every layer at ``precision``, for fitting measured costs."""
        from fxq.backends.lower_qdq import lower_qdq
        from fxq.cost_models import is_float

        if is_float(precision):
            return lower_qdq(copy.deepcopy(base), opts, quantized=False)
        return timing_onnx(dataclasses.replace(opts, weight_bits=int(precision), first_last_bits=0,
                                               budget_ms=None, layer_precision=None))

    def assignment_onnx(layers):
        """The model at a candidate assignment, for the budget check."""
        return timing_onnx(dataclasses.replace(opts, layer_precision=dict(layers), budget_ms=None))

    settings = repr((opts.backend, opts.act_bits, reduced, opts.granularity, opts.method == "adaround"))
    return mixed_precision.plan(
        base, calib, target=opts.target, budget_ms=opts.budget_ms, quantized=quantized, bits=opts.bits,
        batch=opts.batch, search=opts.search, seed=opts.seed, pins=opts.pins,
        first_last_bits=opts.first_last_bits, settings=settings, latency_table=opts.latency_table,
        sensitivity_samples=opts.sensitivity_samples, progress=progress,
        uniform_onnx=uniform_onnx if opts.backend == "onnx-qdq" else None,
        assignment_onnx=assignment_onnx if opts.backend == "onnx-qdq" else None,
        check_rounds=opts.budget_check_rounds)


def quantize_graph(gm: fx.GraphModule, calib: torch.Tensor, opts: CompileOptions, console=None,
                   progress=None, timer: StageTimer | None = None):
    """Run the pass pipeline and calibration on a captured graph. Returns (gm, pass_manager)."""
    from fxq.backends.tables import get_backend, resolve_weight_range
    from fxq.calibrate import calibrate_activations
    from fxq.passes.infra import PassManager

    timer = timer or StageTimer()
    table = get_backend(opts.backend)
    observers = []
    if console is not None and opts.print_summary:
        from fxq.diff import SummaryObserver

        observers.append(SummaryObserver(console))
    if console is not None and (opts.print_diff or opts.print_after):
        from fxq.diff import diff_observer

        observers.append(diff_observer(console, None if opts.print_diff else set(), set(opts.print_after)))
    reduced, why = resolve_weight_range(opts.weight_range, table)
    gm.meta["fxq.weight_range"] = {"reduced": reduced, "why": why}
    pm = PassManager(build_passes(opts, table, reduced, calib), verify=opts.debug, observers=observers,
                     wants_snapshots=bool(observers))
    with timer.stage("passes"):
        gm = pm.run(gm)
    with timer.stage("calibrate"):
        calibrate_activations(gm, calib, progress=progress)
    if opts.method == "gptq":
        from fxq.gptq import gptq_round

        with timer.stage("gptq"):
            gm.meta["fxq.gptq"] = gptq_round(gm, calib, progress=progress)
    if opts.method in RECONSTRUCTING:
        from fxq.reconstruct import config_for, reconstruct
        from fxq.devices import resolve_device
        from fxq.resume import Checkpoint, fingerprint

        cfg = config_for(opts.preset, opts.method, opts.loss, opts.iters, opts.drop_prob, opts.tuning)
        device = resolve_device(opts.device)
        gm.meta["fxq.reconstruction_device"] = str(device)
        with timer.stage("reconstruct"):
            # the device is part of the job: a GPU's float arithmetic differs from the CPU's
            job = fingerprint(gm, calib, repr((cfg, opts.seed, device.type)))
            ckpt = Checkpoint(Path(opts.out_dir) / RESUME_DIR, job, resume=opts.resume, console=console)
            gm.meta["fxq.reconstruction"] = reconstruct(gm, calib, cfg, seed=opts.seed, progress=progress,
                                                        checkpoint=ckpt, device=device)
            gm.meta["fxq.reconstruction_config"] = cfg
            gm.meta["fxq.checkpoint"] = ckpt
    elif opts.bias_correction and opts.method != "gptq":
        # reconstruction already fits each region's output, shift included; GPTQ fits the bias
        from fxq.bias_correction import correct_biases

        with timer.stage("bias_correction"):
            gm.meta["fxq.bias_correction"] = correct_biases(gm, calib)
    from fxq.bias_correction import snap_biases_to_int32_grid

    snap_biases_to_int32_grid(gm)
    return gm, pm


def layer_table(gm: fx.GraphModule) -> list[dict]:
    from fxq.passes.infra import QSPEC, REGION

    rows = []
    for node in gm.graph.nodes:
        if not ops.is_layer(node):
            continue
        spec = node.meta.get(QSPEC) or {}
        w = spec.get("weight")
        a = spec.get("inputs", {}).get(0)
        rows.append({"name": ops.layer_name(node), "node": node.name, "op": str(node.target).replace("aten.", ""),
                     "weight_bits": w.bits if w else 32, "act_bits": a.bits if a else 32,
                     "region": node.meta.get(REGION)})
    return rows


def _top1(a: torch.Tensor, b: torch.Tensor) -> float | None:
    if a.dim() != 2 or a.shape[1] < 2:
        return None
    return float((a.argmax(1) == b.argmax(1)).float().mean())


def fidelity(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    ref, cand = reference.float().reshape(reference.shape[0], -1), candidate.float().reshape(candidate.shape[0], -1)
    cos = torch.nn.functional.cosine_similarity(ref, cand, dim=1).mean()
    out = {"top1_agreement": _top1(reference.reshape(reference.shape[0], -1), candidate.reshape(candidate.shape[0], -1)),
           "max_abs_diff": float((ref - cand).abs().max()), "mean_cosine": float(cos), "samples": int(ref.shape[0])}
    if out["top1_agreement"] is not None:
        p = torch.log_softmax(ref, 1)
        q = torch.log_softmax(cand, 1)
        out["mean_kl"] = float((p.exp() * (p - q)).sum(1).mean())
    return out


def run_onnx(model_bytes: bytes, data: torch.Tensor, batch: int, threads: int = 2) -> torch.Tensor:
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    from fxq.calibrate import map_padded

    name = sess.get_inputs()[0].name
    return map_padded(lambda chunk: torch.from_numpy(np.asarray(sess.run(None, {name: chunk.numpy()})[0])),
                      data, batch)


def export_fake_quant(gm: fx.GraphModule, path: Path) -> None:
    from fxq.atomic import atomic_path

    ex = gm.meta["fxq.example_inputs"]
    ep = torch.export.export(gm, tuple(ex), strict=False)
    with atomic_path(path) as tmp:
        torch.export.save(ep, str(tmp))


def compile_model(loaded, calib, opts: CompileOptions, console=None,
                  keep: dict | None = None) -> dict:
    """Compile ``loaded`` (an ``fxq.loading.LoadedModel`` or an (module, example_inputs) pair)
    with ``calib``: a tensor [N, ...], any iterable of sample or batch tensors, or a path that
    ``fxq.calib_data.load_calibration`` reads.

    Returns the report. Pass a dict as ``keep`` to also receive the quantized graph module
    (``keep["graph_module"]``), e.g. to run ``fxq.emulate`` on it."""
    from rich.progress import Progress

    from fxq.atomic import atomic_write_bytes, atomic_write_text, deferred_commit, ensure_output_dir
    from fxq.backends import lowering
    from fxq.backends.lower_qdq import lower_qdq
    from fxq.calibrate import graph_batch_size, run_batched
    from fxq.capture import capture
    from fxq.onnx_size import payload_bytes, runnable

    _check_mixed(opts)
    if opts.method in RECONSTRUCTING:  # a missing GPU is reported before any work starts
        from fxq.devices import resolve_device

        resolve_device(opts.device)
    torch.manual_seed(opts.seed)
    timer = StageTimer()
    out_dir = ensure_output_dir(Path(opts.out_dir))
    module, example_inputs = (loaded.module, loaded.example_inputs) if hasattr(loaded, "module") else loaded

    if not isinstance(calib, torch.Tensor) or opts.calib_size is not None:
        from fxq.calib_data import load_calibration  # any iterable of tensors; checked up front

        calib = load_calibration(calib, tuple(example_inputs[0].shape), size=opts.calib_size,
                                 preprocess=opts.preprocess)
    calib_set, holdout, held_out = split_holdout(calib, opts.holdout)
    with timer.stage("capture"):
        gm = capture(module, example_inputs)
    batch = graph_batch_size(gm)
    # The float reference (its ONNX model, its outputs on the holdout) is taken before
    # quantization rewrites gm, so no float copy of the weights lives through the compile: on a
    # 600M-parameter model that copy alone is 2.5 GB. A float model past protobuf's 2 GB limit
    # is run from a file with external data in ``scratch``.
    scratch = tempfile.TemporaryDirectory(prefix="fxq-float-")
    with timer.stage("float_reference"):
        float_model = lower_qdq(gm, opts, quantized=False)
        float_size = payload_bytes(float_model)  # before runnable() may move the tensors to a file
        float_ref = runnable(float_model, scratch.name)
        float_size = len(float_ref) if isinstance(float_ref, bytes) else float_size
        del float_model
        float_out = run_batched(gm, holdout)

    plan = None
    with Progress(console=console, transient=True, disable=console is None) as progress:
        if opts.budget_ms is not None:
            with timer.stage("mixed_precision"):
                plan = plan_mixed_precision(gm, calib_set, opts, progress=progress)
            opts = dataclasses.replace(opts, layer_precision=plan.layer_precision())
            if plan.status == "float":  # nothing is quantized: nothing to reconstruct or correct
                opts = dataclasses.replace(opts, method="rtn", bias_correction=False)
            if console is not None:
                for note in plan.notes[:1] if plan.status == "float" else []:
                    console.print(f"[yellow]note:[/] {note}")
        gm, pm = quantize_graph(gm, calib_set, opts, console=console, progress=progress, timer=timer)

    with timer.stage("lower"):
        backend = lowering(opts.backend)
        onnx_model = backend.lower(gm, opts)
        onnx_bytes = onnx_model.SerializeToString()
    with timer.stage("verify"):
        ort_out = run_onnx(onnx_bytes, holdout, batch)
        fq_out = run_batched(gm, holdout)
        from fxq.emulate import emulate_batched

        emu_out = emulate_batched(gm, holdout) if backend.table.integer_emulation else None
        verification = {
            "holdout_samples": int(holdout.shape[0]),
            "held_out": held_out,
            "onnx_vs_fake_quant": fidelity(fq_out, ort_out),
            "onnx_vs_integer_emulation": fidelity(emu_out, ort_out) if emu_out is not None else None,
            "onnx_vs_float": fidelity(float_out, ort_out),
            "fake_quant_vs_float": fidelity(float_out, fq_out),
        }
    with timer.stage("latency"):
        from fxq.ort_timing import measure_latency

        x = holdout[:batch].numpy() if holdout.shape[0] >= batch else example_inputs[0].numpy()
        lat_q = measure_latency(onnx_bytes, x, threads=2, warmup=5, runs=30)
        lat_f = measure_latency(float_ref, x, threads=2, warmup=5, runs=30)
        scratch.cleanup()
        mixed = _check_plan(plan, onnx_bytes) if plan is not None else None
    # every artifact of this compile replaces the previous ones together, or none does
    with deferred_commit(out_dir):
        with timer.stage("write"):
            atomic_write_bytes(out_dir / "model.onnx", onnx_bytes)
            export_fake_quant(gm, out_dir / "model.pt2")
            backend.write_extras(out_dir)
            if mixed is not None:
                from fxq.mixed_precision import plot_front

                atomic_write_text(out_dir / "search.json", json.dumps(mixed, indent=2))
                plot_front(plan, out_dir / "pareto.png", (mixed.get("end_to_end") or {}).get("measured_ms"))

        regions = gm.meta.get("fxq.regions", [])
        report = {
            "fxq_version": __import__("fxq").__version__,
            "model": getattr(loaded, "source", type(module).__name__),
            "input_shape": list(example_inputs[0].shape),
            "backend": opts.backend,
            "target": opts.target,
            "method": opts.method,
            "granularity": opts.granularity,
            "seed": opts.seed,
            "weight_bits": opts.weight_bits,
            "act_bits": opts.act_bits,
            "first_last_bits": opts.first_last_bits,
            "weight_range": gm.meta.get("fxq.weight_range"),
            "bias_correction": gm.meta.get("fxq.bias_correction"),
            "gptq": gm.meta.get("fxq.gptq"),
            "calibration_samples": int(calib_set.shape[0]),
            "budget_ms": opts.budget_ms,
            "mixed_precision": _summary(mixed),
            "latency": {"batch": batch, "threads": 2, "predicted_ms": plan.predicted_ms if plan else None,
                        "measured_ms": lat_q["median_ms"], "float_measured_ms": lat_f["median_ms"],
                        "speedup_vs_float": round(lat_f["median_ms"] / lat_q["median_ms"], 3)},
            "layers": layer_table(gm),
            "regions": _regions_with_losses(regions, gm.meta.get("fxq.reconstruction", [])),
            "reconstruction": _reconstruction_json(gm.meta.get("fxq.reconstruction_config"), opts,
                                                   gm.meta.get("fxq.reconstruction_device")),
            "passes": [{"name": name, "modified": res.modified, "stats": _jsonable(res.stats)} for name, res in pm.history],
            "verification": verification,
            "artifacts": {"model.onnx": len(onnx_bytes), "float_onnx_bytes": float_size,
                          "size_vs_float": round(len(onnx_bytes) / max(float_size, 1), 4)},
            "timings_s": timer.seconds,
            **backend.report(gm),
        }
        atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2))
    if gm.meta.get("fxq.checkpoint") is not None:  # the artifacts are complete: nothing to resume
        gm.meta["fxq.checkpoint"].clear()
    if keep is not None:
        keep["graph_module"] = gm
    return report


def _check_plan(plan, onnx_bytes: bytes) -> dict:
    """The plan as JSON, with the emitted model timed end to end where the target is this
    machine's ONNX Runtime (the cost model measured it; now the whole model is measured)."""
    out = plan.to_json()
    out["end_to_end"] = None
    if plan.target == "ort-cpu":
        from fxq.cost_models import check_end_to_end

        check = check_end_to_end(onnx_bytes, plan.predicted_ms, batch=plan.batch, threads=2)
        check["budget_ms"] = plan.budget_ms
        check["within_budget"] = check["measured_ms"] <= plan.budget_ms
        check["within_budget_5pct"] = check["measured_ms"] <= 1.05 * plan.budget_ms
        out["end_to_end"] = check
    return out


def _summary(mixed: dict | None) -> dict | None:
    """The report's mixed_precision entry: search.json without the Pareto front."""
    if mixed is None:
        return None
    return {k: v for k, v in mixed.items() if k != "pareto_front"} | {"details": "search.json, pareto.png"}


def _reconstruction_json(cfg, opts: CompileOptions, device: str | None) -> dict | None:
    if cfg is None:
        return None
    from dataclasses import asdict

    return {"preset": opts.preset, "device": device, "loss": cfg.loss, "tuning": cfg.tuning, "iters": cfg.iters,
            "batch_size": cfg.batch_size, "samples": cfg.samples, "drop_prob": cfg.drop_prob,
            "config": asdict(cfg)}


def _regions_with_losses(regions, recon: list[dict]) -> list[dict]:
    by_name = {r["region"]: r for r in recon}
    out = []
    for region in regions:
        r = by_name.get(region.name, {})
        out.append(dict(region.to_json(), loss_before=r.get("loss_before"), loss_after=r.get("loss_after"),
                        relevant_fraction=r.get("relevant_fraction"), seconds=r.get("seconds"),
                        train_seconds=r.get("train_seconds")))
    return out


def _jsonable(stats: dict) -> dict:
    out = {}
    for k, v in stats.items():
        if k == "regions":
            out["regions"] = len(v)
        elif isinstance(v, (int, float, str, bool, type(None))):
            out[k] = v
        elif isinstance(v, dict):
            out[k] = {str(a): b for a, b in v.items() if isinstance(b, (int, float, str, bool, type(None)))}
        elif isinstance(v, (list, tuple)):
            out[k] = [x if isinstance(x, (int, float, str, bool)) else str(x) for x in v]
    return out
