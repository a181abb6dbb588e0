"""What the serving-engine dump readers share: opening torch, safetensors and JSONL files without trusting them,
mapping physical expert slots back to logical experts, and building the result (a per-token
:class:`~moesim.traces.format.Trace` or a :class:`~moesim.traces.count_trace.CountTrace`).

Safety: ``torch.save`` files are opened with ``torch.load(weights_only=True)`` only, which unpickles nothing but
tensors, plain containers and numbers: a pickled object of any other class is refused before its code can run.
torch and safetensors are the optional extra ``engines`` (``pip install 'moesim[engines]'``); a missing one is
an error naming the extra. Every problem is an :class:`~moesim.errors.InputError` naming the file and the field
(the record, key or line).

Layers: engines index layers differently (SGLang: every decoder layer, dense ones as empty rows; TensorRT-LLM:
the decoder-layer index of each MoE layer; Megatron: the ``decoder.layers`` index; vLLM: MoE layers 0..L-1).
Readers pass the layer ids as the engine wrote them; layers that hold no pick anywhere in the dump (dense
layers) are dropped here and the kept ids are recorded (``layer_ids``). Deliberately ignored: gate weights
(no engine dump here records them) and which token is which request.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from moesim.budget import require_memory
from moesim.errors import InputError
from moesim.loaders import read_text, require_regular_file, unique_pairs
from moesim.traces.count_trace import CountTrace
from moesim.traces.format import MAX_COUNT, Trace, TraceMeta

EXTRA = "pip install 'moesim[engines]'"
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}  # safetensors dtype -> bytes
MAX_ID = 2**31 - 1


@dataclass(frozen=True)
class DumpOptions:
    """What the user may add to a dump that lacks it: expert count, top-k, MoE layers (base64 routed experts),
    and the model name stored."""

    num_experts: int | None = None
    top_k: int | None = None
    layers: int | None = None
    model: str = ""
    progress: Callable[[int], object] | None = None  # told of each file read

    def tick(self) -> None:
        if self.progress is not None:
            self.progress(1)


@dataclass(frozen=True)
class Dump:
    """An imported dump: the trace or counts, the format read, and notes for the import summary."""

    data: Trace | CountTrace
    format: str
    notes: list[str] = field(default_factory=list)


def sources(paths: Sequence[Path]) -> str:
    return ", ".join(str(p) for p in paths) if len(paths) <= 3 else f"{paths[0]} and {len(paths) - 1} more files"


# ---------------------------------------------------------------- opening files

def load_torch(path: Path) -> Any:
    """A ``torch.save`` file's contents, with tensors as numpy arrays; only plain tensors and containers."""
    src = str(path)
    size = require_regular_file(path, src)
    require_memory(size * 3.0, f"reading a {size / 1e9:.2f} GB torch file", source=src)
    try:
        import torch
    except ImportError:
        raise InputError(f"reading torch.save dumps needs torch: {EXTRA}", source=src) from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError (damaged zip), EOFError ...
        first = " ".join(str(exc).split("\n")[0].split())[:200]
        raise InputError(f"not a file of plain tensors: torch.load(weights_only=True) refused it "
                         f"({type(exc).__name__}: {first})", source=src) from None
    return _to_numpy(data, torch)


