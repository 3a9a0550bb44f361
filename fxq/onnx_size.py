"""ONNX models past protobuf's 2 GB limit (the float reference of a 600M-parameter model).

A ``ModelProto`` holds any size in memory, but protobuf cannot serialize one of 2 GB or more,
and ``onnx.checker.check_model`` refuses it in memory. Such a model is written with its tensors
as external data beside it, then checked and run from that file (ONNX Runtime loads external
data from the model's folder).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

# protobuf's hard limit is 2 GiB - 1; keep room for the graph itself beside the tensors
LIMIT = 2**31 - 2**26


def payload_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the model's initializers (what decides whether it fits in one protobuf)."""
    total = 0
    for t in model.graph.initializer:
        total += len(t.raw_data) if t.raw_data else 8 * (len(t.float_data) + len(t.int32_data) + len(t.int64_data)
                                                          + len(t.double_data))
    return total


def oversized(model: onnx.ModelProto) -> bool:
    return payload_bytes(model) >= LIMIT


def save_external(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` with every tensor of 1 KiB or more in ``<name>.data`` beside it.
    The tensors move out of ``model`` (it then refers to the file): no second copy in memory."""
    path = Path(path)
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    return path


def check_model(model: onnx.ModelProto, full_check: bool = False) -> None:
    """``onnx.checker.check_model``, through a file with external data when the model is too large
    for one protobuf."""
    if not oversized(model):
        onnx.checker.check_model(model, full_check=full_check)
        return
    from onnx.external_data_helper import load_external_data_for_model

    with tempfile.TemporaryDirectory(prefix="fxq-check-") as tmp:
        onnx.checker.check_model(str(save_external(model, Path(tmp) / "model.onnx")), full_check=full_check)
        load_external_data_for_model(model, tmp)  # the tensors come back into the proto


def runnable(model: onnx.ModelProto, folder: str | os.PathLike) -> bytes | str:
    """Serialized bytes, or, past the limit, the path of the model saved with external data in
    ``folder`` (its tensors move there). ONNX Runtime, ``fxq.ort_timing`` and
    ``fxq.pipeline.run_onnx`` take either."""
    if not oversized(model):
        return model.SerializeToString()
    return str(save_external(model, Path(folder) / "model.onnx"))
