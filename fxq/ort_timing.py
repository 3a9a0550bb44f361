"""Latency of ONNX models on ONNX Runtime's CPU provider, measured the same way every time.

Every session gets the same settings (all graph optimizations, ``threads`` intra-op threads, one
inter-op thread, sequential execution) so that a float model, ORT's own quantized model and
fxq's output are timed under identical conditions; otherwise thread-pool defaults (one thread
per core) swamp the differences being measured.

Numbers are wall-clock per ``run`` call, inputs already in memory, outputs fetched. On a shared
machine use the median and compare models timed in the same process, ideally interleaved
(:func:`timing_report` does that).
"""
from __future__ import annotations

import os
import time
from typing import Any, Mapping, Union

import numpy as np

__all__ = ["ModelLike", "session", "measure_latency", "timing_report", "format_report", "with_static_batch",
           "optimized_op_counts"]

# a file path, serialized bytes, an onnx.ModelProto, or an onnxruntime.InferenceSession
ModelLike = Union[str, os.PathLike, bytes, Any]


def _model_bytes_or_path(model) -> str | bytes:
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    if isinstance(model, (bytes, bytearray)):
        return bytes(model)
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    raise TypeError(
        f"expected an ONNX file path, serialized bytes or onnx.ModelProto, got {type(model).__name__}"
    )


def optimized_op_counts(model: ModelLike) -> dict[str, int]:
    """Op types and counts of the graph ONNX Runtime's CPU provider actually runs (after all its
    fusions): two files that give the same counts run the same kernels, so a latency difference
    between them is noise."""
    import tempfile
    from collections import Counter

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        opts.log_severity_level = 3
        ort.InferenceSession(_model_bytes_or_path(model), sess_options=opts, providers=["CPUExecutionProvider"])
        graph = onnx.load(opts.optimized_model_filepath, load_external_data=False).graph
    return dict(sorted(Counter(n.op_type for n in graph.node).items()))


def session(model: ModelLike, threads: int = 2, spinning: bool = True, profile_prefix: str | None = None):
    """An ``onnxruntime.InferenceSession`` on CPU with fxq's fixed timing settings.

    An existing session is returned unchanged, so callers may pass either. ``spinning=False``
    turns the intra-op pool's spin-waiting off (several live sessions on few cores then stop
    stealing each other's cores); ``profile_prefix`` turns ONNX Runtime's profiler on.
    """
    import onnxruntime as ort

    if isinstance(model, ort.InferenceSession):
        return model
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # warnings about unused initializers etc. are noise here; errors still surface as exceptions
    opts.log_severity_level = 3
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return ort.InferenceSession(
        _model_bytes_or_path(model), sess_options=opts, providers=["CPUExecutionProvider"]
    )


def _feeds(sess, inputs) -> dict[str, np.ndarray]:
    names = [i.name for i in sess.get_inputs()]
    if isinstance(inputs, Mapping):
        missing = [n for n in names if n not in inputs]
        if missing:
            raise ValueError(f"inputs lack {missing}; the model takes {names}")
        return {n: np.ascontiguousarray(inputs[n]) for n in names}
    if len(names) != 1:
        raise ValueError(f"the model takes {len(names)} inputs {names}; pass a dict")
    return {names[0]: np.ascontiguousarray(inputs)}


def _summary(times_s: list[float], threads: int) -> dict:
    ms = np.asarray(times_s, dtype=np.float64) * 1e3
    return {
        "median_ms": float(np.median(ms)),
        "p10_ms": float(np.percentile(ms, 10)),
        "p90_ms": float(np.percentile(ms, 90)),
        "mean_ms": float(ms.mean()),
        "min_ms": float(ms.min()),
        "runs": int(ms.size),
        "threads": int(threads),
    }


