"""Text helpers shared by the trace readers: reading a (gzipped) UTF-8 file, and parsing a string of
numbers in one numpy call.

Errors name the file; nothing here knows about routing records.
"""

from __future__ import annotations

import gzip
import warnings
import zlib
from pathlib import Path

import numpy as np

from moesim.budget import require_memory
from moesim.errors import InputError
from moesim.loaders import decode_utf8, read_bytes, require_regular_file


PARSE_FACTOR = 16  # bytes of records and parser objects per byte of text (the row-by-row parsers' worst)
_CHUNK = 16 << 20


def _gunzip(path: Path, src: str) -> bytes:
    """A ``.gz`` file decompressed, chunk by chunk, stopping as soon as what it would parse into exceeds the
    memory limit (a small file can decompress a thousand times over)."""
    parts, total = [], 0
    require_regular_file(path, src)
    try:
        with gzip.open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                parts.append(chunk)
                total += len(chunk)
                require_memory(total * PARSE_FACTOR, f"parsing the text this .gz decompresses to (over "
                                                     f"{total / 1e9:.2f} GB)", source=src)
    except FileNotFoundError:
        raise InputError("file not found", source=src) from None
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"not a readable .gz file ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})",
                         source=src) from None
    return b"".join(parts)


def read_text(path: Path) -> str:
    """The whole file as text (``.gz`` decompressed), newlines kept as written; it must be UTF-8 and small
    enough to parse within the memory limit."""
    src = str(path)
    if path.suffix == ".gz":
        raw = _gunzip(path, src)
    else:
        size = require_regular_file(path, src)
        require_memory(size * PARSE_FACTOR, f"parsing {size / 1e9:.2f} GB of text", source=src)
        raw = read_bytes(path, src)
    return decode_utf8(raw, src)


def parse_numbers(text: str, dtype: type, sep: str) -> np.ndarray | None:
    """``text`` (numbers separated by ``sep``) as a flat array in one numpy call; None when any piece is not
    a number of ``dtype`` (numpy's warning about it is turned into the None), and when an integer is so large
    that numpy may have saturated it (beyond 2^62) or a float is not finite: the callers' record-by-record
    parsers then name the line."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            values: np.ndarray = np.fromstring(text, dtype=dtype, sep=sep)
        except (ValueError, DeprecationWarning):
            return None
    if values.dtype.kind == "i" and values.size and (values.max() >= 2**62 or values.min() <= -(2**62)):
        return None
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        return None
    return values
