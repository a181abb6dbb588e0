"""CSV routing logs: one row per (token, layer) record.

A header names (case-insensitively) a layer column (``layer``, ``layer id``, ``layer_id``), an expert-list
column (``experts``, ``activated expert ids``, ``expert_ids``, ``topk_ids``), optionally a request column
(``request``, ``batch number``, ``batch``, ``request_id``, ``seq_id``), a token position column
(``position``, ``token_index``, ``pos``) and a weights column (``weights``, ``topk_weights``,
``gate_weights``). A ``token`` column holding text is ignored; positions are then the order of the rows of
one (file, request, layer). This is the layout of the DeepSeek-V2-Lite prefill logs. Without a header the
columns are layer, request, token, experts.

Three parsers give the same records: a byte-level one for the DeepSeek layout (every line cut at its first
two commas and its last ``,"[``), a column-at-once one after the csv module has split the rows, and a
row-by-row one that names the first bad row (or skips bad rows when told to). Ignored: token text.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from moesim.errors import InputError
from moesim.traces.readers.records import MAX_ID, ReadOptions, RoutingRecords
from moesim.traces.readers.text import parse_numbers, read_text

LAYER_KEYS = ("layer", "layer id", "layer_id", "layer_idx", "layer index")
EXPERT_KEYS = ("experts", "activated expert ids", "expert_ids", "expert ids", "topk_ids", "topk ids", "ids")
REQUEST_KEYS = ("request", "request_id", "request id", "batch number", "batch", "req_id", "seq_id", "sequence")
POS_KEYS = ("position", "token_index", "token index", "token_idx", "pos")
WEIGHT_KEYS = ("weights", "topk_weights", "topk weights", "gate_weights", "gate weights", "scores")

_BRACKETS = str.maketrans("[]", "  ")
_LIMITS = {"layer": MAX_ID, "pos": MAX_ID, "request": 2**63 - 1}  # largest magnitude of each integer column
_B = {c: ord(c) for c in '[]",\n\r 0123456789'}


@dataclass(frozen=True)
class _Layout:
    """Which column holds what (None: absent), the header's names for them, and where the body starts."""

    cols: dict[str, int | None]  # layer, experts, request, pos, weights -> column index
    names: dict[str, str]  # the header's name of each present column (the key itself without a header)
    ncol: int
    has_header: bool

    @property
    def first(self) -> int:
        """1-based line of the first body row (when no quoted field spans lines)."""
        return 2 if self.has_header else 1


@dataclass(frozen=True)
class _Columns:
    """One file's records as arrays, requests as written."""

    layer: np.ndarray  # int64 [n]
    request: np.ndarray  # int64 [n], request ids as written
    pos: np.ndarray | None  # int64 [n] or None
    ids: np.ndarray  # int64 [n, k], -1 padded
    count: np.ndarray  # int64 [n]
    weights: np.ndarray | None  # float32 [n, k]
    row: np.ndarray  # int64 [n], body row of each record
    hole: np.ndarray | None = None  # bool [n], from the row-by-row parser only


def _find(header: Sequence[str], keys: Sequence[str]) -> int | None:
    names = [h.strip().lower() for h in header]
    for key in keys:
        if key in names:
            return names.index(key)
    return None


def _int_list(text: str) -> list[int]:
    """``"[1, 2, 3]"`` or ``"1 2 3"`` -> [1, 2, 3]; ValueError on anything else (an id beyond MAX_ID too)."""
    inner = text.strip().removeprefix("[").removesuffix("]").replace(",", " ").split()
    values = [int(v) for v in inner]
    if any(abs(v) > MAX_ID for v in values):
        raise ValueError("an expert id out of range")
    return values


def _float_list(text: str) -> list[float]:
    inner = text.strip().removeprefix("[").removesuffix("]").replace(",", " ").split()
    return [float(v) for v in inner]


def _padded(flat: np.ndarray, counts: np.ndarray, fill: float) -> np.ndarray:
    """Concatenated lists ``flat`` of lengths ``counts`` as rows [n, max count], padded with ``fill``."""
    n, k = counts.size, int(counts.max())
    if (counts == k).all():
        return flat.reshape(n, k)
    out = np.full((n, k), fill, dtype=flat.dtype)
    out[np.arange(k)[None, :] < counts[:, None]] = flat
    return out


