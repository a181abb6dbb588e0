"""vLLM's load statistics (an UNMERGED proposal) and per-request routed experts (vLLM and SGLang).

``vllm-stats``: the JSONL that vLLM's open pull request #41141 ("offline EPLB", ``expert_load_stats_path``, later
``write_stats_path``) writes, one record per logged step. This follows an unmerged proposal whose field names
may still change. First revision: ``{"record_type": "eplb_load_stats", "version": 1, "model", "step",
"next_rearrange", "num_ranks", "num_layers", "experts_per_rank", "tokens": [L][R], "expert_load": [L][P],
"p2l_map": [L][P]}``; the later revision first writes one header ``{"record_type": "eplb_load_meta",
"version": 1, "model", "num_ranks", "num_groups", "num_nodes", "num_layers", "num_redundant_experts"}`` and its
stats records carry only ``step``, ``expert_load`` and ``p2l_map``. -> a count trace, one window per record,
physical slots summed into logical experts through that record's ``p2l_map`` (as the PR's
``tools/eplb/generate_static_mapping.py`` does). Layers are MoE-layer indices 0..L-1. top_k is not recorded
(``--top-k``). Ignored: ``tokens`` (per-rank picks, derivable), ``experts_per_rank`` (display only).

``routed-experts``: requests returned with vLLM's ``enable_return_routed_experts`` or SGLang's
``return_routed_experts``, saved as JSON (one response or a list) or JSONL (one per line). Each request holds
``routed_experts`` (top level or in ``meta_info``): nested lists [tokens][layers][k], or SGLang's base64 string
of int32 [tokens, layers, k] (flattened; ``--layers`` and ``--top-k`` give its shape). Layers without any pick
(dense layers, -1 placeholders) are dropped. Ids are read as logical experts: whether an engine returns
physical slots when EPLB is on is not confirmed. -> a per-token trace, requests in file order (no batches:
``moesim trace import --gpus`` packing does not apply; the scenario's tokens_per_gpu lays them out).
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from moesim.errors import InputError
from moesim.loaders import read_json
from moesim.traces.readers.dumps import (
    Dump, DumpOptions, TokenBlock, check_p2l, count_result, int_array, jsonl_objects, physical_to_logical_counts,
    sources, token_result)

VLLM_STATS = "vllm-stats"
ROUTED = "routed-experts"
UNMERGED = "following vLLM's unmerged proposal #41141 (field names may change)"


def read_vllm_stats(paths: list[Path], opts: DumpOptions) -> Dump:
    notes: list[str] = [f"vLLM load statistics {UNMERGED}"]
    windows: list[np.ndarray] = []
    steps: list[int] = []
    shape: tuple[int, int] | None = None
    model = opts.model
    for path in paths:
        opts.tick()
        src = str(path)
        header_seen, stats_seen = False, False
        for line, rec in jsonl_objects(path):
            where = f"line {line}"
            kind = rec.get("record_type")
            if rec.get("version") != 1:
                raise InputError(f"version must be 1, got {rec.get('version')!r}", source=src, field=where)
            if kind == "eplb_load_meta":
                if header_seen or stats_seen:
                    raise InputError("eplb_load_meta must come first, once", source=src, field=where)
                header_seen = True
                model = model or str(rec.get("model", ""))
                continue
            if kind != "eplb_load_stats":
                raise InputError(f"record_type must be eplb_load_stats or eplb_load_meta, got {kind!r}", source=src,
                                 field=where)
            model, stats_seen = model or str(rec.get("model", "")), True
            load = int_array(rec.get("expert_load"), src, f"{where}: expert_load", 2)
            p2l = int_array(rec.get("p2l_map"), src, f"{where}: p2l_map", 2)
            E = check_p2l(p2l, load.shape[0], src, f"{where}: p2l_map")
            if load.shape != p2l.shape:
                raise InputError(f"expert_load of shape {load.shape} must match p2l_map's {p2l.shape}", source=src,
                                 field=where)
            if shape is not None and (load.shape[0], E) != shape:
                raise InputError(f"{load.shape[0]} layers x {E} experts, earlier records {shape[0]} x {shape[1]}",
                                 source=src, field=where)
            if load.size and int(load.min()) < 0:
                raise InputError(f"load {int(load.min())} must be >= 0", source=src, field=f"{where}: expert_load")
            shape = (load.shape[0], E)
            windows.append(physical_to_logical_counts(load[None], p2l, E)[0])
            step = rec.get("step")
            steps.append(step if isinstance(step, int) and not isinstance(step, bool) else len(steps))
    src = sources(paths)
    if not windows or shape is None:
        raise InputError("holds no eplb_load_stats records", source=src)
    if not opts.top_k:
        raise InputError("vLLM load statistics do not record top_k (experts per token); give --top-k", source=src,
                         field="top_k")
    ct = count_result(np.stack(windows), None, num_decoder_layers=None, top_k=opts.top_k,
                      num_experts=opts.num_experts or shape[1], window_tokens=None, model=model,
                      source=f"vLLM EPLB load statistics, {UNMERGED} ({src})", src=src, notes=notes,
                      extra={"steps": steps})
    return Dump(ct, VLLM_STATS, notes)


def _requests(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, request) for each request of a JSON or JSONL file."""
    src = str(path)
    if path.suffix == ".json":
        data = read_json(path, src)
        items = data if isinstance(data, list) else [data]
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise InputError(f"must be a JSON object, got {type(item).__name__}", source=src, field=f"[{i}]")
            yield f"[{i}]", item
    else:
        for line, rec in jsonl_objects(path):
            yield f"line {line}", rec


