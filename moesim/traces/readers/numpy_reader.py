"""Raw numpy routing arrays: one file is one request.

A ``.npy`` int array [tokens, layers, top_k] (or another axis order, ``axes="ltk"``), or an ``.npz`` without
``meta`` (that would be a moesim trace already) holding ``experts``/``topk_ids``/``expert_ids`` and optionally
``weights``/``topk_weights``. -1 in the ids means "no expert" on purpose (a record short of top_k is then
not an error). Ignored: other arrays in an ``.npz``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moesim.budget import require_memory
from moesim.errors import InputError
from moesim.traces.npyfile import npz_names, read_npy, read_npz
from moesim.traces.readers.records import MAX_ID, ReadOptions, RoutingRecords


def _load(path: Path, src: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(ids, weights or None) as stored, headers checked against the file and the memory limit first."""
    if path.suffix != ".npz":
        return read_npy(path, src), None
    files = set(npz_names(path, src))
    if "meta" in files:
        raise InputError("already a moesim trace (has 'meta'): use it directly", source=src)
    ek = next((k for k in ("experts", "topk_ids", "expert_ids") if k in files), None)
    if ek is None:
        raise InputError(f"no 'experts' or 'topk_ids' array (has {sorted(files)})", source=src)
    wk = next((k for k in ("weights", "topk_weights") if k in files), None)
    arrays = read_npz(path, src, names=[ek] + ([wk] if wk else []))
    return arrays[ek], arrays[wk] if wk else None


def read_numpy(path: Path, options: ReadOptions) -> RoutingRecords:
    """One ``.npy`` / ``.npz`` file -> its records, one request named after the file."""
    src = str(path)
    axes = options.axes
    if sorted(axes) != ["k", "l", "t"]:
        raise InputError(f"must order the letters t (token), l (layer), k (choice), got {axes!r}", field="axes")
    ids, w = _load(path, src)
    if ids.ndim != 3 or not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"must be an integer array of 3 axes ({axes}), got {ids.dtype} {ids.shape}", source=src,
                         field="experts")
    order = [axes.index(c) for c in "tlk"]
    ids = np.transpose(ids, order)
    if w is not None:
        w = np.transpose(w, order)
        if w.shape != ids.shape:
            raise InputError(f"shape {w.shape} must equal the expert ids' {ids.shape}", source=src, field="weights")
        if w.dtype.kind not in "fiu":
            raise InputError(f"must be numbers, got {w.dtype}", source=src, field="weights")
    T, L, K = ids.shape
    if K == 0:
        raise InputError(f"has no expert ids (shape {ids.shape} in axes {axes!r}: top_k is 0)", source=src,
                         field="experts")
    require_memory(T * L * (K * 20 + 48), f"{T} tokens x {L} layers x top-{K} records", source=src)
    if ids.size and (int(ids.max()) > MAX_ID or int(ids.min()) < -MAX_ID):
        bad = int(ids.max()) if int(ids.max()) > MAX_ID else int(ids.min())
        raise InputError(f"expert id {bad} out of range (at most {MAX_ID})", source=src, field="experts")
    notes = []
    if L > T:
        notes.append(f"{src}: read as {T} tokens x {L} layers (axes {axes!r}); if the array is [layers, tokens, "
                     "top_k], pass --axes ltk")
    ids2 = ids.reshape(T * L, K).astype(np.int64)
    neg = ids2 < 0
    return RoutingRecords(
        layer=np.tile(np.arange(L, dtype=np.int64), T), request=np.zeros(T * L, dtype=np.int64),
        pos=np.repeat(np.arange(T, dtype=np.int64), L),
        ids=ids2, count=K - neg.sum(axis=1) if neg.any() else np.full(T * L, K, dtype=np.int64),
        weights=None if w is None else w.reshape(T * L, K).astype(np.float32),
        where=lambda i: f"{src}: record {int(i)}", request_names=[path.name],
        explicit=np.ones(T * L, dtype=bool), notes=notes,
    )
