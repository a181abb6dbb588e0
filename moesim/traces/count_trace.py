"""Count traces: how many tokens picked each expert, per window and MoE layer, when a dump holds no per-token
paths; their ``.npz`` format (``moesim.counts/1``); and the labelled synthetic expansion to a per-token trace.

Serving engines' recorders mostly write counts, not paths: SGLang's ``stat`` mode (logical_count per forward
pass), TensorRT-LLM's expert statistics (a bincount per iteration and layer), vLLM's proposed load statistics.
A :class:`CountTrace` holds ``loads`` int64 [windows, MoE layers, logical experts] (a window is what the dump
counts over: a forward pass, an iteration, or a group of them), the trace's ``meta`` (num_layers = MoE layers,
top_k, model, source), the decoder-layer index of each MoE layer when the dump says (``layer_ids``, with
``num_decoder_layers``), and the tokens of each window when known (``window_tokens``).

What a count trace supports (``what_counts_support``, also in docs/engine_formats.md):

=====================================================  ==================================================
use                                                    with counts only
=====================================================  ==================================================
EPLB replica planning (per-layer expert loads)         yes
greedy and ILP placement: the load / balance terms     yes
per-window imbalance, load skew, drift across windows  yes
per-token all-to-all traffic, simulated end-to-end     only via :func:`expand_counts`, labelled synthetic
cross-layer affinity (transitions), co-activation      only via :func:`expand_counts`: carries none
anything reading real per-token paths                  refused (:func:`refuse_counts`)
=====================================================  ==================================================

:func:`expand_counts` is the one documented bridge: per window and layer, it lays the window's picks out over
``T`` tokens so that every count is reproduced exactly (scaled by largest remainders when another token count
is asked for), each token's ``top_k`` experts are distinct, and a token picks expert ``e`` with probability
``count_e / T``. Layers are arranged independently (token order shuffled per layer), so the expansion has NO
cross-layer affinity, and its same-token co-activation comes from a random arrangement, not from the dump;
its ``meta.source`` starts with "synthetic expansion of counts" so every output made from it says so.

Deliberately ignored: physical slots and replicas (counts are per logical expert; readers map physical
counts back), which rank a token came from, and gate weights.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from moesim.budget import require_memory
from moesim.errors import InputError
from moesim.fileio import atomic_write
from moesim.loaders import load_json, require_regular_file
from moesim.traces.counts import count_window_picks
from moesim.traces.format import MAX_COUNT, Trace, TraceMeta
from moesim.traces.npyfile import npz_names, read_npz

FORMAT = "moesim.counts/1"
SYNTHETIC = "synthetic expansion of counts"
_ARRAYS = ("loads", "window_tokens", "meta")
_META_KEYS = {"format", "num_experts", "num_layers", "top_k", "model", "source", "layer_ids", "num_decoder_layers",
              "windows"}

what_counts_support: Mapping[str, str] = {
    "eplb": "yes: replicas are planned from per-layer expert loads",
    "greedy and ilp load terms": "yes: loads per (layer, expert) are what they balance",
    "imbalance, load skew, drift across windows": "yes",
    "per-token all-to-all traffic and end-to-end simulation": "only via expand_counts (labelled synthetic)",
    "cross-layer affinity and co-activation": "only via expand_counts, which carries none (layers independent)",
    "anything reading real per-token paths": "refused: import a per-token dump instead",
}


@dataclass(frozen=True)
class CountTrace:
    """Picks per (window, MoE layer, logical expert), validated on construction (InputError naming the field)."""

    loads: np.ndarray  # int64 [windows, num_moe_layers, num_experts]
    meta: TraceMeta  # num_layers = MoE layers; num_experts = logical experts
    layer_ids: tuple[int, ...] | None = None  # decoder-layer index of each MoE layer, when the dump says
    num_decoder_layers: int | None = None
    window_tokens: np.ndarray | None = None  # int64 [windows], tokens per window when known
    source: str | None = field(default=None, compare=False)  # file named in validation errors

    def __post_init__(self) -> None:
        src = self.source
        object.__setattr__(self, "loads", _check_loads(self.loads, self.meta, src))
        if self.layer_ids is not None:
            object.__setattr__(self, "layer_ids", _check_layer_ids(self.layer_ids, self.meta.num_layers,
                                                                   self.num_decoder_layers, src))
        elif self.num_decoder_layers is not None:
            _check_decoder_layers(self.num_decoder_layers, self.meta.num_layers, src)
        if self.window_tokens is not None:
            object.__setattr__(self, "window_tokens", _check_window_tokens(self.window_tokens, self.loads,
                                                                           self.meta.top_k, src))

    @property
    def num_windows(self) -> int:
        return int(self.loads.shape[0])

    def total(self) -> np.ndarray:
        """Picks per (MoE layer, expert) over every window: int64 [L, E]."""
        return self.loads.sum(axis=0)

    def tokens(self) -> np.ndarray:
        """Tokens per window: ``window_tokens`` when known, else the fewest that could have made the counts
        (every layer's picks over top_k, and no expert picked twice by one token), int64 [W]."""
        if self.window_tokens is not None:
            return self.window_tokens
        per_layer = -(-self.loads.sum(axis=2) // self.meta.top_k)  # ceil(picks / top_k), [W, L]
        most = self.loads.max(axis=2, initial=0)
        return np.maximum(per_layer, most).max(axis=1, initial=0).astype(np.int64)

    def windows(self, index: slice | np.ndarray) -> "CountTrace":
        """The count trace of some windows (e.g. plan on the first half, score on the second)."""
        wt = None if self.window_tokens is None else self.window_tokens[index]
        return CountTrace(loads=self.loads[index], meta=self.meta, layer_ids=self.layer_ids,
                          num_decoder_layers=self.num_decoder_layers, window_tokens=wt, source=self.source)


def _check_loads(loads: Any, meta: TraceMeta, src: str | None) -> np.ndarray:
    arr = np.asarray(loads)
    if arr.ndim != 3:
        raise InputError(f"must be 3-D [windows, layers, experts], got shape {arr.shape}", source=src, field="loads")
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"must be integer, got {arr.dtype}", source=src, field="loads")
    for key in ("num_experts", "num_layers", "top_k"):
        value = getattr(meta, key)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_COUNT:
            raise InputError(f"must be a positive integer up to {MAX_COUNT}, got {value!r}", source=src,
                             field=f"meta.{key}")
    if meta.top_k > meta.num_experts:
        raise InputError(f"top_k={meta.top_k} exceeds num_experts={meta.num_experts}", source=src, field="meta.top_k")
    if arr.shape[1:] != (meta.num_layers, meta.num_experts):
        raise InputError(f"shape {arr.shape} does not match meta num_layers={meta.num_layers}, "
                         f"num_experts={meta.num_experts}", source=src, field="loads")
    if arr.shape[0] == 0:
        raise InputError("holds no windows: a count trace needs at least one", source=src, field="loads")
    if arr.dtype == np.uint64 and int(arr.max()) > np.iinfo(np.int64).max:
        raise InputError(f"count {int(arr.max())} too large", source=src, field="loads")
    arr = arr.astype(np.int64, copy=False)
    if int(arr.min()) < 0:
        w, lay, e = (int(i[0]) for i in np.nonzero(arr < 0))
        raise InputError(f"count {int(arr[w, lay, e])} at window {w}, layer {lay}, expert {e} must be >= 0",
                         source=src, field="loads")
    return arr


def _check_decoder_layers(n: Any, num_layers: int, src: str | None) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or not num_layers <= n <= MAX_COUNT:
        raise InputError(f"must be an integer from num_layers={num_layers} (MoE layers) up to {MAX_COUNT}, got {n!r}",
                         source=src, field="num_decoder_layers")


def _check_layer_ids(ids: Any, num_layers: int, num_decoder: int | None, src: str | None) -> tuple[int, ...]:
    vals = tuple(ids)
    if len(vals) != num_layers or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in vals):
        raise InputError(f"must be {num_layers} integers (one decoder-layer index per MoE layer), got {list(vals)!r}",
                         source=src, field="layer_ids")
    out = tuple(int(v) for v in vals)
    if out and (out[0] < 0 or any(b <= a for a, b in zip(out, out[1:]))):
        raise InputError(f"must be increasing decoder-layer indices >= 0, got {list(out)}", source=src,
                         field="layer_ids")
    if num_decoder is not None:
        _check_decoder_layers(num_decoder, num_layers, src)
        if out and out[-1] >= num_decoder:
            raise InputError(f"index {out[-1]} out of range for num_decoder_layers={num_decoder}", source=src,
                             field="layer_ids")
    return out


