"""--device: resolving the request, caches on the device, and (on a machine with a CUDA GPU)
reconstruction there. The GPU tests skip cleanly elsewhere."""
from __future__ import annotations

import pytest
import torch

from fxq.devices import cache_cap, on_device, resolve_device
from fxq.errors import FxqError
from fxq.options import CompileOptions
from fxq.pipeline import compile_model
from fxq.region_graph import MemoryBudget, ValueStore
from test_pipeline import _calib, _model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_auto_picks_the_gpu_only_when_there_is_one():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("CPU").type == "cpu"
    assert cache_cap(torch.device("cpu"), 123) == 123


@pytest.mark.parametrize("name,phrase", [("tpu", "not a device fxq knows"),
                                         ("mps", "CPU or on CUDA GPUs only")])
def test_unknown_devices_are_refused_with_the_choices(name, phrase):
    with pytest.raises(FxqError, match=phrase) as info:
        resolve_device(name)
    assert "cuda:N" in info.value.fix


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_asking_for_cuda_without_a_gpu_says_what_to_do():
    with pytest.raises(FxqError, match="sees no CUDA GPU") as info:
        resolve_device("cuda")
    assert "--device cpu" in info.value.fix


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_compile_refuses_a_missing_gpu_before_any_work(tmp_path):
    opts = CompileOptions(out_dir=tmp_path / "out", method="brecq", device="cuda", iters=2)
    with pytest.raises(FxqError, match="sees no CUDA GPU"):
        compile_model((_model(), (torch.zeros(1, 3, 16, 16),)), _calib(), opts)
    assert not (tmp_path / "out").exists()


def test_spilled_values_come_back_on_the_budget_device(tmp_path):
    budget = MemoryBudget(0, spill_dir=tmp_path, device="cpu")  # nothing fits: every value spills
    store = ValueStore("x", budget)
    store.append(torch.arange(6.0).reshape(2, 3))
    assert store.spilled == 1 and torch.equal(store[0], torch.arange(6.0).reshape(2, 3))


def _brecq(out, device):
    opts = CompileOptions(out_dir=out, weight_bits=3, act_bits=4, first_last_bits=0, holdout=16,
                          method="brecq", iters=40, device=device)
    keep = {}
    report = compile_model((_model(), (torch.zeros(1, 3, 16, 16),)), _calib(), opts, keep=keep)
    return report, keep["graph_module"]


@cuda
def test_reconstruction_on_the_gpu_lowers_losses_and_returns_the_model_to_the_cpu(tmp_path):
    report, gm = _brecq(tmp_path / "a", "cuda")
    assert report["reconstruction"]["device"].startswith("cuda")
    regions = [r for r in report["regions"] if r["loss_before"] is not None]
    assert regions and all(r["loss_after"] < r["loss_before"] for r in regions)
    assert all(t.device.type == "cpu" for t in list(gm.parameters()) + list(gm.buffers()))
    again, _ = _brecq(tmp_path / "b", "cuda")  # same seed, same GPU: the same artifact
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (tmp_path / "b" / "model.onnx").read_bytes()


@cuda
def test_on_device_moves_constants_and_factories_and_restores_them():
    class WithConstant(torch.nn.Module):
        def forward(self, x):
            return x + torch.ones(3, device=x.device) + torch.zeros(3)

    gm = torch.fx.symbolic_trace(WithConstant())
    gm.const = torch.arange(3.0)
    with gm.graph.inserting_before(next(iter(reversed(gm.graph.nodes)))):
        c = gm.graph.get_attr("const")
    out = next(iter(reversed(gm.graph.nodes)))
    with gm.graph.inserting_before(out):
        s = gm.graph.call_function(torch.add, (out.args[0], c))
    out.args = (s,)
    gm.recompile()
    with on_device(gm, torch.device("cuda")):
        y = gm(torch.zeros(3, device="cuda"))
        assert y.device.type == "cuda" and gm.const.device.type == "cuda"
    assert gm.const.device.type == "cpu"
    assert torch.equal(gm(torch.zeros(3)), torch.tensor([1.0, 2.0, 3.0]))
