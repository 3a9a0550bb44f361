"""Cost models (fxq.cost_models): analytic targets scale as documented, trtexec profiles are
matched to layers, ort-cpu measures, caches and checks itself end to end."""
from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.nn as nn

from fxq import cost_models as cm
from fxq.errors import FxqError
from fxq.search import Problem, build_group, solve


class Tiny(nn.Module):
    """stem conv+BN+relu6, max-pool, a residual conv joined by add+hardtanh(0, 6) (ReLU6
    module), global pool, classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.body = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = nn.functional.max_pool2d(nn.functional.relu6(self.bn(self.stem(x))), 2)
        z = nn.functional.hardtanh(self.body(y) + y, 0.0, 6.0)
        return self.fc(nn.functional.adaptive_avg_pool2d(z, 1).flatten(1))


@pytest.fixture(scope="module")
def tiny_gm():
    from fxq.backends.tables import ONNX_QDQ
    from fxq.options import CompileOptions
    from fxq.passes.infra import PassManager
    from fxq.pipeline import build_passes
    from fxq.capture import capture

    torch.manual_seed(0)
    gm = capture(Tiny().eval(), (torch.randn(1, 3, 24, 24),))
    return PassManager(build_passes(CompileOptions(), ONNX_QDQ)).run(gm)


def names(gm):
    layers = cm.describe_layers(gm)
    return {info.qualname: name for name, info in layers.items()}


# ----------------------------------------------------------------------------- layers, errors

def test_layers_shapes_and_macs_follow_the_batch(tiny_gm):
    one = cm.describe_layers(tiny_gm)
    four = cm.describe_layers(tiny_gm, batch=4)
    assert [i.qualname for i in one.values()] == ["stem", "body", "fc"]
    stem = one[names(tiny_gm)["stem"]]
    assert stem.op == "conv" and stem.macs == 24 * 24 * 16 * 3 * 9
    assert four[stem.name].macs == 4 * stem.macs
    assert four[stem.name].input_shape == (4, 3, 24, 24)
    fc = one[names(tiny_gm)["fc"]]
    assert fc.op == "linear" and fc.macs == 16 * 10


def test_regions_layers_all_have_tables(tiny_gm):
    tables = cm.cost_tables(tiny_gm, "bitserial")
    for region in tiny_gm.meta["fxq.regions"]:
        assert len(tables.layer_latency(region.layers)) == len(region.layers)


def test_unknown_target_lists_the_targets(tiny_gm):
    with pytest.raises(FxqError) as err:
        cm.cost_tables(tiny_gm, "trt-a10")
    for t in cm.TARGETS:
        assert t in str(err.value)
    assert "Did you mean" in str(err.value)


@pytest.mark.parametrize("target,precisions", [("trt-t4", (2,)), ("ort-cpu", (4,)), ("bitserial", ("fp16",))])
def test_unsupported_precision_is_a_clear_error(tiny_gm, target, precisions):
    with pytest.raises(FxqError, match=f"does not run precision.*{precisions[0]!r}"):
        cm.cost_tables(tiny_gm, target, precisions)


def test_precision_aliases():
    assert cm.normalize_precision("int8") == 8
    assert cm.normalize_precision("8") == 8
    assert cm.normalize_precision("FP32") == "float"
    assert cm.normalize_precision("fp16") == "fp16"


# ----------------------------------------------------------------------------- bitserial

def test_bitserial_scales_with_weight_times_activation_bits(tiny_gm):
    t = cm.cost_tables(tiny_gm, "bitserial")
    assert t.precisions == (2, 4, 8) and t.kind == "model"
    for name, info in t.layers.items():
        ms = t.latency[name]
        assert 0 < ms[2] < ms[4] < ms[8]
        assert ms[4] == pytest.approx(2 * ms[2]) and ms[8] == pytest.approx(4 * ms[2])
        assert ms[8] == pytest.approx(info.macs * 8 * 8 / cm.BitSerialModel.BIT_MACS_PER_S * 1e3)
    assert t.problem_kwargs()["transition"] is None and t.fixed_ms == 0
    same = cm.cost_tables(tiny_gm, "bitserial", act_bits="same")
    stem = names(tiny_gm)["stem"]
    assert same.latency[stem][8] == pytest.approx(16 * same.latency[stem][2])
    with_float = cm.cost_tables(tiny_gm, "bitserial", (2, 8, "float"))
    assert with_float.latency[stem]["float"] == pytest.approx(16 * with_float.latency[stem][8])


def test_bitserial_tables_feed_the_search(tiny_gm):
    t = cm.cost_tables(tiny_gm, "bitserial", bits=(2, 8))
    assert t.precisions == ("float", 2, 8)
    t = cm.cost_tables(tiny_gm, "bitserial", (2, 8))
    groups = []
    for r in tiny_gm.meta["fxq.regions"]:
        sens = {}
        for combo in itertools.product((2, 8), repeat=len(r.layers)):
            sens[combo] = sum(1.0 if p == 2 else 0.0 for p in combo)
        groups.append(build_group(r.name, r.layers, sens, t.layer_latency(r.layers), t.transition))
    problem = Problem(groups, **t.problem_kwargs())
    fastest = t.predict_ms(2)
    sol = solve(problem, budget_ms=fastest * 1.0001, method="exact")
    assert set(sol.layers.values()) == {2}
    assert sol.latency_ms == pytest.approx(t.predict_ms(sol.layers))


# ----------------------------------------------------------------------------- TensorRT roofline

def test_trt_int8_no_slower_than_fp16_and_int4_only_for_linear(tiny_gm):
    for target in ("trt-t4", "trt-a100", "trt-h100", "trt-orin"):
        t = cm.cost_tables(tiny_gm, target)
        assert t.kind == "estimate" and t.to_json()["label"].startswith("estimate")
        n = names(tiny_gm)
        for q in ("stem", "body"):
            assert 4 not in t.latency[n[q]], "int4 is weight-only GEMM: no conv kernel"
            assert t.latency[n[q]][8] <= t.latency[n[q]]["fp16"]
        assert set(t.latency[n["fc"]]) == {"fp16", 8, 4}
        # weight-only int4 reads fewer bytes: never slower than fp16 for a linear
        assert t.latency[n["fc"]][4] <= t.latency[n["fc"]]["fp16"]
        assert any("not offered at 4" in note for note in t.notes)


def test_trt_compute_bound_layer_gets_the_int8_speedup():
    gpu = cm.GPUS["trt-a100"]
    model = cm.RooflineModel("trt-a100")
    big = cm.LayerInfo("c", "c", "conv", (64, 256, 56, 56), (256, 256, 3, 3), (64, 256, 56, 56),
                       macs=64 * 256 * 56 * 56 * 256 * 9)
    fp16, int8 = model.layer_ms(big, "fp16"), model.layer_ms(big, 8)
    assert fp16 == pytest.approx(2 * big.macs / (gpu.fp16_tflops * 1e12) * 1e3)  # compute-bound
    assert int8 == pytest.approx(fp16 * gpu.fp16_tflops / gpu.int8_tops)
    with pytest.raises(FxqError, match="no 4 kernel"):
        model.layer_ms(big, 4)
    # a batch-1 linear is memory-bound: int4 weights cut its time
    fc = cm.LayerInfo("fc", "fc", "linear", (1, 4096), (4096, 4096), (1, 4096), macs=4096 * 4096)
    assert model.layer_ms(fc, 4) < model.layer_ms(fc, 8) < model.layer_ms(fc, "fp16")


def test_trt_transition_priced_by_tensor_size(tiny_gm):
    t = cm.cost_tables(tiny_gm, "trt-t4")
    assert t.transition("fp16", 8) > 0 and t.transition(8, 4) > 0
    assert t.transition("fp16", 4) == 0  # int4 weight-only keeps fp16 activations
    n = names(tiny_gm)
    mixed = {n["stem"]: 8, n["body"]: "fp16", n["fc"]: "fp16"}
    parts = t.latency[n["stem"]][8] + t.latency[n["body"]]["fp16"] + t.latency[n["fc"]]["fp16"]
    assert t.predict_ms(mixed) > parts  # casts at the int8 stem's input and output


# ----------------------------------------------------------------------------- trtexec profile

def write_profile(path, entries):
    path.write_text(json.dumps([{"count": 100}] + entries))
    return path


def test_latency_table_matches_fxq_and_exporter_names(tiny_gm, tmp_path):
    n = names(tiny_gm)
    int8 = write_profile(tmp_path / "int8.json", [
        {"name": "Reformatting CopyNode for Input Tensor 0 to " + n["stem"] + "/Conv", "averageMs": 0.01},
        {"name": f"stem.weight_quantized + fxq_q_w_stem_weight/DequantizeLinear + {n['stem']}/Conv + relu/Relu",
         "averageMs": 0.05, "medianMs": 0.05, "percentage": 20},
        {"name": "/body/Conv + /Add + /Relu", "averageMs": 0.04},          # torch.onnx-style name
        {"name": "adaptive_avg_pool2d/GlobalAveragePool", "averageMs": 0.003},
    ])
    fp16 = write_profile(tmp_path / "fp16.json", [
        {"name": f"{n['stem']}/Conv + relu/Relu", "timeMs": 9.0, "count": 100},
        {"name": "/body/Conv", "averageMs": 0.08},
        {"name": "fc/Gemm", "averageMs": 0.02},
    ])
    tables = cm.cost_tables(tiny_gm, "trt-a100",
                            latency_table=cm.parse_latency_tables([f"int8={int8}", f"fp16={fp16}"]))
    assert tables.kind == "profile"
    assert tables.latency[n["stem"]] == {8: pytest.approx(0.05), "fp16": pytest.approx(0.09)}
    assert tables.latency[n["body"]] == {8: pytest.approx(0.04), "fp16": pytest.approx(0.08)}
    assert tables.latency[n["fc"]] == {8: 0.0, "fp16": pytest.approx(0.02)}
    un = tables.details["unmatched_entries"]["8"]
    assert {e["name"].split(" ")[0] for e in un} == {"Reformatting", "adaptive_avg_pool2d/GlobalAveragePool"}
    assert tables.details["unmatched_layers"] == {"8": ["fc"], "fp16": []}
    assert tables.fixed_ms == pytest.approx(0.013)
    assert any("fc" in note for note in tables.notes)


def test_latency_table_bare_file_is_int8_and_bad_files_are_errors(tiny_gm, tmp_path):
    p = write_profile(tmp_path / "p.json", [{"name": "/fc/Gemm", "averageMs": 0.5}])
    t = cm.cost_tables(tiny_gm, str(p))
    assert t.precisions == (8,) and t.latency[names(tiny_gm)["fc"]][8] == 0.5
    (tmp_path / "bad.json").write_text('{"not": "a profile"}')
    with pytest.raises(FxqError, match="trtexec"):
        cm.cost_tables(tiny_gm, str(tmp_path / "bad.json"))
    with pytest.raises(FxqError, match="does not exist"):
        cm.parse_latency_tables(["fp16=" + str(tmp_path / "missing.json")])


def test_matcher_prefers_the_longest_qualified_name():
    def info(q):
        return cm.LayerInfo(q.replace(".", "_"), q, "conv", (1,), (1,), (1,), 1)

    layers = {i.name: i for i in map(info, ["conv1", "layer1.0.conv1", "layer1.1.conv1", "fc"])}
    m = cm.LayerMatcher(layers)
    assert m.match("/layer1/layer1.0/conv1/Conv + /layer1/layer1.0/relu/Relu") == ["layer1_0_conv1"]
    assert m.match("/conv1/Conv") == ["conv1"]
    assert m.match("{ForeignNode[/layer1/layer1.1/conv1/Conv.../fc/Gemm]}") == ["layer1_1_conv1", "fc"]
    assert m.match("/maxpool/MaxPool") == []


# ----------------------------------------------------------------------------- ort-cpu, measured

def test_ort_cpu_measures_caches_and_checks_end_to_end(tiny_gm, tmp_path, monkeypatch):
    from fxq.backends.lower_qdq import lower_qdq
    from fxq.calibrate import calibrate_activations

    seen = []
    opts = dict(cache_dir=tmp_path, seconds_per_item=0.03, max_seconds=20)
    t = cm.cost_tables(tiny_gm, "ort-cpu", progress=lambda d, n, what: seen.append((d, n)), **opts)
    assert t.kind == "measured" and t.precisions == ("float", 8)
    assert t.stats["timed"] == t.stats["items"] > 0 and seen[-1] == (t.stats["items"],) * 2
    for name in t.layers:
        assert set(t.latency[name]) == {"float", 8}
        assert all(v >= 0 for v in t.latency[name].values())
    assert t.predict_ms("float") > 0 and t.predict_ms(8) > 0
    # Q/DQ timed for every tensor shape crossing a segment boundary (tiny here: may net to 0)
    shapes = {"x".join(map(str, e.shape)) for e in t.edges}
    assert set(t.details["qdq_ms"]) == shapes and len(shapes) >= 3
    assert t.transition("float", 8) >= 0 and t.transition(8, "float") >= 0
    assert t.overhead_ms > 0 and t.fixed_ms >= t.overhead_ms
    assert not t.notes, t.notes

    # the rerun reads everything from the cache: no timing at all
    calls = []
    real_time = cm.OrtCpuModel._time

    def counting_time(self, *a, **k):
        calls.append(a)
        return real_time(self, *a, **k)

    monkeypatch.setattr(cm.OrtCpuModel, "_time", counting_time)
    again = cm.cost_tables(tiny_gm, "ort-cpu", **opts)
    assert calls == [] and again.stats["timed"] == 0 and again.stats["cached"] == t.stats["items"]
    assert again.latency == t.latency
    # another batch is another shape: timed (the run overhead is shared)
    other = cm.cost_tables(tiny_gm, "ort-cpu", batch=2, **opts)
    assert len(calls) == other.stats["timed"] == other.stats["items"] - 1
    monkeypatch.undo()

    calibrate_activations(tiny_gm, torch.randn(8, 3, 24, 24))
    onnx_bytes = lower_qdq(tiny_gm).SerializeToString()
    check = cm.check_end_to_end(onnx_bytes, t.predict_ms(8), runs=10, warmup=2)
    assert check["predicted_ms"] == pytest.approx(t.predict_ms(8))
    assert check["measured_ms"] > 0 and check["batch"] == 1
    assert check["error_ms"] == pytest.approx(check["predicted_ms"] - check["measured_ms"])


def test_ort_cpu_int8_segments_are_what_onnx_runtime_fuses(tiny_gm):
    import numpy as np

    from fxq.ort_timing import optimized_op_counts

    model = cm.OrtCpuModel(use_cache=False)
    graph = cm.SegmentGraph(tiny_gm)
    fused = {}
    for seg in graph.segments:
        fm = model._segment_onnx(graph, seg)
        qm = model._int8_onnx(fm, seg, seg.kind == "layer", np.random.default_rng(0))
        fused[seg.name] = optimized_op_counts(qm)
    n = names(tiny_gm)
    # the ReLU6 (Clip) is absorbed: the output grid lies inside its range
    assert set(fused[n["stem"]]) - {"Transpose"} == {"QLinearConv"}
    assert set(fused[n["body"]]) - {"Transpose"} == {"QLinearConv"}
    assert set(fused[n["fc"]]) == {"QGemm"}
    ops = {seg.nodes[0].target.__name__.split(".")[0]: fused[seg.name] for seg in graph.segments
           if seg.kind == "op"}
    assert set(ops["add"]) == {"QLinearAdd"}
    assert set(ops["max_pool2d"]) - {"Transpose"} == {"NhwcMaxPool"}  # uint8, as inside a model
    assert set(ops["adaptive_avg_pool2d"]) == {"QLinearGlobalAveragePool"}


def test_cli_knows_every_cost_model_target():
    from fxq import cost_models, options

    assert options.TARGETS == cost_models.TARGETS


def test_end_to_end_fit_matches_the_uniform_models_and_scales_by_type(tiny_gm, tmp_path):
    """calibrate_end_to_end: after the fit each uniform model's prediction is its measured
    median; float work and int8 work carry one factor each, so a mixed assignment's float and
    int8 parts scale by those factors; the record says what was measured."""
    import copy

    from fxq.backends.lower_qdq import lower_qdq
    from fxq.calibrate import calibrate_activations

    t = cm.cost_tables(tiny_gm, "ort-cpu", cache_dir=tmp_path, seconds_per_item=0.03, max_seconds=20)
    q = copy.deepcopy(tiny_gm)
    calibrate_activations(q, torch.randn(8, 3, 24, 24))
    from fxq.capture import capture

    torch.manual_seed(0)
    float_gm = capture(Tiny().eval(), (torch.randn(1, 3, 24, 24),))
    models = {"float": lower_qdq(float_gm, quantized=False), 8: lower_qdq(q)}
    fitted, record = cm.calibrate_end_to_end(t, models, runs=10, warmup=2)
    assert record["cached"] is False
    # the fit is cached with the tables: a second compile plans with the same numbers, and the
    # models are not even built (the callable is not called)
    again, cached = cm.calibrate_end_to_end(t, lambda: pytest.fail("models built for a cached fit"))
    assert cached["cached"] is True and cached["scale"] == record["scale"]
    assert again.predict_ms("float") == pytest.approx(fitted.predict_ms("float"))
    for p, key in (("float", "float"), (8, "8")):
        r = record["models"][key]
        assert r["predicted_ms_before"] == pytest.approx(t.predict_ms(p))
        assert fitted.predict_ms(p) == pytest.approx(r["measured_ms"], rel=1e-6, abs=1e-9) or \
            not 0.25 < record["scale"]["int8" if p == 8 else "float"] < 4.0  # clamped: noted
    assert set(record["scale"]) == {"float", "int8"} and all(k > 0 for k in record["scale"].values())
    assert any(n.startswith("end-to-end calibration") for n in fitted.notes)
    # one factor per activation type, everywhere
    first = next(iter(t.latency))
    mixed = {n: ("float" if n == first else 8) for n in t.latency}
    before, after = t.predict_parts(mixed), fitted.predict_parts(mixed)
    for kind, ms in before.items():
        assert after[kind] == pytest.approx(ms * record["scale"][kind])
    assert sum(after.values()) == pytest.approx(fitted.predict_ms(mixed))
    assert fitted.latency[first]["float"] == pytest.approx(t.latency[first]["float"] * record["scale"]["float"])
    # the originals are untouched
    assert t.predict_ms("float") == pytest.approx(record["models"]["float"]["predicted_ms_before"])


def test_rescaled_needs_activation_types(tiny_gm):
    t = cm.cost_tables(tiny_gm, "bitserial")
    with pytest.raises(FxqError, match="no activation types"):
        t.rescaled({"float": 2.0})
