"""Regions: the units fxq reconstructs, calibrates and reports on.

A region is a set of graph nodes with the quantizable layers inside it, the activations that
feed it from outside and the one node whose value it is judged by. ``passes.detect_blocks`` finds
them (see ``docs/blocks.md`` for the rules); this module only holds the record and renders it, so
the report, the CLI and the reconstruction loop can share it without importing the pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from rich.table import Table

KINDS = ("residual", "concat", "chain", "layer", "stage", "net")


@dataclass(frozen=True)
class Region:
    """One region of a graph; every field that names graph nodes uses ``fx.Node.name``.

    ``nodes`` and ``layers`` are in topological order; ``inputs`` are the activations produced
    outside the region that its nodes read; ``output`` is the value the region is judged by;
    ``entry`` is the nearest node outside the region that every path into it passes through
    (None when the graph inputs themselves are the only such point).
    """

    name: str
    kind: str
    nodes: tuple[str, ...]
    layers: tuple[str, ...]
    inputs: tuple[str, ...]
    output: str
    entry: str | None = None

    def __post_init__(self):
        # Accept lists from callers and JSON, but keep the record hashable and immutable.
        for name in ("nodes", "layers", "inputs"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.kind not in KINDS:
            raise ValueError(f"Region kind must be one of {', '.join(KINDS)}, not {self.kind!r}.")

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "nodes": list(self.nodes),
                "layers": list(self.layers), "inputs": list(self.inputs), "output": self.output,
                "entry": self.entry}

    @classmethod
    def from_json(cls, data: dict) -> "Region":
        return cls(name=data["name"], kind=data["kind"], nodes=data["nodes"],
                   layers=data["layers"], inputs=data["inputs"], output=data["output"],
                   entry=data.get("entry"))


def count_kinds(regions: Iterable[Region]) -> dict[str, int]:
    """``{kind: number of regions}`` in the fixed order of ``KINDS``, kinds absent left out."""
    regions = list(regions)
    return {k: n for k in KINDS if (n := sum(r.kind == k for r in regions))}


def regions_json(regions: Iterable[Region]) -> dict:
    regions = list(regions)
    return {"regions": [r.to_json() for r in regions], "counts": count_kinds(regions)}


def _abbreviate(names: tuple[str, ...], keep: int = 3) -> str:
    if len(names) <= keep + 1:
        return ", ".join(names)
    return ", ".join(names[:keep]) + f", … (+{len(names) - keep})"


def regions_table(regions: Iterable[Region], title: str | None = "Regions") -> Table:
    table = Table(title=title)
    table.add_column("region", style="bold")
    table.add_column("kind")
    table.add_column("#layers", justify="right")
    table.add_column("layers")
    table.add_column("inputs → output")
    for r in regions:
        table.add_row(r.name, r.kind, str(len(r.layers)), _abbreviate(r.layers),
                      f"{_abbreviate(r.inputs, keep=2)} → {r.output}")
    return table
