"""Turn routing logs into moesim traces: per-layer CSV rows, JSONL per-token records, raw numpy arrays.

What is modelled: each input record says which experts one token of one request picked at one MoE layer
(optionally with gate weights). Records are grouped into tokens (request, position) and layers, checked
(ids in range, no expert twice, every token present at every layer), and the requests are then packed into
batches and spread over GPUs the way a data-parallel serving system does it (:func:`pack_requests`): a
request's tokens stay on one GPU (its home rank), requests longer than the per-GPU budget are split into
chunks (chunked prefill), and each batch holds at most ``tokens_per_gpu`` tokens per GPU.

Deliberately ignored: arrival times, decode steps (each record is one token's routing, whatever phase it
came from), token text, and shared experts (they do not route). Nothing is dropped silently: a malformed
record is an :class:`~moesim.errors.InputError` naming file and line, unless ``skip_bad`` is set, in which
case the number skipped is reported in :attr:`ImportResult.skipped`.

Accepted layouts:

- CSV with a header naming (case-insensitively) a layer column (``layer``, ``layer id``, ``layer_id``), an
  expert-list column (``experts``, ``activated expert ids``, ``expert_ids``, ``topk_ids``), optionally a
  request column (``request``, ``batch number``, ``batch``, ``request_id``, ``seq_id``), a token position
  column (``position``, ``token_index``, ``pos``) and a weights column (``weights``, ``topk_weights``,
  ``gate_weights``). A ``token`` column holding text is ignored; positions are then the order of the rows
  of one (file, request, layer). This is the layout of the DeepSeek-V2-Lite prefill logs. Without a header
  the columns are layer, request, token, experts.
- JSONL, one object per line: ``layer`` (or ``layer_id``), a token index (``token``, ``token_idx``,
  ``token_index``, ``pos``, ``position``), expert ids (``experts``, ``topk_ids``, ``expert_ids``, ``ids``),
  optional weights (``weights``, ``topk_weights``, ``gate_weights``, ``scores``) and request
  (``request``, ``request_id``, ``req_id``, ``seq_id``). A record may also carry several tokens at once:
  a list of id lists with a list of token indices (or the first index).
- numpy: a ``.npy`` int array [tokens, layers, top_k] (or another axis order, ``axes="ltk"``), or an
  ``.npz`` without ``meta`` holding ``experts``/``topk_ids`` and optionally ``weights``/``topk_weights``.
  Each file is one request.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from moesim.errors import InputError
from moesim.traces.format import Trace, TraceMeta

ASSIGN_POLICIES = ("round_robin", "least_loaded")

_LAYER_KEYS = ("layer", "layer id", "layer_id", "layer_idx", "layer index")
_EXPERT_KEYS = ("experts", "activated expert ids", "expert_ids", "expert ids", "topk_ids", "topk ids", "ids")
_REQUEST_KEYS = ("request", "request_id", "request id", "batch number", "batch", "req_id", "seq_id", "sequence")
_POS_KEYS = ("position", "token_index", "token index", "token_idx", "pos")
_WEIGHT_KEYS = ("weights", "topk_weights", "topk weights", "gate_weights", "gate weights", "scores")
_JSON_TOKEN_KEYS = ("token", "token_idx", "token_index", "pos", "position")


@dataclass(frozen=True)
class ImportResult:
    """An imported trace and what the import had to do to get it."""

    trace: Trace
    records: int  # (token, layer) records read
    skipped: int = 0  # malformed records skipped (only with skip_bad)
    padded: int = 0  # records with fewer than top_k ids, padded with -1
    missing: int = 0  # (token, layer) pairs with no record, filled with -1 (only with allow_missing)
    requests: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass
class _Records:
    """Parsed records of one or more files, one row per (token, layer) record."""

    layer: np.ndarray  # int64 [n], layer ids as written
    request: np.ndarray  # int64 [n], request index (global across files)
    pos: np.ndarray | None  # int64 [n] token position in its request, or None: order of the rows
    ids: np.ndarray  # int64 [n, k], -1 padded
    count: np.ndarray  # int64 [n], ids given per record
    weights: np.ndarray | None  # float32 [n, k]
    where: Callable[[int], str]  # record index -> "file:line N"
    request_names: list[str]
    skipped: int = 0
    hole: np.ndarray | None = None  # bool [n]: a skipped row that still holds its token position
    explicit: np.ndarray | None = None  # bool [n]: ids given as an array, where -1 means "no expert" on purpose
    notes: list[str] = field(default_factory=list)


def _open_text(path: Path) -> io.TextIOBase:
    try:
        if path.suffix == ".gz":
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
        return open(path, encoding="utf-8", newline="")
    except FileNotFoundError:
        raise InputError("file not found", source=str(path)) from None
    except OSError as exc:
        raise InputError(f"cannot read ({exc.strerror})", source=str(path)) from None


def _read_text(path: Path) -> str:
    try:
        with _open_text(path) as fh:
            return fh.read()
    except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile) as exc:
        raise InputError(f"cannot read as text ({exc})", source=str(path)) from None


def _find(header: Sequence[str], keys: Sequence[str]) -> int | None:
    names = [h.strip().lower() for h in header]
    for key in keys:
        if key in names:
            return names.index(key)
    return None


def _int_list(text: str) -> list[int]:
    """``"[1, 2, 3]"`` or ``"1 2 3"`` -> [1, 2, 3]; ValueError on anything else."""
    inner = text.strip().removeprefix("[").removesuffix("]").replace(",", " ").split()
    return [int(v) for v in inner]


def _float_list(text: str) -> list[float]:
    inner = text.strip().removeprefix("[").removesuffix("]").replace(",", " ").split()
    return [float(v) for v in inner]


_BRACKETS = str.maketrans("[]", "  ")


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
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            flat = np.fromstring(joined.replace(";", ","), dtype=dtype, sep=",")
        except (ValueError, DeprecationWarning):
            return None
    if flat.size != int(counts.sum()):
        return None
    k = int(counts.max())
    if (counts == k).all():
        return flat.reshape(n, k), counts
    out = np.full((n, k), -1 if dtype is np.int64 else 0, dtype=dtype)
    out[np.arange(k)[None, :] < counts[:, None]] = flat
    return out, counts


def _int_column(col: list[str]) -> np.ndarray | None:
    try:
        return np.array(col, dtype=np.int64) if col else np.empty(0, dtype=np.int64)
    except (ValueError, OverflowError):
        return None


_B = {c: ord(c) for c in '[]",\n\r 0123456789'}


def _csv_bytes_fast(text: str, has_header: bool) -> dict[str, Any] | None:
    """Fast parse of the common layout ``layer,request,<token>,"[ids]"`` (the token may hold commas and
    quotes, but no line breaks): every line is cut at its first two commas and at its last ``,"[``, the
    pieces joined and parsed by numpy in one call each. None when any line does not fit, and the caller
    falls back to the csv module."""
    raw = text.encode("utf-8")
    b = np.frombuffer(raw, dtype=np.uint8)
    if b.size == 0:
        return None
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
    ids_text = b",".join([raw[o:e] for o, e in zip((open_ + 1).tolist(), (ends - 2).tolist())])
    lr_text = b",".join([raw[s:e] for s, e in zip(starts.tolist(), c2.tolist())])
    allowed = np.zeros(256, dtype=bool)
    allowed[[_B[c] for c in "0123456789, "]] = True
    if not allowed[np.frombuffer(ids_text, dtype=np.uint8)].all():
        return None
    allowed[_B[" "]] = False
    if not allowed[np.frombuffer(lr_text, dtype=np.uint8)].all():
        return None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            flat = np.fromstring(ids_text.decode("ascii"), dtype=np.int64, sep=",")
            pairs = np.fromstring(lr_text.decode("ascii"), dtype=np.int64, sep=",")
        except (ValueError, DeprecationWarning):
            return None
    n = starts.size
    if flat.size != int(counts.sum()) or pairs.size != 2 * n:
        return None
    kmax = int(counts.max())
    if (counts == kmax).all():
        out = flat.reshape(n, kmax)
    else:
        out = np.full((n, kmax), -1, dtype=np.int64)
        out[np.arange(kmax)[None, :] < counts[:, None]] = flat
    pairs = pairs.reshape(n, 2)
    return {"layer": pairs[:, 0].copy(), "request": pairs[:, 1].copy(), "pos": None, "ids": out, "count": counts,
            "weights": None, "row": np.arange(n, dtype=np.int64)}


def _csv_file(path: Path, file_index: int, request_offset: int, skip_bad: bool
              ) -> tuple[dict[str, Any], list[str], int]:
    """One CSV file -> column arrays, its request names, rows skipped."""
    src = str(path)
    text = _read_text(path)
    header = next(csv.reader(io.StringIO(text)), None)
    if not header:
        raise InputError("empty file", source=src)
    has_header = _find(header, _LAYER_KEYS) is not None
    if not has_header and not header[0].strip().lstrip("-").isdigit():
        raise InputError(f"no layer column in the header {header}; expected one of "
                         + ", ".join(repr(k) for k in _LAYER_KEYS) + " (a file without a header has the columns "
                         "layer, request, token, experts)", source=src, field="line 1")
    if has_header:
        cols = {name: _find(header, keys) for name, keys in
                (("layer", _LAYER_KEYS), ("experts", _EXPERT_KEYS), ("request", _REQUEST_KEYS),
                 ("pos", _POS_KEYS), ("weights", _WEIGHT_KEYS))}
        if cols["experts"] is None:
            raise InputError(f"no expert-id column in the header {header}; expected one of "
                             + ", ".join(repr(k) for k in _EXPERT_KEYS), source=src, field="line 1")
        first = 2
    else:
        cols = {"layer": 0, "request": 1, "pos": None, "experts": 3, "weights": None}
        first = 1
        if len(header) != 4:
            raise InputError(f"{len(header)} columns; a file without a header needs 4: layer, request, token, experts",
                             source=src, field="line 1")
    ncol = len(header)
    names = {k: (header[c].strip() if has_header else k) for k, c in cols.items() if c is not None}
    quick = None
    if (cols["layer"], cols["request"], cols["experts"], cols["pos"], cols["weights"]) == (0, 1, ncol - 1, None, None) \
            and ncol >= 3:
        quick = _csv_bytes_fast(text, has_header)
    body: list[list[str]] = []
    if quick is None:
        rows = list(csv.reader(io.StringIO(text)))
        body = rows[1:] if has_header else rows

    def line_of(row: int) -> int:
        """1-based line where body row ``row`` starts (quoted fields may span lines: re-read to be exact)."""
        reader = csv.reader(io.StringIO(text))
        ended = 0  # line on which the previous record ended
        for i, _ in enumerate(reader):
            if i == row + (first - 1):
                return ended + 1
            ended = reader.line_num
        return row + first

    def integer(row: list[str], key: str) -> int:
        cell = row[cols[key]]  # type: ignore[index]
        try:
            return int(cell)
        except ValueError:
            what = {"pos": "token position"}.get(key, key)
            raise ValueError(f"{what} {cell!r} is not an integer (column {names[key]!r})") from None

    def parse_row(row: list[str]) -> tuple[int, int, int, list[int], list[float] | None]:
        if len(row) != ncol:
            raise ValueError(f"{len(row)} columns, expected {ncol}")
        layer = integer(row, "layer")
        if layer < 0:
            raise ValueError(f"layer {layer} must be >= 0 (column {names['layer']!r})")
        req = integer(row, "request") if cols["request"] is not None else 0
        pos = integer(row, "pos") if cols["pos"] is not None else -1
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

    def fast() -> dict[str, Any] | None:
        if body and set(map(len, body)) != {ncol}:
            return None
        columns = list(zip(*body)) if body else [()] * ncol
        out: dict[str, Any] = {}
        for name in ("layer", "request", "pos"):
            c = cols[name]
            if c is None:
                out[name] = None if name == "pos" else np.zeros(len(body), dtype=np.int64)
                continue
            arr = _int_column(list(columns[c]))
            if arr is None:
                return None
            out[name] = arr
        got = _fast_lists(list(columns[cols["experts"]]), np.int64)  # type: ignore[index]
        if got is None:
            return None
        out["ids"], out["count"] = got
        out["weights"] = None
        if cols["weights"] is not None:
            w = _fast_lists(list(columns[cols["weights"]]), np.float64)
            if w is None or not np.array_equal(w[1], out["count"]):
                return None
            out["weights"] = w[0].astype(np.float32)
        out["row"] = np.arange(len(body), dtype=np.int64)
        return out

    data = quick if quick is not None else fast()
    skipped = 0
    if data is None:  # row by row: name the first bad row, or skip bad rows when allowed
        parsed, keep, hole = [], [], []
        for i, row in enumerate(body):
            try:
                parsed.append(parse_row(row))
                keep.append(i)
                hole.append(False)
            except (ValueError, IndexError) as exc:
                if not skip_bad:
                    raise InputError(str(exc), source=src, field=f"line {line_of(i)}") from None
                skipped += 1
                if cols["pos"] is None:  # positions are row order: a skipped row still holds its place
                    try:
                        lay = int(row[cols["layer"]])  # type: ignore[index]
                        req = int(row[cols["request"]]) if cols["request"] is not None else 0
                    except (ValueError, IndexError):
                        continue
                    parsed.append((lay, req, -1, [], None))
                    keep.append(i)
                    hole.append(True)
        k = max((len(p[3]) for p in parsed), default=0)
        ids = np.full((len(parsed), k), -1, dtype=np.int64)
        weights = np.zeros((len(parsed), k), dtype=np.float32) if cols["weights"] is not None else None
        for j, p in enumerate(parsed):
            ids[j, : len(p[3])] = p[3]
            if weights is not None and p[4] is not None:
                weights[j, : len(p[4])] = p[4]
        data = {
            "layer": np.array([p[0] for p in parsed], dtype=np.int64),
            "request": np.array([p[1] for p in parsed], dtype=np.int64),
            "pos": np.array([p[2] for p in parsed], dtype=np.int64) if cols["pos"] is not None else None,
            "ids": ids, "count": np.array([len(p[3]) for p in parsed], dtype=np.int64),
            "weights": weights, "row": np.array(keep, dtype=np.int64), "hole": np.array(hole, dtype=bool),
        }
    uniq, inv = np.unique(data["request"], return_inverse=True)
    data["request"] = inv.astype(np.int64) + request_offset
    data["file"] = np.full(len(data["layer"]), file_index, dtype=np.int64)
    data["line_of"] = line_of
    names = [f"{path.name}#{int(u)}" for u in uniq]
    return data, names, skipped


_NUMERIC = bytes(int(chr(i) in "0123456789.-+eE") for i in range(256))  # byte -> 1 if it can be part of a number


def _jsonl_numbers(text: str) -> tuple[dict[str, Any], np.ndarray] | None:
    """Fastest path for JSONL: when every line is the first line with other numbers (same keys in the same
    order, same list lengths, numbers only), read all numbers at once. Returns (the first record, numbers
    [lines, per line]) or None."""
    raw = text.encode("utf-8")
    b = np.frombuffer(raw, dtype=np.uint8)
    if b.size == 0 or b[-1] != ord("\n"):
        return None
    # inside a string (or on its opening quote): parity of the quotes so far (xor-accumulate: 10x an int cumsum)
    quote = np.bitwise_xor.accumulate((b == ord('"')).view(np.uint8)).view(bool)
    num = np.frombuffer(raw.translate(_NUMERIC), dtype=bool) & ~quote  # bytes.translate: 10x a numpy lookup
    keep = ~num
    skel = b[keep]
    nl = np.flatnonzero(skel == ord("\n"))
    n = nl.size
    width = int(nl[0]) + 1
    if skel.size != n * width or not (skel.reshape(n, width) == skel[:width]).all():
        return None  # lines differ in more than their numbers
    try:
        first = json.loads(raw[: int(np.flatnonzero(b == ord("\n"))[0])])
    except ValueError:
        return None
    if not isinstance(first, dict):
        return None
    per_line = 0
    for v in first.values():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            per_line += 1
        elif isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            per_line += len(v)
        else:
            return None
    numbers = np.where(num, b, np.uint8(ord(" "))).tobytes()
    integral = not any(c in numbers for c in (b".", b"e", b"E"))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:  # numpy parses integers 4x faster than floats
            values = np.fromstring(numbers.decode("ascii"), dtype=np.int64 if integral else np.float64, sep=" ")
        except (ValueError, DeprecationWarning):
            return None
    if values.size != n * per_line:
        return None
    return first, values.reshape(n, per_line)


_JSON_KEYS = (("layer", ("layer", "layer_id", "layer_idx")), ("token", _JSON_TOKEN_KEYS),
              ("ids", ("experts", "topk_ids", "expert_ids", "ids")),
              ("weights", ("weights", "topk_weights", "gate_weights", "scores")),
              ("request", ("request", "request_id", "req_id", "seq_id")))


def _jsonl_fast(text: str, path: Path, file_index: int, request_offset: int) -> tuple[dict[str, Any], list[str]] | None:
    """All lines at once, when every line is a one-token record with the keys of the first line and the same
    number of ids: numbers read in one pass (:func:`_jsonl_numbers`) or one JSON parse, then numpy arrays per
    key. None otherwise (the caller goes line by line, which names the first bad line)."""
    quick = _jsonl_numbers(text)
    if quick is not None:
        first, values = quick
        cols: dict[str, np.ndarray] = {}
        at = 0
        for key, v in first.items():
            width = len(v) if isinstance(v, list) else 1
            cols[key] = values[:, at : at + width] if isinstance(v, list) else values[:, at]
            at += width
        keys = {name: next((k for k in cands if k in first), None) for name, cands in _JSON_KEYS}
        if keys["layer"] is None or keys["token"] is None or keys["ids"] is None:
            return None
        as_int = {}
        for name in ("layer", "token", "ids", "request"):
            if keys[name] is None:
                continue
            v = cols[keys[name]]
            if (v.dtype.kind == "f" and not (v == np.floor(v)).all()) or (name == "ids" and v.ndim != 2):
                return None
            as_int[name] = v.astype(np.int64)
        lay, tok, ids = as_int["layer"], as_int["token"], as_int["ids"]
        w = cols[keys["weights"]].astype(np.float32) if keys["weights"] else None
        req = as_int["request"].tolist() if keys["request"] else None
        n = lay.size
    else:
        lines = text.splitlines()
        if not lines or any(not ln.strip() for ln in lines):
            return None
        try:
            objs = json.loads("[" + ",".join(lines) + "]")
            first = objs[0]
            keys = {name: next((k for k in cands if k in first), None) for name, cands in _JSON_KEYS}
            if keys["layer"] is None or keys["token"] is None or keys["ids"] is None:
                return None
            if any(len(o) != len(first) for o in objs):
                return None
            lay_l, tok_l = [o[keys["layer"]] for o in objs], [o[keys["token"]] for o in objs]
            ids_l = [o[keys["ids"]] for o in objs]
            if bool in set(map(type, lay_l)) | set(map(type, tok_l)) or any(bool in set(map(type, r)) for r in ids_l):
                return None  # True == 1 to numpy: the slow path rejects booleans by line
            lay, tok, ids = np.array(lay_l), np.array(tok_l), np.array(ids_l)
            w = np.array([o[keys["weights"]] for o in objs]) if keys["weights"] else None
            if w is not None and w.dtype.kind not in "fiu":
                return None
            req = [o[keys["request"]] for o in objs] if keys["request"] else None
        except (ValueError, TypeError, KeyError, AttributeError, IndexError):
            return None
        n = len(objs)
    if lay.dtype.kind != "i" or tok.dtype.kind != "i" or ids.dtype.kind != "i" or ids.ndim != 2 or ids.shape[1] == 0:
        return None  # booleans, floats, strings, nested or ragged lists: the slow path says which line
    if (tok < 0).any() or (w is not None and w.shape != ids.shape):
        return None
    w = None if w is None else w.astype(np.float32)
    if req is None:
        inv, names = np.zeros(n, dtype=np.int64), [path.name]
    else:
        first_seen: dict[str, int] = {}
        inv = np.fromiter((first_seen.setdefault(json.dumps(r, sort_keys=True), len(first_seen)) for r in req),
                          dtype=np.int64, count=n)
        names = [f"{path.name}#{u}" if u != "null" else path.name for u in first_seen]
    return {
        "layer": lay.astype(np.int64), "request": inv + request_offset, "pos": tok.astype(np.int64),
        "ids": ids.astype(np.int64), "count": np.full(n, ids.shape[1], dtype=np.int64), "weights": w,
        "row": np.arange(1, n + 1, dtype=np.int64), "file": np.full(n, file_index, dtype=np.int64),
        "line_of": lambda row: int(row),
    }, names


def _jsonl_file(path: Path, file_index: int, request_offset: int, skip_bad: bool
                ) -> tuple[dict[str, Any], list[str], int]:
    src = str(path)
    text = _read_text(path)
    quick = _jsonl_fast(text, path, file_index, request_offset)
    if quick is not None:
        return quick[0], quick[1], 0
    layer: list[int] = []
    req_raw: list[Any] = []
    pos: list[int] = []
    ids: list[list[int]] = []
    weights: list[list[float] | None] = []
    lines: list[int] = []
    skipped = 0
    has_weights = False

    def first_key(obj: dict[str, Any], keys: Sequence[str]) -> Any:
        for k in keys:
            if k in obj:
                return obj[k]
        return None

    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
            lay = first_key(obj, ("layer", "layer_id", "layer_idx"))
            tok = first_key(obj, _JSON_TOKEN_KEYS)
            exp = first_key(obj, ("experts", "topk_ids", "expert_ids", "ids"))
            wts = first_key(obj, ("weights", "topk_weights", "gate_weights", "scores"))
            req = first_key(obj, ("request", "request_id", "req_id", "seq_id"))
            if not isinstance(lay, int) or isinstance(lay, bool):
                raise ValueError("needs an integer 'layer'")
            if not isinstance(exp, list):
                raise ValueError("needs 'experts' (or topk_ids): a list of expert ids")
            multi = bool(exp) and isinstance(exp[0], list)
            rows = exp if multi else [exp]
            wrows = wts if (multi and wts is not None) else [wts]
            if multi:
                if isinstance(tok, int) and not isinstance(tok, bool):
                    toks = list(range(tok, tok + len(rows)))
                elif isinstance(tok, list) and len(tok) == len(rows):
                    toks = tok
                else:
                    raise ValueError("a record of several tokens needs 'token' as the first index or a list "
                                     "of one index per id list")
                if wts is not None and (not isinstance(wts, list) or len(wts) != len(rows)):
                    raise ValueError("'weights' must hold one list per id list")
            else:
                toks = [tok]
            for t, r, w in zip(toks, rows, wrows):
                if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                    raise ValueError(f"needs a token index >= 0 ('token'), got {t!r}")
                if not isinstance(r, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in r):
                    raise ValueError(f"expert ids must be a list of integers, got {r!r}")
                if w is not None:
                    if not isinstance(w, list) or len(w) != len(r) or not all(
                            isinstance(v, (int, float)) and not isinstance(v, bool) for v in w):
                        raise ValueError(f"weights must be {len(r)} numbers, got {w!r}")
                    has_weights = True
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            if not skip_bad:
                raise InputError(str(exc).split(": line ")[0], source=src, field=f"line {lineno}") from None
            skipped += 1
            continue
        for t, r, w in zip(toks, rows, wrows):
            layer.append(lay)
            req_raw.append(req)
            pos.append(t)
            ids.append(r)
            weights.append(w)
            lines.append(lineno)
    n = len(ids)
    if has_weights and any(w is None for w in weights):
        i = next(i for i, w in enumerate(weights) if w is None)
        j = next(j for j, w in enumerate(weights) if w is not None)
        raise InputError(f"no weights, but line {lines[j]} has them: give weights on every record or on none",
                         source=src, field=f"line {lines[i]}")
    k = max((len(r) for r in ids), default=0)
    counts = np.fromiter((len(r) for r in ids), dtype=np.int64, count=n)
    ids_arr = np.full((n, k), -1, dtype=np.int64)
    if n and (counts == k).all():
        ids_arr = np.array(ids, dtype=np.int64).reshape(n, k)
    else:
        mask = np.arange(k)[None, :] < counts[:, None]
        ids_arr[mask] = np.fromiter((v for r in ids for v in r), dtype=np.int64, count=int(counts.sum()))
    w_arr = None
    if has_weights:
        w_arr = np.zeros((n, k), dtype=np.float32)
        for i, w in enumerate(weights):
            if w is not None:
                w_arr[i, : len(w)] = w
    first_seen: dict[str, int] = {}  # requests in order of first appearance
    inv = np.fromiter((first_seen.setdefault(json.dumps(r, sort_keys=True), len(first_seen)) for r in req_raw),
                      dtype=np.int64, count=n)
    names = [f"{path.name}#{u}" if u != "null" else path.name for u in first_seen]
    line_arr = np.array(lines, dtype=np.int64)
    return {
        "layer": np.array(layer, dtype=np.int64), "request": np.asarray(inv, dtype=np.int64) + request_offset,
        "pos": np.array(pos, dtype=np.int64), "ids": ids_arr, "count": counts, "weights": w_arr,
        "row": line_arr, "file": np.full(n, file_index, dtype=np.int64), "line_of": lambda row: int(row),
    }, names, skipped


def _numpy_file(path: Path, file_index: int, request_offset: int, axes: str) -> tuple[dict[str, Any], list[str], int]:
    src = str(path)
    if sorted(axes) != ["k", "l", "t"]:
        raise InputError(f"must order the letters t (token), l (layer), k (choice), got {axes!r}", field="axes")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                files = set(z.files)
                if "meta" in files:
                    raise InputError("already a moesim trace (has 'meta'): use it directly", source=src)
                ek = next((k for k in ("experts", "topk_ids", "expert_ids") if k in files), None)
                if ek is None:
                    raise InputError(f"no 'experts' or 'topk_ids' array (has {sorted(files)})", source=src)
                ids = z[ek]
                wk = next((k for k in ("weights", "topk_weights") if k in files), None)
                w = z[wk] if wk else None
        else:
            ids = np.load(path, allow_pickle=False)
            w = None
    except FileNotFoundError:
        raise InputError("file not found", source=src) from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise InputError(f"not a readable numpy file ({exc})", source=src) from None
    if ids.ndim != 3 or not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"must be an integer array of 3 axes ({axes}), got {ids.dtype} {ids.shape}", source=src,
                         field="experts")
    order = [axes.index(c) for c in "tlk"]
    ids = np.transpose(ids, order)
    if w is not None:
        w = np.transpose(w, order)
        if w.shape != ids.shape:
            raise InputError(f"shape {w.shape} must equal the expert ids' {ids.shape}", source=src, field="weights")
    T, L, K = ids.shape
    notes = []
    if L > T:
        notes.append(f"{src}: read as {T} tokens x {L} layers (axes {axes!r}); if the array is [layers, tokens, top_k], "
                     "pass --axes ltk")
    ids2 = ids.reshape(T * L, K).astype(np.int64)
    neg = ids2 < 0
    return {
        "layer": np.tile(np.arange(L, dtype=np.int64), T),
        "request": np.full(T * L, request_offset, dtype=np.int64),
        "pos": np.repeat(np.arange(T, dtype=np.int64), L),
        "ids": ids2, "count": K - neg.sum(axis=1) if neg.any() else np.full(T * L, K, dtype=np.int64),
        "weights": None if w is None else w.reshape(T * L, K).astype(np.float32),
        "row": np.arange(T * L, dtype=np.int64), "file": np.full(T * L, file_index, dtype=np.int64),
        "line_of": None, "explicit": True, "notes": notes,
    }, [path.name], 0


def _detect(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    for fmt, suffixes in (("csv", (".csv", ".tsv")), ("jsonl", (".jsonl", ".json", ".ndjson")), ("numpy", (".npy", ".npz"))):
        if name.endswith(suffixes):
            return fmt
    raise InputError("cannot tell the format from the file name; give --format csv, jsonl or numpy", source=str(path))


def _gather(paths: Sequence[Path], fmt: str | None, skip_bad: bool, axes: str) -> _Records:
    parts: list[dict[str, Any]] = []
    names: list[str] = []
    skipped = 0
    for i, path in enumerate(paths):
        kind = fmt or _detect(path)
        if kind == "csv":
            data, nm, sk = _csv_file(path, i, len(names), skip_bad)
        elif kind == "jsonl":
            data, nm, sk = _jsonl_file(path, i, len(names), skip_bad)
        elif kind == "numpy":
            data, nm, sk = _numpy_file(path, i, len(names), axes)
        else:
            raise InputError(f"unknown format {kind!r}; valid: csv, jsonl, numpy", field="format")
        parts.append(data)
        names.extend(nm)
        skipped += sk
    if not parts or sum(len(p["layer"]) for p in parts) == 0:
        raise InputError("no routing records found", source=", ".join(str(p) for p in paths) or None)
    k = max(p["ids"].shape[1] for p in parts)

    def pad(a: np.ndarray, fill: float) -> np.ndarray:
        return a if a.shape[1] == k else np.pad(a, ((0, 0), (0, k - a.shape[1])), constant_values=fill)

    ids = np.concatenate([pad(p["ids"], -1) for p in parts])
    with_w = [p["weights"] is not None for p in parts]
    if any(with_w) and not all(with_w):
        missing = paths[with_w.index(False)]
        raise InputError("has no gate weights while other files do; import them separately", source=str(missing))
    weights = np.concatenate([pad(p["weights"], 0) for p in parts]) if all(with_w) else None
    has_pos = [p["pos"] is not None for p in parts]
    if any(has_pos) and not all(has_pos):
        raise InputError("some files give token positions and others do not", source=str(paths[has_pos.index(False)]))
    hole = np.concatenate([p.get("hole", np.zeros(len(p["layer"]), dtype=bool)) for p in parts])
    explicit = np.concatenate([np.full(len(p["layer"]), p.get("explicit", False), dtype=bool) for p in parts])
    file_idx = np.concatenate([p["file"] for p in parts])
    row = np.concatenate([p["row"] for p in parts])
    line_fns = [p["line_of"] for p in parts]

    def where(i: int) -> str:
        f = int(file_idx[i])
        fn = line_fns[f]
        if fn is None:
            t = int(row[i])
            return f"{paths[f]}: record {t}"
        return f"{paths[f]}: line {fn(int(row[i]))}"

    return _Records(
        layer=np.concatenate([p["layer"] for p in parts]), request=np.concatenate([p["request"] for p in parts]),
        pos=np.concatenate([p["pos"] for p in parts]) if all(has_pos) else None, ids=ids,
        count=np.concatenate([p["count"] for p in parts]), weights=weights, where=where, request_names=names,
        skipped=skipped, hole=hole if hole.any() else None, explicit=explicit if explicit.any() else None,
        notes=[note for p in parts for note in p.get("notes", [])],
    )


def pack_requests(lengths: np.ndarray, *, num_gpus: int, tokens_per_gpu: int, assign: str = "least_loaded"
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pack requests (in arrival order) into batches and home GPUs, as a data-parallel serving system does.

    A request longer than ``tokens_per_gpu`` is split into chunks of at most that many tokens (chunked
    prefill); each chunk is a unit. A unit goes to a GPU of the open batch with room for it: the next one
    in turn after the previous unit's GPU (``round_robin``) or the least loaded one (``least_loaded``,
    SGLang's shortest-queue dispatch). When no GPU has room the batch is closed and a new one opened.
    Returns per unit: (request index, batch, home GPU), and each request's units are consecutive.
    """
    if assign not in ASSIGN_POLICIES:
        raise InputError(f"unknown assignment {assign!r}; valid: {', '.join(ASSIGN_POLICIES)}", field="assign")
    if num_gpus < 1 or tokens_per_gpu < 1:
        raise InputError(f"num_gpus and tokens_per_gpu must be >= 1, got {num_gpus}, {tokens_per_gpu}")
    lengths = np.asarray(lengths, dtype=np.int64)
    chunks = -(-lengths // tokens_per_gpu)
    unit_req = np.repeat(np.arange(lengths.size), chunks)
    starts = np.concatenate([[0], np.cumsum(chunks)[:-1]]) if lengths.size else np.empty(0, np.int64)
    unit_idx = np.arange(unit_req.size) - np.repeat(starts, chunks)
    unit_len = np.minimum(lengths[unit_req] - unit_idx * tokens_per_gpu, tokens_per_gpu)
    batch = np.empty(unit_req.size, dtype=np.int64)
    home = np.empty(unit_req.size, dtype=np.int64)
    load = np.zeros(num_gpus, dtype=np.int64)
    b, cursor = 0, num_gpus - 1
    for u, n in enumerate(unit_len.tolist()):  # one step per request chunk, not per token
        room = load + n <= tokens_per_gpu
        if not room.any():
            b, load[:] = b + 1, 0
            room[:] = True
        if assign == "round_robin":
            order = (cursor + 1 + np.arange(num_gpus)) % num_gpus
            g = int(order[room[order].argmax()])
        else:
            g = int(np.where(room, load, np.iinfo(np.int64).max).argmin())
        load[g] += n
        batch[u], home[u], cursor = b, g, g
    return unit_req, batch, home


def _id_ranges(ids: np.ndarray) -> str:
    """Sorted distinct integers as ranges: [1, 2, 3, 7] -> '1-3, 7'."""
    vals = np.asarray(ids, dtype=np.int64)
    if vals.size == 0:
        return "none"
    cuts = np.flatnonzero(np.diff(vals) != 1) + 1
    runs = np.split(vals, cuts)
    return ", ".join(str(r[0]) if r.size == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def _assemble(rec: _Records, *, num_experts: int | None, top_k: int | None, allow_missing: bool,
              num_gpus: int | None, tokens_per_gpu: int | None, assign: str, model: str, source: str
              ) -> ImportResult:
    n = rec.layer.size
    notes: list[str] = list(rec.notes)
    # Token positions: given, or the order of the rows within (request, layer).
    if rec.pos is None:
        key = rec.request * (int(rec.layer.max()) - int(rec.layer.min()) + 1) + (rec.layer - rec.layer.min())
        order = np.argsort(key, kind="stable")
        sk = key[order]
        start = np.concatenate([[0], np.flatnonzero(sk[1:] != sk[:-1]) + 1])
        run = np.diff(np.concatenate([start, [n]]))
        pos = np.empty(n, dtype=np.int64)
        pos[order] = np.arange(n) - np.repeat(start, run)
    else:
        pos = rec.pos
    if rec.hole is not None:  # skipped rows kept only to hold their positions: drop them now
        keep = np.flatnonzero(~rec.hole)
        where_all = rec.where
        rec = _Records(layer=rec.layer[keep], request=rec.request[keep], pos=None, ids=rec.ids[keep],
                       count=rec.count[keep], weights=None if rec.weights is None else rec.weights[keep],
                       where=lambda i: where_all(int(keep[i])), request_names=rec.request_names, skipped=rec.skipped,
                       explicit=None if rec.explicit is None else rec.explicit[keep], notes=rec.notes)
        pos, n = pos[keep], keep.size
    if n and int(pos.min()) < 0:
        i = int(np.argmax(pos < 0))
        raise InputError(f"token index {int(pos[i])} must be >= 0", source=rec.where(i))
    if n and int(rec.layer.min()) < 0:
        i = int(np.argmax(rec.layer < 0))
        raise InputError(f"layer {int(rec.layer[i])} must be >= 0", source=rec.where(i))
    if rec.weights is not None:
        given = np.arange(rec.weights.shape[1])[None, :] < rec.count[:, None]
        bad_w = given & ~(np.isfinite(rec.weights) & (rec.weights >= 0))
        if bad_w.any():
            i = int(np.argmax(bad_w.any(axis=1)))
            raise InputError(f"gate weight {float(rec.weights[i][bad_w[i]][0])} must be a finite number >= 0 (gate "
                             "weights after softmax or sigmoid, not raw router logits)", source=rec.where(i))
    layer_ids, layer = np.unique(rec.layer, return_inverse=True)
    L = layer_ids.size
    # Tokens: (request, position), in request order then position order.
    tok_key = rec.request * (int(pos.max()) + 1) + pos
    tok_ids, tok = np.unique(tok_key, return_inverse=True)
    T = tok_ids.size
    cell = tok * L + layer
    order = np.argsort(cell, kind="stable")
    dup = np.flatnonzero(cell[order][1:] == cell[order][:-1])
    if dup.size:
        i, j = int(order[dup[0]]), int(order[dup[0] + 1])
        first, second = min(i, j), max(i, j)
        raise InputError(f"second record for request {rec.request_names[int(rec.request[i])]}, token "
                         f"{int(pos[i])}, layer {int(rec.layer[i])} (first at {rec.where(first)})",
                         source=rec.where(second))
    k_have = int(rec.count.max()) if n else 0
    K = top_k or k_have
    if k_have > K:
        i = int(np.argmax(rec.count > K))
        raise InputError(f"{int(rec.count[i])} expert ids, more than top_k={K}", source=rec.where(i))
    ids = rec.ids if rec.ids.shape[1] == K else np.pad(rec.ids, ((0, 0), (0, K - rec.ids.shape[1])), constant_values=-1)
    valid = np.arange(K)[None, :] < rec.count[:, None]
    bad = valid & (ids < 0)
    if bad.any():
        i = int(np.argmax(bad.any(axis=1)))
        raise InputError(f"expert id {int(ids[i][bad[i]][0])} is negative", source=rec.where(i))
    E_seen = int(ids.max()) + 1 if n else 0
    E = num_experts or E_seen
    if not num_experts:
        notes.append(f"num_experts inferred as {E} (highest id + 1); pass --num-experts if some experts never appear")
    if E_seen > E:
        i = int(np.argmax((ids >= E).any(axis=1)))
        raise InputError(f"expert id {int(ids[i].max())} out of range for num_experts={E}", source=rec.where(i))
    srt = np.sort(ids, axis=1)
    twice = ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any(axis=1)
    if twice.any():
        i = int(np.argmax(twice))
        raise InputError(f"expert {int(srt[i][1:][(srt[i][1:] == srt[i][:-1])][0])} appears twice in one record",
                         source=rec.where(i))
    short = rec.count < K
    if short.any() and not allow_missing and (rec.explicit is None or not rec.explicit[short].all()):
        i = int(np.argmax(short & (True if rec.explicit is None else ~rec.explicit)))
        raise InputError(f"{int(rec.count[i])} expert ids, fewer than top_k={K} ({int(short.sum())} records short in "
                         "all); --allow-missing (allow_missing) pads them with -1, no expert", source=rec.where(i))
    padded = int(short.sum())
    missing = T * L - n
    if missing and not allow_missing:
        have = np.zeros(T * L, dtype=bool)
        have[cell] = True
        hint = "; --allow-missing (allow_missing) fills them with -1, no expert"
        per_layer = np.bincount(layer, minlength=L)
        sparse = int(np.argmin(per_layer))
        if 2 * per_layer[sparse] <= per_layer.max():  # a layer id far fewer records use than others: a typo?
            i = int(np.argmax(layer == sparse))
            raise InputError(f"layer {int(layer_ids[sparse])} has records for only {int(per_layer[sparse])} of {T} "
                             f"tokens (the other layer ids: {_id_ranges(np.delete(layer_ids, sparse))}); "
                             f"{missing} (token, layer) records missing in all{hint}", source=rec.where(i))
        c = int(np.argmin(have))
        t, l = divmod(c, L)
        i = int(np.argmax(tok == t))
        skipped = f"; {rec.skipped} malformed records were skipped" if rec.skipped else ""
        raise InputError(f"token {int(pos[i])} of request {rec.request_names[int(rec.request[i])]} (its first record "
                         f"is here) has no record for layer {int(layer_ids[l])} ({missing} (token, layer) records "
                         f"missing in all{skipped}{hint})", source=rec.where(i))
    dtype = np.int16 if E < 2**15 else np.int32
    experts = np.full((T, L, K), -1, dtype=dtype)
    experts.reshape(T * L, K)[cell] = ids
    weights = None
    if rec.weights is not None:
        wpad = rec.weights if rec.weights.shape[1] == K else np.pad(rec.weights, ((0, 0), (0, K - rec.weights.shape[1])))
        weights = np.zeros((T, L, K), dtype=np.float32)
        weights.reshape(T * L, K)[cell] = wpad
    tok_req = tok_ids // (int(pos.max()) + 1)  # each token's request (tokens sorted by request, position)
    num_req = len(rec.request_names)
    lengths = np.bincount(tok_req, minlength=num_req)
    extra: dict[str, Any] = {"layer_ids": [int(v) for v in layer_ids], "requests": int((lengths > 0).sum())}
    home = batch = None
    if num_gpus:
        budget = tokens_per_gpu or int(lengths.max())
        unit_req, unit_batch, unit_home = pack_requests(lengths, num_gpus=num_gpus, tokens_per_gpu=budget,
                                                        assign=assign)
        unit_len = np.minimum(lengths[unit_req] - (np.arange(unit_req.size) - np.searchsorted(unit_req, unit_req))
                              * budget, budget)
        tok_batch = np.repeat(unit_batch, unit_len)
        tok_home = np.repeat(unit_home, unit_len)
        perm = np.lexsort((np.arange(T), tok_home, tok_batch))  # batches contiguous, a GPU's tokens together
        experts = experts[perm]
        weights = weights[perm] if weights is not None else None
        home, batch = tok_home[perm].astype(np.int32), tok_batch[perm].astype(np.int32)
        extra["packing"] = {"num_gpus": num_gpus, "tokens_per_gpu": budget, "assign": assign}
    meta = TraceMeta(num_experts=E, num_layers=L, top_k=K, model=model, source=source, extra=extra)
    trace = Trace(experts=experts, meta=meta, weights=weights, home=home, batch=batch).validate(source)
    return ImportResult(trace=trace, records=n, skipped=rec.skipped, padded=padded, missing=missing,
                        requests=extra["requests"], notes=notes)


def import_trace(paths: Iterable[str | os.PathLike[str]], *, fmt: str | None = None, num_experts: int | None = None,
                 top_k: int | None = None, num_gpus: int | None = None, tokens_per_gpu: int | None = None,
                 assign: str = "least_loaded", skip_bad: bool = False, allow_missing: bool = False,
                 axes: str = "tlk", model: str = "") -> ImportResult:
    """Read routing logs (CSV, JSONL or numpy; see the module docstring) into one :class:`Trace`.

    Files are read in the order given; each file's requests follow the previous file's. With ``num_gpus``,
    requests are packed into batches of at most ``tokens_per_gpu`` tokens per GPU (default: the longest
    request) and given home GPUs by ``assign`` (see :func:`pack_requests`); without it the trace has no
    ``home``/``batch`` arrays and the scenario's ``tokens_per_gpu`` decides the layout at replay.
    """
    plist = [Path(p) for p in paths]
    if not plist:
        raise InputError("no input files")
    if assign not in ASSIGN_POLICIES:
        raise InputError(f"unknown assignment {assign!r}; valid: {', '.join(ASSIGN_POLICIES)}", field="assign")
    for name, value in (("num_experts", num_experts), ("top_k", top_k), ("num_gpus", num_gpus),
                        ("tokens_per_gpu", tokens_per_gpu)):
        if value is not None and value < 1:
            raise InputError(f"must be >= 1, got {value}", field=name)
    rec = _gather(plist, fmt, skip_bad, axes)
    source = ", ".join(str(p) for p in plist) if len(plist) <= 3 else f"{plist[0]} and {len(plist) - 1} more files"
    return _assemble(rec, num_experts=num_experts, top_k=top_k, allow_missing=allow_missing, num_gpus=num_gpus,
                     tokens_per_gpu=tokens_per_gpu, assign=assign, model=model, source=source)
