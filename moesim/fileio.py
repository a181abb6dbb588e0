"""File helpers every layer shares: atomic writes, and JSON reads that fail as one-line InputErrors."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

from moesim.errors import InputError


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[Any]], None], *, binary: bool = False) -> Path:
    """Write ``path`` through ``write(fh)`` into a temporary file beside it, then rename: all or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as fh:
            write(fh)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; give it the mode open() would have
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_json_object(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON object from ``path``; a missing file, bad JSON (:func:`moesim.loaders.read_json`: UTF-8, no key
    twice, finite numbers, bounded nesting) or another top-level type is an InputError."""
    from moesim.loaders import read_json

    src = str(path)
    raw = read_json(path, src)
    if not isinstance(raw, dict):
        raise InputError("must be a JSON object", source=src)
    return raw
