"""Mixed precision end to end: sensitivity (fxq.sensitivity), the plan (fxq.mixed_precision),
per-layer precisions in annotate_qspecs and the lowering, and `fxq compile --budget-ms`."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxq import ops
from fxq.cli import main
from fxq.errors import FxqError
from fxq.options import CompileOptions
from fxq.sensitivity import configurations, search_groups


class Net(nn.Module):
    """stem, two residual blocks of two convs, classifier: 6 quantizable layers."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                                                  nn.Conv2d(8, 8, 3, padding=1)) for _ in range(2))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for b in self.blocks:
            x = torch.relu(x + b(x))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return Net().eval(), (torch.randn(1, 3, 12, 12),), torch.randn(24, 3, 12, 12)


@pytest.fixture(autouse=True)
def cache_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("FXQ_CACHE_DIR", str(tmp_path / "cache"))


def _plan(net, budget, **kw):
    from fxq.capture import capture
    from fxq.pipeline import plan_mixed_precision

    model, example, calib = net
    gm = capture(model, example)
    return gm, plan_mixed_precision(gm, calib, CompileOptions(budget_ms=budget, **kw))


# ----------------------------------------------------------------------------- pieces

def test_configurations_cover_each_adjacent_pair_once():
    assert configurations(2, ["float", 8]) == [("float", "float"), ("float", 8), (8, "float"), (8, 8)]
    three = configurations(3, [2, 8, 4])
    assert len(three) == 2 * 2 ** 3 - 1 and len(set(three)) == len(three)
    assert (8, 2, 8) not in three and (4, 2, 4) in three and (8, 4, 8) in three


def test_large_regions_are_split_into_chunks():
    from fxq.regions import Region

    r = Region("big", "chain", nodes=tuple("abcdefg"), layers=tuple("abcdefg"), inputs=(), output="g")
    groups = search_groups([r], list("abcdefgh"), max_layers=3)
    assert [g.layers for g in groups] == [tuple("abc"), tuple("def"), ("g",), ("h",)]
    assert [g.region for g in groups] == ["big", "big", "big", ""]


def test_sensitivity_grows_as_bits_drop_and_is_cached(net, one_thread):
    gm, plan = _plan(net, 1e9, target="bitserial")
    sens = plan.sens
    assert not sens.cached
    assert 0 < sens.uniform(8) < sens.uniform(4) < sens.uniform(2)
    for g in sens.groups:  # per group too: every layer lower never helps much
        t = sens.table[g.name]
        k = len(g.layers)
        assert t[(8,) * k] < t[(4,) * k] < t[(2,) * k], g.name
    _, again = _plan(net, 1e9, target="bitserial")
    assert again.sens.cached and again.sens.table == sens.table


def test_plan_meets_budget_and_matches_exact(net, one_thread):
    gm, probe = _plan(net, 1e9, target="bitserial")
    uni = {r["precision"]: r for r in probe.uniform}
    budget = (uni[2]["latency_ms"] + uni[8]["latency_ms"]) / 2
    _, plan = _plan(net, budget, target="bitserial")
    assert plan.status == "searched"
    assert plan.search_latency_ms <= budget
    assert plan.exact is not None and plan.solution.sensitivity <= plan.exact.sensitivity * 1.01
    names = [n.name for n in gm.graph.nodes if ops.is_layer(n)]
    assert set(plan.assignment) == set(names)
    assert plan.assignment[names[0]] == 8 and plan.assignment[names[-1]] == 8  # first/last floor
    assert len({str(p) for p in plan.assignment.values()}) > 1
    lat = [p.latency_ms for p in plan.front]
    assert lat == sorted(lat) and plan.front[-1].sensitivity <= plan.sensitivity


def test_infeasible_budget_names_the_fastest_latency(net, one_thread):
    _, probe = _plan(net, 1e9, target="bitserial")
    with pytest.raises(FxqError, match=r"fastest achievable is ([0-9.e-]+) ms") as err:
        _plan(net, probe.fastest_ms / 2, target="bitserial")
    assert f"{probe.fastest_ms:.4g}" in str(err.value)


def test_budget_above_float_keeps_float(net, one_thread):
    _, plan = _plan(net, 1e6, target="trt-t4")
    assert plan.status == "float" and set(plan.assignment.values()) == {"fp16"}
    assert "stays float" in plan.notes[0]


def test_pins_and_their_errors(net, one_thread):
    _, probe = _plan(net, 1e9, target="bitserial")
    uni = {r["precision"]: r for r in probe.uniform}
    budget = (uni[4]["latency_ms"] + uni[8]["latency_ms"]) / 2
    _, plan = _plan(net, budget, target="bitserial", pins=(("blocks.0.*", 8),))
    pinned = [n for n, q in plan.qualnames.items() if q.startswith("blocks.0.")]
    assert pinned and all(plan.assignment[n] == 8 for n in pinned)
    with pytest.raises(FxqError, match="matches no quantizable layer"):
        _plan(net, budget, target="bitserial", pins=(("nothing*", 8),))
    with pytest.raises(FxqError, match="does not offer"):
        _plan(net, budget, target="bitserial", pins=(("fc", 3),))


