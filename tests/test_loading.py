"""MODEL loading: every form works, every bad input gets a clear ModelLoadError."""
from __future__ import annotations

import io
import sys
import textwrap
import zipfile

import pytest
import torch
from torch import nn

from fxq.errors import ModelLoadError
from fxq.loading import LoadedModel, load_model, parse_input_shape

FACTORY_MODULE = "fxq_testmods_loading"

FACTORY_SOURCE = textwrap.dedent('''
    import torch
    from torch import nn

    INPUT_SHAPE = (1, 3, 8, 8)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)))

    class Declares(Net):
        example_input_shape = (2, 3, 6, 6)

    def build():
        return Net()

    def needs_args(width):
        return Net()

    def returns_int():
        return 3

    def raises():
        raise ValueError("no such config")

    NOT_CALLABLE = 5
    INSTANCE = Net()
''')


@pytest.fixture(scope="module")
def factory_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("factories")
    (folder / f"{FACTORY_MODULE}.py").write_text(FACTORY_SOURCE)
    (folder / "fxq_testmods_broken.py").write_text("import not_a_real_package_xyz\n")
    (folder / "fxq_testmods_noshape.py").write_text(
        "from torch import nn\n\ndef build_mlp():\n"
        "    return nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 3))\n")
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    for name in (FACTORY_MODULE, "fxq_testmods_broken", "fxq_testmods_noshape"):
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def net(factory_dir):
    import importlib

    return importlib.import_module(FACTORY_MODULE).Net().eval()