def _check_window_tokens(tokens: Any, loads: np.ndarray, top_k: int, src: str | None) -> np.ndarray:
    arr = np.asarray(tokens)
    if arr.shape != (loads.shape[0],) or not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"must be integer [windows={loads.shape[0]}], got {arr.dtype} {arr.shape}", source=src,
                         field="window_tokens")
    arr = arr.astype(np.int64, copy=False)
    if int(arr.min()) < 0:
        raise InputError(f"window {int(np.argmax(arr < 0))} has {int(arr.min())} tokens; must be >= 0", source=src,
                         field="window_tokens")
    picks = loads.sum(axis=2)  # [W, L]
    over = picks > arr[:, None] * top_k
    if over.any():
        w, lay = (int(i[0]) for i in np.nonzero(over))
        raise InputError(f"window {w} counts {int(picks[w, lay])} picks at layer {lay}, more than its {int(arr[w])} "
                         f"tokens x top_k={top_k}", source=src, field="window_tokens")
    most = loads.max(axis=2)
    twice = most > arr[:, None]
    if twice.any():
        w, lay = (int(i[0]) for i in np.nonzero(twice))
        raise InputError(f"window {w}, layer {lay}: an expert counted {int(most[w, lay])} times, more than the "
                         f"window's {int(arr[w])} tokens", source=src, field="window_tokens")
    return arr


