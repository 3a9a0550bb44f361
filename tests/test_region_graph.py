"""Region sub-graphs reproduce the model's values; value caches stream, stop early and spill."""
import torch

from fxq.capture import capture
from fxq.options import CompileOptions
from fxq.pipeline import quantize_graph
from fxq.region_graph import MemoryBudget, extract_region, record_values
from test_pipeline import _calib, _model


def _quantized():
    gm = capture(_model(), (torch.zeros(1, 3, 16, 16),))
    gm, _ = quantize_graph(gm, _calib(), CompileOptions(weight_range="reduced"))
    return gm


def test_every_region_subgraph_reproduces_the_model_values():
    gm = _quantized()
    regions = gm.meta["fxq.regions"]
    assert [r.kind for r in regions].count("residual") == 1
    budget = MemoryBudget(1 << 30)
    for region in regions:
        sub, inputs = extract_region(gm, region.output, list(region.inputs))
        stores = record_values(gm, _calib(6), inputs + [region.output], budget)
        for i in range(len(stores[region.output])):
            got = sub(*[stores[name][i] for name in inputs])
            torch.testing.assert_close(got, stores[region.output][i], atol=0, rtol=0)
        # the sub-graph shares the model's quantizers: no copies were made
        shared = {id(m) for m in sub.modules()} & {id(m) for m in gm.fxq_q.modules()}
        assert shared - {id(gm.fxq_q)}


def test_values_spill_to_disk_past_the_budget_and_read_back_equal(tmp_path):
    gm = _quantized()
    last = [n.name for n in gm.graph.nodes if n.op == "call_function"][-1]
    in_memory = record_values(gm, _calib(8), [last], MemoryBudget(1 << 30))
    budget = MemoryBudget(max_bytes=1, spill_dir=tmp_path)
    spilled = record_values(gm, _calib(8), [last], budget)
    assert spilled[last].spilled == len(spilled[last]) == 8
    assert len(list(tmp_path.iterdir())) == 8
    for i in range(8):
        torch.testing.assert_close(spilled[last][i], in_memory[last][i], atol=0, rtol=0)