# ----------------------------------------------------------------------------- lowering

def test_int8_layer_feeding_float_layer_keeps_its_requantize():
    """An int8 layer whose consumer is float still ends in Q/DQ (runtimes fuse a layer into an
    integer kernel only when its output is requantized); float-to-float edges carry none."""
    from fxq.backends.tables import ONNX_QDQ
    from fxq.capture import capture
    from fxq.passes.infra import QSPEC, PassManager
    from fxq.pipeline import build_passes

    torch.manual_seed(0)
    model = Net().eval()
    gm = capture(model, (torch.randn(1, 3, 12, 12),))
    layers = [n.name for n in gm.graph.nodes if ops.is_layer(n)]
    precision = {name: 8 for name in layers}
    precision[layers[2]] = "float"   # the second conv of block 0 reads an int8 conv's output
    precision[layers[3]] = "float"
    precision[layers[4]] = "float"   # block 1 entirely float: its inner edge is float -> float
    opts = CompileOptions(layer_precision=precision)
    q = PassManager(build_passes(opts, ONNX_QDQ)).run(gm)
    nodes = {n.name: n for n in q.graph.nodes}
    spec = {name: nodes[name].meta.get(QSPEC) or {} for name in layers}
    assert spec[layers[1]]["weight"] is not None and spec[layers[1]]["inputs"]
    assert spec[layers[2]].get("weight") is None and spec[layers[2]]["inputs"]  # reads int8 data
    assert spec[layers[4]].get("weight") is None and not spec[layers[4]].get("inputs")  # float -> float


