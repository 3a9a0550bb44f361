"""All-or-nothing file writes.

A crash, Ctrl-C or error half-way through writing must never leave a truncated ``model.onnx`` or
``report.json`` behind, nor clobber the previous good one. Everything fxq writes goes to a temp
file in the destination folder (same file system, so the final ``os.replace`` is atomic) and is
renamed into place only once complete. Inside ``deferred_commit(folder)`` (the CLI wraps a whole
compile in it) the renames into ``folder`` wait until the block ends and then happen together, so
an interruption leaves the previous set of files, not a mix of old and new.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import secrets
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import FxqError

# (folder, {final path: staged temp path}) while ``deferred_commit(folder)`` is active.
_DEFERRED: contextvars.ContextVar[tuple[Path, dict[Path, Path]] | None] = contextvars.ContextVar(
    "fxq_atomic_deferred", default=None)


class OutputError(FxqError):
    """The output location is unusable."""


def _temp_name(path: Path) -> Path:
    # Keep the real suffix last: some writers pick a format or refuse a name by its extension.
    return path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}")


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        # O_EXCL: never write through a file or link somebody else put at the temp name.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns ``path``."""
    return atomic_write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``path`` for a writer that wants a file name
    (``torch.export.save``, ``onnx.save`` ...). On normal exit the temp file is flushed to disk
    and renamed onto ``path``; on any exception (KeyboardInterrupt included) it is removed and
    ``path`` is left as it was."""
    path = Path(path)
    tmp = _temp_name(path)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"the writer did not create {tmp} (for {path})")
        _fsync(tmp)
        deferred = _DEFERRED.get()
        if deferred is not None and path.parent.resolve() == deferred[0]:
            previous = deferred[1].pop(path, None)  # written twice: the last version wins
            if previous is not None:
                with contextlib.suppress(OSError):
                    previous.unlink()
            deferred[1][path] = tmp
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def deferred_commit(folder: str | os.PathLike) -> Iterator[None]:
    """Make the atomic writes into ``folder`` one all-or-nothing group.

    Inside the block, every file written with the functions above directly into ``folder`` is
    completed under its temp name as usual, but the renames onto the real names wait until the
    block ends normally, and then happen together (report.json last). If the block raises
    (an error, Ctrl-C), the staged temp files are deleted and ``folder`` keeps exactly its
    previous contents: never a new ``model.onnx`` next to an old ``report.json``. Writes into
    other folders (the ``.fxq-resume`` checkpoint of an interrupted reconstruction, caches)
    still commit at once.
    """
    staged: dict[Path, Path] = {}
    token = _DEFERRED.set((Path(folder).resolve(), staged))
    try:
        yield
    except BaseException:
        for tmp in staged.values():
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise
    finally:
        _DEFERRED.reset(token)
    order = sorted(staged, key=lambda p: p.name == "report.json")
    try:
        for path in order:
            os.replace(staged.pop(path), path)
    except BaseException:
        for tmp in staged.values():
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise


def ensure_output_dir(path: str | os.PathLike) -> Path:
    """Create the output folder if needed and prove it writable with a real temp file.

    Raises ``OutputError`` (a user-facing ``FxqError``) when ``path`` is a file, cannot be
    created, or cannot be written to.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"The output path '{path}' is a file, not a folder.",
                          "Pass a folder with -o (it is created if missing), or move the file away.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), exc.filename)
        raise OutputError(f"Cannot create the output folder '{path}': part of that path is a file "
                          f"('{blocker}').", "Choose another folder with -o.") from exc
    except OSError as exc:
        raise OutputError(f"Cannot create the output folder '{path}': {exc.strerror or exc}.",
                          "Choose another folder with -o, or fix its permissions.") from exc
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".fxq-write-test.", delete=True) as fh:
            fh.write(b"ok")
            fh.flush()
    except OSError as exc:
        raise OutputError(f"Cannot write to the output folder '{path}': {exc.strerror or exc}.",
                          "Choose another folder with -o, or fix its permissions or free space.") from exc
    return path
