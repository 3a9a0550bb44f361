"""Lower fxq's canonical FX graph (see ``fxq.capture``) to an ONNX ``ModelProto``.

fxq writes the ONNX graph itself instead of calling ``torch.onnx.export``: the quantization
backends must decide where every QuantizeLinear/DequantizeLinear goes, and an exporter that
re-traces, constant-folds or fuses would undo those decisions.

The driver walks the FX graph once, in order:

* placeholders become graph inputs ``input`` (``input_0``, ``input_1`` ... when there are several);
* ``get_attr`` tensors become initializers named by their qualified name, lazily, so a parameter
  that only feeds folded constants never reaches the file;
* a ``call_function`` node that depends on no graph input is evaluated in PyTorch right here and
  becomes an initializer (this removes ``arange``/``full``/``expand`` of class tokens and similar
  families without an emitter each);
* any other ``call_function`` node is handed to its emitter from ``backends/onnx_ops.py``;
* ``call_module`` nodes (fxq's quantizers) go to the caller's ``module_handler``;
* the outputs are renamed ``output`` (``output_0`` ...).

Emitters talk to the graph through ``LoweringContext`` only (documented on the class). Every ONNX
node records the FX node it came from in ``metadata_props`` (keys ``META_FX_NODE``,
``META_TARGET`` and, when a pass stamped one, ``META_RULE``), so a post-pass can find the ONNX
nodes of an FX node with ``onnx_nodes_by_fx_node``.

Naming is a pure function of the FX graph (FX node names and qualified parameter names plus
counters), so lowering the same graph twice gives byte-identical models.
"""
from __future__ import annotations

import operator
import re
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import fx

from fxq.errors import FxqError, LoweringError
from fxq.passes.infra import RULE

# LayerNormalization appeared in 17. Later changes (Reduce* axes as an input in 18, Gelu in 20,
# per-channel GroupNormalization in 21) are handled by the emitters that care.
MIN_OPSET = 17

META_FX_NODE = "fxq.fx_node"
META_TARGET = "fxq.target"
META_RULE = RULE  # the pass/rule that created the FX node, when one stamped it

ModuleHandler = Callable[["LoweringContext", fx.Node, torch.nn.Module], "str | list[str]"]

_TORCH_TO_ONNX = {
    torch.float32: TensorProto.FLOAT,
    torch.float16: TensorProto.FLOAT16,
    torch.bfloat16: TensorProto.BFLOAT16,
    torch.float64: TensorProto.DOUBLE,
    torch.int8: TensorProto.INT8,
    torch.uint8: TensorProto.UINT8,
    torch.int16: TensorProto.INT16,
    torch.int32: TensorProto.INT32,
    torch.int64: TensorProto.INT64,
    torch.bool: TensorProto.BOOL,
}

# Constants up to this many elements are shared by content; larger ones are never compared.
_SHARE_CONST_MAX_ELEMENTS = 16


def onnx_dtype(dtype: torch.dtype) -> int:
    """The ``TensorProto`` element type for a torch dtype."""
    try:
        return _TORCH_TO_ONNX[dtype]
    except KeyError:
        raise LoweringError(f"fxq cannot express dtype {dtype} in ONNX.",
                            "Cast the model to float32 before compiling.") from None


def source_of(node: fx.Node) -> str | None:
    """``file:line `code``` of the innermost user frame recorded in ``stack_trace``, if any."""
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in [^\n]*\n([^\n]*)', trace)
    if not frames:
        return None
    from fxq.capture import _is_library_file

    user = [f for f in frames if not _is_library_file(f[0])]
    filename, line, code = (user or frames)[-1]
    code = code.strip()
    return f"{filename}:{line}" + (f" `{code}`" if code else "")


def describe_node(node: fx.Node) -> str:
    where = source_of(node)
    text = f"fx node '{node.name}'"
    return f"{text}, from {where}" if where else text


def target_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)
    return f"{module}.{name}" if module else name


