"""The record every trace reader returns: the routing records of one file (or of several, concatenated).

One row per (token, layer) record: the layer id as written, the request (an index into ``request_names``),
the token's position in its request (or none given: then positions are the order of the rows), the expert
ids (-1 padded to the widest record) with how many were given, and optional gate weights. ``where`` names
a record's file and line for error messages. Readers check syntax only (each value parses, lists line up);
what needs every record at once (ids in range, no record twice, every token at every layer) is checked when
the records are assembled into a trace (:mod:`moesim.traces.readers.assemble`).

Deliberately absent: anything a reader would have to guess (expert count, top-k, cluster size).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np


MAX_ID = 2**31 - 1  # largest layer id, expert id and token position a record may give (kept in int32 arrays)


@dataclass(frozen=True)
class ReadOptions:
    """What a reader may be told besides the file: skip malformed records (counted) instead of stopping at
    the first, and the axis order of raw arrays (numpy)."""

    skip_bad: bool = False
    axes: str = "tlk"


@dataclass(frozen=True)
class RoutingRecords:
    """Parsed routing records, one row per (token, layer) record."""

    layer: np.ndarray  # int64 [n], layer ids as written
    request: np.ndarray  # int64 [n], index into request_names
    pos: np.ndarray | None  # int64 [n] token position in its request, or None: order of the rows
    ids: np.ndarray  # int64 [n, k], -1 padded
    count: np.ndarray  # int64 [n], ids given per record
    weights: np.ndarray | None  # float32 [n, k], 0 padded
    where: Callable[[int], str]  # record index -> "file: line N" (or "file: record N")
    request_names: list[str]
    skipped: int = 0  # malformed records skipped (only when the reader was told to skip them)
    hole: np.ndarray | None = None  # bool [n]: a skipped row that still holds its token position
    explicit: np.ndarray | None = None  # bool [n]: ids given as an array, where -1 means "no expert" on purpose
    notes: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return int(self.layer.size)


def concatenate(parts: list[RoutingRecords]) -> RoutingRecords:
    """Several files' records as one: requests renumbered to follow the previous files', ids and weights
    padded to the widest record (-1 and 0), ``where`` still naming each record's own file and line. The
    caller has checked that either all parts or none give positions and weights."""
    k = max(p.ids.shape[1] for p in parts)

    def pad(a: np.ndarray, fill: float) -> np.ndarray:
        return a if a.shape[1] == k else np.pad(a, ((0, 0), (0, k - a.shape[1])), constant_values=fill)

    offsets = np.cumsum([0] + [len(p.request_names) for p in parts])
    starts = np.cumsum([0] + [p.size for p in parts])

    def where(i: int) -> str:
        f = int(np.searchsorted(starts, i, side="right")) - 1
        return parts[f].where(i - int(starts[f]))

    def flags(name: str) -> np.ndarray | None:
        arrays = [getattr(p, name) for p in parts]
        both = np.concatenate([np.zeros(p.size, dtype=bool) if a is None else a for p, a in zip(parts, arrays)])
        return both if both.any() else None

    with_weights = all(p.weights is not None for p in parts)
    return RoutingRecords(
        layer=np.concatenate([p.layer for p in parts]),
        request=np.concatenate([p.request + off for p, off in zip(parts, offsets.tolist())]),
        pos=np.concatenate([p.pos for p in parts]) if all(p.pos is not None for p in parts) else None,
        ids=np.concatenate([pad(p.ids, -1) for p in parts]), count=np.concatenate([p.count for p in parts]),
        weights=np.concatenate([pad(p.weights, 0) for p in parts]) if with_weights else None,  # type: ignore[arg-type]
        where=where, request_names=[n for p in parts for n in p.request_names],
        skipped=sum(p.skipped for p in parts), hole=flags("hole"), explicit=flags("explicit"),
        notes=[note for p in parts for note in p.notes],
    )


def drop_rows(rec: RoutingRecords, keep: np.ndarray) -> RoutingRecords:
    """The records at indices ``keep`` (with ``where`` still naming their original lines); positions and
    holes are left out: the caller has already resolved them."""
    return RoutingRecords(layer=rec.layer[keep], request=rec.request[keep], pos=None, ids=rec.ids[keep],
                          count=rec.count[keep], weights=None if rec.weights is None else rec.weights[keep],
                          where=lambda i: rec.where(int(keep[i])), request_names=rec.request_names,
                          skipped=rec.skipped, explicit=None if rec.explicit is None else rec.explicit[keep],
                          notes=rec.notes)