def _fast_lists(col: list[str], dtype: type) -> tuple[np.ndarray, np.ndarray] | None:
    """Parse a column of bracketed number lists at once: (values [n, kmax] padded, counts [n]); None when
    any cell is not a clean non-empty list (the caller then goes row by row, to pad or name the bad one)."""
    n = len(col)
    if n == 0:
        return None
    joined = ";".join(col).translate(_BRACKETS)
    chars = np.frombuffer(joined.encode(), dtype=np.uint8)
    if dtype is np.int64 and (chars == ord(".")).any():
        return None
    seg = np.cumsum(chars == ord(";"), dtype=np.int32)
    counts = np.bincount(seg[chars == ord(",")], minlength=n).astype(np.int64) + 1
    digits = np.bincount(seg[(chars >= ord("0")) & (chars <= ord("9"))], minlength=n)
    if (digits == 0).any():  # an empty list: the slow path pads it
        return None
    flat = parse_numbers(joined.replace(";", ","), dtype, ",")
    if flat is None or flat.size != int(counts.sum()):
        return None
    return _padded(flat, counts, -1 if dtype is np.int64 else 0), counts


def _int_column(col: list[str], limit: int = MAX_ID) -> np.ndarray | None:
    """A column of integers of magnitude at most ``limit``; None otherwise (the row-by-row parser names the row)."""
    try:
        arr = np.array(col, dtype=np.int64) if col else np.empty(0, dtype=np.int64)
    except (ValueError, OverflowError):
        return None
    return arr if not arr.size or (arr.min() >= -limit and arr.max() <= limit) else None