def normalized_args(node: fx.Node) -> SimpleNamespace:
    """The node's arguments by schema name, defaults filled in (``a.input``, ``a.stride`` ...).

    For targets without an ATen schema (``operator.getitem`` ...) the namespace holds ``args``
    and ``kwargs`` as given.
    """
    target = node.target
    schema = getattr(target, "_schema", None)
    if schema is None:
        return SimpleNamespace(args=tuple(node.args), kwargs=dict(node.kwargs))
    values: dict[str, Any] = {}
    positional = list(node.args)
    for i, arg in enumerate(schema.arguments):
        if i < len(positional) and not arg.kwarg_only:
            values[arg.name] = positional[i]
        elif arg.name in node.kwargs:
            values[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            values[arg.name] = arg.default_value
        else:
            values[arg.name] = None
    return SimpleNamespace(**values)


class _Folded:
    """A value computed at lowering time; becomes an initializer the first time it is used."""

    __slots__ = ("value", "hint", "alias_of")

    def __init__(self, value: Any, hint: str, alias_of: fx.Node | None = None):
        self.value = value
        self.hint = hint
        self.alias_of = alias_of


class LoweringContext:
    """What an emitter sees. The API:

    ``ctx.current``                 the FX node being lowered.
    ``ctx.opset``                   the target ai.onnx opset.
    ``ctx.gm``                      the graph module.
    ``ctx.value(arg, dtype=None)``  ONNX value name for an FX arg. A Node gives its value (cast to
                                    ``dtype`` if given and different); a Python number, list of
                                    numbers or tensor gives a constant initializer (of ``dtype`` if
                                    given); ``None`` gives ``""`` (an omitted optional input).
    ``ctx.const(array, hint, dtype=None, share=True)``  an initializer from a tensor, numpy array
                                    or Python number(s) (float32/int64/bool by default); tiny
                                    ones are shared by content unless ``share=False``.
    ``ctx.node(op_type, inputs, outputs=None, *, domain="", **attrs)`` appends one ONNX node and
                                    returns its output names. ``outputs``: None (one fresh name),
                                    an int (that many fresh names) or explicit names. ``None``
                                    inputs become ``""``; attributes that are ``None`` are dropped.
    ``ctx.op(op_type, *inputs, **attrs)``  ``ctx.node`` for a single-output node; returns the name.
    ``ctx.fresh(hint)``             a value name not used yet (``hint`` itself when free).
    ``ctx.shape(arg)`` / ``ctx.dtype(arg)`` / ``ctx.rank(arg)``  static shape, torch dtype, rank.
    ``ctx.constant(arg)``           the tensor if ``arg`` is known at lowering time, else None.
    ``ctx.name_hint(arg)``          a readable base name (qualified name of a parameter).
    ``ctx.cast(value, dtype)``      a Cast node unless unnecessary (needs the value's torch dtype).
    ``ctx.reduce(op_type, value, axes, keepdims)``  Reduce* across opset differences.
    ``ctx.bind(fx_node, value)``    record the ONNX value(s) of an FX node (emitters usually just
                                    return the name(s) and let the driver bind them).
    ``ctx.bind_transposed(fx_node, value)``  record that ONNX ``value`` holds the 2-D FX value
                                    transposed; consumers that want ``w.T`` (linear) use it directly
                                    (a blocked weight DQ laid out [in, out] feeds MatMul this way).
    ``ctx.fail(what, fix=None)``    raise ``LoweringError`` naming the current node and source line.

    An emitter is ``fn(ctx, node, a) -> str | list[str] | None`` where ``a`` holds the node's
    arguments by schema name (see ``normalized_args``).
    """

    def __init__(self, gm: fx.GraphModule, opset: int, module_handler: ModuleHandler | None):
        self.gm = gm
        self.opset = opset
        self.module_handler = module_handler
        self.current: fx.Node | None = None
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._values: dict[fx.Node, Any] = {}
        self._folded: dict[fx.Node, _Folded] = {}
        # (folded node, dtype it was asked in) -> its initializer
        self._materialized: dict[tuple[fx.Node, torch.dtype | None], str] = {}
        self._meta: dict[fx.Node, tuple[tuple[int, ...], torch.dtype]] = {}
        self._used: set[str] = set()
        self._node_names: set[str] = set()
        self._fx_value_name: dict[fx.Node, str] = {}
        self._shared_consts: dict[tuple, str] = {}
        self._initializer_names: set[str] = set()
        self._input_names: set[str] = set()
        self._value_info: dict[str, tuple[int, tuple[int, ...]]] = {}
        self._step_start = 0
        # FX node -> an ONNX value holding its 2-D value transposed (see ``bind_transposed``)
        self.transposed: dict[fx.Node, str] = {}

    # ----------------------------------------------------------------- names and constants
    def fresh(self, hint: str) -> str:
        name = hint
        i = 1
        while name in self._used:
            name = f"{hint}_{i}"
            i += 1
        self._used.add(name)
        return name

    def _fresh_node_name(self, hint: str) -> str:
        name = hint
        i = 1
        while name in self._node_names:
            name = f"{hint}_{i}"
            i += 1
        self._node_names.add(name)
        return name

    def const(self, array: Any, hint: str, dtype: torch.dtype | None = None, *, share: bool = True,
              _reserved: bool = False) -> str:
        if isinstance(array, torch.Tensor):
            t = array.detach().cpu()
            if dtype is not None:
                t = t.to(dtype)
            if t.dtype == torch.bfloat16:
                raise LoweringError("fxq cannot write bfloat16 constants to ONNX.",
                                    "Cast the model to float32 before compiling.")
            arr = t.contiguous().numpy()
        elif isinstance(array, (np.ndarray, np.generic)):
            arr = np.asarray(array)
            if dtype is not None:
                arr = torch.from_numpy(np.array(arr)).to(dtype).numpy()
        else:
            # Python numbers: float32 / int64 / bool unless told otherwise.
            if dtype is None:
                arr = np.asarray(array)
                dtype = {np.dtype(np.float64): torch.float32, np.dtype(np.bool_): torch.bool}.get(
                    arr.dtype, torch.int64)
            arr = torch.tensor(array, dtype=dtype).numpy()
        key = None
        if share and arr.size <= _SHARE_CONST_MAX_ELEMENTS:
            key = (arr.dtype.str, arr.shape, arr.tobytes())
            if key in self._shared_consts:
                return self._shared_consts[key]
        # ``_reserved``: ``hint`` is the name set aside for this FX node's value (a folded node).
        name = hint if _reserved else self.fresh(hint)
        if not arr.flags.c_contiguous:
            arr = np.array(arr, order="C")  # (np.ascontiguousarray would turn 0-d into 1-d)
        self.initializers.append(numpy_helper.from_array(arr, name))
        self._initializer_names.add(name)
        if key is not None:
            self._shared_consts[key] = name
        return name

    # ----------------------------------------------------------------- reading FX args
    def _fx_meta(self, node: fx.Node) -> tuple[tuple[int, ...], torch.dtype]:
        if node in self._meta:
            return self._meta[node]
        folded = self._folded.get(node)
        if folded is not None and isinstance(folded.value, torch.Tensor):
            return tuple(folded.value.shape), folded.value.dtype
        raise LoweringError(f"fxq has no shape for {describe_node(node)}.",
                            "Make sure every node carries meta['val'] (re-run capture or "
                            "FakeTensorProp after the pass that created it).")

    def shape(self, arg: Any) -> tuple[int, ...]:
        if isinstance(arg, fx.Node):
            return self._fx_meta(arg)[0]
        if isinstance(arg, torch.Tensor):
            return tuple(arg.shape)
        return ()

    def dtype(self, arg: Any) -> torch.dtype:
        if isinstance(arg, fx.Node):
            return self._fx_meta(arg)[1]
        if isinstance(arg, torch.Tensor):
            return arg.dtype
        if isinstance(arg, bool):
            return torch.bool
        if isinstance(arg, int):
            return torch.int64
        return torch.float32

    def rank(self, arg: Any) -> int:
        return len(self.shape(arg))

    def constant(self, arg: Any) -> torch.Tensor | None:
        if isinstance(arg, torch.Tensor):
            return arg
        if isinstance(arg, fx.Node) and arg not in self._values and arg in self._folded:
            value = self._folded[arg].value
            return value if isinstance(value, torch.Tensor) else None
        return None

    def name_hint(self, arg: Any) -> str:
        if isinstance(arg, fx.Node):
            folded = self._folded.get(arg)
            if folded is not None:
                return self.name_hint(folded.alias_of) if folded.alias_of is not None else folded.hint
            return arg.name
        return "const"

    def value(self, arg: Any, dtype: torch.dtype | None = None) -> str:
        if arg is None:
            return ""
        if isinstance(arg, fx.Node):
            folded = self._folded.get(arg)
            if arg not in self._values and folded is not None and folded.alias_of is None:
                return self._node_value(arg, dtype)
            name = self._node_value(arg, None)
            if dtype is not None and self.dtype(arg) != dtype:
                name = self.cast(name, dtype, from_dtype=self.dtype(arg))
            return name
        if isinstance(arg, torch.Tensor):
            return self.const(arg, "const", dtype)
        if isinstance(arg, (bool, int, float)):
            return self.const(np.asarray(arg), "scalar", dtype or self.dtype(arg))
        if isinstance(arg, (list, tuple)) and all(isinstance(v, (bool, int, float)) for v in arg):
            return self.const(np.asarray(arg), "list", dtype or (torch.float32 if any(
                isinstance(v, float) for v in arg) else torch.int64))
        self.fail(f"fxq cannot turn the argument {arg!r} into an ONNX value.")

    def _node_value(self, node: fx.Node, dtype: torch.dtype | None) -> str:
        if node in self._values:
            value = self._values[node]
            if not isinstance(value, str):
                self.fail(f"'{node.name}' holds several values (a tuple) but is used as one tensor.")
            return value
        folded = self._folded.get(node)
        if folded is None:
            self.fail(f"'{node.name}' has no ONNX value yet (graph not in topological order?).")
        if folded.alias_of is not None:
            return self._node_value(folded.alias_of, None)
        value = folded.value
        if not isinstance(value, (torch.Tensor, bool, int, float)):
            self.fail(f"'{node.name}' was folded to a {type(value).__name__}, not a tensor.")
        if dtype == self.dtype(node):
            dtype = None
        key = (node, dtype)
        if key not in self._materialized:
            # Parameters and folded values keep their own names, even when their contents repeat;
            # a constant needed in another dtype is converted here rather than by a Cast node.
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            hint = folded.hint if dtype is None else f"{folded.hint}/{str(dtype).replace('torch.', '')}"
            reserved = dtype is None and self._fx_value_name.get(node) == hint and hint not in self._initializer_names
            self._materialized[key] = self.const(t if dtype is None else t.to(dtype), hint, share=False,
                                                 _reserved=reserved)
        return self._materialized[key]

    # ----------------------------------------------------------------- emitting
    def node(self, op_type: str, inputs: Sequence[str | None], outputs: int | Sequence[str] | None = None,
             *, domain: str = "", **attrs: Any) -> list[str]:
        ins = ["" if i is None else i for i in inputs]
        while ins and ins[-1] == "":
            ins.pop()
        base = self._fx_value_name.get(self.current, "graph") if self.current is not None else "graph"
        if outputs is None:
            outs = [self.fresh(f"{base}/{op_type}")]
        elif isinstance(outputs, int):
            outs = [self.fresh(f"{base}/{op_type}_{i}") for i in range(outputs)]
        else:
            outs = list(outputs)
            self._used.update(outs)
        attrs = {k: v for k, v in attrs.items() if v is not None}
        proto = helper.make_node(op_type, ins, outs, name=self._fresh_node_name(f"{base}/{op_type}"),
                                 domain=domain or None, **attrs)
        if self.current is not None:
            self._stamp(proto, self.current)
        self.nodes.append(proto)
        return outs

    def op(self, op_type: str, *inputs: str | None, domain: str = "", **attrs: Any) -> str:
        return self.node(op_type, list(inputs), None, domain=domain, **attrs)[0]

    def cast(self, value: str, dtype: torch.dtype, from_dtype: torch.dtype | None = None) -> str:
        if from_dtype is not None and from_dtype == dtype:
            return value
        return self.op("Cast", value, to=onnx_dtype(dtype))

    def reduce(self, op_type: str, value: str, axes: Sequence[int] | None, keepdims: bool) -> str:
        """``Reduce*`` over ``axes`` (None: all); axes moved from attribute to input in opset 18
        (ReduceSum: 13)."""
        keep = int(bool(keepdims))
        if axes is None:
            return self.op(op_type, value, keepdims=keep)
        axes = [int(a) for a in axes]
        if op_type == "ReduceSum" or self.opset >= 18:
            return self.op(op_type, value, self.const(np.asarray(axes, np.int64), "axes"), keepdims=keep)
        return self.op(op_type, value, axes=axes, keepdims=keep)

    def _stamp(self, proto: onnx.NodeProto, fx_node: fx.Node) -> None:
        entries = [(META_FX_NODE, fx_node.name), (META_TARGET, target_name(fx_node.target))]
        rule = fx_node.meta.get(META_RULE)
        if rule is not None:
            entries.append((META_RULE, str(rule)))
        for key, value in entries:
            prop = proto.metadata_props.add()
            prop.key = key
            prop.value = value

    def bind(self, fx_node: fx.Node, value: Any) -> None:
        self._values[fx_node] = value
        if isinstance(value, str) and value and fx_node in self._meta and value not in self._value_info \
                and value not in self._initializer_names and value not in self._input_names:
            shape, dtype = self._meta[fx_node]
            if dtype in _TORCH_TO_ONNX:
                self._value_info[value] = (_TORCH_TO_ONNX[dtype], shape)

    def bind_transposed(self, fx_node: fx.Node, value: str) -> None:
        self.transposed[fx_node] = value

    def fail(self, what: str, fix: str | None = None):
        node = self.current
        where = f" ({describe_node(node)}, op {target_name(node.target)})" if node is not None else ""
        raise LoweringError(what.rstrip(".") + where + ".", fix)

    # ----------------------------------------------------------------- renaming
    def rename(self, old: str, new: str, nodes: Iterable[onnx.NodeProto] | None = None) -> None:
        """Rename an ONNX value everywhere (or only in ``nodes``)."""
        for proto in (self.nodes if nodes is None else nodes):
            for i, name in enumerate(proto.input):
                if name == old:
                    proto.input[i] = new
            for i, name in enumerate(proto.output):
                if name == old:
                    proto.output[i] = new
        if old in self._value_info:
            self._value_info[new] = self._value_info.pop(old)
        if nodes is not None:
            return  # a value made in the current step is not bound to any FX node yet
        for fx_node, value in self._values.items():
            if value == old:
                self._values[fx_node] = new
            elif isinstance(value, list) and old in value:
                self._values[fx_node] = [new if v == old else v for v in value]

    def _fx_named(self, name: str) -> bool:
        return any(v == name for n, v in self._values.items() if n in self._fx_value_name)

    def _produced_in_step(self, name: str) -> bool:
        return any(name in proto.output for proto in self.nodes[self._step_start:])


def _meta_from_val(val: Any) -> tuple[tuple[int, ...], torch.dtype] | None:
    if isinstance(val, torch.Tensor):
        try:
            return tuple(int(d) for d in val.shape), val.dtype
        except (TypeError, ValueError):
            raise LoweringError("fxq's ONNX lowering needs static shapes, but the graph has a "
                                f"symbolic shape {tuple(val.shape)}.",
                                "Capture the model with fixed input shapes.") from None
    return None


def _collect_meta(ctx: LoweringContext, gm: fx.GraphModule, example_inputs: tuple) -> None:
    missing = False
    for node in gm.graph.nodes:
        if node.op in ("output",):
            continue
        val = node.meta.get("val")
        if isinstance(val, (list, tuple)):
            # Several results (max.dim, split ...): shape(node) means the first one.
            metas = [_meta_from_val(v) for v in val]
            first = next((m for m in metas if m is not None), None)
            if first is not None:
                ctx._meta[node] = first
            continue
        meta = _meta_from_val(val)
        if meta is not None:
            ctx._meta[node] = meta
        elif val is None and node.users and node.op != "get_attr":
            missing = True
    if not missing:
        return
    # Nodes inserted by later passes may lack meta["val"]; run the graph once to learn them.
    class _Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n not in ctx._meta and isinstance(out, torch.Tensor):
                ctx._meta[n] = (tuple(out.shape), out.dtype)
            return out

    with torch.no_grad():
        _Recorder(gm).run(*example_inputs)


def _dynamic_nodes(gm: fx.GraphModule, shape_only: Callable[[Any], bool]) -> set[fx.Node]:
    """Nodes whose value depends on a graph input or on a module call (a quantizer); an op that
    reads only its inputs' static shapes (``new_zeros`` ...) does not propagate dependence."""
    dynamic: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "call_module", "call_method"):
            dynamic.add(node)
        elif node.op == "call_function" and not shape_only(node.target):
            if any(inp in dynamic for inp in node.all_input_nodes):
                dynamic.add(node)
    return dynamic


