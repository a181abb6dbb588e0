"""Reading ``.npy`` and ``.npz`` files without trusting them: headers checked against the bytes that back them
and against the memory limit before a single array is allocated.

A ``.npy`` header states a shape and a dtype; numpy allocates what it claims, so a 100-byte file claiming
10^12 rows fails with MemoryError (or a RecursionError, zlib error or EOF inside a damaged ZIP member) after
a while. Here every member's header is read first; its shape times its item size must equal the bytes the
member holds (the ZIP directory's uncompressed size, or the file's size for a ``.npy``); object arrays are
refused; the total is checked against :func:`moesim.budget.require_memory`; only then are arrays read (or,
stored uncompressed and asked for, memory-mapped). Every failure is one InputError naming the file and the
member.

Deliberately ignored: Fortran-ordered arrays are read as numpy reads them (the traces moesim writes are C
ordered); ZIP features numpy does not write (encryption, other compressions) are refused by zipfile itself.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable

import numpy as np

from moesim.budget import gb, require_memory
from moesim.errors import InputError
from moesim.loaders import require_regular_file

# what reading a damaged file can raise besides InputError (zipfile and the npy format raise all of these)
READ_ERRORS = (OSError, ValueError, EOFError, zlib.error, zipfile.BadZipFile, NotImplementedError, RuntimeError,
               OverflowError, KeyError, SyntaxError, TypeError, RecursionError, MemoryError)


@dataclass(frozen=True)
class Header:
    """A ``.npy`` header: shape, dtype, order, and where the data starts."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    offset: int  # bytes of magic and header before the data

    @property
    def nbytes(self) -> int:
        count = 1
        for n in self.shape:
            count *= n
        return count * self.dtype.itemsize


def read_header(fh: IO[bytes]) -> Header:
    """The header at the start of ``fh``; ValueError saying what is wrong with it."""
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh, max_header_size=100_000)
    elif version in ((2, 0), (3, 0)):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh, max_header_size=100_000)
    else:
        raise ValueError(f"unsupported .npy format version {version}")
    if dtype.hasobject:
        raise ValueError("holds Python objects (a pickle), not numbers")
    if dtype.itemsize == 0:
        raise ValueError(f"dtype {dtype} has items of zero bytes")
    if any(not isinstance(n, int) or n < 0 for n in shape):
        raise ValueError(f"header has an invalid shape {shape}")
    return Header(tuple(shape), dtype, bool(fortran), fh.tell())


def _check_size(header: Header, held: int, src: str, field: str | None) -> None:
    if header.nbytes != held:
        raise InputError(f"the header claims shape {header.shape} of {header.dtype} ({gb(header.nbytes)}), but the "
                         f"{'member' if field else 'file'} holds {held} bytes of data: truncated or damaged",
                         source=src, field=field)


def read_npy(path: str | os.PathLike[str], src: str) -> np.ndarray:
    """A ``.npy`` array whose header matches the file's size and fits the memory limit."""
    require_regular_file(path, src)
    try:
        with open(path, "rb") as fh:
            header = read_header(fh)
            size = os.fstat(fh.fileno()).st_size
        _check_size(header, size - header.offset, src, None)
        require_memory(header.nbytes, f"an array of shape {header.shape} ({header.dtype})", source=src)
        return np.load(path, allow_pickle=False)
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError("file not found", source=src) from None
    except READ_ERRORS as exc:
        raise InputError(f"not a readable .npy file ({_reason(exc)})", source=src) from None


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _member_headers(zf: zipfile.ZipFile, names: Iterable[str], src: str) -> dict[str, tuple[zipfile.ZipInfo, Header]]:
    out = {}
    for name in names:
        info = zf.getinfo(f"{name}.npy")
        with zf.open(info) as fh:
            try:
                header = read_header(fh)  # type: ignore[arg-type]
            except READ_ERRORS as exc:
                raise InputError(f"damaged member or .npy header ({_reason(exc)})", source=src, field=name) from None
        _check_size(header, info.file_size - header.offset, src, name)
        out[name] = (info, header)
    return out


def _memmap(path: str | os.PathLike[str], info: zipfile.ZipInfo, header: Header) -> np.ndarray | None:
    """Member ``info`` memory-mapped when stored uncompressed in C order; None otherwise."""
    if info.compress_type != zipfile.ZIP_STORED or header.fortran or not header.shape:
        return None
    with open(path, "rb") as raw:
        raw.seek(info.header_offset)
        local = raw.read(30)
        if local[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
    start = info.header_offset + 30 + name_len + extra_len + header.offset
    if start + header.nbytes > os.path.getsize(path):
        raise ValueError("member runs past the end of the file")
    if header.nbytes == 0:
        return np.empty(header.shape, dtype=header.dtype)
    return np.memmap(path, dtype=header.dtype, mode="r", offset=start, shape=header.shape)


def read_npz(path: str | os.PathLike[str], src: str, *, names: Iterable[str] | None = None,
             mmap: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """The arrays of a ``.npz`` (only ``names`` when given; each must be a member), headers checked first;
    members named in ``mmap`` are memory-mapped when stored uncompressed."""
    require_regular_file(path, src)
    try:
        with zipfile.ZipFile(path) as zf:
            members = [n.removesuffix(".npy") for n in zf.namelist() if n.endswith(".npy")]
            wanted = members if names is None else [n for n in names if n in members]
            headers = _member_headers(zf, wanted, src)
            mapped: dict[str, np.ndarray] = {}
            for name in set(mmap) & set(headers):
                arr = _memmap(path, *headers[name])
                if arr is not None:
                    mapped[name] = arr
            total = sum(h.nbytes for n, (_, h) in headers.items() if n not in mapped)
            shapes = ", ".join(f"{n} {h.shape}" for n, (_, h) in headers.items() if n not in mapped)
            require_memory(total, f"reading {shapes}", source=src)
            out = {}
            for name in wanted:
                if name in mapped:
                    out[name] = mapped[name]
                    continue
                with zf.open(f"{name}.npy") as fh:
                    try:
                        out[name] = np.lib.format.read_array(fh, allow_pickle=False)  # type: ignore[arg-type]
                    except READ_ERRORS as exc:
                        raise InputError(f"damaged member ({_reason(exc)})", source=src, field=name) from None
            return out
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError("file not found", source=src) from None
    except READ_ERRORS as exc:
        raise InputError(f"not a readable .npz file ({_reason(exc)})", source=src) from None


def npz_names(path: str | os.PathLike[str], src: str) -> list[str]:
    """The array names of a ``.npz`` (members ending in ``.npy``, the suffix dropped)."""
    require_regular_file(path, src)
    try:
        with zipfile.ZipFile(Path(path)) as zf:
            return [n.removesuffix(".npy") for n in zf.namelist() if n.endswith(".npy")]
    except FileNotFoundError:
        raise InputError("file not found", source=src) from None
    except READ_ERRORS as exc:
        raise InputError(f"not a readable .npz file ({_reason(exc)})", source=src) from None