def _to_numpy(value: Any, torch: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy() if value.dtype != torch.bfloat16 else value.float().numpy()
    if isinstance(value, dict):
        return {k: _to_numpy(v, torch) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_numpy(v, torch) for v in value]
    return value


def load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a ``.safetensors`` file as numpy (no torch needed); a damaged header names ``header``, a
    damaged tensor its key."""
    src = str(path)
    size = require_regular_file(path, src)
    require_memory(size * 2.0, f"reading a {size / 1e9:.2f} GB safetensors file", source=src)
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise InputError(f"reading safetensors dumps needs safetensors: {EXTRA}", source=src) from None
    _check_safetensors_size(path, size, src)
    out: dict[str, np.ndarray] = {}
    key = "header"
    try:
        with safe_open(str(path), framework="np") as fh:
            for key in fh.keys():
                out[key] = fh.get_tensor(key)
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        first = " ".join(str(exc).split())[:200]
        raise InputError(f"damaged safetensors file ({type(exc).__name__}: {first})", source=src, field=key) from None
    return out


def _check_safetensors_size(path: Path, size: int, src: str) -> None:
    """The header's last data offset must lie within the file: a truncated file is named before it is read."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 2 <= n <= min(size - 8, 100 << 20):
                raise InputError(f"damaged safetensors file (header length {n} in a file of {size} bytes)",
                                 source=src, field="header")
            header = json.loads(fh.read(n))  # (a key given twice: safetensors refuses it below)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"damaged safetensors file (header is not JSON: {str(exc)[:120]})", source=src,
                         field="header") from None
    if not isinstance(header, dict):
        raise InputError("damaged safetensors file (header is not a JSON object)", source=src, field="header")
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or offsets[1] > size - 8 - n):
            raise InputError(f"truncated or damaged: data_offsets {offsets} beyond the file's {size - 8 - n} data "
                             "bytes", source=src, field=key)
        shape, itemsize = info.get("shape"), _ITEMSIZE.get(str(info.get("dtype")))
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape) or itemsize is None:
            raise InputError(f"damaged: dtype {info.get('dtype')!r}, shape {shape!r}", source=src, field=key)
        if int(np.prod(shape, dtype=object)) * itemsize != offsets[1] - offsets[0]:
            raise InputError(f"damaged: shape {shape} of {info.get('dtype')} does not fill its "
                             f"{offsets[1] - offsets[0]} bytes", source=src, field=key)


def jsonl_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a JSONL file; a line that is not a JSON object is an
    error naming it."""
    src = str(path)
    for i, line in enumerate(read_text(path, src, per_byte=12).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"line {i}"
        try:
            obj = json.loads(line, object_pairs_hook=unique_pairs)
        except (ValueError, RecursionError) as exc:
            raise InputError(f"not valid JSON ({' '.join(str(exc).split())[:160]})", source=src, field=where) from None
        if not isinstance(obj, dict):
            raise InputError(f"must be a JSON object, got {type(obj).__name__}", source=src, field=where)
        yield i, obj


def first_json_object(path: Path) -> dict[str, Any] | None:
    """The first line of a JSON / JSONL file parsed as an object (a JSON list: its first item); when the first
    megabyte holds no whole object, an object of the top-level key names found there (values None); None when
    neither. Used to recognise a format, never to read it."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 20).decode("utf-8", "replace")
    except OSError:
        return None
    text = head.lstrip()
    line = text.split("\n", 1)[0]
    for candidate in (line, text):
        try:
            obj = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(obj, list) and obj and isinstance(obj[0], dict):
            return obj[0]
        if isinstance(obj, dict):
            return obj
    keys = re.findall(r'"([A-Za-z_]+)"\s*:', head)
    return dict.fromkeys(keys) if keys else None


# ---------------------------------------------------------------- values

def int_array(value: Any, src: str, where: str, ndim: int) -> np.ndarray:
    """``value`` (a numpy array from torch/safetensors, or nested JSON lists) as int64 of ``ndim`` dimensions."""
    if isinstance(value, np.ndarray):
        arr = value
    else:
        if not isinstance(value, list):
            raise InputError(f"must be a {ndim}-D array of integers, got {type(value).__name__}", source=src,
                             field=where)
        try:  # floats, booleans, text or integers beyond 64 bits give a dtype refused below
            arr = np.array(value)
        except (ValueError, OverflowError):
            raise InputError(f"must be a {ndim}-D array of integers (rows of unequal length)", source=src,
                             field=where) from None
        if arr.size == 0:
            arr = arr.reshape((0,) * ndim) if arr.ndim < ndim else arr.astype(np.int64)
    if arr.ndim != ndim:
        raise InputError(f"must be {ndim}-D, got shape {arr.shape}", source=src, field=where)
    if arr.size and arr.dtype.kind not in "iu":
        raise InputError(f"must hold integers, got {arr.dtype}", source=src, field=where)
    if arr.size and arr.dtype == np.uint64 and int(arr.max()) > MAX_ID:
        raise InputError(f"value {int(arr.max())} too large", source=src, field=where)
    return arr.astype(np.int64, copy=False)