def _routed(rec: dict[str, Any], src: str, where: str, opts: DumpOptions) -> np.ndarray:
    """A request's routed experts as [tokens, layers, k]."""
    meta = rec.get("meta_info")
    value = rec.get("routed_experts", meta.get("routed_experts") if isinstance(meta, dict) else None)
    if value is None:
        raise InputError("no routed_experts (top level or in meta_info)", source=src, field=where)
    if not isinstance(value, str):
        return int_array(value, src, f"{where}: routed_experts", 3)
    if not opts.layers or not opts.top_k:
        raise InputError("base64 routed_experts is a flat int32 array: give --layers and --top-k for its shape",
                         source=src, field=f"{where}: routed_experts")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("not valid base64", source=src, field=f"{where}: routed_experts") from None
    per_token = opts.layers * opts.top_k
    if len(raw) % (4 * per_token):
        raise InputError(f"{len(raw)} bytes are not whole tokens of {opts.layers} layers x top-{opts.top_k} int32 "
                         "ids", source=src, field=f"{where}: routed_experts")
    return np.frombuffer(raw, dtype="<i4").astype(np.int64).reshape(-1, opts.layers, opts.top_k)


def read_routed_experts(paths: list[Path], opts: DumpOptions) -> Dump:
    notes: list[str] = ["ids read as logical experts (with EPLB on, an engine may return physical slots: check)"]
    blocks: list[TokenBlock] = []
    L: int | None = None
    for path in paths:
        opts.tick()
        src = str(path)
        for where, rec in _requests(path):
            ids = _routed(rec, src, where, opts)
            if L is not None and ids.shape[1] != L:
                raise InputError(f"{ids.shape[1]} layers, earlier requests have {L}", source=src,
                                 field=f"{where}: routed_experts")
            L = ids.shape[1]
            if ids.size and int(ids.min()) < -1:
                raise InputError(f"expert id {int(ids.min())} out of range (-1 = none)", source=src,
                                 field=f"{where}: routed_experts")
            if opts.num_experts and ids.size and int(ids.max()) >= opts.num_experts:
                raise InputError(f"expert id {int(ids.max())} out of range for num_experts={opts.num_experts}",
                                 source=src, field=f"{where}: routed_experts")
            blocks.append(TokenBlock(window=len(blocks), rank=0, ids=ids.transpose(1, 0, 2)))
    src = sources(paths)
    if not blocks or L is None:
        raise InputError("holds no requests", source=src)
    trace = token_result(blocks, list(range(L)), num_decoder_layers=None, num_experts=opts.num_experts,
                         model=opts.model, source=f"routed experts returned per request ({src})", src=src,
                         notes=notes, batched=False)
    trace.meta.extra["requests"] = len(blocks)
    return Dump(trace, ROUTED, notes)


def looks_like(obj: dict[str, Any]) -> str | None:
    """The format a JSON object's keys suggest (vllm-stats, routed-experts, megatron), or None."""
    if obj.get("record_type") in ("eplb_load_stats", "eplb_load_meta") or {"expert_load", "p2l_map"} <= set(obj):
        return VLLM_STATS
    meta = obj.get("meta_info")
    if "routed_experts" in obj or (isinstance(meta, dict) and "routed_experts" in meta):
        return ROUTED
    if {"step", "layer", "top_indices"} <= set(obj):
        return "megatron"
    return None

