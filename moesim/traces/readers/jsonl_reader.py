"""JSONL routing logs: one JSON object per line.

Keys: ``layer`` (or ``layer_id``), a token index (``token``, ``token_idx``, ``token_index``, ``pos``,
``position``), expert ids (``experts``, ``topk_ids``, ``expert_ids``, ``ids``), optional weights
(``weights``, ``topk_weights``, ``gate_weights``, ``scores``) and request (``request``, ``request_id``,
``req_id``, ``seq_id``; any JSON value, requests named in order of first appearance). A record may also carry
several tokens at once: a list of id lists with a list of token indices (or the first index).

Three parsers give the same records: when every line is the first line with other numbers, all numbers are
read in one pass (:func:`_jsonl_numbers`); when every line is a one-token record with the same keys, one JSON
parse of the whole file; otherwise line by line, which names the first bad line (or skips bad lines when
told to). Ignored: keys other than these.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from moesim.errors import InputError
from moesim.loaders import check_values, unique_pairs
from moesim.traces.readers.records import MAX_ID, ReadOptions, RoutingRecords
from moesim.traces.readers.text import parse_numbers, read_text

LAYER_KEYS = ("layer", "layer_id", "layer_idx")
TOKEN_KEYS = ("token", "token_idx", "token_index", "pos", "position")
EXPERT_KEYS = ("experts", "topk_ids", "expert_ids", "ids")
WEIGHT_KEYS = ("weights", "topk_weights", "gate_weights", "scores")
REQUEST_KEYS = ("request", "request_id", "req_id", "seq_id")
_KEYS = (("layer", LAYER_KEYS), ("token", TOKEN_KEYS), ("ids", EXPERT_KEYS), ("weights", WEIGHT_KEYS),
         ("request", REQUEST_KEYS))

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_NUMERIC = bytes(int(chr(i) in "0123456789.-+eE") for i in range(256))  # byte -> 1 if it can be part of a number


class _Columns(NamedTuple):
    """A whole file of one-token records as arrays (not yet checked); requests as written."""

    layer: np.ndarray
    token: np.ndarray
    ids: np.ndarray
    weights: np.ndarray | None
    request: list[Any] | None
    n: int


def _keys_of(first: dict[str, Any]) -> dict[str, str | None]:
    """The key the file uses for each field (the first candidate present), None when absent."""
    return {name: next((k for k in cands if k in first), None) for name, cands in _KEYS}


def _request_index(requests: Sequence[Any], n: int, file_name: str) -> tuple[np.ndarray, list[str]]:
    """Requests numbered in order of first appearance, and their names (``file#request``; the file name alone
    for records without one)."""
    first_seen: dict[str, int] = {}
    inv = np.fromiter((first_seen.setdefault(json.dumps(r, sort_keys=True), len(first_seen)) for r in requests),
                      dtype=np.int64, count=n)
    return inv, [f"{file_name}#{u}" if u != "null" else file_name for u in first_seen]


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
        first = json.loads(raw[: int(np.flatnonzero(b == ord("\n"))[0])], object_pairs_hook=unique_pairs)
    except (ValueError, RecursionError):
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
    # numpy parses integers 4x faster than floats
    values = parse_numbers(numbers.decode("ascii"), np.int64 if integral else np.float64, " ")
    if values is None or values.size != n * per_line:
        return None
    return first, values.reshape(n, per_line)


def _columns_of_numbers(first: dict[str, Any], values: np.ndarray) -> _Columns | None:
    """The columns of :func:`_jsonl_numbers`' output; None when a needed key is missing or a value that must
    be an integer is not."""
    cols: dict[str, np.ndarray] = {}
    at = 0
    for key, v in first.items():
        width = len(v) if isinstance(v, list) else 1
        cols[key] = values[:, at : at + width] if isinstance(v, list) else values[:, at]
        at += width
    keys = _keys_of(first)
    if keys["layer"] is None or keys["token"] is None or keys["ids"] is None:
        return None
    as_int = {}
    for name in ("layer", "token", "ids", "request"):
        if keys[name] is None:
            continue
        v = cols[keys[name]]  # type: ignore[index]
        if (v.dtype.kind == "f" and not (v == np.floor(v)).all()) or (name == "ids" and v.ndim != 2):
            return None
        limit = 2**53 if name == "request" else MAX_ID
        if v.size and (v.min() < -limit or v.max() > limit):  # the slow path names the line
            return None
        as_int[name] = v.astype(np.int64)
    w = cols[keys["weights"]].astype(np.float32) if keys["weights"] else None
    req = as_int["request"].tolist() if keys["request"] else None
    return _Columns(as_int["layer"], as_int["token"], as_int["ids"], w, req, as_int["layer"].size)


def _columns_of_json(text: str) -> _Columns | None:
    """One JSON parse of all lines, when each is a one-token record with the keys of the first; None
    otherwise."""
    lines = text.splitlines()
    if not lines or any(not ln.strip() for ln in lines):
        return None
    try:
        objs = json.loads("[" + ",".join(lines) + "]", object_pairs_hook=unique_pairs)
        first = objs[0]
        keys = _keys_of(first)
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
        if req is not None and any(isinstance(r, (list, dict)) for r in req):
            return None  # a request given as a structure: the slow path checks its depth and values
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError, RecursionError):
        return None
    if any(a.dtype.kind == "i" and a.size and (a.min() < -MAX_ID or a.max() > MAX_ID) for a in (lay, tok, ids)):
        return None  # the slow path names the line
    return _Columns(lay, tok, ids, w, req, len(objs))


def _jsonl_fast(text: str, path: Path) -> RoutingRecords | None:
    """All lines at once, when every line is a one-token record with the keys of the first line and the same
    number of ids: numbers read in one pass (:func:`_jsonl_numbers`) or one JSON parse, then numpy arrays per
    key. None otherwise (the caller goes line by line, which names the first bad line)."""
    quick = _jsonl_numbers(text)
    got = _columns_of_numbers(*quick) if quick is not None else _columns_of_json(text)
    if got is None:
        return None
    lay, tok, ids, w, req, n = got
    if lay.dtype.kind != "i" or tok.dtype.kind != "i" or ids.dtype.kind != "i" or ids.ndim != 2 or ids.shape[1] == 0:
        return None  # booleans, floats, strings, nested or ragged lists: the slow path says which line
    if (tok < 0).any() or (w is not None and w.shape != ids.shape):
        return None
    w = None if w is None else w.astype(np.float32)
    if req is None:
        inv, names = np.zeros(n, dtype=np.int64), [path.name]
    else:
        inv, names = _request_index(req, n, path.name)
    src = str(path)
    return RoutingRecords(
        layer=lay.astype(np.int64), request=inv, pos=tok.astype(np.int64), ids=ids.astype(np.int64),
        count=np.full(n, ids.shape[1], dtype=np.int64), weights=w, where=lambda i: f"{src}: line {int(i) + 1}",
        request_names=names,
    )


def _parse_line(raw: str) -> Any:
    """One line's JSON; ValueError when it is not JSON, nests too deeply, repeats a key, or holds a number
    that is not finite or an integer beyond 64 bits (:func:`moesim.loaders.load_json`)."""
    try:
        obj = json.loads(raw, object_pairs_hook=unique_pairs)  # (a JSONDecodeError says where: the caller cuts it)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    try:
        check_values(obj, None)
    except InputError as exc:
        raise ValueError(exc.detail if exc.field is None else f"{exc.field}: {exc.detail}") from None
    return obj


def _first_key(obj: dict[str, Any], keys: Sequence[str]) -> Any:
    for k in keys:
        if k in obj:
            return obj[k]
    return None


def _token_indices(tok: Any, rows: list[Any], wts: Any) -> list[Any]:
    """The token indices of a record of several tokens: a list of one per id list, or the first index."""
    if isinstance(tok, int) and not isinstance(tok, bool):
        toks = list(range(tok, tok + len(rows)))
    elif isinstance(tok, list) and len(tok) == len(rows):
        toks = tok
    else:
        raise ValueError("a record of several tokens needs 'token' as the first index or a list "
                         "of one index per id list")
    if wts is not None and (not isinstance(wts, list) or len(wts) != len(rows)):
        raise ValueError("'weights' must hold one list per id list")
    return toks


def _line_records(obj: Any) -> tuple[int, Any, list[Any], list[Any], list[Any]]:
    """(layer, request, token indices, id lists, weight lists) of one parsed line; ValueError naming what is
    wrong with the line as a whole (each token is checked by :func:`_check_token`)."""
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    lay = _first_key(obj, LAYER_KEYS)
    tok = _first_key(obj, TOKEN_KEYS)
    exp = _first_key(obj, EXPERT_KEYS)
    wts = _first_key(obj, WEIGHT_KEYS)
    req = _first_key(obj, REQUEST_KEYS)
    if not isinstance(lay, int) or isinstance(lay, bool) or not 0 <= lay <= MAX_ID:
        raise ValueError(f"needs an integer 'layer' from 0 to {MAX_ID}, got {lay!r}")
    if not isinstance(exp, list):
        raise ValueError("needs 'experts' (or topk_ids): a list of expert ids")
    multi = bool(exp) and isinstance(exp[0], list)
    rows = exp if multi else [exp]
    wrows = wts if (multi and wts is not None) else [wts]
    toks = _token_indices(tok, rows, wts) if multi else [tok]
    return lay, req, toks, rows, wrows


def _check_token(t: Any, r: Any, w: Any) -> bool:
    """One token's index, ids and weights; ValueError naming the bad one. True when it has weights."""
    if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t <= MAX_ID:
        raise ValueError(f"needs a token index from 0 to {MAX_ID} ('token'), got {t!r}")
    if not isinstance(r, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in r):
        raise ValueError(f"expert ids must be a list of integers, got {r!r}")
    if any(not -MAX_ID <= v <= MAX_ID for v in r):
        raise ValueError(f"expert id {next(v for v in r if not -MAX_ID <= v <= MAX_ID)} out of range [0, {MAX_ID}]")
    if w is None:
        return False
    if not isinstance(w, list) or len(w) != len(r) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in w):
        raise ValueError(f"weights must be {len(r)} numbers, got {w!r}")
    return True


