"""Canonical graph text and graph diffs: what ``--print-diff`` and ``--print-after`` show.

A graph is printed one line per node, in a form that does not depend on names:

    %in0 = input f32[1,3,224,224]
    %0 = aten.conv2d(%in0, param f32[64,3,7,7], None, [2,2], [3,3])
    %1 = aten.relu(%0)  # canonicalize.functionalize
    return %1

* nodes are numbered in graph order (fx keeps it topological), placeholders ``%in0, %in1 ...``;
* ATen targets lose the ``torch.ops`` prefix and their overload when it is the op's primary one
  (the first registered: ``aten.conv2d.default``, ``aten.add.Tensor``), so ``aten.add.Tensor``
  prints ``aten.add`` while ``aten.add.Scalar`` keeps its suffix; in-place ops keep their
  trailing underscore;
* ``get_attr`` nodes get no line of their own: each consumer shows the value it reads as
  ``param f32[64,3,7,7]`` (shape and dtype, not the attribute name), so renaming a parameter is not
  a change and a diff does not fill up with parameter loads;
* ``call_module`` shows the module's class and, when the module has a ``describe()`` method (fxq's
  quantizers do), its description: ``WeightQuantizer[wq int8 per-channel axis0](%3)``.

Each line remembers the rule that made its node (``node.meta["fxq.rule"]``); the rule is not part
of the text, so stamping provenance never shows up as a change.

In a diff, nodes that survived the pass keep the number they had before it (new nodes get fresh
numbers after the highest old one), so removing one node changes the lines that read it, not every
line below it.
"""
from __future__ import annotations

import difflib
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

import torch
from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text
from torch import fx, nn

# The same key as passes.infra.RULE; spelled out because infra imports this module.
_RULE = "fxq.rule"
# Ops that are bookkeeping, not computation: left out of the per-op counts.
_NOT_COUNTED = ("input", "output")


@dataclass(frozen=True)
class CanonLine:
    """One node of the canonical listing. Equality and hashing use ``text`` only."""

    text: str
    rule: str | None = field(default=None, compare=False)
    op: str = field(default="", compare=False)
    # The fx node name; used only to line nodes up across a pass (see graph_diff).
    node: str | None = field(default=None, compare=False, repr=False)


# ---------------------------------------------------------------------------------------------
# Canonical listing

_DTYPE_SHORT = {
    torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
    torch.uint8: "u8", torch.bool: "bool", torch.complex64: "c64",
}
for _name in ("float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "int4", "uint4"):
    if hasattr(torch, _name):
        _DTYPE_SHORT.setdefault(getattr(torch, _name), _name.replace("float", "f").replace("uint", "u")
                                .replace("int", "i"))


def _tensor_type(t) -> str:
    dtype = _DTYPE_SHORT.get(t.dtype, str(t.dtype).replace("torch.", ""))
    return f"{dtype}[{','.join(str(d) for d in t.shape)}]"


def op_name(target) -> str:
    """Short, stable name of a call_function target (see the module docstring)."""
    if isinstance(target, torch._ops.OpOverload):
        base = target._schema.name.replace("::", ".")
        # The first registered overload is the everyday one (aten.add.Tensor, aten.conv2d.default);
        # "default" is not always it: aten.add.default adds two Python scalars.
        overloads = target.overloadpacket.overloads()
        primary = overloads[0] if overloads else "default"
        return base if target._overloadname == primary else f"{base}.{target._overloadname}"
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.replace("::", ".")
    if isinstance(target, torch._ops.HigherOrderOperator):
        return target.name()
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)
    if module in ("operator", "_operator", "builtins"):
        return name
    return f"{module}.{name}" if module else name