def measure_latency(
    model: ModelLike,
    inputs: Mapping[str, np.ndarray] | np.ndarray,
    threads: int = 2,
    warmup: int = 10,
    runs: int = 50,
) -> dict:
    """Time ``runs`` calls after ``warmup`` untimed ones.

    Returns ``median_ms``, ``p10_ms``, ``p90_ms``, ``mean_ms``, ``min_ms``, ``runs``, ``threads``.
    ``inputs`` is a feed dict, or one array for a single-input model.
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    sess = session(model, threads)
    feeds = _feeds(sess, inputs)
    for _ in range(max(warmup, 0)):
        sess.run(None, feeds)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return _summary(times, threads)


def timing_report(
    models: Mapping[str, ModelLike],
    inputs: Mapping[str, np.ndarray] | np.ndarray,
    threads: int = 2,
    warmup: int = 10,
    runs: int = 50,
    rounds: int = 5,
    spinning: bool = True,
) -> dict[str, dict]:
    """Time several models against each other, interleaved.

    The runs are split into ``rounds``; each round times every model in turn, so a background
    load spike on a shared machine hits all models alike instead of whichever ran at that
    moment. The order rotates from round to round, so no model always runs right after the
    same other one (whose memory traffic it would inherit). Each result also has
    ``speedup_vs_first``: the first model's median over this one's.
    """
    if not models:
        return {}
    rounds = max(1, min(rounds, runs))
    sessions = {name: session(m, threads, spinning=spinning) for name, m in models.items()}
    feeds = {name: _feeds(s, inputs) for name, s in sessions.items()}
    for name, s in sessions.items():
        for _ in range(max(warmup, 0)):
            s.run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    per_round = [runs // rounds + (1 if r < runs % rounds else 0) for r in range(rounds)]
    names = list(sessions)
    for r, count in enumerate(per_round):
        for name in names[r % len(names):] + names[:r % len(names)]:
            s, f = sessions[name], feeds[name]
            for _ in range(count):
                t0 = time.perf_counter()
                s.run(None, f)
                times[name].append(time.perf_counter() - t0)
    report = {name: _summary(t, threads) for name, t in times.items()}
    base = next(iter(report.values()))["median_ms"]
    for r in report.values():
        r["speedup_vs_first"] = base / r["median_ms"]
    return report


def format_report(report: Mapping[str, dict]) -> str:
    """A small fixed-width table of a :func:`timing_report` (or several measure_latency) result."""
    width = max([len("model")] + [len(n) for n in report])
    lines = [f"{'model':<{width}}  median ms   p10 ms   p90 ms   min ms  speedup"]
    base = next(iter(report.values()))["median_ms"] if report else 1.0
    for name, r in report.items():
        speed = r.get("speedup_vs_first", base / r["median_ms"])
        lines.append(
            f"{name:<{width}}  {r['median_ms']:9.2f} {r['p10_ms']:8.2f} {r['p90_ms']:8.2f}"
            f" {r['min_ms']:8.2f}  {speed:6.2f}x"
        )
    if report:
        r0 = next(iter(report.values()))
        lines.append(f"({r0['runs']} runs each, {r0['threads']} intra-op threads, ORT CPU)")
    return "\n".join(lines)


def with_static_batch(model: ModelLike, batch: int):
    """A copy of ``model`` (an ``onnx.ModelProto``, bytes or path) whose inputs and outputs have
    the static leading dimension ``batch`` instead of the one fxq captured.

    fxq's ONNX graphs have the static batch of the example input they were captured with. For a
    convolutional network nothing inside the graph depends on it (the classifier's reshape is a
    ``Flatten(axis=1)``), so the same quantized file can be timed at another batch size by
    restating the batch dimension of its inputs and outputs; the intermediate ``value_info``
    shapes are dropped and ONNX Runtime infers them again. This is only a rewrite of declared
    shapes: a graph that hard-codes the batch somewhere (a ``Reshape`` to a constant shape, say)
    fails in ONNX Runtime or computes something else, so callers must check the result against
    the original, sample by sample (``benchmarks/latency.py`` does).
    """
    import onnx

    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    src = _model_bytes_or_path(model)
    m = onnx.load_from_string(src) if isinstance(src, bytes) else onnx.load(src)
    inits = {i.name for i in m.graph.initializer}
    for vi in list(m.graph.input) + list(m.graph.output):
        if vi.name in inits or not vi.type.HasField("tensor_type"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if len(dims) == 0:
            continue
        dims[0].Clear()
        dims[0].dim_value = batch
    del m.graph.value_info[:]
    return m
