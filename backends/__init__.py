"""fxq's backends: placement tables and lowering to runtime formats.

``lowering(name)`` is what the compile pipeline uses: the backend's table, its lowering function,
the files it writes beside ``model.onnx`` and what it adds to ``report.json``.
"""
from __future__ import annotations

import logging

log = logging.getLogger("fxq.backends")


class Lowering:
    """One compile's lowering to backend ``name`` (``onnx-qdq`` or ``tensorrt``)."""

    def __init__(self, name: str):
        from fxq.backends.lower_qdq import new_notes
        from fxq.backends.tables import get_backend

        self.table = get_backend(name)
        self.notes = new_notes()
        self.structure: dict | None = None  # tensorrt: structure_report of the lowered graph

    def lower(self, gm, opts=None, notes: dict | None = None):
        """The ONNX model of the quantized ``gm``; each storage warning is logged once."""
        from fxq.backends.lower_qdq import lower_qdq
        from fxq.backends.lower_tensorrt import lower_tensorrt

        fn = {"onnx-qdq": lower_qdq, "tensorrt": lower_tensorrt}[self.table.name]
        notes = self.notes if notes is None else notes
        model = fn(gm, opts, notes=notes)
        for text in notes["warnings"].values():
            log.warning(text)
        if self.table.name == "tensorrt":
            from fxq.backends.lower_tensorrt import structure_report

            self.structure = structure_report(model)
        return model

    def write_extras(self, out_dir) -> list[str]:
        """Files written beside model.onnx (atomically): tensorrt's ``build_engine.sh``."""
        if self.table.name != "tensorrt":
            return []
        from fxq.backends.lower_tensorrt import write_build_script

        return [write_build_script(out_dir).name]

    def report(self, gm) -> dict:
        """The backend's part of report.json: placement rows, weight storage, warnings, nodes
        left in float and (tensorrt) the engine build command."""
        from fxq.backends.tables import float_nodes

        out = {
            "placement": {"table": self.table.name, "rows": self.table.describe_rows()},
            "weight_storage": self.notes["weights"],
            "warnings": list(self.notes["warnings"].values()),
            "float_nodes": float_nodes(gm, self.table),
        }
        if self.table.name == "tensorrt":
            from fxq.backends.lower_tensorrt import engine_report

            out["engine"] = dict(engine_report(), structure=self.structure)
        return out


def lowering(name: str) -> Lowering:
    return Lowering(name)