# ---------------------------------------------------------------- the .npz format

def is_counts_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` looks like a count trace moesim wrote (a ``.npz`` holding ``loads`` and ``meta``)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return {"loads.npy", "meta.npy"} <= set(zf.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def save_counts(path: str | os.PathLike[str], ct: CountTrace) -> Path:
    """Write ``ct`` as a ``.npz`` of format ``moesim.counts/1``, atomically."""
    m = ct.meta
    meta: dict[str, Any] = dict(m.extra)
    meta.update({"format": FORMAT, "num_experts": m.num_experts, "num_layers": m.num_layers, "top_k": m.top_k,
                 "model": m.model, "source": m.source, "windows": ct.num_windows,
                 "layer_ids": None if ct.layer_ids is None else list(ct.layer_ids),
                 "num_decoder_layers": ct.num_decoder_layers})
    arrays = {"loads": ct.loads}
    if ct.window_tokens is not None:
        arrays["window_tokens"] = ct.window_tokens
    arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))

    def write(fh: Any) -> None:
        np.savez_compressed(fh, **arrays)  # type: ignore[arg-type]  # numpy stubs: allow_pickle kw

    return atomic_write(path, write, binary=True)


def _int_field(meta: dict[str, Any], key: str, src: str) -> int:
    value = meta.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_COUNT:
        raise InputError(f"must be a positive integer up to {MAX_COUNT}, got {value!r}", source=src,
                         field=f"meta.{key}")
    return value


def _parse_meta(arr: np.ndarray, src: str) -> dict[str, Any]:
    if arr.ndim != 0 or arr.dtype.kind != "U":
        raise InputError(f"must be a JSON object as one string, got {arr.dtype} {arr.shape}", source=src, field="meta")
    try:
        raw = load_json(str(arr), src)
    except InputError as exc:
        raise exc.at(field_prefix="meta") from None
    if not isinstance(raw, dict):
        raise InputError("must be a JSON object", source=src, field="meta")
    if raw.get("format") != FORMAT:
        hint = " (a per-token trace: load it with load_trace)" if raw.get("format") == "moesim.trace/1" else ""
        raise InputError(f"must be {FORMAT!r}, got {raw.get('format')!r}{hint}", source=src, field="meta.format")
    return raw


def load_counts(path: str | os.PathLike[str]) -> CountTrace:
    """Read and validate a ``moesim.counts/1`` file; every problem is an InputError naming file and field."""
    src = str(path)
    require_regular_file(path, src)
    try:
        with open(path, "rb") as fh:
            magic = fh.read(2)
    except OSError as exc:
        raise InputError(f"cannot read ({exc.strerror})", source=src) from None
    if magic != b"PK":
        raise InputError("not a .npz count trace (an engine dump? convert it with 'moesim trace import')", source=src)
    names = npz_names(path, src)
    for key in ("loads", "meta"):
        if key not in names:
            hint = ": a per-token trace, not counts?" if "experts" in names else ""
            raise InputError(f"missing{hint}", source=src, field=key)
    for key in names:
        if key not in _ARRAYS:
            raise InputError(f"unknown array; expected {', '.join(_ARRAYS)}", source=src, field=key)
    data = read_npz(path, src)
    raw = _parse_meta(data["meta"], src)
    meta = TraceMeta(num_experts=_int_field(raw, "num_experts", src), num_layers=_int_field(raw, "num_layers", src),
                     top_k=_int_field(raw, "top_k", src), model=str(raw.get("model", "")),
                     source=str(raw.get("source", "")), extra={k: v for k, v in raw.items() if k not in _META_KEYS})
    layer_ids = raw.get("layer_ids")
    if layer_ids is not None and not isinstance(layer_ids, list):
        raise InputError(f"must be a list of integers or null, got {layer_ids!r}", source=src, field="meta.layer_ids")
    try:
        return CountTrace(loads=data["loads"], meta=meta, layer_ids=None if layer_ids is None else tuple(layer_ids),
                          num_decoder_layers=raw.get("num_decoder_layers"), window_tokens=data.get("window_tokens"),
                          source=src)
    except InputError as exc:
        if exc.field in ("layer_ids", "num_decoder_layers"):
            raise exc.at(field_prefix="meta") from None
        raise


# ---------------------------------------------------------------- refusing and expanding

def refuse_counts(what: str, source: str | None = None) -> InputError:
    """The error for a use that needs real per-token paths, given a count trace (the caller raises it)."""
    return InputError(f"is a count trace (expert loads per window, no per-token paths); {what} needs per-token "
                      "routing: import a per-token dump, or expand the counts with expand_counts (synthetic, "
                      "labelled, no cross-layer affinity)", source=source)


def _scaled(counts: np.ndarray, have: int, want: int) -> np.ndarray:
    """``counts`` (one layer of one window, [E]) scaled from ``have`` tokens to ``want`` by largest remainders:
    the total is round(total x want / have), no count exceeds ``want`` when none exceeded ``have``."""
    if want == have:
        return counts
    exact = counts * (want / have)
    out = np.floor(exact).astype(np.int64)
    extra = int(round(float(counts.sum()) * want / have)) - int(out.sum())
    if extra > 0:
        order = np.argsort(-(exact - out), kind="stable")
        out[order[:extra]] += 1
    return out


def _arrange(counts: np.ndarray, T: int, K: int, rng: np.random.Generator) -> np.ndarray:
    """[T, K] expert ids (-1 padded) holding every expert ``counts[e]`` times, never twice in one token: the
    picks, experts in random order, fill the slots column by column (an expert's <= T copies land on distinct
    tokens); the rows are then shuffled."""
    order = rng.permutation(counts.size)
    picks = np.repeat(order, counts[order])
    slots = np.full(T * K, -1, dtype=np.int64)
    slots[: picks.size] = picks
    grid = slots.reshape(K, T).T
    return grid[rng.permutation(T)]


def expand_counts(ct: CountTrace, tokens_per_window: int | None, rng: np.random.Generator) -> Trace:
    """A per-token trace with the counts of ``ct`` (see the module docstring): ``tokens_per_window`` tokens
    per window (default: each window's own tokens, :meth:`CountTrace.tokens`), one batch per window with
    picks; windows without picks are left out. The result's ``meta.source`` says it is synthetic."""
    if tokens_per_window is not None and not 1 <= tokens_per_window <= MAX_COUNT:
        raise InputError(f"must be from 1 to {MAX_COUNT}, got {tokens_per_window}", field="tokens_per_window")
    have = ct.tokens()
    keep = np.flatnonzero(ct.loads.sum(axis=(1, 2)) > 0)
    if keep.size == 0:
        raise InputError("holds no picks in any window: nothing to expand", source=ct.source, field="loads")
    want = np.full(keep.size, tokens_per_window, dtype=np.int64) if tokens_per_window else have[keep]
    L, K = ct.meta.num_layers, ct.meta.top_k
    total = int(want.sum())
    require_memory(total * L * K * 4.0, f"expanding counts to {total} tokens x {L} layers x top-{K}",
                   source=ct.source)
    dtype = np.int16 if ct.meta.num_experts < 2**15 else np.int32
    experts = np.empty((total, L, K), dtype=dtype)
    start = 0
    for w, T in zip(keep.tolist(), want.tolist()):
        for lay in range(L):
            counts = _scaled(ct.loads[w, lay], int(have[w]), T)
            experts[start : start + T, lay] = _arrange(counts, T, K, rng)
        start += T
    batch = np.repeat(np.arange(keep.size, dtype=np.int32), want)
    extra = dict(ct.meta.extra)
    extra.update({"expanded_from": {"windows": [int(w) for w in keep], "tokens_per_window": tokens_per_window,
                                    "layer_ids": None if ct.layer_ids is None else list(ct.layer_ids),
                                    "num_decoder_layers": ct.num_decoder_layers}})
    meta = TraceMeta(num_experts=ct.meta.num_experts, num_layers=L, top_k=K, model=ct.meta.model,
                     source=f"{SYNTHETIC} ({ct.meta.source or 'unnamed'}): no cross-layer affinity", extra=extra)
    return Trace(experts=experts, meta=meta, batch=batch).validate(ct.source)


def counts_of_trace(trace: Trace, window: np.ndarray | None = None) -> CountTrace:
    """The count trace of a per-token trace: one window per batch (``window`` int [tokens] overrides; without
    either, one window of every token)."""
    T = trace.num_tokens
    if window is None:
        window = trace.batch if trace.batch is not None else np.zeros(T, dtype=np.int64)
    window = np.asarray(window, dtype=np.int64)
    loads = count_window_picks(trace.experts, trace.meta.num_experts, window)
    tokens = np.bincount(window, minlength=loads.shape[0]).astype(np.int64)
    ids = trace.meta.extra.get("layer_ids")
    layer_ids = tuple(ids) if isinstance(ids, list) and len(ids) == trace.meta.num_layers else None
    return CountTrace(loads=loads, meta=trace.meta, layer_ids=layer_ids, window_tokens=tokens)
