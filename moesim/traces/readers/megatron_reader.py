"""Megatron-LM's router trace (``--moe-routing-trace-path``), as
``megatron/core/transformer/moe/router_trace.py`` writes it: ``router_trace_rank{r}.jsonl`` per rank, one line
per (step, block, layer) router call: ``{"step", "stage": "pre_dispatch", "block": "decoder" | "mtp", "layer",
"rank", "num_tokens", "topk", "top_indices": [[ids] x num_tokens]}`` (MTP records add ``mtp_idx``).

-> a per-token trace: one batch per step, each rank's tokens homed on that rank. A layer called several times
in one step (micro-batches in training) gives one group of tokens per call, matched across layers by call order.

Layers: ``layer`` is the index in ``decoder.layers`` as the hook parsed it from the module name (0-based, local to
the pipeline stage; Megatron falls back to the module's 1-based ``layer_number`` when the name does not parse).
Every rank must record every layer: ranks of different pipeline stages hold different layers of the same
tokens, which this reader cannot join (import one stage's ranks). MTP records are left out (they are not
decoder layers), with a note. Ignored: ``stage``, and the hidden-state and logit sidecar files.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from moesim.errors import InputError
from moesim.traces.readers.dumps import Dump, DumpOptions, TokenBlock, int_array, jsonl_objects, rank_of, sources
from moesim.traces.readers.dumps import token_result

MEGATRON = "megatron"
_INT_KEYS = ("step", "layer", "num_tokens", "topk")


def read_megatron(paths: list[Path], opts: DumpOptions) -> Dump:
    notes: list[str] = []
    calls: dict[tuple[int, int, int], list[np.ndarray]] = defaultdict(list)  # (rank, step, layer) -> calls
    mtp = 0
    for path in paths:
        opts.tick()
        src = str(path)
        for line, rec in jsonl_objects(path):
            where = f"line {line}"
            if rec.get("block", "decoder") != "decoder" or "mtp_idx" in rec:
                mtp += 1
                continue
            for key in _INT_KEYS:
                value = rec.get(key)
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise InputError(f"{key} must be an integer >= 0, got {value!r}", source=src, field=where)
            rank = rec.get("rank", rank_of(path))
            if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
                raise InputError(f"rank must be an integer >= 0, got {rank!r}", source=src, field=where)
            ids = int_array(rec.get("top_indices"), src, f"{where}: top_indices", 2)
            if ids.shape[0] != rec["num_tokens"] or (ids.size and ids.shape[1] != rec["topk"]):
                raise InputError(f"top_indices of shape {ids.shape} do not match num_tokens={rec['num_tokens']}, "
                                 f"topk={rec['topk']}", source=src, field=where)
            if ids.size and int(ids.min()) < 0:
                raise InputError(f"expert id {int(ids.min())} is negative", source=src, field=where)
            if opts.num_experts and ids.size and int(ids.max()) >= opts.num_experts:
                raise InputError(f"expert id {int(ids.max())} out of range for num_experts={opts.num_experts}",
                                 source=src, field=where)
            calls[(rank, rec["step"], rec["layer"])].append(ids.reshape(ids.shape[0], -1))
    src = sources(paths)
    if mtp:
        notes.append(f"{mtp} MTP router records left out (not decoder layers)")
    if not calls:
        raise InputError("holds no decoder router records", source=src)
    blocks, layers = _blocks(calls, src)
    trace = token_result(blocks, layers, num_decoder_layers=None, num_experts=opts.num_experts, model=opts.model,
                         source=f"Megatron-LM router trace ({src})", src=src, notes=notes)
    return Dump(trace, MEGATRON, notes)


def _blocks(calls: dict[tuple[int, int, int], list[np.ndarray]], src: str) -> tuple[list[TokenBlock], list[int]]:
    """One block per (rank, step): each layer's calls concatenated in call order, the same tokens at every
    layer."""
    layers = sorted({lay for _, _, lay in calls})
    groups = sorted({(r, s) for r, s, _ in calls})
    blocks = []
    for rank, step in groups:
        missing = [lay for lay in layers if (rank, step, lay) not in calls]
        if missing:
            raise InputError(f"rank {rank}, step {step} has no record for layers {missing[:8]} that other records "
                             "have (pipeline stages? import the ranks of one stage together)", source=src)
        per_layer = [calls[(rank, step, lay)] for lay in layers]
        sizes = [[c.shape[0] for c in cl] for cl in per_layer]
        if any(s != sizes[0] for s in sizes):
            bad = layers[next(i for i, s in enumerate(sizes) if s != sizes[0])]
            raise InputError(f"rank {rank}, step {step}: layer {bad} routed calls of {sizes[layers.index(bad)]} "
                             f"tokens, layer {layers[0]} of {sizes[0]}: the same tokens must reach every layer",
                             source=src)
        K = max(c.shape[1] for cl in per_layer for c in cl)
        stacked = [np.concatenate([np.pad(c, ((0, 0), (0, K - c.shape[1])), constant_values=-1) for c in cl])
                   for cl in per_layer]
        blocks.append(TokenBlock(window=step, rank=rank, ids=np.stack(stacked)))
    return blocks, layers
