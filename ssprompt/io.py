"""Atomic result files: written to a temporary name, then renamed, so a crash never leaves a
half-written result behind."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def _clean(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename:
    the one write-then-rename helper of the project."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write leaves neither a result nor a temp file
        raise


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(_clean(obj), indent=2) + "\n")


def expect_file(path: str | Path, what: str, field: str | None = None) -> Path:
    """``path`` as a file for ``what`` ("a prompts file"): a folder there, or nothing, is a
    one-line ``UserError`` of its own (a folder's message names a file it holds that fits,
    when ``what`` names one as "... (NAME)")."""
    from .errors import fail

    path = Path(path)
    if path.is_dir():
        hint = ""
        if what.endswith(")") and "(" in what:
            name = what.rsplit("(", 1)[1][:-1]
            if (path / name).is_file():
                hint = f"; did you mean {path / name}?"
        raise fail(path, f"is a folder, expected {what}{hint}", field)
    if not path.exists():
        raise fail(path, f"not found (expected {what})", field)
    return path


def expect_folder(path: str | Path, what: str, field: str | None = None) -> Path:
    """``path`` as a folder for ``what``: a file there, or nothing, is a one-line
    ``UserError`` of its own."""
    from .errors import fail

    path = Path(path)
    if path.is_file():
        raise fail(path, f"is a file, expected {what}", field)
    if not path.is_dir():
        raise fail(path, f"not found (expected {what})", field)
    return path


def remove_if_empty(path: str | Path) -> None:
    """Remove the folder ``path`` if it holds no file (only empty folders, if any): what a
    run that created it and then failed, or was interrupted, leaves behind."""
    import shutil

    path = Path(path)
    if path.is_dir() and not any(p.is_file() or p.is_symlink() for p in path.rglob("*")):
        shutil.rmtree(path, ignore_errors=True)
