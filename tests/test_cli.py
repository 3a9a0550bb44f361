"""The fxq command line: exit codes, one-paragraph errors without tracebacks, option validation
before anything heavy, no output left behind on failure; and the atomic writers it relies on."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fxq import atomic
from fxq.cli import main

FACTORY_MODULE = "fxq_testmods_cli"
FACTORY_SOURCE = textwrap.dedent('''
    import warnings
    import torch
    from torch import nn

    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            y = torch.relu(self.bn(self.conv(x)))
            y = y + self.conv2(y)
            return self.fc(y.mean((2, 3)))

    class Noisy(Small):
        def forward(self, x):
            warnings.warn("fxq-test-noisy-warning")
            return super().forward(x)

    def build():
        return Small()
''')


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Model and data files shared by the CLI tests (built once: export is the slow part)."""
    d = tmp_path_factory.mktemp("cli")
    (d / f"{FACTORY_MODULE}.py").write_text(FACTORY_SOURCE)
    sys.path.insert(0, str(d))
    import importlib

    mod = importlib.import_module(FACTORY_MODULE)
    model = mod.Small().eval()
    ep = torch.export.export(model, (torch.randn(1, 3, 8, 8),))
    torch.export.save(ep, d / "model.pt2")
    torch.save(model, d / "whole.pt")
    torch.save(model.state_dict(), d / "state.pt")
    (d / "text.pt").write_text("hello\n")
    (d / "empty.pt").write_bytes(b"")
    (d / "model.onnx").write_bytes(b"\x08\x07\x12\x07pytorch")
    torch.save(torch.randn(8, 3, 8, 8), d / "calib.pt")
    yield d
    sys.path.remove(str(d))
    sys.modules.pop(FACTORY_MODULE, None)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code, out, err, phrase, exit_code=2):
    assert code == exit_code, err
    assert "error:" in err and phrase in err, err
    assert "Traceback" not in err and "Traceback" not in out
    assert out == ""


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if the command gets as far as loading the model."""
    import fxq.loading

    def boom(*a, **k):
        raise AssertionError("validation should have stopped before loading the model")

    monkeypatch.setattr(fxq.loading, "load_model", boom)


# ----------------------------------------------------------------------------- basics


def test_no_command_prints_help(capsys):
    code, out, err = run(capsys)
    assert code == 2 and "inspect" in err and "compile" in err


def test_help_and_version(capsys):
    assert run(capsys, "--help")[0] == 0
    code, out, _ = run(capsys, "--version")
    assert code == 0 and "fxq" in out


def test_python_m_fxq_and_lazy_torch(tmp_path):
    # `python -m fxq` works, and option handling does not pay for importing torch.
    code = ("import sys, fxq.cli; rc = fxq.cli.main(['--version']); "
            "print('torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip().endswith("False"), res.stdout + res.stderr
    res = subprocess.run([sys.executable, "-m", "fxq", "compile", "x.pt2", "--calib", "nope"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 2 and "error:" in res.stderr and "Traceback" not in res.stderr


# ----------------------------------------------------------------------------- compile validation


VALIDATION_CASES = [
    (["--weight-bits", "9"], "--weight-bits 9 is not supported"),
    (["--weight-bits", "1"], "--weight-bits 1 is not supported"),
    (["--act-bits", "16"], "--act-bits 16 is not supported"),
    (["--first-last-bits", "1"], "--first-last-bits 1 is not supported"),
    (["--bits", "2,9"], "unsupported width(s) 9"),
    (["--bits", "two"], "is not a list of bit-widths"),
    (["--budget-ms", "0"], "--budget-ms must be a positive"),
    (["--budget-ms", "-2"], "--budget-ms must be a positive"),
    (["--budget-ms", "nan"], "--budget-ms must be a positive"),
    (["--iters", "0"], "--iters must be at least 1"),
    (["--calib-size", "0"], "--calib-size must be at least 1"),
    (["--calib-size", "-5"], "--calib-size must be at least 1"),
    (["--seed", "-1"], "--seed must be between"),
    (["--drop-prob", "1"], "--drop-prob must be in [0, 1)"),
    (["--drop-prob", "-0.1"], "--drop-prob must be in [0, 1)"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
    (["--input-shape", "1,3,x"], "is not a shape"),
    (["--target", "profile.json"], "does not exist"),
]


@pytest.mark.parametrize("extra,phrase", VALIDATION_CASES, ids=[" ".join(c[0]) for c in VALIDATION_CASES])
def test_compile_validates_options_before_loading(capsys, env, tmp_path, no_load, extra, phrase):
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, "compile", env / "model.pt2", "--calib", env / "calib.pt",
                         "-o", out_dir, *extra)
    assert_user_error(code, out, err, phrase)
    assert not out_dir.exists()


@pytest.mark.parametrize("flag,value", [("--backend", "tflite"), ("--method", "obq"),
                                        ("--granularity", "layerz"), ("--loss", "l1"),
                                        ("--preset", "slow"), ("--preprocess", "torch"),
                                        ("--tuning", "sequential"),
                                        ("--weight-bits", "four")])
def test_compile_rejects_unknown_choices(capsys, env, tmp_path, no_load, flag, value):
    code, out, err = run(capsys, "compile", env / "model.pt2", "--calib", env / "calib.pt",
                         "-o", tmp_path / "out", flag, value)
    assert code == 2 and "error:" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_compile_unknown_target(capsys, env, tmp_path, no_load):
    from fxq import options

    if getattr(options, "TARGETS", None) is None:
        pytest.skip("fxq.options defines no TARGETS list yet; targets are checked by the pipeline")
    code, out, err = run(capsys, "compile", env / "model.pt2", "--calib", env / "calib.pt",
                         "-o", tmp_path / "out", "--target", "ort-cpuu")
    assert_user_error(code, out, err, "Unknown --target 'ort-cpuu'")


def test_compile_negative_budget_check_rounds(capsys, env, tmp_path, no_load):
    code, out, err = run(capsys, "compile", env / "model.pt2", "--calib", env / "calib.pt",
                         "-o", tmp_path / "out", "--budget-ms", "5", "--budget-check-rounds", "-1")
    assert_user_error(code, out, err, "--budget-check-rounds must be 0 or more")


def test_compile_missing_inputs(capsys, env, tmp_path, no_load):
    code, out, err = run(capsys, "compile", env / "model.pt2", "--calib", tmp_path / "nope",
                         "-o", tmp_path / "out")
    assert_user_error(code, out, err, "Calibration data")
    code, out, err = run(capsys, "compile", env / "model.pt2", "--calib", env / "calib.pt",
                         "--weights", tmp_path / "nope.pt", "-o", tmp_path / "out")
    assert_user_error(code, out, err, "Weights file")
    assert not (tmp_path / "out").exists()


def test_compile_output_path_is_a_file(capsys, env, tmp_path, no_load):
    (tmp_path / "taken").write_text("x")
    code, out, err = run(capsys, "compile", env / "model.pt2", "--calib", env / "calib.pt",
                         "-o", tmp_path / "taken")
    assert_user_error(code, out, err, "is a file, not a folder")
    code, out, err = run(capsys, "compile", env / "model.pt2", "--calib", env / "calib.pt",
                         "-o", tmp_path / "taken" / "sub")
    assert_user_error(code, out, err, "Cannot create the output folder")
    assert (tmp_path / "taken").read_text() == "x"


def test_compile_model_error_leaves_no_output(capsys, env, tmp_path):
    fresh = tmp_path / "fresh"
    code, out, err = run(capsys, "compile", env / "whole.pt", "--calib", env / "calib.pt",
                         "-o", fresh / "nested")
    assert_user_error(code, out, err, "--trust-pickle")
    assert not fresh.exists()
    # An existing output folder keeps its earlier results untouched.
    old = tmp_path / "old"
    old.mkdir()
    (old / "report.json").write_text("{}")
    code, out, err = run(capsys, "compile", env / "text.pt", "--calib", env / "calib.pt", "-o", old)
    assert_user_error(code, out, err, "text file")
    assert sorted(p.name for p in old.iterdir()) == ["report.json"]


def test_compile_calibration_error(capsys, env, tmp_path):
    torch.save(torch.randn(4, 3, 9, 9), tmp_path / "wrong.pt")
    code, out, err = run(capsys, "compile", env / "model.pt2", "--calib", tmp_path / "wrong.pt",
                         "-o", tmp_path / "out")
    assert_user_error(code, out, err, "[N, 3, 8, 8]")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- model errors


MODEL_ERRORS = [
    ("missing.pt2", [], "does not exist"),
    ("empty.pt", [], "empty"),
    ("text.pt", [], "text file"),
    ("model.onnx", [], "fxq takes PyTorch models"),
    ("whole.pt", [], "Unpickling runs code"),
    ("state.pt", [], "state dict"),
    ("no_such_pkg_xyz.mod:build", [], "Cannot import module 'no_such_pkg_xyz.mod'"),
    ("torchvision:resnet81", [], "Did you mean resnet18"),
    (f"{FACTORY_MODULE}:build", [], "needs --input-shape"),
    (f"{FACTORY_MODULE}:build", ["--input-shape", "1,3,,8"], "is not a shape"),
    (f"{FACTORY_MODULE}:build", ["--input-shape", "1,5,8,8"], "does not run on input shape [1, 5, 8, 8]"),
    (f"{FACTORY_MODULE}:build", ["--input-shape", "1,3,8,8", "--weights", "whole.pt"],
     "not a plain state dict"),
]


@pytest.mark.parametrize("model,extra,phrase", MODEL_ERRORS, ids=[f"{m} {' '.join(e)}" for m, e, _ in MODEL_ERRORS])
def test_inspect_model_errors(capsys, env, model, extra, phrase):
    spec = env / model if not (":" in model) else model
    extra = [str(env / e) if (env / e).exists() else e for e in extra]
    code, out, err = run(capsys, "inspect", spec, *extra)
    assert_user_error(code, out, err, phrase)


def test_debug_shows_traceback(capsys, env):
    code, out, err = run(capsys, "inspect", env / "text.pt", "--debug")
    assert code == 2 and "Traceback" in err and "error:" in err


def test_internal_error(capsys, env, monkeypatch):
    import fxq.loading

    def broken(*a, **k):
        raise ValueError("boom\nsecond line")

    monkeypatch.setattr(fxq.loading, "load_model", broken)
    code, out, err = run(capsys, "inspect", env / "model.pt2")
    assert code == 1 and "internal error: ValueError: boom" in err and "rerun with --debug" in err
    assert "Traceback" not in err and "second line" not in err
    code, out, err = run(capsys, "inspect", env / "model.pt2", "--debug")
    assert code == 1 and "Traceback" in err


def test_keyboard_interrupt(capsys, env, tmp_path, monkeypatch):
    import fxq.loading

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(fxq.loading, "load_model", interrupted)
    old = tmp_path / "out"
    old.mkdir()
    (old / "model.onnx").write_bytes(b"previous")
    code, out, err = run(capsys, "compile", env / "model.pt2", "--calib", env / "calib.pt", "-o", old)
    assert code == 130 and "interrupted; previous outputs left intact" in err
    assert (old / "model.onnx").read_bytes() == b"previous" and len(list(old.iterdir())) == 1


def test_torch_warnings_silenced_unless_debug(capsys, env):
    import warnings

    argv = ["inspect", f"{FACTORY_MODULE}:Noisy", "--input-shape", "1,3,5,5"]
    for debug in (False, True):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            run(capsys, *argv, *(["--debug"] if debug else []))
        shown = any("fxq-test-noisy-warning" in str(w.message) for w in seen)
        assert shown == debug


# ----------------------------------------------------------------------------- inspect end to end


def _have_detect_blocks() -> bool:
    try:
        import fxq.passes.canonicalize  # noqa: F401
        import fxq.passes.detect_blocks  # noqa: F401
        import fxq.passes.fold_batchnorm  # noqa: F401
        import fxq.regions  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _have_detect_blocks(),
                    reason="fxq.passes.detect_blocks/canonicalize/fold_batchnorm not all written yet")
def test_inspect_end_to_end(capsys, env):
    code, out, err = run(capsys, "inspect", env / "model.pt2")
    assert code == 0, err
    assert "model.pt2" in out
    code, out, err = run(capsys, "inspect", env / "model.pt2", "--json", "--granularity", "layer")
    assert code == 0, err
    data = json.loads(out)  # stdout holds only the JSON document
    assert "regions" in data and "counts" in data
    assert data["granularity"] == "layer" and data["input_shapes"] == [[1, 3, 8, 8]]


# ----------------------------------------------------------------------------- atomic writes


def test_atomic_write_text_and_bytes(tmp_path):
    target = tmp_path / "report.json"
    atomic.atomic_write_text(target, '{"a": 1}')
    atomic.atomic_write_bytes(tmp_path / "model.onnx", b"\x00\x01")
    assert target.read_text() == '{"a": 1}'
    assert (tmp_path / "model.onnx").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "report.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert (target.stat().st_mode & 0o777) == (0o666 & ~umask)


@pytest.mark.parametrize("exc", [RuntimeError("writer failed"), KeyboardInterrupt()])
def test_atomic_path_failure_keeps_previous_file(tmp_path, exc):
    target = tmp_path / "model.pt2"
    target.write_bytes(b"previous")
    with pytest.raises(type(exc)):
        with atomic.atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".pt2"
            tmp.write_bytes(b"half")
            raise exc
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt2"]


def test_atomic_path_success_and_writer_that_wrote_nothing(tmp_path):
    target = tmp_path / "model.pt2"
    with atomic.atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    with pytest.raises(FileNotFoundError):
        with atomic.atomic_path(tmp_path / "other.onnx"):
            pass
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt2"]


def test_ensure_output_dir(tmp_path):
    made = atomic.ensure_output_dir(tmp_path / "a" / "b")
    assert made.is_dir() and list(made.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(atomic.OutputError, match="is a file"):
        atomic.ensure_output_dir(tmp_path / "file")
    with pytest.raises(atomic.OutputError, match="part of that path is a file"):
        atomic.ensure_output_dir(tmp_path / "file" / "sub")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root can write to read-only folders")
def test_ensure_output_dir_not_writable(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(atomic.OutputError, match="Cannot write"):
            atomic.ensure_output_dir(ro)
    finally:
        ro.chmod(0o700)
