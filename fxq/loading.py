"""Turn the MODEL argument into a model plus example inputs.

MODEL forms (see docs/cli.md):

* a ``torch.export`` archive (any file name): recognised by its content, loaded with
  ``torch.export.load``; its saved example inputs become the example inputs;
* ``package.module:factory``: a callable (taking no arguments) that returns an ``nn.Module``;
  ``weights`` loads a state dict into it and ``input_shape`` says what it eats, unless the module
  has an ``example_input_shape`` attribute or the factory's Python module a global ``INPUT_SHAPE``;
* ``torchvision:NAME``: a torchvision model, random init (seeded, so repeatable) unless ``weights``;
  input shape 1,3,224,224 unless given;
* a whole pickled module (``torch.save(model)``), only with ``trust_pickle=True``.

Loading never touches the network and never unpickles arbitrary objects unless
``trust_pickle`` is set: state dicts load with ``weights_only=True``, and the pickled pieces
inside an export archive are checked with the same restricted unpickler before torch loads them
(torch's own loader falls back to a full unpickle when the restricted one refuses).
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import io
import json
import logging
import math
import os
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .errors import ModelLoadError

Shape = tuple[int, ...]

DEFAULT_IMAGE_SHAPE: Shape = (1, 3, 224, 224)
_FACTORY_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
_ZIP_MAGIC = b"PK\x03\x04"
_EMPTY_ZIP_MAGIC = b"PK\x05\x06"
_ONNX_HINTS = (b"onnx", b"pytorch", b"ai.onnx", b"tf2onnx", b"skl2onnx")
_FORMS_HINT = ("fxq takes a torch.export archive (torch.export.save), package.module:factory, "
               "torchvision:NAME, or a pickled module with --trust-pickle.")
_STATE_DICT_WRAPPERS = ("state_dict", "model_state_dict", "model", "net", "weights")


@dataclass
class LoadedModel:
    """A loaded model ready for ``fxq.capture.capture(module, example_inputs)``."""

    module: Any                  # nn.Module (eval mode) or torch.export.ExportedProgram
    example_inputs: tuple        # tuple of tensors, one per model input
    source: str                  # short human description, e.g. "torchvision resnet18 (random init)"
    kind: str = ""               # "export" | "factory" | "torchvision" | "pickle"

    @property
    def input_shapes(self) -> list[Shape]:
        return [tuple(t.shape) for t in self.example_inputs]


# --------------------------------------------------------------------------- input shapes


def parse_input_shape(text: str | Sequence | None) -> list[Shape] | None:
    """``"1,3,224,224"`` → ``[(1, 3, 224, 224)]``. Several inputs are separated by ``;``
    (``"1,3,32,32;1,10"``); ``x`` works as a dimension separator too (``1x3x224x224``).
    Sequences of ints (one input) or of sequences (several) are accepted from Python."""
    if text is None:
        return None
    if not isinstance(text, str):
        items = list(text)
        if items and all(isinstance(d, int) for d in items):
            return [_check_dims(items, str(tuple(items)))]
        if items and all(isinstance(s, (list, tuple)) for s in items):
            return [_check_dims(list(s), str(tuple(s))) for s in items]
        raise ModelLoadError(f"input_shape {text!r} is not a shape.",
                             "Give a tuple of positive ints such as (1, 3, 224, 224).")
    shapes = []
    for part in text.split(";"):
        part = part.strip()
        dims = [d.strip() for d in re.split(r"[,x×]", part)] if part else []
        if not dims or not all(re.fullmatch(r"\d+", d) for d in dims):
            raise ModelLoadError(
                f"--input-shape '{text}' is not a shape.",
                "Write comma-separated positive integers with the batch first, e.g. "
                "--input-shape 1,3,224,224 (separate several inputs with ';').")
        shapes.append(_check_dims([int(d) for d in dims], text))
    return shapes


def _check_dims(dims: list, text: str) -> Shape:
    if not dims or any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in dims):
        raise ModelLoadError(
            f"--input-shape '{text}' has a zero, negative or non-integer dimension.",
            "Every dimension must be a positive integer, batch first, e.g. 1,3,224,224.")
    return tuple(int(d) for d in dims)


def format_shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _make_inputs(shapes: list[Shape]) -> tuple:
    import torch

    gen = torch.Generator().manual_seed(0)
    try:
        return tuple(torch.randn(s, generator=gen) for s in shapes)
    except (RuntimeError, MemoryError) as exc:  # the allocator refused: far too large a shape
        sizes = " and ".join(format_shape(s) for s in shapes)
        gib = sum(math.prod(s) for s in shapes) * 4 / 2**30
        raise ModelLoadError(
            f"Input shape {sizes} is too large: one float32 input of that shape needs "
            f"{gib:,.1f} GiB, which this machine cannot allocate.",
            "Check --input-shape (batch first, e.g. 1,3,224,224).") from exc


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    line = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _end(text: str) -> str:
    return text if text.endswith((".", "!", "?")) else text + "."


def _check_forward(module, inputs: tuple, where: str, fix: str | None = None) -> None:
    """Run the model once so a wrong input shape fails here, in one line, not deep in export."""
    import torch

    try:
        with torch.no_grad():
            module(*inputs)
    except Exception as exc:  # any failure of the user's forward means "does not accept this"
        shapes = " and ".join(format_shape(t.shape) for t in inputs)
        raise ModelLoadError(
            f"{where} does not run on input shape {shapes}: {_end(_first_line(exc))}",
            fix or "Pass the shape the model expects with --input-shape (batch first, e.g. "
            "1,3,224,224).",
        ) from exc


# --------------------------------------------------------------------------- entry point


def load_model(spec: str, weights: str | os.PathLike | None = None,
               input_shape: str | Sequence | None = None,
               trust_pickle: bool = False) -> LoadedModel:
    """Load MODEL ``spec`` (a file, ``package.module:factory`` or ``torchvision:NAME``).

    Raises ``ModelLoadError`` with a user-facing message for anything wrong with the inputs.
    """
    spec = str(spec)
    shapes = parse_input_shape(input_shape)
    if weights is not None:
        weights = Path(weights)
    path = Path(spec)
    if path.exists():
        return _load_file(path, weights, shapes, trust_pickle)
    if spec.startswith("torchvision:"):
        return _load_torchvision(spec.split(":", 1)[1], weights, shapes)
    if _FACTORY_RE.match(spec):
        return _load_factory(spec, weights, shapes)
    if ":" not in spec:
        return _load_file(path, weights, shapes, trust_pickle)
    raise ModelLoadError(
        f"MODEL '{spec}' is neither an existing file nor of the form package.module:factory or "
        "torchvision:NAME.", "Check the spelling. " + _FORMS_HINT)


# --------------------------------------------------------------------------- files


def _load_file(path: Path, weights: Path | None, shapes, trust_pickle: bool) -> LoadedModel:
    if not path.exists():
        raise ModelLoadError(f"Model file '{path}' does not exist.", "Check the path and spelling.")
    if path.is_dir():
        raise ModelLoadError(f"Model path '{path}' is a folder, not a model file.", _FORMS_HINT)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError as exc:
        raise ModelLoadError(f"Cannot read model file '{path}': {exc.strerror or exc}.",
                             "Check its permissions.") from exc
    if size == 0:
        raise ModelLoadError(f"Model file '{path}' is empty (0 bytes).",
                             "It was probably not written completely; save or copy it again.")
    if head.startswith(_ZIP_MAGIC) or head.startswith(_EMPTY_ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            raise ModelLoadError(
                f"Model file '{path}' is a truncated or corrupt zip archive (its table of "
                f"contents is missing).", "Save or copy it again; it was probably cut short.")
        return _load_zip(path, weights, shapes, trust_pickle)
    if _looks_like_onnx(path, head):
        raise ModelLoadError(
            f"'{path}' is an ONNX model; fxq takes PyTorch models and produces the ONNX itself.",
            "Give the PyTorch model instead: a torch.export archive (torch.export.save), "
            "package.module:factory, or torchvision:NAME.")
    if head[:1] == b"\x80":  # pickle protocol marker: legacy (non-zip) torch.save format
        return _load_pickle(path, weights, shapes, trust_pickle)
    if _looks_like_text(head):
        first = head.decode("utf-8", "replace").strip().splitlines()
        peek = f" (it starts with: {first[0][:60]!r})" if first else ""
        raise ModelLoadError(f"'{path}' is a text file, not a PyTorch model{peek}.", _FORMS_HINT)
    raise ModelLoadError(f"'{path}' is not a file format fxq recognises as a PyTorch model.",
                         _FORMS_HINT)


def _looks_like_onnx(path: Path, head: bytes) -> bool:
    if path.suffix.lower() == ".onnx":
        return True
    # ONNX ModelProto starts with field 1 (ir_version, varint) and names its producer early.
    return head[:1] == b"\x08" and any(h in head[:256].lower() for h in _ONNX_HINTS)


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\r\n\t" for c in text)


def sniff_file_problem(path: Path) -> str | None:
    """What is visibly wrong with a file that should be a ``torch.save`` file, as words that
    follow its name ("is a text file ..."), or None. Cheap: the first bytes and, for a zip,
    whether its table of contents is there (torch's own message for a truncated zip is a
    paragraph about miniz)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError:
        return None
    if head.startswith(_ZIP_MAGIC) or head.startswith(_EMPTY_ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            return "is a truncated or corrupt zip archive (its table of contents is missing)"
        return None
    if _looks_like_onnx(path, head):
        return "is an ONNX model, not a torch.save file"
    if head and head[:1] != b"\x80" and _looks_like_text(head):
        first = head.decode("utf-8", "replace").strip().splitlines()
        peek = f" (it starts with: {first[0][:60]!r})" if first else ""
        return f"is a text file, not a torch.save file{peek}"
    return None


def _zip_entries(path: Path) -> tuple[zipfile.ZipFile, str, set[str]]:
    """Open the zip; torch writes every entry under one root folder, which we strip."""
    try:
        zf = zipfile.ZipFile(path)
        names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ModelLoadError(f"Model file '{path}' is a corrupt zip archive ({exc}).",
                             "Save or copy it again.") from exc
    roots = {n.split("/", 1)[0] for n in names if "/" in n}
    root = roots.pop() + "/" if len(roots) == 1 else ""
    return zf, root, {n[len(root):] for n in names if n.startswith(root)}


def _load_zip(path: Path, weights, shapes, trust_pickle) -> LoadedModel:
    zf, root, entries = _zip_entries(path)
    with zf:
        is_pt2 = "archive_format" in entries and any(e.startswith("models/") and e.endswith(".json")
                                                     for e in entries)
        legacy_export = "serialized_exported_program.json" in entries
        if is_pt2 or legacy_export:
            if weights is not None:
                raise ModelLoadError(
                    f"--weights was given, but '{path}' is a torch.export archive, which already "
                    "holds its weights.", "Drop --weights, or re-export the model with the weights loaded.")
            if not trust_pickle:
                _check_archive_pickles(path, zf, root, entries)
            return _load_export(path, shapes)
        if "archive_format" in entries and any(e.startswith("data/aotinductor/") for e in entries):
            raise ModelLoadError(
                f"'{path}' is an AOTInductor package (compiled code), not an exported program.",
                "Pass the torch.export archive saved with torch.export.save(ep, 'model.pt2') "
                "before compiling it with AOTInductor.")
        if "constants.pkl" in entries and any(e.startswith("code/") for e in entries):
            raise ModelLoadError(
                f"'{path}' is a TorchScript archive (torch.jit.save); fxq does not read TorchScript.",
                "Export the original nn.Module with torch.export.save, or give "
                "package.module:factory --weights FILE.")
        if "data.pkl" in entries:
            return _load_pickle(path, weights, shapes, trust_pickle)
    raise ModelLoadError(f"'{path}' is a zip archive, but not a torch.export archive or a "
                         "torch.save file.", _FORMS_HINT)


# --------------------------------------------------------------------------- torch.export


def _restricted_load_ok(data: bytes) -> bool:
    import pickle

    import torch

    try:
        torch.load(io.BytesIO(data), weights_only=True)
        return True
    except pickle.UnpicklingError:
        return False
    except Exception:
        # Not a pickle the restricted loader refuses on safety grounds (corruption, say):
        # torch.export.load will report that itself.
        return True


def _check_archive_pickles(path: Path, zf: zipfile.ZipFile, root: str, entries: set[str]) -> None:
    """Refuse archives whose embedded pickles need more than the weights-only unpickler."""
    unsafe: list[str] = []

    def read(name: str) -> bytes | None:
        try:
            return zf.read(root + name)
        except (KeyError, zipfile.BadZipFile, OSError, ValueError):
            return None  # missing/corrupt entries are torch.export.load's to report

    for config_name in sorted(e for e in entries if e.endswith("_config.json")
                              and e.startswith(("data/weights/", "data/constants/"))):
        folder = config_name.rsplit("/", 1)[0] + "/"
        raw = read(config_name)
        try:
            config = json.loads(raw or b"{}").get("config", {})
        except (ValueError, AttributeError):
            continue
        for fqn, meta in config.items():
            if not isinstance(meta, dict):
                continue
            name = str(meta.get("path_name", ""))
            if name.startswith(("custom_obj", "opaque_obj")):
                unsafe.append(fqn)
            elif meta.get("use_pickle"):
                data = read(folder + name)
                if data is not None and not _restricted_load_ok(data):
                    unsafe.append(fqn)
    for name in sorted(e for e in entries if e.endswith(".pt")):
        data = read(name)
        if data and not _restricted_load_ok(data):
            unsafe.append(name)
    if unsafe:
        listed = ", ".join(unsafe[:3]) + (" …" if len(unsafe) > 3 else "")
        raise ModelLoadError(
            f"The torch.export archive '{path}' contains pickled Python objects beyond plain "
            f"tensors ({listed}); unpickling them can run arbitrary code, so fxq does not load "
            "them by default.",
            "If you trust where the file came from, pass --trust-pickle.")


class _RecordExceptions(logging.Handler):
    """torch.export.load logs the real deserialization error and raises a generic one."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.errors: list[BaseException] = []

    def emit(self, record):
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])


def _load_export(path: Path, shapes) -> LoadedModel:
    import torch

    from .capture import example_inputs_of

    recorder = _RecordExceptions()
    logger = logging.getLogger("torch.export")
    logger.addHandler(recorder)
    try:
        # A file object rather than a name: torch warns about names not ending in .pt2.
        with open(path, "rb") as fh:
            ep = torch.export.load(fh)
    except Exception as exc:
        cause = recorder.errors[0] if recorder.errors else exc
        raise ModelLoadError(
            f"'{path}' looks like a torch.export archive but could not be loaded: "
            f"{_end(_first_line(cause))}",
            f"It may be corrupt, or saved by a different torch version than this one "
            f"({torch.__version__}); re-export it with torch.export.save using this version.",
        ) from exc
    finally:
        logger.removeHandler(recorder)
    source = f"torch.export archive {path}"
    if shapes is not None:
        inputs = _make_inputs(shapes)
        saved = example_inputs_of(ep)
        fix = None
        if saved:
            saved_shapes = " and ".join(format_shape(t.shape) for t in saved)
            fix = (f"It was exported with input shape {saved_shapes}; leave out --input-shape to use "
                   "that, or re-export it for the shape you want (or with dynamic_shapes).")
        _check_forward(ep.module(), inputs, f"The exported model in '{path}'", fix)
        return LoadedModel(ep, inputs, source, "export")
    inputs = example_inputs_of(ep)
    if inputs is None:
        inputs = _inputs_from_signature(ep)
    if inputs is None:
        raise ModelLoadError(
            f"The torch.export archive '{path}' carries no usable example inputs.",
            "Pass --input-shape (batch first, e.g. 1,3,224,224).")
    return LoadedModel(ep, tuple(inputs), source, "export")


def _inputs_from_signature(ep) -> tuple | None:
    import torch
    from torch.export.graph_signature import InputKind

    user = {s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT}
    vals = [n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder" and n.name in user]
    if not vals or not all(isinstance(v, torch.Tensor) for v in vals):
        return None
    try:
        shapes = [tuple(int(d) for d in v.shape) for v in vals]
    except TypeError:  # symbolic (dynamic) dims have no single value to pick
        return None
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(s, generator=gen).to(v.dtype) if v.dtype.is_floating_point
                 else torch.zeros(s, dtype=v.dtype) for s, v in zip(shapes, vals))


# --------------------------------------------------------------------------- pickles


def weights_only_refusal(exc: BaseException) -> tuple[str | None, str]:
    """(the global the weights-only unpickler refused, or None; its one-line reason)."""
    text = str(exc)
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if m:
        return m.group(1), f"it references {m.group(1)}"
    tail = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
    return None, (tail[0].strip() if tail and tail[0].strip() else "unsupported content")


def _describe_object(obj) -> str:
    import torch

    if isinstance(obj, torch.Tensor):
        return f"a single tensor of shape {format_shape(obj.shape)}"
    return f"a {type(obj).__module__}.{type(obj).__qualname__}"


def _is_state_dict(obj) -> bool:
    import torch

    return (isinstance(obj, dict) and len(obj) > 0
            and all(isinstance(k, str) for k in obj)
            and all(isinstance(v, torch.Tensor) for v in obj.values()))


def _unwrap_state_dict(obj):
    """Accept common checkpoint layouts: the state dict itself, or wrapped under one key."""
    if _is_state_dict(obj):
        return obj
    if isinstance(obj, dict):
        for key in _STATE_DICT_WRAPPERS:
            if _is_state_dict(obj.get(key)):
                return obj[key]
    return None


def _load_pickle(path: Path, weights, shapes, trust_pickle) -> LoadedModel:
    import pickle

    import torch
    from torch import nn

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            needs, detail = weights_only_refusal(exc)
            what = (f"'{path}' is a pickled Python object that references {needs} (likely a whole "
                    "module saved with torch.save(model))." if needs else
                    f"'{path}' could not be read with the safe weights-only loader ({detail}); it "
                    "is either corrupt or a pickle of arbitrary Python objects.")
            raise ModelLoadError(
                what + " Unpickling runs code stored in the file, so fxq only does it with "
                "--trust-pickle.",
                "If you trust the file's source, pass --trust-pickle. Safer: save it with "
                "torch.export.save(torch.export.export(model, args), 'model.pt2'), or save "
                "model.state_dict() and use package.module:factory --weights FILE.") from exc
        obj = _trusted_unpickle(path)
    except Exception as exc:
        raise ModelLoadError(f"'{path}' could not be read as a torch.save file: {_end(_first_line(exc))}",
                             "It may be truncated or corrupt; save or copy it again.") from exc

    if not isinstance(obj, nn.Module):
        if _unwrap_state_dict(obj) is not None:
            raise ModelLoadError(
                f"'{path}' holds a state dict (parameter names → tensors), not a model: it has no "
                "architecture to load the weights into.",
                f"Give the code that builds the model and the file as weights: "
                f"fxq ... package.module:factory --weights {path} (or torchvision:NAME --weights "
                f"{path} for a torchvision architecture).")
        raise ModelLoadError(f"'{path}' holds {_describe_object(obj)}, not a model.", _FORMS_HINT)
    module = obj.eval()
    if weights is not None:
        _apply_weights(module, weights)
    if shapes is None:
        shapes = _declared_shape(module, sys.modules.get(type(module).__module__))
    if shapes is None:
        raise ModelLoadError(
            f"'{path}' is a pickled module, which does not record its input shape.",
            "Pass --input-shape (batch first, e.g. 1,3,224,224).")
    inputs = _make_inputs(shapes)
    _check_forward(module, inputs, f"The model in '{path}'")
    return LoadedModel(module, inputs, f"pickled module {path} ({type(module).__name__})", "pickle")


def _trusted_unpickle(path: Path):
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (AttributeError, ModuleNotFoundError, ImportError) as exc:
        raise ModelLoadError(
            f"'{path}' refers to code that cannot be imported here: {_end(_first_line(exc))} A pickled "
            "module stores only a reference to its class, which must be importable (a class "
            "defined in the script that saved it, i.e. __main__, never is).",
            "Put the defining module on PYTHONPATH, or better, save a torch.export archive, or "
            "use package.module:factory --weights FILE.") from exc
    except Exception as exc:
        raise ModelLoadError(f"'{path}' could not be unpickled: {_end(_first_line(exc))}",
                             "It may be truncated or corrupt; save or copy it again.") from exc


# --------------------------------------------------------------------------- factories


def _declared_shape(module, py_module) -> list[Shape] | None:
    """An input shape the model declares itself: ``module.example_input_shape`` or the
    factory's Python module global ``INPUT_SHAPE``."""
    for owner, attr in ((module, "example_input_shape"), (py_module, "INPUT_SHAPE")):
        value = getattr(owner, attr, None) if owner is not None else None
        if value is None:
            continue
        try:
            return parse_input_shape(value if isinstance(value, str) else tuple(value))
        except (ModelLoadError, TypeError) as exc:
            raise ModelLoadError(f"The model's {attr} ({value!r}) is not a valid shape.",
                                 "Fix it, or pass --input-shape.") from exc
    return None


def _load_factory(spec: str, weights, shapes) -> LoadedModel:
    from torch import nn

    mod_name, attr_path = spec.split(":", 1)
    # `python -m fxq` puts the working directory on sys.path, the `fxq` script does not;
    # make both find factories defined next to the user.
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    try:
        py_module = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or mod_name
        detail = (f"there is no module named '{missing}'" if missing == mod_name
                  else f"importing it failed: {_first_line(exc).rstrip('.')}")
        raise ModelLoadError(
            f"Cannot import module '{mod_name}' for MODEL '{spec}': {detail}.",
            "Check the spelling, install the package, or run fxq from the folder that contains "
            "it (or add that folder to PYTHONPATH).") from exc
    except Exception as exc:  # the user's module may raise anything while importing
        raise ModelLoadError(f"Importing module '{mod_name}' for MODEL '{spec}' failed: "
                             f"{_end(_first_line(exc))}", "Fix the error in that module.") from exc
    obj: Any = py_module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ModelLoadError(f"Module '{mod_name}' has no attribute '{attr_path}'.{hint}",
                                 "MODEL is package.module:factory, where factory is a function or "
                                 "class in that module returning an nn.Module.")
        obj = getattr(obj, part)
    factory = obj
    if isinstance(factory, nn.Module):
        raise ModelLoadError(
            f"'{spec}' is an nn.Module instance, not a factory.",
            f"Wrap it in a function, e.g. def make(): return {attr_path}, and pass "
            f"{mod_name}:make.")
    if not callable(factory):
        raise ModelLoadError(f"'{spec}' is not callable (it is of type {type(factory).__name__}).",
                             "Point MODEL at a function or class that returns an nn.Module.")
    _check_no_required_args(factory, spec)
    try:
        module = factory()
    except Exception as exc:
        raise ModelLoadError(f"Calling the factory '{spec}' failed: {_end(_first_line(exc))}",
                             "Fix the factory so it builds the model with no arguments.") from exc
    if not isinstance(module, nn.Module):
        raise ModelLoadError(f"The factory '{spec}' returned {_describe_object(module)}, "
                             "not an nn.Module.", "Make it return the model (an nn.Module).")
    module = module.eval()
    if weights is not None:
        _apply_weights(module, weights)
    if shapes is None:
        shapes = (_declared_shape(module, py_module)
                  or _declared_shape(None, sys.modules.get(type(module).__module__)))
    if shapes is None:
        raise ModelLoadError(
            f"MODEL '{spec}' needs --input-shape: fxq cannot tell what input the model takes.",
            "Pass e.g. --input-shape 1,3,224,224 (batch first), or give the module an "
            "example_input_shape attribute or its Python module an INPUT_SHAPE global.")
    inputs = _make_inputs(shapes)
    _check_forward(module, inputs, f"The model from '{spec}'")
    src = f"factory {spec}" + (f" with weights {weights}" if weights is not None else "")
    return LoadedModel(module, inputs, src, "factory")


def _check_no_required_args(factory, spec: str) -> None:
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return  # builtins without a signature: just try calling
    required = [p.name for p in sig.parameters.values()
                if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD,
                                                       p.KEYWORD_ONLY)]
    if required:
        raise ModelLoadError(
            f"The factory '{spec}' needs arguments ({', '.join(required)}); fxq calls it with none.",
            "Give those parameters defaults, or add a small function without parameters that "
            "calls it and pass that instead.")


