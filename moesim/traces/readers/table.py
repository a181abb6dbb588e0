"""The table of trace readers: format name -> the function that reads one file of it, and the file-name
suffixes that pick it when no format is given; and reading a list of files through it.

A reader is a function ``(path, ReadOptions) -> RoutingRecords`` (:mod:`moesim.traces.readers.records`).
Adding a format is one row in :data:`READERS`. Detection looks at the file name only (a trailing ``.gz`` is
ignored); rows are tried in order. Files are read in the order given, each file's requests following the
previous file's; what cannot be mixed across files (positions given or not, weights given or not) is an
error naming the first file that differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping, Sequence

from moesim.errors import InputError
from moesim.traces.readers.csv_reader import read_csv
from moesim.traces.readers.jsonl_reader import read_jsonl
from moesim.traces.readers.numpy_reader import read_numpy
from moesim.traces.readers.records import ReadOptions, RoutingRecords, concatenate


@dataclass(frozen=True)
class Reader:
    """One row of the table: a format's name, the suffixes that pick it, and the function reading a file."""

    name: str
    suffixes: tuple[str, ...]
    read: Callable[[Path, ReadOptions], RoutingRecords]


def _table(*readers: Reader) -> Mapping[str, Reader]:
    table: dict[str, Reader] = {}
    for r in readers:
        if r.name in table:
            raise ValueError(f"trace reader {r.name!r} is listed twice; listed: {', '.join(table)}")
        table[r.name] = r
    return MappingProxyType(table)


READERS: Mapping[str, Reader] = _table(
    Reader("csv", (".csv", ".tsv"), read_csv),
    Reader("jsonl", (".jsonl", ".json", ".ndjson"), read_jsonl),
    Reader("numpy", (".npy", ".npz"), read_numpy),
)


def detect_format(path: Path) -> str:
    """The name of the first reader whose suffixes end the file name (``.gz`` aside)."""
    name = path.name.lower().removesuffix(".gz")
    for reader in READERS.values():
        if name.endswith(reader.suffixes):
            return reader.name
    names = list(READERS)
    choices = f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]
    raise InputError(f"cannot tell the format from the file name; give --format {choices}", source=str(path))


def reader_for(fmt: str) -> Reader:
    """The table's row for ``fmt``; an error listing the valid names otherwise."""
    if fmt not in READERS:
        raise InputError(f"unknown format {fmt!r}; valid: {', '.join(READERS)}", field="format")
    return READERS[fmt]


def read_files(paths: Sequence[Path], fmt: str | None, options: ReadOptions) -> RoutingRecords:
    """Every file's records, concatenated in the order given (format ``fmt``, or detected per file)."""
    parts = [reader_for(fmt or detect_format(path)).read(path, options) for path in paths]
    if not parts or sum(p.size for p in parts) == 0:
        raise InputError("no routing records found", source=", ".join(str(p) for p in paths) or None)
    with_w = [p.weights is not None for p in parts]
    if any(with_w) and not all(with_w):
        missing = paths[with_w.index(False)]
        raise InputError("has no gate weights while other files do; import them separately", source=str(missing))
    has_pos = [p.pos is not None for p in parts]
    if any(has_pos) and not all(has_pos):
        raise InputError("some files give token positions and others do not", source=str(paths[has_pos.index(False)]))
    return concatenate(parts)