def test_cli_budget_end_to_end(net, tmp_path, capsys, one_thread):
    model, example, calib = net
    ep = torch.export.export(model, example)
    torch.export.save(ep, tmp_path / "m.pt2")
    torch.save(calib, tmp_path / "calib.pt")
    _, probe = _plan(net, 1e9, target="bitserial")
    uni = {r["precision"]: r for r in probe.uniform}
    budget = (uni[2]["latency_ms"] + uni[8]["latency_ms"]) / 2
    out = tmp_path / "out"
    code = main(["compile", str(tmp_path / "m.pt2"), "--calib", str(tmp_path / "calib.pt"), "-o", str(out),
                 "--target", "bitserial", "--budget-ms", repr(budget), "--bits", "2,4,8", "--search", "exact"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "mixed precision on bitserial" in text
    report = json.loads((out / "report.json").read_text())
    mp = report["mixed_precision"]
    assert mp["status"] == "searched" and mp["search_latency_ms"] <= budget and mp["search"] == "exact"
    bits = {row["name"]: row["weight_bits"] for row in report["layers"]}
    assert "float" in mp["precisions"]  # --bits adds the target's unquantized precision
    for name, p in mp["layers"].items():  # the plan reached the quantizers (8 may be a 7-bit grid)
        expect = {"float": (32,), 8: (8, 7)}.get(p, (p,))
        assert bits[name] in expect, (name, p, bits[name])
    search = json.loads((out / "search.json").read_text())
    assert search["pareto_front"] and search["uniform"]
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_infeasible_budget_is_a_clear_error(net, tmp_path, capsys, one_thread):
    model, example, calib = net
    torch.export.save(torch.export.export(model, example), tmp_path / "m.pt2")
    torch.save(calib, tmp_path / "calib.pt")
    out = tmp_path / "out"
    code = main(["compile", str(tmp_path / "m.pt2"), "--calib", str(tmp_path / "calib.pt"), "-o", str(out),
                 "--target", "bitserial", "--budget-ms", "1e-9"])
    _, err = capsys.readouterr()
    assert code == 2 and "fastest achievable is" in err and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("argv,phrase", [
    (["--bits", "2,4"], "needs a latency budget"),
    (["--pin", "fc=8"], "needs a latency budget"),
    (["--budget-ms", "5", "--pin", "fc"], "is not NAME=BITS"),
    (["--budget-ms", "5", "--batch", "0"], "--batch must be at least 1"),
])
def test_cli_mixed_precision_usage_errors(tmp_path, capsys, argv, phrase):
    torch.save(torch.randn(4, 3, 8, 8), tmp_path / "calib.pt")
    code = main(["compile", str(tmp_path / "missing.pt2"), "--calib", str(tmp_path / "calib.pt"),
                 "-o", str(tmp_path / "out"), *argv])
    _, err = capsys.readouterr()
    assert code == 2 and phrase in err and "Traceback" not in err


class _DepthwiseSandwich(nn.Module):
    """int8 conv -> depthwise conv (kept float) -> int8 conv. The depthwise weights span four
    orders of magnitude across channels (the last conv undoes it, so every channel matters to
    the output): a per-tensor int8 grid on them zeroes most channels."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.b = nn.Conv2d(16, 8, 1)
        with torch.no_grad():
            self.dw.weight.mul_(torch.logspace(-2, 2, 16).view(16, 1, 1, 1))
            self.dw.bias.mul_(torch.logspace(-2, 2, 16))
            self.b.weight.mul_(torch.logspace(2, -2, 16).view(1, 16, 1, 1))

    def forward(self, x):
        return self.b(F.relu(self.dw(F.relu(self.a(x)))))


def test_float_layer_between_int8_layers_runs_in_float_in_onnx_runtime():
    """ONNX Runtime's optimizer (WeightBiasQuantization) would quantize a float-weight conv fed by
    a per-tensor DQ and read by a Q; the lowering must keep it float: ONNX Runtime with every
    optimization on agrees with the fake-quant model as closely as with none."""
    import onnxruntime as ort

    from fxq.backends import lowering
    from fxq.calibrate import run_batched
    from fxq.capture import capture
    from fxq.pipeline import quantize_graph

    torch.manual_seed(0)
    x = torch.randn(8, 3, 12, 12)
    gm = capture(_DepthwiseSandwich().eval(), (x[:1],))
    layers = [n.name for n in gm.graph.nodes if ops.is_layer(n)]
    opts = CompileOptions(layer_precision={layers[0]: 8, layers[1]: "float", layers[2]: 8})
    q, _ = quantize_graph(gm, x, opts)
    model = lowering(opts.backend).lower(q, opts).SerializeToString()
    want = run_batched(q, x).numpy()

    def max_err(level) -> float:
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        got = np.concatenate([sess.run(None, {sess.get_inputs()[0].name: x[i:i + 1].numpy()})[0]
                              for i in range(len(x))])
        return float(np.abs(got - want).max() / np.abs(want).max())

    plain, optimized = max_err(ort.GraphOptimizationLevel.ORT_DISABLE_ALL), \
        max_err(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    assert plain < 0.02
    assert optimized < 0.02, f"ONNX Runtime's optimizer changed the float layer: {plain:.4f} -> {optimized:.4f}"


def test_budget_check_tightens_until_the_measured_latency_fits():
    """check_measured: an assignment predicted at the budget but measuring 10 % over it is
    replaced by the next front point whose prediction x 1.1 fits; one that fits stays."""
    from types import SimpleNamespace

    from fxq.mixed_precision import check_measured

    front = [SimpleNamespace(latency_ms=ms, layers={"ms": ms}) for ms in (10.0, 9.5, 9.0, 8.0)]
    tables = SimpleNamespace(predict_ms=lambda layers: layers["ms"])
    front_ms = [p.latency_ms for p in front]

    def resolve(budget):
        return max((p for p in front if p.latency_ms <= budget), key=lambda p: p.latency_ms)

    timed = []

    def measure(layers, factor=1.1):
        timed.append(layers["ms"])
        return {"measured_ms": layers["ms"] * factor * 2, "corrected_ms": layers["ms"] * factor, "drift": 0.5}

    sol, budget, checks, notes = check_measured(tables, front, front_ms, 10.0, front[0], 10.0, resolve, measure, 3)
    assert timed == [10.0, 9.0] and sol is front[2] and budget == 9.0
    assert [c["round"] for c in checks] == [1, 2] and checks[0]["bias"] == pytest.approx(1.1)
    assert "after 1 tightening" in notes[0]

    timed.clear()
    sol, _, checks, notes = check_measured(tables, front, front_ms, 10.0, front[0], 10.0, resolve,
                                           lambda layers: measure(layers, 0.9), 3)
    assert timed == [10.0] and sol is front[0] and len(checks) == 1

    timed.clear()  # nothing fits at the first bias: the fastest point is tried next
    sol, budget, checks, notes = check_measured(tables, front, front_ms, 10.0, front[0], 10.0, resolve,
                                                lambda layers: measure(layers, 1.0 if layers["ms"] == 8.0 else 1.3), 3)
    assert timed == [10.0, 8.0] and sol is front[3] and budget == 8.0 and "after 1 tightening" in notes[0]

    timed.clear()  # never fits: stops when nothing is faster, keeps the fastest measured, says so
    sol, _, checks, notes = check_measured(tables, front, front_ms, 10.0, front[0], 10.0, resolve,
                                           lambda layers: measure(layers, 2.0), 3)
    assert timed == [10.0, 8.0] and sol is front[3] and checks[1].get("kept") and "every candidate" in notes[0]
    assert "no faster assignment" in notes[0]

    timed.clear()  # a later, predicted-faster candidate that measures slower (noise) is not kept
    sol, budget, checks, notes = check_measured(tables, front, front_ms, 10.0, front[0], 10.0, resolve,
                                                lambda layers: measure(layers, 1.05 if layers["ms"] == 10.0 else 1.3), 2)
    assert timed == [10.0, 9.5] and sol is front[0] and budget == 10.0 and checks[0].get("kept")
    assert "round 1" in notes[0]
