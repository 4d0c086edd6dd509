"""Files that are whole or absent: atomic files and directories, fsync, path-safe joins, atomic adapter saves.

Every writer here fills a sibling temp file or folder and moves it into place with ``os.replace``, so an
interrupted write leaves the previous content (or nothing), never a mix. `atomic_dir` also marks a finished
directory with `MARKER`; one without it is half-written and is never used (the asset cache relies on it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MARKER = ".abmll-complete"
STALE_TEMP_SECONDS = 6 * 3600


def safe_join(root: str | os.PathLike, *parts: str) -> Path:
    """``root / parts...``, refusing any part that escapes ``root``.

    Rejects empty names, ``.``/``..`` components, absolute paths, and paths that resolve outside
    ``root`` through symlinks. Raises ``ValueError`` naming the offending part.
    """
    root_path = Path(root)
    real_root = root_path.resolve()
    path = root_path
    for part in parts:
        text = os.fspath(part)
        pieces = text.replace("\\", "/").split("/")
        if os.path.isabs(text) or text.startswith(("/", "\\")) or any(p in ("", ".", "..") for p in pieces):
            raise ValueError(f"Unsafe path component {text!r}: must be a relative name inside {root_path}")
        path = path / text
        real = path.resolve()
        if real != real_root and real_root not in real.parents:
            raise ValueError(f"Unsafe path component {text!r}: {path} resolves outside {root_path}")
    return path


def is_complete(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a finished cache directory (has the completion marker)."""
    return (Path(path) / MARKER).is_file()


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final_path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory atomically: yields a sibling temp dir to fill, then moves it to ``final_path``.

    On success a completion marker is written and the temp dir is ``os.replace``-d into place. On an
    exception the temp dir is deleted and ``final_path`` is untouched. A half-written ``final_path``
    (no marker) is replaced; if another process finished ``final_path`` first, its copy wins and ours
    is discarded. Temp dirs of killed runs older than `STALE_TEMP_SECONDS` are deleted. Callers should
    check `is_complete` first to skip the work.
    """
    final = Path(final_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        (tmp / MARKER).write_text("ok\n")
        fsync_path(tmp)
        if is_complete(final):
            return  # a concurrent finished copy wins
        if final.exists() or final.is_symlink():
            stale = final.with_name(f".{final.name}.stale-{uuid.uuid4().hex[:8]}")
            try:
                os.replace(final, stale)
            except FileNotFoundError:
                pass
            else:
                _remove(stale)
        try:
            os.replace(tmp, final)
        except OSError:
            if not is_complete(final):  # lost a race to a half-written dir: should not happen
                raise
        fsync_path(final.parent)
    finally:
        _remove(tmp)


@contextlib.contextmanager
def replace_dir(final_path: str | os.PathLike) -> Iterator[Path]:
    """Write a directory that may already exist without ever leaving a half-written one in its place.

    Yields a sibling temp dir to fill; on success it takes the place of ``final_path`` and the previous
    content is deleted. On an exception (or if the process dies) inside the block, ``final_path`` keeps
    its previous content and the temp dir is removed (a killed run's temp dir is removed by a later call
    once older than `STALE_TEMP_SECONDS`). The swap is two renames (old -> ``.<name>.old-*``, new ->
    ``final_path``): a kill in the microseconds between them leaves the old copy under that name.
    """
    final = Path(final_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    old: Path | None = None
    try:
        yield tmp
        fsync_tree(tmp)
        if final.exists() or final.is_symlink():
            old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            if old is not None:  # put the previous content back
                os.replace(old, final)
                old = None
            raise
        fsync_path(final.parent)
    finally:
        _remove(tmp)
        if old is not None:
            _remove(old)


def fsync_tree(root: Path) -> None:
    """Flush every file and folder under `root` (itself included) to disk."""
    for path in [root, *root.rglob("*")]:
        fsync_path(path)


def _remove_stale_temps(final: Path) -> None:
    """Delete temp dirs of ``final`` left by killed runs (untouched for `STALE_TEMP_SECONDS`)."""
    cutoff = time.time() - STALE_TEMP_SECONDS
    for leftover in final.parent.glob(f".{final.name}.tmp-*"):
        with contextlib.suppress(OSError):
            if leftover.lstat().st_mtime < cutoff:
                _remove(leftover)


def fsync_path(path: Path) -> None:
    """Flush one file or folder to disk (best effort: errors of file systems that refuse are ignored)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a sibling temp file + fsync + ``os.replace``.

    ``path`` is either the old or the new content, never a mix, whatever interrupts the write. Temp
    files of killed writers older than `STALE_TEMP_SECONDS` are deleted.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(final)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return final


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see `atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode(encoding))


def save_pretrained_atomic(model: Any, path: str | os.PathLike, tokenizer: Any = None, **kwargs: Any) -> Path:
    """``model.save_pretrained(path, **kwargs)`` (+ the tokenizer) that never leaves a half-written folder.

    Everything is written into a sibling temp folder that then takes the place of ``path`` (`replace_dir`):
    if the save is interrupted, ``path`` keeps the previous adapter.
    """
    with replace_dir(path) as tmp:
        model.save_pretrained(str(tmp), **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(path)
