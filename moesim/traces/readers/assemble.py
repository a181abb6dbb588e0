"""Routing records into a :class:`~moesim.traces.format.Trace`: checks, dense arrays, and packing requests
into batches and home GPUs.

Records are grouped into tokens (request, position) and layers, checked (ids in range, no expert twice,
every token present at every layer), and the requests are then packed into batches and spread over GPUs the
way a data-parallel serving system does it (:func:`pack_requests`): a request's tokens stay on one GPU (its
home rank), requests longer than the per-GPU budget are split into chunks (chunked prefill), and each batch
holds at most ``tokens_per_gpu`` tokens per GPU.

Deliberately ignored: arrival times, decode steps (each record is one token's routing, whatever phase it
came from), token text, and shared experts (they do not route). Nothing is dropped silently: a malformed
record is an :class:`~moesim.errors.InputError` naming file and line, unless ``skip_bad`` is set, in which
case the number skipped is reported in :attr:`ImportResult.skipped`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from moesim.budget import require_memory, require_time
from moesim.errors import InputError
from moesim.traces.format import Trace, TraceMeta
from moesim.traces.readers.records import MAX_ID, ReadOptions, RoutingRecords, drop_rows
from moesim.traces.readers.table import read_files

ASSIGN_POLICIES = ("round_robin", "least_loaded")
_ALLOW_HINT = "--allow-missing (allow_missing)"
MAX_GPUS = 1 << 20  # GPUs a trace may be packed onto: beyond any cluster moesim can route (GPUs^2 paths)


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


def _check_assign(assign: str) -> None:
    if assign not in ASSIGN_POLICIES:
        raise InputError(f"unknown assignment {assign!r}; valid: {', '.join(ASSIGN_POLICIES)}", field="assign")


def pack_requests(lengths: np.ndarray, *, num_gpus: int, tokens_per_gpu: int, assign: str = "least_loaded"
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pack requests (in arrival order) into batches and home GPUs, as a data-parallel serving system does.

    A request longer than ``tokens_per_gpu`` is split into chunks of at most that many tokens (chunked
    prefill); each chunk is a unit. A unit goes to a GPU of the open batch with room for it: the next one
    in turn after the previous unit's GPU (``round_robin``) or the least loaded one (``least_loaded``,
    SGLang's shortest-queue dispatch). When no GPU has room the batch is closed and a new one opened.
    Returns per unit: (request index, batch, home GPU), and each request's units are consecutive.
    """
    _check_assign(assign)
    if not 1 <= num_gpus <= MAX_GPUS or tokens_per_gpu < 1:
        raise InputError(f"num_gpus must be from 1 to {MAX_GPUS} and tokens_per_gpu >= 1, got {num_gpus}, "
                         f"{tokens_per_gpu}")
    lengths = np.asarray(lengths, dtype=np.int64)
    chunks = -(-lengths // tokens_per_gpu)
    units = int(chunks.sum())
    require_memory(8.0 * num_gpus + 64.0 * units, f"packing {units} request chunks onto {num_gpus} GPUs",
                   field="num_gpus")
    require_time(units * (4e-6 + 3e-8 * num_gpus), f"packing {units} request chunks onto {num_gpus} GPUs",
                 field="num_gpus")
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


@dataclass(frozen=True)
class Packing:
    """Tokens (in request order) packed by :func:`pack_requests`: the order that makes batches contiguous
    with a GPU's tokens together, and each token's home and batch in that order."""

    perm: np.ndarray  # int64 [tokens]: new order of the tokens
    home: np.ndarray  # int32 [tokens], in the new order
    batch: np.ndarray  # int32 [tokens], in the new order
    num_gpus: int
    tokens_per_gpu: int  # the budget used
    assign: str

    def to_json(self) -> dict[str, Any]:
        return {"num_gpus": self.num_gpus, "tokens_per_gpu": self.tokens_per_gpu, "assign": self.assign}


def pack_tokens(lengths: np.ndarray, *, num_gpus: int, tokens_per_gpu: int | None, assign: str) -> Packing:
    """Pack requests of ``lengths`` tokens (the tokens of request 0 first, then request 1, ...) with a budget
    of ``tokens_per_gpu`` (default: the longest request) and reorder the tokens batch by batch."""
    budget = tokens_per_gpu or int(lengths.max())
    unit_req, unit_batch, unit_home = pack_requests(lengths, num_gpus=num_gpus, tokens_per_gpu=budget,
                                                    assign=assign)
    unit_len = np.minimum(lengths[unit_req] - (np.arange(unit_req.size) - np.searchsorted(unit_req, unit_req))
                          * budget, budget)
    tok_batch = np.repeat(unit_batch, unit_len)
    tok_home = np.repeat(unit_home, unit_len)
    perm = np.lexsort((np.arange(tok_home.size), tok_home, tok_batch))  # batches contiguous, a GPU's tokens together
    return Packing(perm=perm, home=tok_home[perm].astype(np.int32), batch=tok_batch[perm].astype(np.int32),
                   num_gpus=num_gpus, tokens_per_gpu=budget, assign=assign)


def _id_ranges(ids: np.ndarray) -> str:
    """Sorted distinct integers as ranges: [1, 2, 3, 7] -> '1-3, 7'."""
    vals = np.asarray(ids, dtype=np.int64)
    if vals.size == 0:
        return "none"
    cuts = np.flatnonzero(np.diff(vals) != 1) + 1
    runs = np.split(vals, cuts)
    return ", ".join(str(r[0]) if r.size == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def _positions(rec: RoutingRecords) -> np.ndarray:
    """Token positions: given, or the order of the rows within (request, layer)."""
    if rec.pos is not None:
        return rec.pos
    n = rec.size
    key = rec.request * (int(rec.layer.max()) - int(rec.layer.min()) + 1) + (rec.layer - rec.layer.min())
    order = np.argsort(key, kind="stable")
    sk = key[order]
    start = np.concatenate([[0], np.flatnonzero(sk[1:] != sk[:-1]) + 1])
    run = np.diff(np.concatenate([start, [n]]))
    pos = np.empty(n, dtype=np.int64)
    pos[order] = np.arange(n) - np.repeat(start, run)
    return pos


def _check_values(rec: RoutingRecords, pos: np.ndarray) -> None:
    """Positions and layers >= 0, gate weights finite and >= 0."""
    n = rec.size
    if n and int(pos.min()) < 0:
        i = int(np.argmax(pos < 0))
        raise InputError(f"token index {int(pos[i])} must be >= 0", source=rec.where(i))
    if n and int(rec.layer.min()) < 0:
        i = int(np.argmax(rec.layer < 0))
        raise InputError(f"layer {int(rec.layer[i])} must be >= 0", source=rec.where(i))
    for name, values in (("token index", pos), ("layer", rec.layer)):
        if n and int(values.max()) > MAX_ID:
            i = int(np.argmax(values > MAX_ID))
            raise InputError(f"{name} {int(values[i])} out of range (at most {MAX_ID})", source=rec.where(i))
    if rec.weights is not None:
        given = np.arange(rec.weights.shape[1])[None, :] < rec.count[:, None]
        bad_w = given & ~(np.isfinite(rec.weights) & (rec.weights >= 0))
        if bad_w.any():
            i = int(np.argmax(bad_w.any(axis=1)))
            raise InputError(f"gate weight {float(rec.weights[i][bad_w[i]][0])} must be a finite number >= 0 (gate "
                             "weights after softmax or sigmoid, not raw router logits)", source=rec.where(i))


@dataclass(frozen=True)
class _Grid:
    """Where each record goes in the dense [tokens, layers] grid."""

    layer_ids: np.ndarray  # [L] the layer ids as written, sorted
    layer: np.ndarray  # [n] index of each record's layer in layer_ids
    tok_ids: np.ndarray  # [T] token keys, sorted (request-major, then position)
    tok: np.ndarray  # [n] index of each record's token in tok_ids
    cell: np.ndarray  # [n] tok * L + layer
    pos_span: int  # max position + 1: tok_ids // pos_span is the token's request

    @property
    def num_layers(self) -> int:
        return int(self.layer_ids.size)

    @property
    def num_tokens(self) -> int:
        return int(self.tok_ids.size)


def _grid(rec: RoutingRecords, pos: np.ndarray) -> _Grid:
    """Tokens (request, position) in request order then position order; a second record for one cell is
    an error naming both."""
    layer_ids, layer = np.unique(rec.layer, return_inverse=True)
    L = layer_ids.size
    span = int(pos.max()) + 1
    tok_ids, tok = np.unique(rec.request * span + pos, return_inverse=True)
    cell = tok * L + layer
    order = np.argsort(cell, kind="stable")
    dup = np.flatnonzero(cell[order][1:] == cell[order][:-1])
    if dup.size:
        i, j = int(order[dup[0]]), int(order[dup[0] + 1])
        first, second = min(i, j), max(i, j)
        raise InputError(f"second record for request {rec.request_names[int(rec.request[i])]}, token "
                         f"{int(pos[i])}, layer {int(rec.layer[i])} (first at {rec.where(first)})",
                         source=rec.where(second))
    return _Grid(layer_ids=layer_ids, layer=layer, tok_ids=tok_ids, tok=tok, cell=cell, pos_span=span)


def _ids_to_top_k(rec: RoutingRecords, top_k: int | None) -> tuple[np.ndarray, int]:
    """(ids padded to K columns, K): K is ``top_k`` or the most ids of any record; no record may have more,
    and no given id may be negative."""
    k_have = int(rec.count.max()) if rec.size else 0
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
    return ids, K


def _num_experts(rec: RoutingRecords, ids: np.ndarray, num_experts: int | None, notes: list[str]) -> int:
    """``num_experts``, or the highest id + 1 (with a note); every id must be below it."""
    E_seen = int(ids.max()) + 1 if rec.size else 0
    if E_seen > MAX_ID:
        i = int(np.argmax((ids >= MAX_ID).any(axis=1)))
        raise InputError(f"expert id {int(ids[i].max())} out of range (at most {MAX_ID - 1})", source=rec.where(i))
    E = num_experts or E_seen
    if not num_experts:
        notes.append(f"num_experts inferred as {E} (highest id + 1); pass --num-experts if some experts never appear")
    if E_seen > E:
        i = int(np.argmax((ids >= E).any(axis=1)))
        raise InputError(f"expert id {int(ids[i].max())} out of range for num_experts={E}", source=rec.where(i))
    return E


def _check_distinct(rec: RoutingRecords, ids: np.ndarray) -> None:
    srt = np.sort(ids, axis=1)
    twice = ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any(axis=1)
    if twice.any():
        i = int(np.argmax(twice))
        raise InputError(f"expert {int(srt[i][1:][(srt[i][1:] == srt[i][:-1])][0])} appears twice in one record",
                         source=rec.where(i))


def _count_short(rec: RoutingRecords, K: int, allow_missing: bool) -> int:
    """Records with fewer than K ids (padded with -1): an error unless allowed or given so on purpose."""
    short = rec.count < K
    if short.any() and not allow_missing and (rec.explicit is None or not rec.explicit[short].all()):
        i = int(np.argmax(short & (True if rec.explicit is None else ~rec.explicit)))
        raise InputError(f"{int(rec.count[i])} expert ids, fewer than top_k={K} ({int(short.sum())} records short in "
                         f"all); {_ALLOW_HINT} pads them with -1, no expert", source=rec.where(i))
    return int(short.sum())


def _count_missing(rec: RoutingRecords, pos: np.ndarray, grid: _Grid, allow_missing: bool) -> int:
    """(token, layer) cells without a record: an error unless allowed, pointing at a sparse layer id (a
    typo?) when there is one, else at the first token short of a layer."""
    T, L = grid.num_tokens, grid.num_layers
    missing = T * L - rec.size
    if not missing or allow_missing:
        return missing
    hint = f"; {_ALLOW_HINT} fills them with -1, no expert"
    per_layer = np.bincount(grid.layer, minlength=L)
    sparse = int(np.argmin(per_layer))
    if 2 * per_layer[sparse] <= per_layer.max():  # a layer id far fewer records use than others: a typo?
        i = int(np.argmax(grid.layer == sparse))
        raise InputError(f"layer {int(grid.layer_ids[sparse])} has records for only {int(per_layer[sparse])} of {T} "
                         f"tokens (the other layer ids: {_id_ranges(np.delete(grid.layer_ids, sparse))}); "
                         f"{missing} (token, layer) records missing in all{hint}", source=rec.where(i))
    require_memory(T * L, f"a grid of {T} tokens x {L} layers", source=rec.request_names[0].split("#")[0])
    have = np.zeros(T * L, dtype=bool)
    have[grid.cell] = True
    t, lay = divmod(int(np.argmin(have)), L)
    i = int(np.argmax(grid.tok == t))
    skipped = f"; {rec.skipped} malformed records were skipped" if rec.skipped else ""
    raise InputError(f"token {int(pos[i])} of request {rec.request_names[int(rec.request[i])]} (its first record "
                     f"is here) has no record for layer {int(grid.layer_ids[lay])} ({missing} (token, layer) records "
                     f"missing in all{skipped}{hint})", source=rec.where(i))


def _dense(rec: RoutingRecords, ids: np.ndarray, grid: _Grid, K: int, E: int, source: str
           ) -> tuple[np.ndarray, np.ndarray | None]:
    """experts [T, L, K] (-1 where no record) and weights (0 there), tokens in request then position order."""
    T, L = grid.num_tokens, grid.num_layers
    require_memory(T * L * K * (4 + (8 if rec.weights is not None else 0)),
                   f"a trace of {T} tokens x {L} layers x top-{K}", source=source)
    dtype = np.int16 if E < 2**15 else np.int32
    experts = np.full((T, L, K), -1, dtype=dtype)
    experts.reshape(T * L, K)[grid.cell] = ids
    if rec.weights is None:
        return experts, None
    wpad = rec.weights if rec.weights.shape[1] == K else np.pad(rec.weights, ((0, 0), (0, K - rec.weights.shape[1])))
    weights = np.zeros((T, L, K), dtype=np.float32)
    weights.reshape(T * L, K)[grid.cell] = wpad
    return experts, weights


def assemble(rec: RoutingRecords, *, num_experts: int | None, top_k: int | None, allow_missing: bool,
             num_gpus: int | None, tokens_per_gpu: int | None, assign: str, model: str, source: str
             ) -> ImportResult:
    """Check ``rec`` as a whole and build the trace (see the module docstring)."""
    notes: list[str] = list(rec.notes)
    pos = _positions(rec)
    if rec.hole is not None:  # skipped rows kept only to hold their positions: drop them now
        keep = np.flatnonzero(~rec.hole)
        rec, pos = drop_rows(rec, keep), pos[keep]
    _check_values(rec, pos)
    grid = _grid(rec, pos)
    ids, K = _ids_to_top_k(rec, top_k)
    E = _num_experts(rec, ids, num_experts, notes)
    _check_distinct(rec, ids)
    padded = _count_short(rec, K, allow_missing)
    missing = _count_missing(rec, pos, grid, allow_missing)
    experts, weights = _dense(rec, ids, grid, K, E, source)
    tok_req = grid.tok_ids // grid.pos_span  # each token's request (tokens sorted by request, position)
    lengths = np.bincount(tok_req, minlength=len(rec.request_names))
    extra: dict[str, Any] = {"layer_ids": [int(v) for v in grid.layer_ids], "requests": int((lengths > 0).sum())}
    home = batch = None
    if num_gpus:
        packing = pack_tokens(lengths, num_gpus=num_gpus, tokens_per_gpu=tokens_per_gpu, assign=assign)
        experts = experts[packing.perm]
        weights = weights[packing.perm] if weights is not None else None
        home, batch = packing.home, packing.batch
        extra["packing"] = packing.to_json()
    meta = TraceMeta(num_experts=E, num_layers=grid.num_layers, top_k=K, model=model, source=source, extra=extra)
    trace = Trace(experts=experts, meta=meta, weights=weights, home=home, batch=batch).validate(source)
    return ImportResult(trace=trace, records=rec.size, skipped=rec.skipped, padded=padded, missing=missing,
                        requests=extra["requests"], notes=notes)


def import_trace(paths: Iterable[str | os.PathLike[str]], *, fmt: str | None = None, num_experts: int | None = None,
                 top_k: int | None = None, num_gpus: int | None = None, tokens_per_gpu: int | None = None,
                 assign: str = "least_loaded", skip_bad: bool = False, allow_missing: bool = False,
                 axes: str = "tlk", model: str = "") -> ImportResult:
    """Read routing logs (any format of :data:`~moesim.traces.readers.table.READERS`) into one :class:`Trace`.

    Files are read in the order given; each file's requests follow the previous file's. With ``num_gpus``,
    requests are packed into batches of at most ``tokens_per_gpu`` tokens per GPU (default: the longest
    request) and given home GPUs by ``assign`` (see :func:`pack_requests`); without it the trace has no
    ``home``/``batch`` arrays and the scenario's ``tokens_per_gpu`` decides the layout at replay.
    """
    plist = [Path(p) for p in paths]
    if not plist:
        raise InputError("no input files")
    _check_assign(assign)
    for name, value, most in (("num_experts", num_experts, MAX_ID), ("top_k", top_k, MAX_ID),
                              ("num_gpus", num_gpus, MAX_GPUS), ("tokens_per_gpu", tokens_per_gpu, MAX_ID)):
        if value is not None and not 1 <= value <= most:
            raise InputError(f"must be from 1 to {most}, got {value}", field=name)
    rec = read_files(plist, fmt, ReadOptions(skip_bad=skip_bad, axes=axes))
    source = ", ".join(str(p) for p in plist) if len(plist) <= 3 else f"{plist[0]} and {len(plist) - 1} more files"
    return assemble(rec, num_experts=num_experts, top_k=top_k, allow_missing=allow_missing, num_gpus=num_gpus,
                    tokens_per_gpu=tokens_per_gpu, assign=assign, model=model, source=source)