def positive(value: Any, src: str, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_COUNT:
        raise InputError(f"must be a positive integer, got {value!r}", source=src, field=where)
    return value


def check_p2l(p2l: np.ndarray, num_layers: int, src: str, where: str) -> int:
    """A physical-to-logical map [layers, P]: ids >= 0, every logical expert 0..E-1 in some slot of each layer;
    returns E."""
    if p2l.ndim != 2 or p2l.shape[0] != num_layers or p2l.shape[1] == 0:
        raise InputError(f"must be [layers={num_layers}, physical slots], got shape {p2l.shape}", source=src,
                         field=where)
    if int(p2l.min()) < 0 or int(p2l.max()) > MAX_ID:
        bad = int(p2l.min()) if int(p2l.min()) < 0 else int(p2l.max())
        raise InputError(f"logical expert id {bad} out of range", source=src, field=where)
    E = int(p2l.max()) + 1
    for lay in range(num_layers):
        seen = np.bincount(p2l[lay], minlength=E)
        if not seen.all():
            raise InputError(f"layer {lay}: logical expert {int(np.argmin(seen))} has no physical slot (every logical "
                             f"expert 0..{E - 1} needs one)", source=src, field=where)
    return E


def physical_to_logical_ids(ids: np.ndarray, p2l: np.ndarray, src: str, where: str) -> np.ndarray:
    """Per-token physical slot ids [L, T, K] (-1 = none) as logical ids through ``p2l`` [L, P]."""
    L, P = p2l.shape
    if ids.size and (int(ids.min()) < -1 or int(ids.max()) >= P):
        bad = int(ids.min()) if int(ids.min()) < -1 else int(ids.max())
        lay = int(np.nonzero((ids == bad).any(axis=(1, 2)))[0][0])
        raise InputError(f"physical expert id {bad} out of range [0, {P}) (-1 = none) at layer {lay}", source=src,
                         field=where)
    safe = np.where(ids >= 0, ids, 0)
    logical = np.take_along_axis(p2l[:, None, :], safe.reshape(L, 1, -1), axis=2).reshape(ids.shape)
    return np.where(ids >= 0, logical, -1)


def physical_to_logical_counts(counts: np.ndarray, p2l: np.ndarray, E: int) -> np.ndarray:
    """Physical-slot counts [W, L, P] summed into logical experts [W, L, E] through ``p2l`` [L, P]."""
    W, L, P = counts.shape
    flat = (np.arange(L)[:, None] * E + p2l)[None, :, :] + (np.arange(W) * L * E)[:, None, None]
    out = np.zeros(W * L * E, dtype=np.int64)
    np.add.at(out, flat.ravel(), counts.astype(np.int64).ravel())
    return out.reshape(W, L, E)


# ---------------------------------------------------------------- results

def _kept_layers(active: np.ndarray, layer_ids: Sequence[int], notes: list[str]) -> np.ndarray:
    """Indices of the layers with picks; the dropped ones (dense layers) noted."""
    keep = np.flatnonzero(active)
    if keep.size < len(layer_ids):
        dropped = [int(layer_ids[int(i)]) for i in np.flatnonzero(~active)]
        shown = ", ".join(map(str, dropped[:12])) + (" ..." if len(dropped) > 12 else "")
        notes.append(f"{len(dropped)} layers without any pick dropped as dense layers (ids {shown})")
    return keep


def count_result(loads: np.ndarray, layer_ids: Sequence[int] | None, *, num_decoder_layers: int | None, top_k: int,
                 num_experts: int, window_tokens: np.ndarray | None, model: str, source: str, src: str,
                 notes: list[str], extra: dict[str, Any] | None = None) -> CountTrace:
    """A CountTrace of ``loads`` [W, layers as written, E], layers without picks dropped (``layer_ids`` None:
    the rows are MoE layers 0..L-1, all kept)."""
    if loads.shape[2] > num_experts:
        raise InputError(f"counts of {loads.shape[2]} experts, more than num_experts={num_experts}", source=src)
    if loads.shape[2] < num_experts:
        loads = np.pad(loads, ((0, 0), (0, 0), (0, num_experts - loads.shape[2])))
    active = loads.sum(axis=(0, 2)) > 0
    if not active.any():
        raise InputError("holds no picks at any layer: nothing was recorded", source=src)
    keep = np.arange(loads.shape[1]) if layer_ids is None else _kept_layers(active, layer_ids, notes)
    ids = None if layer_ids is None else tuple(int(layer_ids[int(i)]) for i in keep)
    meta = TraceMeta(num_experts=num_experts, num_layers=int(keep.size), top_k=top_k, model=model, source=source,
                     extra=dict(extra or {}))
    return CountTrace(loads=loads[:, keep], meta=meta, layer_ids=ids, num_decoder_layers=num_decoder_layers,
                      window_tokens=window_tokens, source=src)


@dataclass(frozen=True)
class TokenBlock:
    """Tokens of one window on one rank: logical ids [layers as written, tokens, K] (-1 = none)."""

    window: int
    rank: int
    ids: np.ndarray


def token_result(blocks: list[TokenBlock], layer_ids: Sequence[int], *, num_decoder_layers: int | None,
                 num_experts: int | None, model: str, source: str, src: str, notes: list[str],
                 batched: bool = True) -> Trace:
    """A per-token Trace: tokens by window then rank (one batch per window and home = rank when several ranks
    recorded, unless not ``batched``), layers without picks dropped, top_k = the most ids any token has at a
    layer."""
    blocks = sorted(blocks, key=lambda b: (b.window, b.rank))
    total = sum(b.ids.shape[1] for b in blocks)
    L, K = (blocks[0].ids.shape[0], max(b.ids.shape[2] for b in blocks)) if blocks else (0, 0)
    if total == 0:
        raise InputError("holds no tokens", source=src)
    require_memory(total * L * K * 16.0, f"a trace of {total} tokens x {L} layers x {K} ids", source=src)
    ids = np.concatenate([np.pad(b.ids, ((0, 0), (0, 0), (0, K - b.ids.shape[2])), constant_values=-1)
                          for b in blocks], axis=1)  # [L, T, K]
    keep = _kept_layers(np.asarray((ids >= 0).any(axis=(1, 2))), layer_ids, notes)
    if keep.size == 0:
        raise InputError("holds no picks at any layer: nothing was recorded", source=src)
    kept = ids[keep]
    order = np.argsort(kept < 0, axis=2, kind="stable")  # ids first in their order, none (-1) last
    experts = np.take_along_axis(kept, order, axis=2).transpose(1, 0, 2)  # [T, L, K]
    top_k = int((experts >= 0).sum(axis=2).max())
    experts = experts[:, :, :top_k]
    E_seen = int(experts.max()) + 1
    E = num_experts or E_seen
    if not num_experts:
        notes.append(f"num_experts inferred as {E} (highest id + 1); pass --num-experts if some experts never appear")
    windows = sorted({b.window for b in blocks})
    batch = np.repeat(np.searchsorted(windows, [b.window for b in blocks]), [b.ids.shape[1] for b in blocks])
    ranks = sorted({b.rank for b in blocks})
    home = None
    if len(ranks) > 1 and batched:
        home = np.repeat(np.searchsorted(ranks, [b.rank for b in blocks]), [b.ids.shape[1] for b in blocks])
        notes.append(f"tokens keep their recorded rank as home GPU ({len(ranks)} ranks)")
    short = int(((experts >= 0).sum(axis=2) < top_k).sum())
    if short:
        notes.append(f"{short} (token, layer) records with fewer than top_k={top_k} ids (-1 = no expert)")
    extra = {"layer_ids": [int(layer_ids[int(i)]) for i in keep], "num_decoder_layers": num_decoder_layers,
             "windows": [int(w) for w in windows], "ranks": [int(r) for r in ranks]}
    meta = TraceMeta(num_experts=E, num_layers=int(keep.size), top_k=top_k, model=model, source=source, extra=extra)
    dtype = np.int16 if E < 2**15 else np.int32
    trace = Trace(experts=experts.astype(dtype), meta=meta, batch=batch.astype(np.int32) if batched else None,
                  home=None if home is None else home.astype(np.int32))
    return trace.validate(src)


def rank_of(path: Path, default: int = 0) -> int:
    """The rank in a file name ``...rank{r}...`` (``default`` when there is none)."""
    stem = path.name
    i = stem.rfind("rank")
    digits = ""
    if i >= 0:
        for ch in stem[i + 4:]:
            if not ch.isdigit():
                break
            digits += ch
    return int(digits) if digits else default


def list_dir(path: Path, pattern: str) -> list[Path]:
    """Files in folder ``path`` matching ``pattern``, sorted by rank then name."""
    return sorted((p for p in path.glob(pattern) if p.is_file()), key=lambda p: (rank_of(p), p.name))


def is_dir(path: Path) -> bool:
    return os.path.isdir(path)