def _attr_value(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _describe_attr(gm: fx.GraphModule, target: str) -> str:
    try:
        value = _attr_value(gm, target)
    except AttributeError:
        return f"param <missing {target}>"
    if isinstance(value, torch.Tensor):
        return f"param {_tensor_type(value)}"
    return f"attr {type(value).__name__}"


def _describe_module(module: nn.Module) -> str:
    describe = getattr(module, "describe", None)
    detail = describe() if callable(describe) else module.extra_repr()
    name = type(module).__name__
    return f"{name}[{detail}]" if detail else name


class _Renderer:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.refs: dict[fx.Node, str] = {}

    def value(self, v) -> str:
        if isinstance(v, fx.Node):
            if v.op == "get_attr":
                return _describe_attr(self.gm, v.target)
            return self.refs.get(v, f"%?{v.name}")
        if isinstance(v, list):
            return "[" + ",".join(self.value(x) for x in v) + "]"
        if isinstance(v, tuple):
            inner = ",".join(self.value(x) for x in v)
            return f"({inner},)" if len(v) == 1 else f"({inner})"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k!r}: {self.value(x)}" for k, x in v.items()) + "}"
        if isinstance(v, torch.Tensor):
            return f"tensor {_tensor_type(v)}"
        if isinstance(v, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
            return str(v)
        return repr(v)

    def call(self, args, kwargs) -> str:
        parts = [self.value(a) for a in args]
        parts += [f"{k}={self.value(v)}" for k, v in kwargs.items()]
        return "(" + ", ".join(parts) + ")"


def canonical_lines(gm: fx.GraphModule) -> list[CanonLine]:
    """The canonical listing of ``gm`` (see the module docstring)."""
    r = _Renderer(gm)
    lines: list[CanonLine] = []
    n_inputs = n_nodes = 0
    for node in gm.graph.nodes:
        rule = node.meta.get(_RULE)
        if node.op == "get_attr":
            continue
        if node.op == "placeholder":
            ref = f"%in{n_inputs}"
            n_inputs += 1
            val = node.meta.get("val")
            kind = f" {_tensor_type(val)}" if isinstance(val, torch.Tensor) else ""
            r.refs[node] = ref
            lines.append(CanonLine(f"{ref} = input{kind}", rule, "input", node.name))
            continue
        if node.op == "output":
            lines.append(CanonLine(f"return {r.value(node.args[0])}", rule, "output", node.name))
            continue
        ref = f"%{n_nodes}"
        n_nodes += 1
        if node.op == "call_function":
            op = op_name(node.target)
            head = op
        elif node.op == "call_method":
            op = head = f"method.{node.target}"
        else:  # call_module
            try:
                module = gm.get_submodule(node.target)
                op, head = type(module).__name__, _describe_module(module)
            except AttributeError:
                op = head = f"<missing module {node.target}>"
        r.refs[node] = ref
        lines.append(CanonLine(f"{ref} = {head}{r.call(node.args, node.kwargs)}", rule, op, node.name))
    return lines


def op_counts(lines: Iterable[CanonLine]) -> Counter:
    """How many nodes of each op a listing has (inputs and the output not counted)."""
    return Counter(line.op for line in lines if line.op not in _NOT_COUNTED)


def listing_text(lines: Iterable[CanonLine]) -> str:
    """The listing as plain text, each line tagged with its rule: golden files and logs."""
    return "\n".join(_tagged(line.text, line.rule) for line in lines) + "\n"


def _tagged(text: str, rule: str | None) -> str:
    return f"{text}  # {rule}" if rule else text


def print_graph(gm: fx.GraphModule, title: str = "graph"):
    """A rich renderable of the canonical listing, rule tags dimmed."""
    out = [Text(title, style="bold")]
    for line in canonical_lines(gm):
        t = Text(line.text)
        if line.rule:
            t.append(f"  # {line.rule}", style="dim")
        out.append(t)
    return Group(*out)


# ---------------------------------------------------------------------------------------------
# Diffs

_DEF = re.compile(r"^%(\d+) = ")
_REF = re.compile(r"%(\d+)\b")


def _defined_number(line: CanonLine) -> int | None:
    m = _DEF.match(line.text)
    return int(m.group(1)) if m else None


def _keep_numbers(before: list[CanonLine], after: list[CanonLine]) -> list[CanonLine]:
    """Renumber ``after`` so that nodes that survived keep their ``before`` number.

    Nodes are matched by fx node name; a run of removed nodes replaced by a run of new ones (an
    in-place op replaced by its functional twin) is paired up in order, so the replacement keeps
    the old number and its readers do not show as changed. Other new nodes are numbered after the
    highest old number.
    """
    if any(line.node is None for line in (*before, *after)):
        return after  # lines built by hand: nothing to match nodes by
    old = {line.node: n for line in before if (n := _defined_number(line)) is not None}
    old_nodes = list(old)
    new_nodes = [line.node for line in after if _defined_number(line) is not None]
    number_of = {name: old[name] for name in new_nodes if name in old}
    matcher = difflib.SequenceMatcher(None, old_nodes, new_nodes, autojunk=False)
    taken = set(number_of.values())
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag != "replace":
            continue
        gone = [name for name in old_nodes[i1:i2] if old[name] not in taken]
        came = [name for name in new_nodes[j1:j2] if name not in number_of]
        for g, c in zip(gone, came):
            number_of[c] = old[g]
            taken.add(old[g])
    fresh = max(old.values(), default=-1) + 1
    for name in new_nodes:
        if name not in number_of:
            number_of[name] = fresh
            fresh += 1
    renumber = {_defined_number(line): number_of[line.node] for line in after
                if _defined_number(line) is not None}

    def sub(m: re.Match) -> str:
        return f"%{renumber.get(int(m.group(1)), int(m.group(1)))}"

    return [CanonLine(_REF.sub(sub, line.text), line.rule, line.op, line.node) for line in after]


def _changed(before: list[CanonLine], after: list[CanonLine]) -> int:
    matcher = difflib.SequenceMatcher(None, [l.text for l in before], [l.text for l in after],
                                      autojunk=False)
    return sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in matcher.get_opcodes() if tag != "equal")


