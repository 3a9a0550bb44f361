"""Capture a model into fxq's one canonical FX graph.

fxq captures with ``torch.export`` (non-strict) and nothing else. Reasons:

* a ``torch.export`` archive is the default MODEL form, so export IR is what we receive anyway;
  one IR means every pass is written once;
* non-strict export traces through more Python than ``fx.symbolic_trace`` (which fails on any
  control flow over tensor values *and* on many shape computations) and records the module
  hierarchy in ``node.meta["nn_module_stack"]`` and the source line in ``node.meta["stack_trace"]``,
  which block detection and error messages rely on;
* the result is ATen-level (``aten.conv2d``, ``aten.batch_norm``, ``aten.add.Tensor`` ...), so
  ``x + y``, ``torch.add`` and ``x += y`` arrive as the same few ops.

The canonical graph is ``ExportedProgram.module()`` with three normalizations: the export guard
call is removed, the pytree calling convention is replaced by plain positional placeholders, and a
single output is returned bare (several outputs as a tuple). Parameters stay ``get_attr`` nodes
pointing into the original module hierarchy, so qualified names survive.
"""
from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass

import torch
from torch import fx, nn

from .errors import CaptureError

log = logging.getLogger(__name__)

_DATA_DEPENDENT_HINTS = (
    "data-dependent",
    "data dependent",
    "GuardOnDataDependentSymNode",
    "Could not guard on",
    "Could not extract specialized integer",
    "Dynamic control flow",
    "could not evaluate",
)


# gm.meta[CAPTURE_METHOD]: how the graph was obtained (there is no other route, e.g. no
# fx.symbolic_trace fallback; the coverage table reports it per model)
CAPTURE_METHOD = "fxq.capture"
CAPTURED_EXPORT = "torch.export (non-strict)"
CAPTURED_ARCHIVE = "torch.export archive"


@dataclass(frozen=True)
class UserFrame:
    filename: str
    lineno: int
    line: str
    function: str
    module_name: str | None
    module_class: str | None

    def describe(self) -> str:
        where = f'{self.filename}:{self.lineno} in {self.function}'
        if self.module_class is not None:
            owner = f"module '{self.module_name or '<root>'}' ({self.module_class})"
            where = f"{owner} at {where}"
        code = f": `{self.line.strip()}`" if self.line.strip() else ""
        return where + code


def _is_library_file(filename: str) -> bool:
    markers = ("/torch/", "/torchvision/", "/site-packages/torch", "<frozen", "/fxq/", "/passes/",
               "/backends/", "/contextlib.py", "/functools.py")
    return any(m in filename for m in markers)


def find_user_frame(exc: BaseException, model: nn.Module | None) -> UserFrame | None:
    """The innermost traceback frame in user code, with the nn.Module that owns it (if any)."""
    names = {id(m): n for n, m in model.named_modules()} if model is not None else {}
    best = None
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        filename = frame.f_code.co_filename
        if not _is_library_file(filename):
            code = frame.f_code
            first_arg = code.co_varnames[0] if code.co_argcount else None
            owner = frame.f_locals.get(first_arg) if first_arg else None
            best = (frame, tb.tb_lineno, owner)
        tb = tb.tb_next
    if best is None:
        return None
    frame, lineno, owner = best
    import linecache

    line = linecache.getline(frame.f_code.co_filename, lineno)
    is_module = isinstance(owner, nn.Module)
    return UserFrame(
        filename=frame.f_code.co_filename,
        lineno=lineno,
        line=line,
        function=frame.f_code.co_name,
        module_name=names.get(id(owner)) if is_module else None,
        module_class=type(owner).__name__ if is_module else None,
    )


