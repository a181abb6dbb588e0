"""Text helpers shared by the trace readers: reading a (gzipped) UTF-8 file, and parsing a string of
numbers in one numpy call.

Errors name the file; nothing here knows about routing records.
"""

from __future__ import annotations

import gzip
import io
import warnings
from pathlib import Path

import numpy as np

from moesim.errors import InputError


def _open_text(path: Path) -> io.TextIOBase:
    try:
        if path.suffix == ".gz":
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
        return open(path, encoding="utf-8", newline="")
    except FileNotFoundError:
        raise InputError("file not found", source=str(path)) from None
    except OSError as exc:
        raise InputError(f"cannot read ({exc.strerror})", source=str(path)) from None


def read_text(path: Path) -> str:
    """The whole file as text (``.gz`` decompressed), newlines kept as written."""
    try:
        with _open_text(path) as fh:
            return fh.read()
    except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile) as exc:
        raise InputError(f"cannot read as text ({exc})", source=str(path)) from None


def parse_numbers(text: str, dtype: type, sep: str) -> np.ndarray | None:
    """``text`` (numbers separated by ``sep``) as a flat array in one numpy call; None when any piece is not
    a number of ``dtype`` (numpy's warning about it is turned into the None)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            return np.fromstring(text, dtype=dtype, sep=sep)
        except (ValueError, DeprecationWarning):
            return None