def _resolve_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _fold(ctx: LoweringContext, node: fx.Node, shape_only: bool) -> None:
    """Evaluate ``node`` now. ``shape_only``: its inputs may be graph values, but only their
    shapes matter (``zeros_like`` ...), so stand-ins of the right shape are used."""

    def resolve(arg: fx.Node):
        folded = ctx._folded.get(arg)
        if folded is not None and arg not in ctx._values:
            return folded.value
        if shape_only:
            shape, dtype = ctx._fx_meta(arg)
            return torch.zeros(shape, dtype=dtype)
        raise AssertionError(f"{arg.name} is not constant")

    mutated = _mutated_storage(ctx, node) if not shape_only else None
    try:
        args = fx.node.map_arg(node.args, resolve)
        kwargs = fx.node.map_arg(node.kwargs, resolve)
        with torch.no_grad():
            value = node.target(*args, **kwargs)
    except Exception as exc:  # any failure means "cannot fold": report it with the node
        ctx.current = node
        ctx.fail(f"fxq could not evaluate the constant expression {target_name(node.target)} "
                 f"at lowering time ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
    ctx._folded[node] = _Folded(value, node.name)
    if mutated is not None:
        # Constants sharing the mutated storage must be written out again when next used.
        for other, folded in ctx._folded.items():
            if isinstance(folded.value, torch.Tensor) and folded.value.untyped_storage().data_ptr() == mutated:
                for key in [k for k in ctx._materialized if k[0] is other]:
                    del ctx._materialized[key]


def _mutated_storage(ctx: LoweringContext, node: fx.Node) -> int | None:
    """The storage an in-place op on constants (e.g. filling a slice of a mask) will write to;
    refuses to write into a parameter or buffer of the user's model."""
    if not (_mutates(node) and node.args and isinstance(node.args[0], fx.Node)):
        return None
    target = ctx._folded.get(node.args[0])
    if target is None or not isinstance(target.value, torch.Tensor):
        return None
    storage = target.value.untyped_storage().data_ptr()
    for other, folded in ctx._folded.items():
        if other.op == "get_attr" and isinstance(folded.value, torch.Tensor) \
                and folded.value.untyped_storage().data_ptr() == storage:
            ctx.current = node
            ctx.fail(f"the graph modifies the parameter or buffer '{other.target}' in place")
    return storage


def _graph_io_type(name: str, shape: Sequence[int], dtype: torch.dtype) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, onnx_dtype(dtype), list(shape))