def _capture_error(exc: BaseException, model: nn.Module) -> CaptureError:
    text = f"{type(exc).__name__}: {exc}"
    first = text.strip().splitlines()[0][:300]
    frame = find_user_frame(exc, model)
    where = f" The failure is in {frame.describe()}." if frame else ""
    if any(h in text for h in _DATA_DEPENDENT_HINTS):
        return CaptureError(
            f"torch.export could not capture the model: it branches on the value of a tensor "
            f"(data-dependent control flow).{where}",
            "Rewrite that branch so it does not depend on tensor values (torch.where, torch.cond, "
            "or a shape-only condition), or export the model yourself with torch.export and pass "
            f"the archive. (torch said: {first})",
        )
    return CaptureError(
        f"torch.export could not capture the model.{where}",
        "Check that the model runs on --input-shape in eval mode, or export it yourself with "
        f"torch.export.export(model, args) and pass the saved archive. (torch said: {first})",
    )


@contextlib.contextmanager
def _torch_output_to_debug_log():
    """On a failed capture torch.export prints the partial graph straight to stderr and logs
    warnings about the symbols it could not trace; the CaptureError already says what failed and
    where. Unless fxq's debug log is on (``--debug``: then torch speaks for itself), that text
    goes to the debug log instead of the user's terminal."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    loggers = [lg for name, lg in list(logging.root.manager.loggerDict.items())
               if (name == "torch" or name.startswith("torch.")) and isinstance(lg, logging.Logger)]
    levels = [lg.level for lg in loggers]
    buf = io.StringIO()
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with contextlib.redirect_stderr(buf):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if buf.getvalue().strip():
            log.debug("torch.export said:\n%s", buf.getvalue())


def export_model(model: nn.Module, example_inputs: tuple) -> torch.export.ExportedProgram:
    model = model.eval()
    try:
        with torch.no_grad(), _torch_output_to_debug_log():
            return torch.export.export(model, tuple(example_inputs), strict=False)
    except Exception as exc:  # torch raises many exception types here; all mean "not capturable"
        raise _capture_error(exc, model) from exc


def canonicalize_exported(ep: torch.export.ExportedProgram) -> fx.GraphModule:
    gm = ep.module()
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    # Plain positional calling convention instead of the pytree codegen of ep.module().
    graph._codegen = fx.graph.CodeGen()
    output = next(n for n in graph.nodes if n.op == "output")
    outs = output.args[0]
    if isinstance(outs, (tuple, list)) and len(outs) == 1:
        output.args = (outs[0],)
    elif isinstance(outs, list):
        output.args = (tuple(outs),)
    graph.lint()
    gm.recompile()
    return gm


def example_inputs_of(ep: torch.export.ExportedProgram) -> tuple | None:
    ex = getattr(ep, "example_inputs", None)
    if ex is None:
        return None
    args, kwargs = ex
    if kwargs:
        return None
    return tuple(args)


def capture(model: nn.Module | torch.export.ExportedProgram, example_inputs: tuple | None = None) -> fx.GraphModule:
    """Return the canonical FX graph of ``model`` (see module docstring).

    ``example_inputs`` is required for an ``nn.Module``; an ExportedProgram carries its own.
    The graph module remembers them in ``gm.meta["fxq.example_inputs"]``, and how it was
    captured in ``gm.meta["fxq.capture"]`` (``CAPTURED_EXPORT`` or ``CAPTURED_ARCHIVE``).
    """
    if isinstance(model, torch.export.ExportedProgram):
        ep = model
        method = CAPTURED_ARCHIVE
        if example_inputs is None:
            example_inputs = example_inputs_of(ep)
    else:
        if example_inputs is None:
            raise CaptureError("Capturing an nn.Module needs example inputs.",
                               "Pass --input-shape (e.g. 1,3,224,224).")
        ep = export_model(model, example_inputs)
        method = CAPTURED_EXPORT
    gm = canonicalize_exported(ep)
    if example_inputs is None:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        example_inputs = tuple(torch.zeros(p.meta["val"].shape, dtype=p.meta["val"].dtype) for p in placeholders)
    gm.meta["fxq.example_inputs"] = tuple(example_inputs)
    gm.meta[CAPTURE_METHOD] = method
    return gm