def _owns(rule: str | None, pass_name: str | None) -> bool:
    if rule is None:
        return False
    return pass_name is None or rule == pass_name or rule.startswith(pass_name + ".")


def _diff_rows(before: list[CanonLine], after: list[CanonLine], context: int,
               pass_name: str | None) -> list[tuple[str, str, str | None]]:
    """(kind, text, rule) rows; kind is '@' (hunk header), ' ', '-', '+' or '~'.

    '~' marks a line whose text is unchanged but whose node the pass restamped with its rule:
    the node was rewritten in a way the text does not show (new parameter values).
    """
    if before != after:
        aligned = _keep_numbers(before, after)
        if _changed(before, aligned) <= _changed(before, after):
            after = aligned
    matcher = difflib.SequenceMatcher(None, [l.text for l in before], [l.text for l in after],
                                      autojunk=False)
    full: list[tuple[str, str, str | None]] = []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            for b, a in zip(before[i1:i2], after[j1:j2]):
                restamped = a.rule != b.rule and _owns(a.rule, pass_name)
                full.append(("~", a.text, a.rule) if restamped else (" ", a.text, None))
            continue
        full += [("-", line.text, None) for line in before[i1:i2]]
        full += [("+", line.text, line.rule if _owns(line.rule, pass_name) else None)
                 for line in after[j1:j2]]
    keep: set[int] = set()
    for i, (kind, _, _) in enumerate(full):
        if kind != " ":
            keep.update(range(max(0, i - context), min(len(full), i + context + 1)))
    # Line numbers of each row in the before and after listings, for the hunk headers.
    pos, nb, na = [], 0, 0
    for kind, _, _ in full:
        pos.append((nb, na))
        nb += kind != "+"
        na += kind != "-"
    rows: list[tuple[str, str, str | None]] = []
    hunk: list[int] = []
    for i in sorted(keep) + [None]:
        if hunk and (i is None or i != hunk[-1] + 1):
            kinds = [full[k][0] for k in hunk]
            b0, a0 = pos[hunk[0]]
            header = (f"@@ -{b0 + 1},{sum(k != '+' for k in kinds)} "
                      f"+{a0 + 1},{sum(k != '-' for k in kinds)} @@")
            rows.append(("@", header, None))
            rows += [full[k] for k in hunk]
            hunk = []
        if i is not None:
            hunk.append(i)
    return rows


def _count_rows(before: list[CanonLine], after: list[CanonLine]) -> list[tuple[str, int, int]]:
    cb, ca = op_counts(before), op_counts(after)
    rows = [(op, cb[op], ca[op]) for op in sorted(set(cb) | set(ca)) if cb[op] != ca[op]]
    rows.append(("total", sum(cb.values()), sum(ca.values())))
    return rows


def diff_text(before: list[CanonLine], after: list[CanonLine], context: int = 3,
              pass_name: str | None = None) -> str:
    """The diff as plain text: unified hunks, then the per-op count summary.

    Rows start with ``-`` (removed), ``+`` (added, tagged ``# rule``), ``~`` (same text, node
    rewritten by the rule, e.g. a conv whose weights were folded) or a space (context).

    ``pass_name`` limits the ``# rule`` tags to rules of that pass (``fold_batchnorm`` and
    ``fold_batchnorm.*``), so a line rewired by this pass is not credited to an earlier one.
    """
    rows = _diff_rows(before, after, context, pass_name)
    if not rows:
        return "no change\n"
    out = ["--- before", "+++ after"]
    for kind, text, rule in rows:
        out.append(text if kind == "@" else f"{kind} {_tagged(text, rule)}")
    rows = _count_rows(before, after)
    width = max(len("op"), *(len(op) for op, _, _ in rows))
    out.append("")
    out.append(f"{'op':<{width}}  {'before':>6}  {'after':>6}  {'Δ':>5}")
    for op, nb, na in rows:
        out.append(f"{op:<{width}}  {nb:>6}  {na:>6}  {na - nb:>+5}")
    return "\n".join(out) + "\n"