def lower_to_onnx(gm: fx.GraphModule, example_inputs: tuple | None = None, opset: int = 21,
                  module_handler: ModuleHandler | None = None, graph_name: str = "fxq", *,
                  fold_constants: bool = True, value_info: bool = True,
                  check: bool = True) -> onnx.ModelProto:
    """Lower a canonical FX graph module to an ONNX model (ai.onnx ``opset``).

    ``example_inputs`` fixes the input types (default: ``gm.meta["fxq.example_inputs"]``, then the
    placeholders' ``meta["val"]``). ``module_handler(ctx, node, module)`` lowers each
    ``call_module`` node and returns its value name(s); without one a ``call_module`` is an
    error. ``value_info`` records the static shape of every FX value; ``check`` runs
    ``onnx.checker.check_model(full_check=True)`` and reports failures as ``LoweringError``.
    """
    from fxq.onnx_size import check_model

    from . import onnx_ops  # the op table registers itself on import

    if opset < MIN_OPSET:
        raise LoweringError(f"fxq lowers to ONNX opset {MIN_OPSET} or newer; {opset} was asked for.",
                            f"Use opset >= {MIN_OPSET}.")
    if example_inputs is None:
        example_inputs = gm.meta.get("fxq.example_inputs")
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if example_inputs is None:
        example_inputs = tuple(torch.zeros(p.meta["val"].shape, dtype=p.meta["val"].dtype)
                               for p in placeholders)
    example_inputs = tuple(example_inputs)
    if len(example_inputs) != len(placeholders):
        raise LoweringError(f"The graph takes {len(placeholders)} inputs but {len(example_inputs)} "
                            "example inputs were given.", "Pass one example tensor per input.")

    ctx = LoweringContext(gm, opset, module_handler)
    _collect_meta(ctx, gm, example_inputs)
    output_node = next(n for n in graph.nodes if n.op == "output")
    outs = output_node.args[0]
    out_args = list(outs) if isinstance(outs, (tuple, list)) else [outs]

    # Reserve the interface names first, then every FX node's own name for its value.
    in_names = ["input"] if len(placeholders) == 1 else [f"input_{i}" for i in range(len(placeholders))]
    out_names = ["output"] if len(out_args) == 1 else [f"output_{i}" for i in range(len(out_args))]
    ctx._used.update(in_names)
    ctx._used.update(out_names)
    for node in graph.nodes:
        if node.op in ("call_function", "call_module", "call_method"):
            ctx._fx_value_name[node] = ctx.fresh(node.name)

    inputs = []
    for node, name, example in zip(placeholders, in_names, example_inputs):
        if not isinstance(example, torch.Tensor):
            raise LoweringError(f"Graph input '{node.name}' is a {type(example).__name__}, not a tensor.",
                                "Pass tensors as example inputs.")
        inputs.append(_graph_io_type(name, example.shape, example.dtype))
        ctx._input_names.add(name)
        ctx._meta.setdefault(node, (tuple(example.shape), example.dtype))
        ctx._values[node] = name

    dynamic = _dynamic_nodes(gm, onnx_ops.is_shape_only if fold_constants else (lambda t: False))
    for node in graph.nodes:
        ctx.current = node
        if node.op == "placeholder" or node.op == "output":
            continue
        if node.op == "get_attr":
            value = _resolve_attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                ctx._folded[node] = _Folded(value.detach(), node.target)
            continue
        ctx._step_start = len(ctx.nodes)
        if not node.users and not _mutates(node):
            continue  # dead code, e.g. the unused indices of max_pool2d_with_indices
        if node.op == "call_function":
            if fold_constants and onnx_ops.is_shape_only(node.target):
                _fold(ctx, node, shape_only=True)
                continue
            if fold_constants and node not in dynamic and onnx_ops.can_fold(node.target):
                _fold(ctx, node, shape_only=False)
                if onnx_ops.is_identity(node.target) and node.args and isinstance(node.args[0], fx.Node):
                    ctx._folded[node].alias_of = node.args[0]
                continue
            emitter = onnx_ops.lookup(node.target)
            if emitter is None:
                raise _unsupported(node)
            result = _run_emitter(ctx, emitter, node)
        elif node.op == "call_module":
            if module_handler is None:
                raise LoweringError(
                    f"The graph calls module '{node.target}' ({describe_node(node)}) and no "
                    "module_handler was given to lower it.",
                    "Pass module_handler=... to lower_to_onnx (the quantization backends do), or "
                    "lower the float graph before quantizers are inserted.")
            module = gm.get_submodule(node.target)
            result = _call_guarded(ctx, node, lambda: module_handler(ctx, node, module))
        else:
            raise _unsupported(node)
        _finish_step(ctx, node, result)

    ctx.current = None
    graph_outputs = []
    for arg, name in zip(out_args, out_names):
        if not isinstance(arg, fx.Node):
            raise LoweringError(f"The graph returns a constant {arg!r}; fxq needs tensor outputs.",
                                "Return tensors computed from the inputs.")
        value = ctx.value(arg)
        renamable = (value not in ctx._input_names and value not in ctx._initializer_names
                     and value not in {o.name for o in graph_outputs}
                     and any(value in p.output for p in ctx.nodes))
        if renamable:
            ctx.rename(value, name)
        else:
            ctx.node("Identity", [value], [name])
        shape, dtype = ctx._fx_meta(arg)
        graph_outputs.append(_graph_io_type(name, shape, dtype))
        ctx._value_info.pop(name, None)

    infos = []
    if value_info:
        for name, (elem, shape) in ctx._value_info.items():
            infos.append(helper.make_tensor_value_info(name, elem, list(shape)))
    onnx_graph = helper.make_graph(ctx.nodes, graph_name, inputs, graph_outputs,
                                   initializer=ctx.initializers, value_info=infos)
    model = helper.make_model(onnx_graph, producer_name="fxq",
                              opset_imports=[helper.make_opsetid("", opset)])
    # Node metadata_props needs IR 10; never go below what the opset itself needs.
    model.ir_version = max(10, helper.find_min_ir_version_for([helper.make_opsetid("", opset)]))
    if check:
        try:
            check_model(model, full_check=True)
        except Exception as exc:  # checker and shape-inference errors share no base class
            raise LoweringError(f"fxq produced an invalid ONNX model: {str(exc).strip()[:600]}",
                                "This is a bug in an ONNX emitter; please report it with the model.") from exc
    return model


