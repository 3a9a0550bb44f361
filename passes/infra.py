"""The pass framework: a pass is a named object whose ``call(gm)`` returns a ``PassResult``.

One pass manager runs a list of passes, verifies the graph after each one when asked, stamps
provenance on the nodes each pass created, lets observers see every (before, after) pair (the CLI
uses that for ``--print-diff``/``--print-after``), and, when a pass fails, says which passes ran
before it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from torch import fx

from fxq.errors import FxqError, PassError
from fxq.ops import get_attr

RULE = "fxq.rule"      # which pass/rule created or last rewrote a node
REGION = "fxq.region"  # the region (block) a node belongs to
QSPEC = "fxq.qspec"    # quantization decisions attached to a node's edges
FLOAT = "fxq.float"    # {"rule", "why"}: a table row matched the node but left it in float


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


class Pass:
    """Base class. Subclasses set ``name`` and implement ``call``.

    ``requires``/``ensures`` are optional checks run before/after ``call``; they raise
    ``PassError`` with a reason when the graph is not what the pass expects or promises.
    """

    name: str = "pass"

    def call(self, gm: fx.GraphModule) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def requires(self, gm: fx.GraphModule) -> None:
        return None

    def ensures(self, gm: fx.GraphModule) -> None:
        return None

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        self.requires(gm)
        result = self.call(gm)
        self.ensures(result.graph_module)
        return result

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


def verify_graph(gm: fx.GraphModule) -> None:
    """Structural checks: fx lint, every get_attr/call_module target exists, code regenerates."""
    gm.graph.lint()
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "call_module"):
            try:
                gm.get_submodule(node.target) if node.op == "call_module" else get_attr(gm, node.target)
            except AttributeError as exc:
                raise PassError(f"Graph verification failed: node '{node.name}' refers to missing "
                                f"attribute '{node.target}'.") from exc
    gm.recompile()


def stamp_new_nodes(gm: fx.GraphModule, before: set[fx.Node], rule: str) -> int:
    """Stamp ``fxq.rule`` on nodes created since ``before`` that carry no finer rule."""
    count = 0
    for node in gm.graph.nodes:
        if node not in before:
            node.meta.setdefault(RULE, rule)
            count += 1
    return count


Observer = Callable[[str, fx.GraphModule, fx.GraphModule | None, PassResult], None]


class PassManager:
    """Run passes in order. ``verify=True`` lints after every pass (tests and ``--debug``).

    ``observers`` are called as ``observer(pass_name, gm_after, snapshot_before, result)`` where
    ``snapshot_before`` is the canonical text of the graph before the pass (or None when no
    observer asked for snapshots via ``wants_snapshots``).
    """

    def __init__(self, passes: Iterable[Pass], verify: bool = False,
                 observers: Iterable[Callable] = (), wants_snapshots: bool = False):
        self.passes = list(passes)
        self.verify = verify
        self.observers = list(observers)
        self.wants_snapshots = wants_snapshots
        self.history: list[tuple[str, PassResult]] = []

    def run(self, gm: fx.GraphModule) -> fx.GraphModule:
        from fxq.diff import canonical_lines  # local: diff imports nothing from here

        for p in self.passes:
            before_nodes = set(gm.graph.nodes)
            snapshot = canonical_lines(gm) if self.wants_snapshots else None
            try:
                result = p(gm)
            except FxqError as exc:
                raise type(exc)(f"{exc.message} (in pass '{p.name}'; passes that ran before it: "
                                f"{self._ran()})") from exc
            except Exception as exc:
                raise PassError(
                    f"Pass '{p.name}' failed with {type(exc).__name__}: {exc}. Passes that ran before "
                    f"it: {self._ran()}.",
                    "Rerun with --debug for the traceback, and report it with the model if it persists.",
                ) from exc
            gm = result.graph_module
            stamp_new_nodes(gm, before_nodes, p.name)
            if self.verify:
                try:
                    verify_graph(gm)
                except Exception as exc:
                    raise PassError(f"Graph verification failed after pass '{p.name}': {exc}. Passes "
                                    f"that ran before it: {self._ran()}.") from exc
            else:
                gm.recompile()
            self.history.append((p.name, result))
            for obs in self.observers:
                obs(p.name, gm, snapshot, result)
        return gm

    def _ran(self) -> str:
        return ", ".join(name for name, _ in self.history) or "none"