def graph_diff(before: list[CanonLine], after: list[CanonLine], title: str, context: int = 3,
               pass_name: str | None = None):
    """A rich renderable: the diff coloured (removed red, added green with rule tags, rewritten
    in place yellow, context dim) followed by a table of the op counts that changed, plus totals."""
    parts: list = [Text(title, style="bold")]
    rows = _diff_rows(before, after, context, pass_name)
    if not rows:
        parts.append(Text("no change", style="dim"))
        return Group(*parts)
    style = {"@": "cyan dim", " ": "dim", "-": "red", "+": "green", "~": "yellow"}
    for kind, text, rule in rows:
        t = Text(text if kind == "@" else f"{kind} {text}", style=style[kind])
        if rule:
            t.append(f"  # {rule}", style="italic green dim")
        parts.append(t)
    table = Table(box=box.SIMPLE, show_edge=False, pad_edge=False)
    table.add_column("op")
    for name in ("before", "after", "Δ"):
        table.add_column(name, justify="right")
    for op, nb, na in _count_rows(before, after):
        delta = na - nb
        colour = "green" if delta > 0 else "red" if delta < 0 else "dim"
        table.add_row(op, str(nb), str(na), Text(f"{delta:+d}", style=colour),
                      style="bold" if op == "total" else None)
    parts.append(table)
    return Group(*parts)


# ---------------------------------------------------------------------------------------------
# PassManager observer

class DiffObserver:
    """``--print-diff`` / ``--print-after`` as a PassManager observer.

    ``passes_to_diff``: names of the passes to diff, ``None`` for every pass, empty for none.
    ``print_after``: names of the passes after which to print the whole canonical graph.
    Diffs need the "before" snapshot, so build the manager with
    ``PassManager(passes, observers=[obs], wants_snapshots=obs.wants_snapshots)``.
    """

    max_skips_shown = 10

    def __init__(self, console: Console, passes_to_diff: set[str] | None, print_after: set[str]):
        self.console = console
        self.passes_to_diff = passes_to_diff
        self.print_after = set(print_after)
        self.wants_snapshots = passes_to_diff is None or bool(passes_to_diff)

    def _diffs(self, pass_name: str) -> bool:
        return self.passes_to_diff is None or pass_name in self.passes_to_diff

    def __call__(self, pass_name: str, gm: fx.GraphModule, before: list[CanonLine] | None,
                 result) -> None:
        if self._diffs(pass_name):
            self._print_diff(pass_name, gm, before, result)
        if pass_name in self.print_after:
            self.console.print(print_graph(gm, f"graph after {pass_name}"))

    def _print_diff(self, pass_name, gm, before, result) -> None:
        if before is None:
            self.console.print(Text(f"{pass_name}: no snapshot to diff against (create the "
                                    f"PassManager with wants_snapshots=True)", style="yellow"))
            return
        after = canonical_lines(gm)
        if not _diff_rows(before, after, 0, pass_name):
            what = ("modified values only; graph text unchanged" if getattr(result, "modified", False)
                    else "no change")
            self.console.print(Text(f"{pass_name}: {what}", style="dim"))
        else:
            self.console.print(graph_diff(before, after, f"{pass_name}", pass_name=pass_name))
        self._print_stats(getattr(result, "stats", None) or {})

    def _print_stats(self, stats: dict) -> None:
        counts = [f"{k}={v}" for k, v in stats.items() if isinstance(v, (int, float)) and v]
        if counts:
            self.console.print(Text("stats: " + ", ".join(counts), style="dim"))
        skipped = stats.get("skipped") or []
        for skip in skipped[: self.max_skips_shown]:
            self.console.print(Text(f"  left {skip.get('node')}: {skip.get('reason')}", style="dim"))
        if len(skipped) > self.max_skips_shown:
            self.console.print(Text(f"  ... and {len(skipped) - self.max_skips_shown} more",
                                    style="dim"))


def diff_observer(console: Console, passes_to_diff: set[str] | None = None,
                  print_after: Iterable[str] = ()) -> DiffObserver:
    """The observer behind ``--print-diff`` and ``--print-after PASS`` (see ``DiffObserver``)."""
    return DiffObserver(console, passes_to_diff, set(print_after))


class SummaryObserver:
    """One line per pass: what it changed, as op-count deltas (``--print-summary``)."""

    wants_snapshots = True

    def __init__(self, console: Console):
        self.console = console

    def __call__(self, pass_name: str, gm: fx.GraphModule, before: list[CanonLine] | None, result) -> None:
        if before is None:
            return
        rows = _count_rows(before, canonical_lines(gm))
        deltas = ", ".join(f"{op} {b}→{a}" for op, b, a in rows if op != "total") or "no op-count change"
        self.console.print(f"[bold]{pass_name}[/bold]: {deltas}")
