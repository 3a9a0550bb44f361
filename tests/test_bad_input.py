"""The bad-input battery (issue 6): every user mistake is one clear ``error:`` paragraph with a
non-zero exit code, no traceback (unless ``--debug``), and nothing left in the output folder.

Each case runs ``fxq compile ... -o OUT`` in-process on a tiny factory model (loading it costs a
forward pass, not an export), so only the data-dependent control-flow case reaches capture.
Then: safe loading (nothing unpickled without --trust-pickle, no network), and atomic outputs
(Ctrl-C while writing leaves the previous results byte-identical).
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import socket
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fxq.cli import main

MODULE = "fxq_testmods_badinput"
SOURCE = textwrap.dedent('''
    import torch
    from torch import nn

    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            y = torch.relu(self.conv(x))
            return self.fc(y.mean((2, 3)))

    class Branchy(Small):
        def forward(self, x):
            y = torch.relu(self.conv(x))
            if y.mean() > 0.5:  # data-dependent control flow
                y = y * 2
            return self.fc(y.mean((2, 3)))

    def build():
        return Small()
''')
BRANCH_LINE = "if y.mean() > 0.5:"
FACTORY = f"{MODULE}:build"
SHAPE = ["--input-shape", "1,3,8,8"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One of every bad input, written once."""
    d = tmp_path_factory.mktemp("badinput")
    (d / f"{MODULE}.py").write_text(SOURCE)
    (d / "fxq_testmods_badimport.py").write_text("import fxq_no_such_dependency_xyz\n")
    sys.path.insert(0, str(d))
    import importlib

    mod = importlib.import_module(MODULE)
    torch.manual_seed(0)
    model = mod.Small().eval()
    # model files
    torch.save(model, d / "whole.pt")
    torch.save(model, d / "whole_legacy.pt", _use_new_zipfile_serialization=False)
    torch.save(model.state_dict(), d / "state.pt")
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, d / "tensors_dict.pt")
    ep = torch.export.export(model, (torch.randn(1, 3, 8, 8),))
    torch.export.save(ep, d / "model.pt2")
    data = (d / "model.pt2").read_bytes()
    (d / "truncated.pt2").write_bytes(data[: len(data) // 2])
    (d / "empty.pt").write_bytes(b"")
    (d / "text.pt").write_text("this is not a model\n")
    import onnx
    from onnx import helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx_bytes = helper.make_model(graph, producer_name="pytorch").SerializeToString()
    (d / "model.onnx").write_bytes(onnx_bytes)
    (d / "onnx_named.pt").write_bytes(onnx_bytes)
    # calibration data
    gen = torch.Generator().manual_seed(0)
    good = torch.randn(8, 3, 8, 8, generator=gen)
    torch.save(good, d / "calib.pt")
    data = (d / "calib.pt").read_bytes()
    (d / "calib_truncated.pt").write_bytes(data[: len(data) // 2])
    (d / "calib_empty").mkdir()
    (d / "calib_text").mkdir()
    (d / "calib_text" / "labels.txt").write_text("cat\ndog\n")
    (d / "calib_text" / "notes.csv").write_text("a,b\n")
    (d / "calib_broken").mkdir()
    (d / "calib_broken" / "cat.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    np.savez(d / "several.npz", images=good.numpy(), labels=np.arange(8))
    torch.save(torch.randn(8, 3, 9, 9), d / "wrong_shape.pt")
    torch.save(good.permute(0, 2, 3, 1).contiguous(), d / "channels_last.pt")
    torch.save((good * 255).to(torch.uint8), d / "uint8.pt")
    nan = good.clone()
    nan[2, 0, 0, 0] = float("nan")
    torch.save(nan, d / "nan.pt")
    inf = good.clone()
    inf[5, 1, 2, 3] = float("inf")
    torch.save(inf, d / "inf.pt")
    yield d
    sys.path.remove(str(d))
    for name in (MODULE, "fxq_testmods_badimport"):
        sys.modules.pop(name, None)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if the command gets as far as loading the model."""
    import fxq.loading

    def boom(*a, **k):
        raise AssertionError("the option should have been refused before loading the model")

    monkeypatch.setattr(fxq.loading, "load_model", boom)


# --------------------------------------------------------------------------- the battery

# (id, MODEL (file name in env or a spec), extra arguments, phrase the message must contain,
#  refused before the model is loaded)
CASES = [
    # MODEL
    ("missing-file", "nope.pt2", [], "does not exist", False),
    ("empty-file", "empty.pt", [], "is empty (0 bytes)", False),
    ("truncated-archive", "truncated.pt2", [], "truncated or corrupt zip archive", False),
    ("text-file-named-pt", "text.pt", [], "is a text file", False),
    ("onnx-file", "model.onnx", [], "is an ONNX model; fxq takes PyTorch models", False),
    ("onnx-content-named-pt", "onnx_named.pt", [], "is an ONNX model", False),
    ("pickled-module-without-trust", "whole.pt", [], "only does it with --trust-pickle", False),
    ("legacy-pickled-module-without-trust", "whole_legacy.pt", [], "--trust-pickle", False),
    ("dict-of-tensors", "tensors_dict.pt", [], "package.module:factory --weights", False),
    ("factory-module-missing", "fxq_no_such_pkg.models:build", SHAPE,
     "Cannot import module 'fxq_no_such_pkg.models'", False),
    ("factory-import-fails", "fxq_testmods_badimport:build", SHAPE,
     "No module named 'fxq_no_such_dependency_xyz'", False),
    ("factory-attribute-missing", f"{MODULE}:biuld", SHAPE, "Did you mean build", False),
    ("data-dependent-control-flow", f"{MODULE}:Branchy", SHAPE, BRANCH_LINE, False),
    ("input-shape-rejected", FACTORY, ["--input-shape", "1,5,8,8"],
     "does not run on input shape [1, 5, 8, 8]", False),
    ("input-shape-malformed", FACTORY, ["--input-shape", "1,3,eight,8"], "is not a shape", True),
    ("input-shape-too-large", FACTORY, ["--input-shape", "64,3,100000,100000"], "is too large", False),
    ("weights-text-file", FACTORY, [*SHAPE, "--weights", "text.pt"], "is a text file", False),
    # DATA
    ("calib-folder-empty", FACTORY, [*SHAPE, "--calib", "calib_empty"], "contains nothing", False),
    ("calib-folder-no-images", FACTORY, [*SHAPE, "--calib", "calib_text"],
     "contains no image files (only 2 other files)", False),
    ("calib-image-unreadable", FACTORY, [*SHAPE, "--calib", "calib_broken"],
     "cat.jpg' cannot be read", False),
    ("npz-several-arrays-no-x", FACTORY, [*SHAPE, "--calib", "several.npz"],
     "holds 2 arrays (images, labels) and none is named 'x'", False),
    ("calib-wrong-shape", FACTORY, [*SHAPE, "--calib", "wrong_shape.pt"],
     "has shape [8, 3, 9, 9], but the model's input is [N, 3, 8, 8]", False),
    ("calib-channels-last", FACTORY, [*SHAPE, "--calib", "channels_last.pt"], "channels-last", False),
    ("calib-wrong-dtype", FACTORY, [*SHAPE, "--calib", "uint8.pt"], "integer dtype uint8", False),
    ("calib-nan", FACTORY, [*SHAPE, "--calib", "nan.pt"], "contains 1 NaN and 0 infinite values", False),
    ("calib-inf", FACTORY, [*SHAPE, "--calib", "inf.pt"], "contains 0 NaN and 1 infinite values", False),
    ("calib-truncated", FACTORY, [*SHAPE, "--calib", "calib_truncated.pt"],
     "truncated or corrupt zip archive", False),
    ("calib-missing", FACTORY, [*SHAPE, "--calib", "nope.pt"], "does not exist", True),
    # options
    ("calib-size-0", FACTORY, [*SHAPE, "--calib-size", "0"], "--calib-size must be at least 1", True),
    ("weight-bits-1", FACTORY, [*SHAPE, "--weight-bits", "1"], "--weight-bits 1 is not supported", True),
    ("weight-bits-9", FACTORY, [*SHAPE, "--weight-bits", "9"], "--weight-bits 9 is not supported", True),
    ("budget-ms-zero", FACTORY, [*SHAPE, "--budget-ms", "0"], "--budget-ms must be a positive", True),
    ("budget-ms-negative", FACTORY, [*SHAPE, "--budget-ms", "-3"], "--budget-ms must be a positive", True),
    ("unknown-target", FACTORY, [*SHAPE, "--target", "ort-gpu"], "Unknown --target 'ort-gpu'", True),
    ("unknown-backend", FACTORY, [*SHAPE, "--backend", "tflite"],
     "argument --backend: invalid choice: 'tflite'", True),
]


def _resolve(env: Path, value: str) -> str:
    return str(env / value) if (env / value).exists() or value.endswith((".pt", ".pt2")) else value


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(capsys, env, tmp_path, monkeypatch, case):
    _, model, extra, phrase, early = case
    if early:
        import fxq.loading

        monkeypatch.setattr(fxq.loading, "load_model", lambda *a, **k: pytest.fail("model was loaded"))
    extra = [_resolve(env, e) for e in extra]
    if "--calib" not in extra:
        extra += ["--calib", str(env / "calib.pt")]
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, "compile", _resolve(env, model), *extra, "-o", out_dir,
                         "--method", "rtn")
    assert code == 2, err
    assert "error:" in err and phrase in err, err
    assert "Traceback" not in err and "Traceback" not in out
    assert out == ""
    assert not out_dir.exists(), "a failed run left its output folder behind"


def test_data_dependent_control_flow_names_line_and_fix(capsys, env, tmp_path):
    code, out, err = run(capsys, "compile", f"{MODULE}:Branchy", *SHAPE, "--calib", env / "calib.pt",
                         "-o", tmp_path / "out")
    assert code == 2 and "data-dependent control flow" in err
    assert f"{MODULE}.py:" in err and BRANCH_LINE in err          # where
    assert "torch.where" in err and "torch.cond" in err            # what to do instead
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    assert "def forward" not in err  # torch's partial graph goes to the debug log, not the terminal


def test_output_folder_not_writable(capsys, env, tmp_path, monkeypatch, no_load):
    ro = tmp_path / "ro"
    ro.mkdir()
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # root writes anywhere: refuse the write
        def refuse(*a, **k):
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    else:
        ro.chmod(0o500)
    try:
        code, out, err = run(capsys, "compile", FACTORY, *SHAPE, "--calib", env / "calib.pt", "-o", ro)
    finally:
        ro.chmod(0o700)
    assert code == 2 and "Cannot write to the output folder" in err and "Permission denied" in err, err
    assert "Traceback" not in err and list(ro.iterdir()) == []


def test_output_path_is_a_file(capsys, env, tmp_path, no_load):
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    code, out, err = run(capsys, "compile", FACTORY, *SHAPE, "--calib", env / "calib.pt", "-o", taken)
    assert code == 2 and "is a file, not a folder" in err and "Traceback" not in err, err
    code, out, err = run(capsys, "compile", FACTORY, *SHAPE, "--calib", env / "calib.pt",
                         "-o", taken / "sub")
    assert code == 2 and "part of that path is a file" in err, err
    assert taken.read_text() == "keep me"


def test_debug_shows_the_traceback(capsys, env, tmp_path):
    code, out, err = run(capsys, "compile", env / "text.pt", "--calib", env / "calib.pt",
                         "-o", tmp_path / "out", "--debug")
    assert code == 2 and "Traceback" in err and "error:" in err and "is a text file" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("one_thread")
def test_failed_run_leaves_existing_output_folder_untouched(capsys, env, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    previous = {"model.onnx": b"old onnx", "report.json": b'{"old": true}', "model.pt2": b"old pt2"}
    for name, data in previous.items():
        (out_dir / name).write_bytes(data)
    for model, extra in [(f"{MODULE}:Branchy", []),                       # fails in capture
                         (FACTORY, ["--calib", env / "nan.pt"]),           # fails on the data
                         (env / "whole.pt", [])]:                          # fails on the model
        extra = extra or ["--calib", env / "calib.pt"]
        code, out, err = run(capsys, "compile", model, *SHAPE, *extra, "-o", out_dir)
        assert code == 2 and "Traceback" not in err, err
        assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == previous


# --------------------------------------------------------------------------- safe loading


@pytest.fixture
def torch_load_calls(monkeypatch):
    """Every torch.load call's weights_only flag (the CLI's loaders call torch.load at run time)."""
    calls: list = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


def test_nothing_is_unpickled_without_trust_pickle(capsys, env, tmp_path, torch_load_calls, monkeypatch):
    unpickled = []
    real_loads, real_unpickler = pickle.loads, pickle.Unpickler

    class Watch(real_unpickler):
        def find_class(self, module, name):
            unpickled.append(f"{module}.{name}")
            return super().find_class(module, name)

    monkeypatch.setattr(pickle, "Unpickler", Watch)
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: unpickled.append("loads") or real_loads(*a, **k))
    for argv in (["inspect", env / "whole.pt", *SHAPE],               # refused: names --trust-pickle
                 ["inspect", env / "whole_legacy.pt", *SHAPE],
                 ["inspect", FACTORY, *SHAPE, "--weights", env / "whole.pt"],
                 ["compile", FACTORY, *SHAPE, "--calib", env / "whole.pt", "-o", tmp_path / "o"]):
        code, out, err = run(capsys, *argv)
        assert code == 2 and "Traceback" not in err, err
        assert "--trust-pickle" in err or "weights_only=True" in err, err
    # A state dict as --weights and a tensor as --calib load, weights-only.
    code, out, err = run(capsys, "inspect", FACTORY, *SHAPE, "--weights", env / "state.pt")
    assert code == 0, err
    assert torch_load_calls and all(flag is True for flag in torch_load_calls), torch_load_calls
    assert unpickled == [], unpickled
    # Only --trust-pickle unpickles (and then the module's class is imported).
    code, out, err = run(capsys, "inspect", env / "whole.pt", *SHAPE, "--trust-pickle")
    assert code == 0, err
    assert False in torch_load_calls


def test_export_archive_pickles_are_checked_weights_only(capsys, env, torch_load_calls):
    code, out, err = run(capsys, "inspect", env / "model.pt2")
    assert code == 0, err
    assert all(flag is not False for flag in torch_load_calls), torch_load_calls


@pytest.mark.usefixtures("one_thread")
def test_no_network_access(capsys, env, tmp_path, monkeypatch):
    """Loading (a factory, torchvision random init) and a whole compile never open a socket."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:] or kwargs)
        raise OSError("fxq test: network access attempted")

    for name in ("connect", "connect_ex", "sendto"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    from fxq.loading import load_model

    load_model("torchvision:squeezenet1_1")
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, "compile", FACTORY, *SHAPE, "--calib", env / "calib.pt", "-o", out_dir,
                         "--method", "rtn")
    assert code == 0, err
    assert attempts == []
    assert {"model.onnx", "model.pt2", "report.json"} <= {p.name for p in out_dir.iterdir()}


PRODUCT = Path(__file__).resolve().parents[1]
NETWORK_APIS = ("torch.hub", "urllib", "import requests", "http.client", "load_state_dict_from_url",
                "download_url", "urlopen", "socket.")


def test_product_code_has_no_download_path():
    sources = [p for folder in ("fxq", "passes", "backends") for p in (PRODUCT / folder).rglob("*.py")]
    assert sources
    hits = [f"{p.relative_to(PRODUCT)}: {api}" for p in sources for api in NETWORK_APIS
            if api in p.read_text()]
    assert hits == []


# --------------------------------------------------------------------------- atomic outputs


def _interrupt_export_save(monkeypatch):
    """torch.export.save writes half of model.pt2, then the user presses Ctrl-C."""
    def save(ep, f, *a, **k):
        Path(f).write_bytes(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.export, "save", save)


def _interrupt_report(monkeypatch):
    """Ctrl-C while report.json (the last file) is being flushed to disk."""
    import fxq.atomic

    real = fxq.atomic._fsync

    def fsync(path):
        if "report" in Path(path).name:
            raise KeyboardInterrupt
        real(path)

    monkeypatch.setattr(fxq.atomic, "_fsync", fsync)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("interrupt", [_interrupt_export_save, _interrupt_report],
                         ids=["while-writing-model.pt2", "while-writing-report.json"])
def test_ctrl_c_while_writing_keeps_previous_outputs(capsys, env, tmp_path, monkeypatch, interrupt):
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, "compile", FACTORY, *SHAPE, "--calib", env / "calib.pt", "-o", out_dir)
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    assert {"model.onnx", "model.pt2", "report.json"} <= set(before)

    interrupt(monkeypatch)
    # Different settings, so every artifact of this run would differ from the previous ones.
    code, out, err = run(capsys, "compile", FACTORY, *SHAPE, "--calib", env / "calib.pt", "-o", out_dir,
                         "--weight-bits", "4", "--seed", "7")
    assert code == 130 and "interrupted; previous outputs left intact" in err, err
    after = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    assert after == before  # byte-identical, and no temp files left
    assert json.loads(after["report.json"])["weight_bits"] == 8


def test_deferred_commit_replaces_a_folder_all_or_nothing(tmp_path):
    from fxq.atomic import atomic_path, atomic_write_bytes, atomic_write_text, deferred_commit

    (tmp_path / "a.onnx").write_bytes(b"old a")
    (tmp_path / "report.json").write_text("old report")
    with pytest.raises(KeyboardInterrupt):
        with deferred_commit(tmp_path):
            atomic_write_bytes(tmp_path / "a.onnx", b"new a")
            atomic_write_bytes(tmp_path / "a.onnx", b"newer a")    # rewritten: one temp file kept
            (tmp_path / "sub").mkdir()
            atomic_write_text(tmp_path / "sub" / "ckpt", "kept")   # another folder: commits at once
            assert (tmp_path / "a.onnx").read_bytes() == b"old a"  # nothing renamed yet
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "report.json", "sub"]
    assert (tmp_path / "a.onnx").read_bytes() == b"old a" and (tmp_path / "sub" / "ckpt").read_text() == "kept"
    with deferred_commit(tmp_path):
        atomic_write_text(tmp_path / "report.json", "new report")
        with atomic_path(tmp_path / "b.pt2") as tmp:
            tmp.write_bytes(b"new b")
    assert (tmp_path / "report.json").read_text() == "new report"
    assert (tmp_path / "b.pt2").read_bytes() == b"new b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.pt2", "report.json", "sub"]
