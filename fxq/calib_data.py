"""Turn the --calib argument into one float tensor ``[N, ...]`` matching the model's input.

DATA forms (see docs/cli.md): a folder of images (searched recursively, sorted by relative path),
a ``.pt`` file holding a tensor (``weights_only=True``), a ``.npz``/``.npy`` holding one array (or
key ``x``), or, from Python, any iterable of tensors each ``[B, ...]`` or ``[...]``.

Everything is checked before it is used: a wrong shape, an integer dtype or a NaN is reported
with what was found and what was expected, rather than surfacing as a cryptic failure in
calibration. Warnings (skipped files, fewer samples than asked) go to the ``fxq`` logger.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .errors import CalibrationDataError

log = logging.getLogger("fxq.calib")

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif",
                            ".ppm", ".pgm", ".pbm", ".jfif"})
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ImageNet evaluation resizes the shorter side to 256 before a 224 center crop.
IMAGENET_CROP_RATIO = 224 / 256
PREPROCESS = ("imagenet", "none")


def _shape_str(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def load_calibration(spec: str | os.PathLike | Iterable[torch.Tensor],
                     input_shape: Sequence[int] | None,
                     size: int | None = None,
                     preprocess: str = "imagenet") -> torch.Tensor:
    """Return calibration samples as a contiguous float32 tensor ``[N, *input_shape[1:]]``.

    ``input_shape`` is the model's input shape with its batch dimension (e.g. ``(1, 3, 224, 224)``);
    only the dimensions after the batch are compared. ``None`` skips the comparison (not allowed
    for image folders, which need the target size). ``size`` keeps the first ``size`` samples.
    """
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise CalibrationDataError(f"--calib-size must be a positive number of samples; got {size!r}.",
                                   "Pass e.g. --calib-size 256, or leave it out to use all samples.")
    if preprocess not in PREPROCESS:
        raise CalibrationDataError(f"Unknown --preprocess '{preprocess}'.",
                                   f"Choose one of: {', '.join(PREPROCESS)}.")
    sample_shape = tuple(int(d) for d in input_shape[1:]) if input_shape is not None else None

    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        label = f"Calibration data '{path}'"
        if not path.exists():
            raise CalibrationDataError(f"Calibration data '{path}' does not exist.",
                                       "Check the path given to --calib.")
        if path.is_dir():
            data = _load_image_folder(path, input_shape, size, preprocess)
        else:
            data = _load_file(path)
    elif isinstance(spec, torch.Tensor):
        label = "The calibration tensor"
        data = spec
    else:
        label = "The calibration batches"
        data = _stack_iterable(spec, sample_shape, size)

    data = _check_tensor(data, sample_shape, label)
    if size is not None:
        if data.shape[0] < size:
            log.warning("--calib-size asks for %d samples but %s has only %d; using %d.",
                        size, label[0].lower() + label[1:], data.shape[0], data.shape[0])
        data = data[:size]
    return data.to(torch.float32).contiguous()


# --------------------------------------------------------------------------- tensors


def _check_tensor(data, sample_shape: tuple | None, label: str) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise CalibrationDataError(f"{label} is a {type(data).__name__}, not a tensor.",
                                   "Give a tensor of shape [N, ...] (batch first).")
    if data.is_complex() or not (data.is_floating_point()):
        kind = "boolean" if data.dtype == torch.bool else "complex" if data.is_complex() else "integer"
        raise CalibrationDataError(
            f"{label} has {kind} dtype {str(data.dtype).replace('torch.', '')}; calibration needs "
            "float samples exactly as the model receives them.",
            "Convert and scale it first, e.g. x.float() / 255 for 8-bit images, followed by the "
            "model's normalization.")
    if data.dim() == 0 or data.shape[0] == 0:
        raise CalibrationDataError(f"{label} holds no samples (shape {_shape_str(data.shape)}).",
                                   "Give at least one sample, batch first: [N, ...].")
    if sample_shape is not None and tuple(data.shape[1:]) != sample_shape:
        expected = "[N, " + ", ".join(str(d) for d in sample_shape) + "]"
        hint = "Give samples batch first with the model's input shape after the batch."
        if tuple(data.shape) == sample_shape:
            hint = "It looks like a single sample without a batch dimension: add one (x.unsqueeze(0))."
        elif data.dim() == len(sample_shape) + 1 and sorted(data.shape[1:]) == sorted(sample_shape):
            hint = ("The dimensions are in a different order (channels-last?): permute them, e.g. "
                    "x.permute(0, 3, 1, 2) for NHWC → NCHW.")
        raise CalibrationDataError(
            f"{label} has shape {_shape_str(data.shape)}, but the model's input is "
            f"{expected} (batch first).", hint)
    data = data.detach()
    finite = torch.isfinite(data)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(data).sum())
        n_inf = int((~finite).sum()) - n_nan
        bad_samples = int((~finite).flatten(1).any(1).sum()) if data.dim() > 1 else int((~finite).sum())
        raise CalibrationDataError(
            f"{label} contains {n_nan} NaN and {n_inf} infinite values (in {bad_samples} of "
            f"{data.shape[0]} samples).",
            "Remove or fix those samples; quantization ranges computed from them would be meaningless.")
    return data


def _stack_iterable(items: Iterable, sample_shape: tuple | None, size: int | None) -> torch.Tensor:
    batches = []
    count = 0
    try:
        iterator = iter(items)
    except TypeError as exc:
        raise CalibrationDataError(f"Calibration data must be a path or an iterable of tensors; got "
                                   f"a {type(items).__name__}.", "Pass a folder, a .pt/.npz file, "
                                   "or a list/DataLoader of tensors.") from exc
    for i, item in enumerate(iterator):
        if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
            item = item[0]  # (input, label) pairs from a labeled DataLoader
        if not isinstance(item, torch.Tensor):
            raise CalibrationDataError(f"Calibration item {i} is a {type(item).__name__}, not a tensor.",
                                       "Yield tensors [B, ...] or [...] (or (input, label) pairs).")
        if sample_shape is not None and item.dim() == len(sample_shape):
            item = item.unsqueeze(0)
        elif sample_shape is not None and item.dim() != len(sample_shape) + 1:
            raise CalibrationDataError(
                f"Calibration item {i} has shape {_shape_str(item.shape)}, but the model's input is "
                f"[B, {', '.join(str(d) for d in sample_shape)}].",
                "Yield batches [B, ...] or single samples with the model's input shape.")
        if batches and item.shape[1:] != batches[0].shape[1:]:
            raise CalibrationDataError(
                f"Calibration item {i} has shape {_shape_str(item.shape)}, unlike the earlier ones "
                f"({_shape_str(batches[0].shape)}).", "All samples must have the same shape.")
        batches.append(item.detach().cpu())
        count += item.shape[0]
        if size is not None and count >= size:
            break
    if not batches:
        raise CalibrationDataError("The calibration iterable yielded no tensors.",
                                   "Give at least one sample.")
    if any(b.dtype != batches[0].dtype for b in batches):
        batches = [b.to(torch.promote_types(batches[0].dtype, b.dtype)) for b in batches]
    return torch.cat(batches, 0)


# --------------------------------------------------------------------------- files


def _load_file(path: Path) -> torch.Tensor:
    if path.stat().st_size == 0:
        raise CalibrationDataError(f"Calibration file '{path}' is empty (0 bytes).",
                                   "Save or copy it again.")
    suffix = path.suffix.lower()
    if suffix in (".npz", ".npy"):
        return _load_numpy(path)
    if suffix in (".pt", ".pth", ".bin"):
        return _load_pt(path)
    if suffix in IMAGE_SUFFIXES:
        raise CalibrationDataError(f"--calib '{path}' is a single image file.",
                                   "Put the calibration images in a folder and pass the folder.")
    raise CalibrationDataError(
        f"Calibration file '{path}' has an unsupported type ('{path.suffix or 'no extension'}').",
        "--calib takes a folder of images, a .pt file holding a tensor [N, ...], or a .npz "
        "holding one array (or an array named x).")


def _load_pt(path: Path) -> torch.Tensor:
    import pickle

    from .loading import sniff_file_problem

    problem = sniff_file_problem(path)
    if problem is not None:
        raise CalibrationDataError(f"Calibration file '{path}' {problem}.",
                                   "It was probably cut short; copy or save it again." if "truncated"
                                   in problem else "Save the samples with torch.save(x, path), x a "
                                   "float tensor [N, ...].")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        from .loading import weights_only_refusal

        needs, detail = weights_only_refusal(exc)
        if needs is None:
            raise CalibrationDataError(
                f"Calibration file '{path}' could not be read as a torch.save file ({detail}).",
                "It may be truncated or corrupt; save it again with torch.save(x, path).") from exc
        raise CalibrationDataError(
            f"Calibration file '{path}' holds pickled Python objects ({detail}), not just tensors; "
            "fxq loads it with weights_only=True because unpickling runs code.",
            "Save a plain tensor: torch.save(x, path) with x of shape [N, ...].") from exc
    except Exception as exc:
        raise CalibrationDataError(
            f"Calibration file '{path}' could not be read as a torch.save file: "
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}",
            "It may be truncated or corrupt; save it again with torch.save(x, path).") from exc
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if "x" in tensors:
            return tensors["x"]
        if len(tensors) == 1 and len(obj) == 1:
            return next(iter(tensors.values()))
        raise CalibrationDataError(
            f"Calibration file '{path}' holds a dict with keys {sorted(map(str, obj))[:6]} and no "
            "tensor named 'x'.", "Save the input tensor alone, or under the key 'x'.")
    if isinstance(obj, (list, tuple)) and obj and all(isinstance(t, torch.Tensor) for t in obj):
        return _stack_iterable(obj, None, None)
    raise CalibrationDataError(f"Calibration file '{path}' holds a {type(obj).__name__}, not a "
                               "tensor.", "Save a tensor of shape [N, ...]: torch.save(x, path).")


def _load_numpy(path: Path) -> torch.Tensor:
    import zipfile

    import numpy as np

    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise CalibrationDataError(
            f"Calibration file '{path}' holds pickled objects (an object array); fxq does not "
            "unpickle data.", "Save a numeric array: np.savez(path, x=array.astype('float32')).") from exc
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise CalibrationDataError(f"Calibration file '{path}' is not a readable NumPy file: {exc}.",
                                   "It may be truncated or corrupt; save it again.") from exc
    try:
        if isinstance(loaded, np.ndarray):
            array = loaded
        else:
            keys = list(loaded.files)
            if "x" in keys:
                key = "x"
            elif len(keys) == 1:
                key = keys[0]
            elif not keys:
                raise CalibrationDataError(f"Calibration file '{path}' holds no arrays.",
                                           "Save the samples with np.savez(path, x=array).")
            else:
                raise CalibrationDataError(
                    f"Calibration file '{path}' holds {len(keys)} arrays ({', '.join(keys[:6])}) and "
                    "none is named 'x', so fxq cannot tell which are the inputs.",
                    "Name the input array x: np.savez(path, x=inputs).")
            try:
                array = loaded[key]
            except ValueError as exc:
                raise CalibrationDataError(
                    f"Array '{key}' in '{path}' holds pickled objects; fxq does not unpickle data.",
                    "Save a numeric array (e.g. array.astype('float32')).") from exc
            except (OSError, EOFError, zipfile.BadZipFile) as exc:
                raise CalibrationDataError(f"Array '{key}' in '{path}' could not be read: {exc}.",
                                           "The file may be corrupt; save it again.") from exc
    finally:
        if not isinstance(loaded, np.ndarray):
            loaded.close()
    if array.dtype.kind not in "fiub" or array.dtype.kind == "f" and array.dtype.itemsize > 8:
        raise CalibrationDataError(f"Calibration file '{path}' holds an array of dtype {array.dtype}.",
                                   "Save a float32 array of shape [N, ...].")
    return torch.from_numpy(np.ascontiguousarray(array))


# --------------------------------------------------------------------------- images


def list_images(folder: Path) -> tuple[list[Path], int]:
    """Image files under ``folder`` sorted by relative path, and the number of other files."""
    images, others = [], 0
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            p = Path(root) / name
            if p.suffix.lower() in IMAGE_SUFFIXES and not name.startswith("."):
                images.append(p)
            else:
                others += 1
    images.sort(key=lambda p: p.relative_to(folder).as_posix())
    return images, others


def _load_image_folder(folder: Path, input_shape, size: int | None, preprocess: str) -> torch.Tensor:
    images, others = list_images(folder)
    if not images:
        what = (f"no image files (only {others} other file{'s' if others != 1 else ''})" if others
                else "nothing (it is empty)")
        raise CalibrationDataError(
            f"Calibration folder '{folder}' contains {what}.",
            "Put images (.jpg, .png, .bmp, .tiff, …) in it, or pass a .pt/.npz file holding a "
            "tensor [N, ...].")
    if input_shape is None or len(input_shape) != 4 or input_shape[1] not in (1, 3):
        shown = _shape_str(input_shape) if input_shape is not None else "unknown"
        raise CalibrationDataError(
            f"A folder of images needs a model whose input is images [N, 1 or 3, H, W]; this "
            f"model's input shape is {shown}.",
            "Pass calibration data as a .pt or .npz tensor [N, ...] instead.")
    if others:
        log.warning("Ignoring %d non-image file%s in calibration folder '%s'.", others,
                    "s" if others != 1 else "", folder)
    if size is not None:
        images = images[:size]
    _, channels, height, width = (int(d) for d in input_shape)
    return torch.stack([_load_image(p, channels, height, width, preprocess) for p in images])


def _load_image(path: Path, channels: int, height: int, width: int, preprocess: str) -> torch.Tensor:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise CalibrationDataError(
            f"Calibration image '{path}' cannot be read: {exc}.",
            "It is corrupt or not really an image; remove or replace it.") from exc
    ratio = IMAGENET_CROP_RATIO if preprocess == "imagenet" else 1.0
    # Resize so the crop fits (shorter side scaled, aspect kept), then take the center.
    scale = max(height / ratio / img.height, width / ratio / img.width)
    new_w = max(width, math.ceil(img.width * scale - 1e-6))
    new_h = max(height, math.ceil(img.height * scale - 1e-6))
    img = img.resize((new_w, new_h), Image.BILINEAR)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    img = img.crop((left, top, left + width, top + height))
    arr = np.asarray(img, dtype=np.float32) / 255.0
    x = torch.from_numpy(arr.copy())
    x = x.unsqueeze(0) if channels == 1 else x.permute(2, 0, 1)
    if preprocess == "imagenet":
        mean = IMAGENET_MEAN if channels == 3 else (sum(IMAGENET_MEAN) / 3,)
        std = IMAGENET_STD if channels == 3 else (sum(IMAGENET_STD) / 3,)
        x = (x - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    return x.contiguous()