@pytest.fixture(scope="module")
def files(net, tmp_path_factory):
    """One of each kind of model file, written once."""
    d = tmp_path_factory.mktemp("models")
    ep = torch.export.export(net, (torch.randn(1, 3, 8, 8),))
    torch.export.save(ep, d / "model.pt2")
    torch.export.save(ep, d / "exported.pt")          # an export archive with a .pt name
    torch.save(net, d / "whole.pt")
    torch.save(net.state_dict(), d / "state.pt")
    torch.save({"state_dict": net.state_dict(), "epoch": 3}, d / "checkpoint.pth")
    from safetensors.torch import save_file

    save_file(net.state_dict(), str(d / "state.safetensors"))
    torch.save(torch.randn(4, 3, 8, 8), d / "tensor.pt")
    (d / "text.pt").write_text("this is not a model\n")
    (d / "empty.pt").write_bytes(b"")
    data = (d / "model.pt2").read_bytes()
    (d / "truncated.pt2").write_bytes(data[: len(data) // 2])
    return d


def _err(spec, **kw) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_model(str(spec), **kw)
    return info.value.message


# ----------------------------------------------------------------------------- forms


def test_export_archive_carries_its_inputs(files):
    for name in ("model.pt2", "exported.pt"):
        lm = load_model(str(files / name))
        assert isinstance(lm, LoadedModel)
        assert isinstance(lm.module, torch.export.ExportedProgram)
        assert lm.input_shapes == [(1, 3, 8, 8)]
        assert "torch.export archive" in lm.source


def test_export_archive_with_explicit_shape(files):
    lm = load_model(str(files / "model.pt2"), input_shape="1,3,8,8")
    assert lm.input_shapes == [(1, 3, 8, 8)]


def test_factory_with_shape_weights_and_module_default(files, net):
    lm = load_model(f"{FACTORY_MODULE}:build", input_shape="2,3,5,5")
    assert isinstance(lm.module, nn.Module) and not lm.module.training
    assert lm.input_shapes == [(2, 3, 5, 5)]
    # INPUT_SHAPE in the factory's module is the default.
    assert load_model(f"{FACTORY_MODULE}:build").input_shapes == [(1, 3, 8, 8)]
    # example_input_shape on the module wins over the module global.
    assert load_model(f"{FACTORY_MODULE}:Declares").input_shapes == [(2, 3, 6, 6)]
    for weights in ("state.pt", "state.safetensors", "checkpoint.pth"):
        lm = load_model(f"{FACTORY_MODULE}:build", weights=str(files / weights))
        assert torch.equal(lm.module.conv.weight, net.conv.weight)


def test_factory_needs_shape_when_not_declared(factory_dir):
    msg = _err("fxq_testmods_noshape:build_mlp")
    assert "needs --input-shape" in msg
    assert load_model("fxq_testmods_noshape:build_mlp", input_shape="4,10").input_shapes == [(4, 10)]


def test_torchvision_random_init_is_seeded_and_leaves_rng_alone():
    import torchvision

    rng = torch.get_rng_state()
    lm = load_model("torchvision:resnet18")
    assert torch.equal(torch.get_rng_state(), rng)
    assert lm.input_shapes == [(1, 3, 224, 224)]
    assert "random init" in lm.source
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ref = torchvision.models.resnet18()
    assert torch.equal(lm.module.conv1.weight, ref.conv1.weight)


def test_pickled_module_needs_trust(files):
    msg = _err(files / "whole.pt")
    assert "--trust-pickle" in msg and "runs code" in msg
    lm = load_model(str(files / "whole.pt"), trust_pickle=True)
    assert isinstance(lm.module, nn.Module)
    assert lm.input_shapes == [(1, 3, 8, 8)]  # from INPUT_SHAPE of the class's module


def test_parse_input_shape():
    assert parse_input_shape("1,3,224,224") == [(1, 3, 224, 224)]
    assert parse_input_shape("1x3x32x32") == [(1, 3, 32, 32)]
    assert parse_input_shape("1,3,8,8; 1,10") == [(1, 3, 8, 8), (1, 10)]
    assert parse_input_shape((1, 3, 4, 4)) == [(1, 3, 4, 4)]
    assert parse_input_shape(None) is None
    for bad in ("", "1,3,,4", "a,b", "1,0,3", "1,-3", "1.5,3"):
        with pytest.raises(ModelLoadError, match="input-shape"):
            parse_input_shape(bad)


# ----------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    assert "does not exist" in _err(tmp_path / "nope.pt2")
    assert "does not exist" in _err("nope.pt")


def test_folder_as_model(tmp_path):
    assert "is a folder" in _err(tmp_path)


def test_empty_file(files):
    assert "empty" in _err(files / "empty.pt")


def test_truncated_archive(files):
    assert "truncated or corrupt" in _err(files / "truncated.pt2")


def test_corrupt_archive_contents(files, tmp_path):
    # A well-formed zip that claims to be an export archive but holds garbage.
    bad = tmp_path / "bad.pt2"
    with zipfile.ZipFile(files / "model.pt2") as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("models/model.json"):
                data = b"{not json"
            dst.writestr(item, data)
    msg = _err(bad)
    assert "could not be loaded" in msg and "re-export" in msg


def test_archive_with_unsafe_pickle_needs_trust(files, tmp_path):
    bad = tmp_path / "unsafe.pt2"
    evil = io.BytesIO()
    torch.save(nn.ReLU(), evil)  # any non-tensor object the weights-only unpickler refuses
    with zipfile.ZipFile(files / "model.pt2") as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if "sample_inputs" in item.filename:
                data = evil.getvalue()
            dst.writestr(item, data)
    msg = _err(bad)
    assert "--trust-pickle" in msg and "arbitrary code" in msg


def test_text_file_named_pt(files):
    msg = _err(files / "text.pt")
    assert "text file" in msg and "not a PyTorch model" in msg


def test_onnx_file(tmp_path):
    import onnx
    from onnx import helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    data = helper.make_model(graph, producer_name="pytorch").SerializeToString()
    (tmp_path / "model.onnx").write_bytes(data)
    (tmp_path / "renamed.pt").write_bytes(data)  # detected by content too
    for name in ("model.onnx", "renamed.pt"):
        msg = _err(tmp_path / name)
        assert "ONNX" in msg and "PyTorch models" in msg


def test_state_dict_as_model(files):
    for name in ("state.pt", "checkpoint.pth"):
        msg = _err(files / name)
        assert "state dict" in msg and "--weights" in msg and "package.module:factory" in msg


def test_tensor_as_model(files):
    assert "single tensor of shape [4, 3, 8, 8]" in _err(files / "tensor.pt")


def test_factory_import_errors(factory_dir):
    msg = _err("no_such_pkg_xyz.models:build")
    assert "no_such_pkg_xyz.models" in msg and "No module named 'no_such_pkg_xyz'" in msg
    msg = _err("fxq_testmods_broken:build")
    assert "fxq_testmods_broken" in msg and "not_a_real_package_xyz" in msg


def test_factory_attribute_errors(factory_dir):
    msg = _err(f"{FACTORY_MODULE}:biuld")
    assert "no attribute 'biuld'" in msg and "build" in msg
    assert "not callable" in _err(f"{FACTORY_MODULE}:NOT_CALLABLE")
    assert "nn.Module instance, not a factory" in _err(f"{FACTORY_MODULE}:INSTANCE")
    assert "needs arguments (width)" in _err(f"{FACTORY_MODULE}:needs_args")
    assert "returned a builtins.int, not an nn.Module" in _err(f"{FACTORY_MODULE}:returns_int")
    assert "no such config" in _err(f"{FACTORY_MODULE}:raises")


def test_unknown_torchvision_name_suggests():
    msg = _err("torchvision:resnet81")
    assert "no model named 'resnet81'" in msg and "resnet18" in msg


def test_weights_mismatch_lists_keys(files, tmp_path):
    other = nn.Sequential(nn.Conv2d(3, 4, 3))
    torch.save(other.state_dict(), tmp_path / "other.pt")
    msg = _err(f"{FACTORY_MODULE}:build", weights=str(tmp_path / "other.pt"))
    assert "do not match" in msg and "missing: conv.weight" in msg and "unexpected: 0.weight" in msg
    wrong = {k: v for k, v in torch.load(files / "state.pt").items()}
    wrong["fc.weight"] = torch.zeros(7, 4)
    torch.save(wrong, tmp_path / "wrong_shape.pt")
    msg = _err(f"{FACTORY_MODULE}:build", weights=str(tmp_path / "wrong_shape.pt"))
    assert "fc.weight (file [7, 4], model [2, 4])" in msg


def test_weights_file_problems(files, tmp_path):
    assert "does not exist" in _err(f"{FACTORY_MODULE}:build", weights=str(tmp_path / "x.pt"))
    assert "not a plain state dict" in _err(f"{FACTORY_MODULE}:build", weights=str(files / "whole.pt"))
    assert "empty" in _err(f"{FACTORY_MODULE}:build", weights=str(files / "empty.pt"))
    (tmp_path / "bad.safetensors").write_bytes(b"garbage!")
    assert "safetensors" in _err(f"{FACTORY_MODULE}:build", weights=str(tmp_path / "bad.safetensors"))
    assert "already holds its weights" in _err(files / "model.pt2", weights=str(files / "state.pt"))


def test_input_shape_syntax(factory_dir):
    assert "is not a shape" in _err(f"{FACTORY_MODULE}:build", input_shape="1,3,2a4")


def test_input_shape_the_model_rejects(files, factory_dir):
    msg = _err(f"{FACTORY_MODULE}:build", input_shape="1,3")
    assert "does not run on input shape [1, 3]" in msg and "\n" not in msg
    msg = _err(files / "model.pt2", input_shape="1,3,9,9")
    assert "does not run on input shape [1, 3, 9, 9]" in msg and "exported with input shape [1, 3, 8, 8]" in msg


def test_bad_spec():
    assert "neither an existing file" in _err("what:is-this")
