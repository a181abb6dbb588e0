"""SGLang's expert-distribution recorder dumps (``--expert-distribution-recorder-mode``; files
``expert_distribution_recorder_*.pt`` written by ``torch.save`` into ``SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR``),
as SGLang's ``python/sglang/srt/eplb/expert_distribution.py`` writes them:

- ``stat`` (rank 0 writes one file): ``{"rank", "logical_count": int [buffer, layers, logical experts] summed over
  ranks, "average_utilization_rate_over_window"}`` -> a count trace, one window per forward pass in the buffer.
  The buffer is circular (``--expert-distribution-recorder-buffer-size``, default 1000): rows never filled are
  all zero and are dropped; once it wraps, its rows are not in time order (SGLang keeps no index).
- ``per_pass`` (one file per rank): ``{"records": [{"forward_pass_id", "rank", "gatherer_key",
  "global_physical_count": int [layers, physical slots]}, ...], "last_physical_to_logical_map": [layers, P]}``
  -> a count trace: each pass summed over the ranks' files, slots summed into logical experts through the map.
- ``per_token`` (one file per rank): the records also carry ``topk_ids_of_layer`` int32 [layers, tokens, 8] of
  PHYSICAL slot ids padded with -1, and ``input_ids``, ``positions``, ``extend_seq_lens``, ``forward_mode`` ->
  a per-token trace: ids mapped to logical experts through the recorded map, one batch per forward pass, each
  rank's tokens homed on that rank.

Layers: SGLang's rows are every decoder layer (``num_hidden_layers``), dense layers included as rows without
picks; those are dropped and the decoder-layer index of each MoE layer is kept (``layer_ids``). Neither dump
records top_k for counts: ``stat`` and ``per_pass`` need ``--top-k``. Ignored: the utilisation rate, the
gatherer key, ``misc_objects``, token text and positions; the map is the LAST one (SGLang notes it may change
during recording, after a rebalance). Ranks that recorded the very same tokens and routing in a pass (tensor
parallel replicas) are kept once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from moesim.errors import InputError
from moesim.traces.readers.dumps import (
    Dump, DumpOptions, TokenBlock, check_p2l, count_result, int_array, load_torch, physical_to_logical_counts,
    physical_to_logical_ids, sources, token_result)

STAT, PER_PASS, PER_TOKEN = "sglang-stat", "sglang-per-pass", "sglang-per-token"


def sglang_kind(data: Any) -> str | None:
    """Which recorder mode wrote a loaded dump (None: not an SGLang recorder dump)."""
    if not isinstance(data, dict):
        return None
    if "logical_count" in data:
        return STAT
    records = data.get("records")
    if isinstance(records, list) and "last_physical_to_logical_map" in data:
        return PER_TOKEN if records and isinstance(records[0], dict) and "topk_ids_of_layer" in records[0] \
            else PER_PASS
    return None


def _need_top_k(opts: DumpOptions, fmt: str, src: str) -> int:
    if not opts.top_k:
        raise InputError(f"{fmt} dumps do not record top_k (experts per token); give --top-k", source=src,
                         field="top_k")
    return opts.top_k


def _load(path: Path, want: str) -> dict[str, Any]:
    data = load_torch(path)
    kind = sglang_kind(data)
    if kind is None:
        keys = sorted(data)[:8] if isinstance(data, dict) else type(data).__name__
        raise InputError(f"not an SGLang expert-distribution dump (expected 'logical_count' or 'records' with "
                         f"'last_physical_to_logical_map'; found {keys})", source=str(path))
    if want == STAT and kind != STAT:
        raise InputError(f"a {kind} dump, not a stat dump: give --format {kind}", source=str(path))
    if want != STAT and kind == STAT:
        raise InputError(f"a stat dump (logical_count), not {want}: give --format {STAT}", source=str(path))
    if want == PER_TOKEN and kind != PER_TOKEN:
        raise InputError(f"records carry no topk_ids_of_layer (a per_pass dump): give --format {PER_PASS}",
                         source=str(path))
    return data


def read_stat(paths: list[Path], opts: DumpOptions) -> Dump:
    notes: list[str] = []
    parts: list[np.ndarray] = []
    for path in paths:
        opts.tick()
        src = str(path)
        raw = _load(path, STAT)["logical_count"]
        counts = int_array(raw, src, "logical_count", raw.ndim if isinstance(raw, np.ndarray) else 3)
        if counts.ndim == 2:
            counts = counts[None]
        if counts.ndim != 3:
            raise InputError(f"must be [buffer, layers, experts] or [layers, experts], got shape {counts.shape}",
                             source=src, field="logical_count")
        if counts.size and int(counts.min()) < 0:
            raise InputError(f"count {int(counts.min())} must be >= 0", source=src, field="logical_count")
        if parts and counts.shape[1:] != parts[0].shape[1:]:
            raise InputError(f"shape {counts.shape} differs from the first file's {parts[0].shape}", source=src,
                             field="logical_count")
        parts.append(counts)
    loads = np.concatenate(parts)
    filled = loads.sum(axis=(1, 2)) > 0
    if not filled.all():
        notes.append(f"{int((~filled).sum())} buffer rows without picks dropped (never filled); once SGLang's "
                     "circular buffer wraps, its rows are not in time order")
    src = sources(paths)
    top_k = _need_top_k(opts, STAT, src)
    L, E = loads.shape[1:]
    ct = count_result(loads[filled] if filled.any() else loads, list(range(L)), num_decoder_layers=L, top_k=top_k,
                      num_experts=opts.num_experts or E, window_tokens=None, model=opts.model,
                      source=f"SGLang expert-distribution recorder, stat mode ({src})", src=src, notes=notes)
    return Dump(ct, STAT, notes)


def _records(data: dict[str, Any], src: str) -> tuple[list[dict[str, Any]], np.ndarray, int]:
    """The records and the physical-to-logical map [layers, P] with E logical experts."""
    p2l = int_array(data["last_physical_to_logical_map"], src, "last_physical_to_logical_map", 2)
    E = check_p2l(p2l, p2l.shape[0], src, "last_physical_to_logical_map")
    records = data["records"]
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise InputError(f"must be a dict, got {type(rec).__name__}", source=src, field=f"records[{i}]")
        for key in ("forward_pass_id", "rank"):
            value = rec.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InputError(f"must be an integer >= 0, got {value!r}", source=src, field=f"records[{i}].{key}")
    return records, p2l, E


def read_per_pass(paths: list[Path], opts: DumpOptions) -> Dump:
    notes: list[str] = []
    by_pass: dict[int, np.ndarray] = {}
    first: tuple[int, int] | None = None  # (layers, logical experts) of the first file
    for path in paths:
        opts.tick()
        src = str(path)
        records, p2l, E = _records(_load(path, PER_PASS), src)
        if first is not None and (p2l.shape[0], E) != first:
            raise InputError(f"{p2l.shape[0]} layers x {E} logical experts, the first file has {first[0]} x "
                             f"{first[1]}", source=src, field="last_physical_to_logical_map")
        first = (p2l.shape[0], E)
        for i, rec in enumerate(records):
            where = f"records[{i}].global_physical_count"
            if "global_physical_count" not in rec:
                raise InputError("missing", source=src, field=where)
            phys = int_array(rec["global_physical_count"], src, where, 2)
            if phys.shape != p2l.shape:
                raise InputError(f"shape {phys.shape} must equal the map's {p2l.shape}", source=src, field=where)
            if phys.size and int(phys.min()) < 0:
                raise InputError(f"count {int(phys.min())} must be >= 0", source=src, field=where)
            logical = physical_to_logical_counts(phys[None], p2l, E)[0]
            fid = rec["forward_pass_id"]
            by_pass[fid] = by_pass[fid] + logical if fid in by_pass else logical
    src = sources(paths)
    if not by_pass or first is None:
        raise InputError("holds no records", source=src, field="records")
    passes = sorted(by_pass)
    loads = np.stack([by_pass[p] for p in passes])
    top_k = _need_top_k(opts, PER_PASS, src)
    notes.append(f"{len(passes)} forward passes summed over {len(paths)} rank files; physical slots mapped to "
                 "logical experts through last_physical_to_logical_map")
    ct = count_result(loads, list(range(first[0])), num_decoder_layers=first[0], top_k=top_k,
                      num_experts=opts.num_experts or first[1], window_tokens=None, model=opts.model,
                      source=f"SGLang expert-distribution recorder, per_pass mode ({src})", src=src, notes=notes,
                      extra={"forward_pass_ids": [int(p) for p in passes]})
    return Dump(ct, PER_PASS, notes)


def read_per_token(paths: list[Path], opts: DumpOptions) -> Dump:
    notes: list[str] = []
    blocks: list[TokenBlock] = []
    seen: set[tuple[int, int]] = set()
    replicas = 0
    L = None
    for path in paths:
        opts.tick()
        src = str(path)
        records, p2l, _ = _records(_load(path, PER_TOKEN), src)
        if L is not None and p2l.shape[0] != L:
            raise InputError(f"{p2l.shape[0]} layers, the first file has {L}", source=src,
                             field="last_physical_to_logical_map")
        L = p2l.shape[0]
        for i, rec in enumerate(records):
            where = f"records[{i}].topk_ids_of_layer"
            if "topk_ids_of_layer" not in rec:
                raise InputError("missing", source=src, field=where)
            phys = int_array(rec["topk_ids_of_layer"], src, where, 3)
            if phys.shape[0] != L:
                raise InputError(f"shape {phys.shape}: {phys.shape[0]} layers, the map has {L}", source=src,
                                 field=where)
            ids = physical_to_logical_ids(phys, p2l, src, where)
            key = (rec["forward_pass_id"], hash((ids.tobytes(), ids.shape, str(rec.get("input_ids")))))
            if key in seen:
                replicas += 1
                continue
            seen.add(key)
            blocks.append(TokenBlock(window=rec["forward_pass_id"], rank=rec["rank"], ids=ids))
    src = sources(paths)
    if not blocks or L is None:
        raise InputError("holds no records", source=src, field="records")
    if replicas:
        notes.append(f"{replicas} records repeating another rank's tokens and routing in the same pass (tensor-"
                     "parallel replicas) kept once")
    notes.append("physical slot ids mapped to logical experts through last_physical_to_logical_map")
    trace = token_result(blocks, list(range(L)), num_decoder_layers=L, num_experts=opts.num_experts,
                         model=opts.model, source=f"SGLang expert-distribution recorder, per_token mode ({src})",
                         src=src, notes=notes)
    return Dump(trace, PER_TOKEN, notes)