def _line_bounds(b: np.ndarray, has_header: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """(start, end) byte offsets of every body line, line breaks (and a carriage return) excluded; None when
    a line is too short to be a record."""
    nl = np.flatnonzero(b == _B["\n"])
    ends = nl if b[-1] == _B["\n"] else np.append(nl, b.size)
    starts = np.concatenate([[0], ends[:-1] + 1])
    if has_header:
        starts, ends = starts[1:], ends[1:]
    if starts.size == 0:
        return None
    ends = ends - (b[np.maximum(ends - 1, 0)] == _B["\r"])
    if (ends - starts < 8).any():  # empty or too short to be a record
        return None
    return starts, ends


def _cut_lines(b: np.ndarray, starts: np.ndarray, ends: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Per line: the second comma (end of layer,request), the ``[`` opening the id list, and the number of
    ids; None when a line does not end in ``,"[ids]"`` after two leading fields."""
    if not ((b[ends - 1] == _B['"']) & (b[ends - 2] == _B["]"])).all():
        return None
    lbr = np.flatnonzero(b == _B["["])
    k = np.searchsorted(lbr, ends, side="left") - 1
    if (k < 0).any():
        return None
    open_ = lbr[k]
    commas = np.flatnonzero(b == _B[","])
    i1 = np.searchsorted(commas, starts)
    if (i1 + 1 >= commas.size).any():
        return None
    c1, c2 = commas[i1], commas[i1 + 1]
    if not ((open_ > c2 + 1) & (b[open_ - 1] == _B['"']) & (b[open_ - 2] == _B[","]) & (c1 > starts)
            & (c2 > c1 + 1) & (ends - 2 > open_ + 1)).all():
        return None  # (an empty id list goes the slow way too, which pads it)
    counts = (np.searchsorted(commas, ends - 2) - np.searchsorted(commas, open_)).astype(np.int64) + 1
    return c2, open_, counts


def _only(text: bytes, chars: str) -> bool:
    allowed = np.zeros(256, dtype=bool)
    allowed[[_B[c] for c in chars]] = True
    return bool(allowed[np.frombuffer(text, dtype=np.uint8)].all())


def _csv_bytes_fast(text: str, has_header: bool) -> _Columns | None:
    """Fast parse of the common layout ``layer,request,<token>,"[ids]"`` (the token may hold commas and
    quotes, but no line breaks): every line is cut at its first two commas and at its last ``,"[``, the
    pieces joined and parsed by numpy in one call each. None when any line does not fit, and the caller
    falls back to the csv module."""
    raw = text.encode("utf-8")
    b = np.frombuffer(raw, dtype=np.uint8)
    if b.size == 0:
        return None
    bounds = _line_bounds(b, has_header)
    if bounds is None:
        return None
    starts, ends = bounds
    cut = _cut_lines(b, starts, ends)
    if cut is None:
        return None
    c2, open_, counts = cut
    ids_text = b",".join([raw[o:e] for o, e in zip((open_ + 1).tolist(), (ends - 2).tolist())])
    lr_text = b",".join([raw[s:e] for s, e in zip(starts.tolist(), c2.tolist())])
    if not _only(ids_text, "0123456789, ") or not _only(lr_text, "0123456789,"):
        return None
    flat = parse_numbers(ids_text.decode("ascii"), np.int64, ",")
    if flat is None:
        return None
    pairs = parse_numbers(lr_text.decode("ascii"), np.int64, ",")
    if pairs is None:
        return None
    n = starts.size
    if flat.size != int(counts.sum()) or pairs.size != 2 * n:
        return None
    pairs = pairs.reshape(n, 2)
    return _Columns(layer=pairs[:, 0].copy(), request=pairs[:, 1].copy(), pos=None, ids=_padded(flat, counts, -1),
                    count=counts, weights=None, row=np.arange(n, dtype=np.int64))


def _layout(header: list[str], src: str) -> _Layout:
    """Columns from the first row: a header naming them, or the four columns of a file without one."""
    has_header = _find(header, LAYER_KEYS) is not None
    if not has_header and not header[0].strip().lstrip("-").isdigit():
        raise InputError(f"no layer column in the header {header}; expected one of "
                         + ", ".join(repr(k) for k in LAYER_KEYS) + " (a file without a header has the columns "
                         "layer, request, token, experts)", source=src, field="line 1")
    if has_header:
        cols = {name: _find(header, keys) for name, keys in
                (("layer", LAYER_KEYS), ("experts", EXPERT_KEYS), ("request", REQUEST_KEYS),
                 ("pos", POS_KEYS), ("weights", WEIGHT_KEYS))}
        if cols["experts"] is None:
            raise InputError(f"no expert-id column in the header {header}; expected one of "
                             + ", ".join(repr(k) for k in EXPERT_KEYS), source=src, field="line 1")
    else:
        cols = {"layer": 0, "request": 1, "pos": None, "experts": 3, "weights": None}
        if len(header) != 4:
            raise InputError(f"{len(header)} columns; a file without a header needs 4: layer, request, token, experts",
                             source=src, field="line 1")
    names = {k: (header[c].strip() if has_header else k) for k, c in cols.items() if c is not None}
    return _Layout(cols=cols, names=names, ncol=len(header), has_header=has_header)


def _line_locator(text: str, first: int) -> Callable[[int], int]:
    def line_of(row: int) -> int:
        """1-based line where body row ``row`` starts (quoted fields may span lines: re-read to be exact)."""
        reader = csv.reader(io.StringIO(text))
        ended = 0  # line on which the previous record ended
        for i, _ in enumerate(reader):
            if i == row + (first - 1):
                return ended + 1
            ended = reader.line_num
        return row + first

    return line_of


def _integer(row: list[str], key: str, lay: _Layout) -> int:
    cell = row[lay.cols[key]]  # type: ignore[index]
    what = {"pos": "token position"}.get(key, key)
    try:
        value = int(cell)
    except ValueError:
        raise ValueError(f"{what} {cell[:40]!r} is not an integer (column {lay.names[key]!r})") from None
    if not -_LIMITS[key] <= value <= _LIMITS[key]:
        raise ValueError(f"{what} {cell[:40]} out of range (at most {_LIMITS[key]}; column {lay.names[key]!r})")
    return value


def _parse_row(row: list[str], lay: _Layout) -> tuple[int, int, int, list[int], list[float] | None]:
    """(layer, request, position or -1, ids, weights or None) of one row; ValueError naming what is wrong."""
    cols = lay.cols
    if len(row) != lay.ncol:
        raise ValueError(f"{len(row)} columns, expected {lay.ncol}")
    layer = _integer(row, "layer", lay)
    if layer < 0:
        raise ValueError(f"layer {layer} must be >= 0 (column {lay.names['layer']!r})")
    req = _integer(row, "request", lay) if cols["request"] is not None else 0
    pos = _integer(row, "pos", lay) if cols["pos"] is not None else -1
    try:
        ids = _int_list(row[cols["experts"]])  # type: ignore[index]
    except ValueError:
        raise ValueError(f"expert ids {row[cols['experts']]!r} are not a list of integers") from None  # type: ignore[index]
    w = None
    if cols["weights"] is not None:
        try:
            w = _float_list(row[cols["weights"]])
        except ValueError:
            raise ValueError(f"weights {row[cols['weights']]!r} are not a list of numbers") from None
        if len(w) != len(ids):
            raise ValueError(f"{len(w)} weights for {len(ids)} expert ids")
    return layer, req, pos, ids, w


def _columns_fast(body: list[list[str]], lay: _Layout) -> _Columns | None:
    """Every column parsed at once (numpy); None when any cell does not parse cleanly."""
    cols = lay.cols
    if body and set(map(len, body)) != {lay.ncol}:
        return None
    columns = list(zip(*body)) if body else [()] * lay.ncol
    ints: dict[str, np.ndarray | None] = {}
    for name in ("layer", "request", "pos"):
        c = cols[name]
        if c is None:
            ints[name] = None if name == "pos" else np.zeros(len(body), dtype=np.int64)
            continue
        arr = _int_column(list(columns[c]), _LIMITS[name])
        if arr is None:
            return None
        ints[name] = arr
    got = _fast_lists(list(columns[cols["experts"]]), np.int64)  # type: ignore[index]
    if got is None:
        return None
    ids, count = got
    weights = None
    if cols["weights"] is not None:
        w = _fast_lists(list(columns[cols["weights"]]), np.float64)
        if w is None or not np.array_equal(w[1], count):
            return None
        weights = w[0].astype(np.float32)
    return _Columns(layer=ints["layer"], request=ints["request"], pos=ints["pos"],  # type: ignore[arg-type]
                    ids=ids, count=count, weights=weights, row=np.arange(len(body), dtype=np.int64))


def _hole_of(row: list[str], lay: _Layout) -> tuple[int, int, int, list[int], None] | None:
    """A skipped row kept to hold its token position (positions are the order of the rows): its layer and
    request, no ids; None when even those do not parse."""
    try:
        layer = _integer(row, "layer", lay)
        req = _integer(row, "request", lay) if lay.cols["request"] is not None else 0
    except (ValueError, IndexError):
        return None
    return layer, req, -1, [], None


def _columns_by_row(body: list[list[str]], lay: _Layout, src: str, skip_bad: bool,
                    line_of: Callable[[int], int]) -> tuple[_Columns, int]:
    """Row by row: the first bad row is an error naming its line, or (``skip_bad``) is skipped and counted."""
    parsed, keep, hole = [], [], []
    skipped = 0
    for i, row in enumerate(body):
        try:
            parsed.append(_parse_row(row, lay))
            keep.append(i)
            hole.append(False)
        except (ValueError, IndexError) as exc:
            if not skip_bad:
                raise InputError(str(exc), source=src, field=f"line {line_of(i)}") from None
            skipped += 1
            held = _hole_of(row, lay) if lay.cols["pos"] is None else None
            if held is not None:
                parsed.append(held)
                keep.append(i)
                hole.append(True)
    k = max((len(p[3]) for p in parsed), default=0)
    ids = np.full((len(parsed), k), -1, dtype=np.int64)
    weights = np.zeros((len(parsed), k), dtype=np.float32) if lay.cols["weights"] is not None else None
    for j, p in enumerate(parsed):
        ids[j, : len(p[3])] = p[3]
        if weights is not None and p[4] is not None:
            weights[j, : len(p[4])] = p[4]
    return _Columns(
        layer=np.array([p[0] for p in parsed], dtype=np.int64),
        request=np.array([p[1] for p in parsed], dtype=np.int64),
        pos=np.array([p[2] for p in parsed], dtype=np.int64) if lay.cols["pos"] is not None else None,
        ids=ids, count=np.array([len(p[3]) for p in parsed], dtype=np.int64), weights=weights,
        row=np.array(keep, dtype=np.int64), hole=np.array(hole, dtype=bool),
    ), skipped


def read_csv(path: Path, options: ReadOptions) -> RoutingRecords:
    """One CSV file (``.gz`` too) -> its records; requests named ``<file name>#<request id>``."""
    src = str(path)
    text = read_text(path)
    try:
        return _read_csv_text(path, text, options)
    except csv.Error as exc:  # a field over the csv module's size limit, a NUL byte, ...
        raise InputError(f"malformed CSV ({exc})", source=src) from None


def _read_csv_text(path: Path, text: str, options: ReadOptions) -> RoutingRecords:
    src = str(path)
    header = next(csv.reader(io.StringIO(text)), None)
    if not header:
        raise InputError("empty file", source=src)
    lay = _layout(header, src)
    line_of = _line_locator(text, lay.first)
    data = None
    c = lay.cols
    if (c["layer"], c["request"], c["experts"], c["pos"], c["weights"]) == (0, 1, lay.ncol - 1, None, None) \
            and lay.ncol >= 3:
        data = _csv_bytes_fast(text, lay.has_header)
    skipped = 0
    if data is None:
        rows = list(csv.reader(io.StringIO(text)))
        body = rows[1:] if lay.has_header else rows
        data = _columns_fast(body, lay)
        if data is None:
            data, skipped = _columns_by_row(body, lay, src, options.skip_bad, line_of)
    uniq, inv = np.unique(data.request, return_inverse=True)
    row = data.row
    return RoutingRecords(
        layer=data.layer, request=inv.astype(np.int64), pos=data.pos, ids=data.ids, count=data.count,
        weights=data.weights, where=lambda i: f"{src}: line {line_of(int(row[i]))}",
        request_names=[f"{path.name}#{int(u)}" for u in uniq], skipped=skipped, hole=data.hole,
    )