class _Lines(NamedTuple):
    """Records read line by line: one entry per token."""

    layer: list[int]
    request: list[Any]
    pos: list[int]
    ids: list[list[int]]
    weights: list[list[float] | None]
    line: list[int]


def _read_lines(text: str, src: str, skip_bad: bool) -> tuple[_Lines, int, bool]:
    """Every line's tokens; the first bad line is an error naming it, or (``skip_bad``) is skipped and
    counted. Returns (records, lines skipped, whether any token checked had weights)."""
    out = _Lines([], [], [], [], [], [])
    skipped = 0
    has_weights = False
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            lay, req, toks, rows, wrows = _line_records(_parse_line(raw))
            for t, r, w in zip(toks, rows, wrows):
                if _check_token(t, r, w):
                    has_weights = True  # (set even when a later token of the line is bad)
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            if not skip_bad:
                raise InputError(str(exc).split(": line ")[0], source=src, field=f"line {lineno}") from None
            skipped += 1
            continue
        for t, r, w in zip(toks, rows, wrows):
            out.layer.append(lay)
            out.request.append(req)
            out.pos.append(t)
            out.ids.append(r)
            out.weights.append(w)
            out.line.append(lineno)
    return out, skipped, has_weights


def _id_array(ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Id lists as rows [n, longest], -1 padded, and the number given per row."""
    n = len(ids)
    k = max((len(r) for r in ids), default=0)
    counts = np.fromiter((len(r) for r in ids), dtype=np.int64, count=n)
    ids_arr = np.full((n, k), -1, dtype=np.int64)
    if n and (counts == k).all():
        ids_arr = np.array(ids, dtype=np.int64).reshape(n, k)
    else:
        mask = np.arange(k)[None, :] < counts[:, None]
        ids_arr[mask] = np.fromiter((v for r in ids for v in r), dtype=np.int64, count=int(counts.sum()))
    return ids_arr, counts


def _weight_array(weights: list[list[float] | None], k: int) -> np.ndarray:
    w_arr = np.zeros((len(weights), k), dtype=np.float32)
    for i, w in enumerate(weights):
        if w is not None:
            w_arr[i, : len(w)] = w
    return w_arr


def read_jsonl(path: Path, options: ReadOptions) -> RoutingRecords:
    """One JSONL file (``.gz`` too) -> its records."""
    src = str(path)
    text = read_text(path)
    # the fast paths take JSON as json.loads does; escapes of lone surrogates go line by line, to be refused
    quick = None if _SURROGATE_ESCAPE.search(text) else _jsonl_fast(text, path)
    if quick is not None:
        return quick
    got, skipped, has_weights = _read_lines(text, src, options.skip_bad)
    if has_weights and any(w is None for w in got.weights):
        i = next(i for i, w in enumerate(got.weights) if w is None)
        j = next(j for j, w in enumerate(got.weights) if w is not None)
        raise InputError(f"no weights, but line {got.line[j]} has them: give weights on every record or on none",
                         source=src, field=f"line {got.line[i]}")
    n = len(got.ids)
    ids_arr, counts = _id_array(got.ids)
    inv, names = _request_index(got.request, n, path.name)
    line_arr = np.array(got.line, dtype=np.int64)
    return RoutingRecords(
        layer=np.array(got.layer, dtype=np.int64), request=np.asarray(inv, dtype=np.int64),
        pos=np.array(got.pos, dtype=np.int64), ids=ids_arr, count=counts,
        weights=_weight_array(got.weights, ids_arr.shape[1]) if has_weights else None,
        where=lambda i: f"{src}: line {int(line_arr[i])}", request_names=names, skipped=skipped,
    )