# --------------------------------------------------------------------------- torchvision


def _load_torchvision(name: str, weights, shapes) -> LoadedModel:
    import torch

    try:
        import torchvision
    except ImportError as exc:
        raise ModelLoadError("MODEL torchvision:NAME needs the torchvision package, which is not "
                             "installed.", "pip install torchvision.") from exc
    known = torchvision.models.list_models()
    if name not in known:
        close = difflib.get_close_matches(name.lower(), known, n=4, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelLoadError(f"torchvision has no model named '{name}'.{hint}",
                             "See torchvision.models.list_models() for the names.")
    # Seeded so random-init runs are repeatable; fork_rng leaves the caller's RNG alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            module = torchvision.models.get_model(name, weights=None)
        except Exception as exc:
            raise ModelLoadError(f"Building torchvision:{name} failed: {_end(_first_line(exc))}",
                                 "Try another model or a factory.") from exc
    module = module.eval()
    if weights is not None:
        _apply_weights(module, weights)
    shapes = shapes or [DEFAULT_IMAGE_SHAPE]
    inputs = _make_inputs(shapes)
    _check_forward(module, inputs, f"torchvision:{name}")
    init = f"weights from {weights}" if weights is not None else "random init"
    return LoadedModel(module, inputs, f"torchvision {name} ({init})", "torchvision")


# --------------------------------------------------------------------------- weights


def load_state_dict_file(path: Path) -> dict:
    """A state dict from ``.safetensors`` or a ``torch.save`` file, loaded without unpickling code."""
    import pickle

    import torch

    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"Weights file '{path}' does not exist.",
                             "Check the path; fxq never downloads weights.")
    if path.is_dir():
        raise ModelLoadError(f"Weights path '{path}' is a folder, not a file.",
                             "Give the state dict file (.pt/.pth or .safetensors).")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"Weights file '{path}' is empty (0 bytes).", "Save or copy it again.")
    if path.suffix.lower() == ".safetensors":
        try:
            from safetensors.torch import load_file
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise ModelLoadError(f"Weights file '{path}' is not a readable safetensors file: "
                                 f"{_end(_first_line(exc))}", "Save or copy it again.") from exc
    problem = sniff_file_problem(path)
    if problem is not None:
        raise ModelLoadError(f"Weights file '{path}' {problem}.",
                             "It was probably cut short; copy or save it again." if "truncated" in
                             problem else "Give a state dict saved with torch.save(model.state_dict(), "
                             "path), or a .safetensors file.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        needs, detail = weights_only_refusal(exc)
        if needs is None:
            raise ModelLoadError(f"Weights file '{path}' could not be read ({detail}).",
                                 "It may be truncated or corrupt; save it again.") from exc
        raise ModelLoadError(
            f"Weights file '{path}' is not a plain state dict ({detail}); fxq loads weights with "
            "weights_only=True because unpickling arbitrary objects runs code.",
            "Save model.state_dict() (torch.save(model.state_dict(), path)) or use .safetensors. "
            "A whole pickled module can be given as MODEL with --trust-pickle.") from exc
    except Exception as exc:
        raise ModelLoadError(f"Weights file '{path}' could not be read: {_end(_first_line(exc))}",
                             "It may be truncated, corrupt or not a torch.save file; save it "
                             "again.") from exc
    state = _unwrap_state_dict(obj)
    if state is None:
        raise ModelLoadError(f"Weights file '{path}' holds {_describe_object(obj)}, not a state "
                             "dict (parameter names → tensors).",
                             "Save it with torch.save(model.state_dict(), path).")
    return state


def _apply_weights(module, weights: Path) -> None:
    state = load_state_dict_file(weights)
    expected = module.state_dict()
    if not set(state) & set(expected):
        # DataParallel/DistributedDataParallel checkpoints prefix every key with "module.".
        stripped = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
        if set(stripped) & set(expected):
            state = stripped
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} (file {format_shape(state[k].shape)}, model {format_shape(v.shape)})"
                  for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or mismatched:
        def few(items):
            return ", ".join(items[:4]) + (f", … ({len(items) - 4} more)" if len(items) > 4 else "")
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {few(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {few(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} with the wrong shape: {few(mismatched)}")
        raise ModelLoadError(
            f"The weights in '{weights}' do not match the model's parameters "
            f"({'; '.join(parts)}).",
            "Check that the file was saved from the same architecture (model.state_dict()) as "
            "the one MODEL builds.")
    try:
        module.load_state_dict(state, strict=True)
    except Exception as exc:
        raise ModelLoadError(f"Loading the weights in '{weights}' failed: {_end(_first_line(exc))}",
                             "Check that the file matches the architecture.") from exc
