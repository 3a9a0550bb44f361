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


def test_frontier_values_equal_a_full_rerun_region_after_region():
    from fxq.frontier import Frontier

    gm = _quantized()
    data = _calib(40)
    frontier = Frontier(gm, data, MemoryBudget(1 << 30))
    for region in gm.meta["fxq.regions"]:
        sub, names = extract_region(gm, region.output, list(region.inputs))
        got = frontier.get(names)
        want = record_values(gm, data, names, MemoryBudget(1 << 30))
        for name in names:
            assert len(got[name]) == len(want[name]) == 40
            a = torch.cat([got[name][i] for i in range(40)])
            b = torch.cat([want[name][i] for i in range(40)])
            # batched convolutions differ from single ones in the last float bit, which can move
            # an activation by one quantization step now and then; nothing more
            assert float((a - b).abs().mean()) <= 1e-3 * float(b.abs().mean())
        # training changes the region's quantizers; values downstream must follow
        trained = {n.target for n in sub.graph.nodes if n.op == "call_module"}
        for target in trained:
            mod = gm.get_submodule(target)
            if hasattr(mod, "zero_point"):
                mod.scale.mul_(1.1)
        frontier.forget(trained)


def test_frontier_falls_back_to_single_batches_when_the_batch_is_baked_in():
    from fxq.frontier import Frontier

    class Baked(torch.nn.Module):
        def forward(self, x):
            return x.reshape(1, -1, 4).sum(1) * 2.0  # batch size 1 baked into the reshape

    gm = torch.fx.symbolic_trace(Baked())
    data = torch.randn(10, 8)
    out_name = list(gm.graph.nodes)[-1].args[0].name
    frontier = Frontier(gm, data, MemoryBudget(1 << 30))
    got = frontier.get([out_name])[out_name]
    for i in range(10):
        torch.testing.assert_close(got[i], data[i:i + 1].reshape(1, -1, 4).sum(1) * 2.0)
    assert frontier.batched and not any(frontier.batched.values())