def _mutates(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_module" or (schema is not None and schema.is_mutable)


def _unsupported(node: fx.Node) -> LoweringError:
    name = target_name(node.target)
    return LoweringError(
        f"fxq cannot lower `{name}` to ONNX ({describe_node(node)}): no emitter is registered "
        "for this op.",
        f"Register one in fxq/backends/onnx_ops.py with @emits({name}) (the existing emitters show "
        "the pattern), or rewrite that part of the model with supported ops.")


def _call_guarded(ctx: LoweringContext, node: fx.Node, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except FxqError:
        raise
    except Exception as exc:  # an emitter bug: keep the traceback, add which node it was
        raise LoweringError(
            f"fxq failed while lowering `{target_name(node.target)}` ({describe_node(node)}): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
            "This is a bug in the ONNX lowering; please report it with the model.") from exc


def _run_emitter(ctx: LoweringContext, emitter: Callable, node: fx.Node) -> Any:
    args = normalized_args(node)
    return _call_guarded(ctx, node, lambda: emitter(ctx, node, args))


def _finish_step(ctx: LoweringContext, node: fx.Node, result: Any) -> None:
    if result is None:
        if node not in ctx._values and node.users:
            ctx.fail("The emitter returned no value for a node that has users.")
        return
    want = ctx._fx_value_name[node]
    step = ctx.nodes[ctx._step_start:]
    if isinstance(result, str):
        # The value takes the FX node's name when this step created it, so values read like the
        # FX graph; intermediates keep "<fx name>/<OpType>".
        if result != want and ctx._produced_in_step(result):
            ctx.rename(result, want, step)
            result = want
    elif isinstance(result, (list, tuple)):
        result = list(result)
    if node.target is operator.getitem and isinstance(result, str) and result != want \
            and result not in ctx._input_names and result not in ctx._initializer_names \
            and not ctx._fx_named(result):
        # Name a tuple element after the getitem that picks it (one getitem per element).
        ctx.rename(result, want)
        result = want
    if len(step) == 1:
        ctx._node_names.discard(step[0].name)
        step[0].name = ctx._fresh_node_name(node.name)
    ctx.bind(node, result)
    # An in-place op changes its first argument: later readers must see the new value.
    schema = getattr(node.target, "_schema", None)
    if schema is not None and schema.arguments and node.args and isinstance(node.args[0], fx.Node):
        alias = schema.arguments[0].alias_info
        if alias is not None and alias.is_write and isinstance(result, str):
            ctx._values[node.args[0]] = result


def onnx_nodes_by_fx_node(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Map each FX node name to the ONNX nodes lowered from it, in graph order."""
    found: dict[str, list[onnx.NodeProto]] = {}
    for proto in model.graph.node:
        for prop in proto.metadata_props:
            if prop.key == META_FX_NODE:
                found.setdefault(prop.value, []).append(proto)
    return found
