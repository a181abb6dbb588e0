"""The token-routing trace: which experts each token picks at each MoE layer, and the ``.npz`` format.

A trace holds ``experts`` int [tokens, layers, top_k] (-1 = no expert), optional gate ``weights`` float
[tokens, layers, top_k], optional ``home`` int [tokens] (the GPU the token lives on) and ``batch`` int
[tokens], and ``meta`` (num_experts, num_layers, top_k, model, source). Missing ``home``/``batch`` are
filled by the rules in :meth:`Trace.layout`. Loading validates shapes, dtypes and ranges and names the
file and field of the first problem. Deliberately not modelled: token order inside a batch, sequence
boundaries, and the attention KV cache (all placement-independent here).
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from moesim.errors import InputError
from moesim.fileio import atomic_write
from moesim.loaders import load_json, require_regular_file
from moesim.traces.npyfile import npz_names, read_npz

FORMAT = "moesim.trace/1"
META_KEYS = {"num_experts", "num_layers", "top_k", "model", "source", "format"}
MAX_COUNT = 2**31 - 1  # experts, layers, picks, GPUs and batches are counted in int32 arrays
_VALIDATE_BLOCK = 1 << 22  # (token, layer, choice) entries checked per numpy call
_MMAP_ARRAYS = ("experts", "weights")  # the big arrays, memory-mapped when stored uncompressed
_ARRAYS = ("experts", "weights", "home", "batch", "meta")


@dataclass(frozen=True)
class TraceMeta:
    num_experts: int
    num_layers: int
    top_k: int
    model: str = ""
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = {"format": FORMAT, "num_experts": self.num_experts, "num_layers": self.num_layers,
               "top_k": self.top_k, "model": self.model, "source": self.source}
        out.update(self.extra)
        return out


@dataclass(frozen=True)
class Layout:
    """Where each token lives (GPU) and which batch it belongs to, resolved for one cluster size."""

    home: np.ndarray  # int32 [tokens]
    batch: np.ndarray  # int32 [tokens]
    num_batches: int

    def batch_indices(self) -> list[np.ndarray]:
        order = np.argsort(self.batch, kind="stable")
        bounds = np.searchsorted(self.batch[order], np.arange(self.num_batches + 1))
        return [order[bounds[b] : bounds[b + 1]] for b in range(self.num_batches)]


@dataclass(frozen=True)
class Trace:
    experts: np.ndarray
    meta: TraceMeta
    weights: np.ndarray | None = None
    home: np.ndarray | None = None
    batch: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.experts.shape[0])

    def num_batches(self, num_gpus: int, tokens_per_gpu: int | None) -> int:
        """Batches of the layout for ``num_gpus`` GPUs (see :meth:`layout`), without building it."""
        T = self.num_tokens
        if not T:
            return 0
        if self.batch is not None:
            return int(np.max(self.batch)) + 1
        return -(-T // (tokens_per_gpu * num_gpus)) if tokens_per_gpu else 1

    def layout(self, num_gpus: int, tokens_per_gpu: int | None, *, source: str | None = None) -> Layout:
        """Resolve homes and batches for a cluster of ``num_gpus`` GPUs.

        Default batch: consecutive blocks of ``tokens_per_gpu x num_gpus`` tokens (one batch if
        ``tokens_per_gpu`` is None). Default home: each batch's tokens spread evenly in contiguous blocks.
        """
        T = self.num_tokens
        if self.batch is not None:
            batch = self.batch.astype(np.int32)
        elif tokens_per_gpu:
            batch = (np.arange(T) // (tokens_per_gpu * num_gpus)).astype(np.int32)
        else:
            batch = np.zeros(T, dtype=np.int32)
        num_batches = int(batch.max()) + 1 if T else 0
        if self.home is not None:
            if T and int(self.home.max()) >= num_gpus:
                raise InputError(f"token home GPU {int(self.home.max())} out of range for a cluster of "
                                 f"{num_gpus} GPUs", source=source, field="home")
            home = self.home.astype(np.int32)
        else:
            home = np.empty(T, dtype=np.int32)
            for idx in Layout(home, batch, num_batches).batch_indices():
                home[idx] = (np.arange(idx.size) * num_gpus) // max(idx.size, 1)
        return Layout(home=home, batch=batch, num_batches=num_batches)

    def validate(self, source: str | None = None) -> "Trace":
        """Check shapes, dtypes and ranges of every array against ``meta``; the first problem is an
        InputError naming ``source`` and the array."""
        self._validate_experts(source)
        for name in ("home", "batch"):
            _check_index_array(getattr(self, name), name, self.num_tokens, source)
        if self.weights is not None:
            _check_weights(self.weights, self.experts.shape, source)
        return self

    def _validate_experts(self, source: str | None) -> None:
        m, e = self.meta, self.experts
        if e.ndim != 3:
            raise InputError(f"must be 3-D [tokens, layers, top_k], got shape {e.shape}", source=source,
                             field="experts")
        if not np.issubdtype(e.dtype, np.integer):
            raise InputError(f"must be integer, got {e.dtype}", source=source, field="experts")
        if e.shape[1:] != (m.num_layers, m.top_k):
            raise InputError(f"shape {e.shape} does not match meta num_layers={m.num_layers}, top_k={m.top_k}",
                             source=source, field="experts")
        # Checked in blocks of tokens, so a memory-mapped trace is read once and never copied whole.
        step = max(1, _VALIDATE_BLOCK // max(m.num_layers * m.top_k, 1))
        for a in range(0, e.shape[0], step):
            blk = np.asarray(e[a : a + step])
            lo, hi = int(blk.min()), int(blk.max())
            if lo < -1 or hi >= m.num_experts:
                bad = lo if lo < -1 else hi
                t, lay, k = (int(i[0]) for i in np.nonzero(blk == bad))
                raise InputError(f"expert id {bad} out of range [0, {m.num_experts}) (-1 = none) at token {a + t}, "
                                 f"layer {lay}, choice {k}", source=source, field="experts")
            srt = np.sort(blk, axis=2)
            dup = (srt[:, :, 1:] == srt[:, :, :-1]) & (srt[:, :, 1:] >= 0)
            if dup.any():
                t, lay, _ = (int(i[0]) for i in np.nonzero(dup))
                raise InputError(f"token {a + t} picks the same expert twice at layer {lay}", source=source,
                                 field="experts")


def _check_index_array(arr: np.ndarray | None, name: str, tokens: int, source: str | None) -> None:
    """``home`` or ``batch``: integers [tokens], 0 <= value <= MAX_COUNT (they are kept as int32)."""
    if arr is None:
        return
    if arr.shape != (tokens,) or not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"must be integer [tokens={tokens}], got {arr.dtype} {arr.shape}", source=source, field=name)
    if arr.size and int(arr.min()) < 0:
        raise InputError("must be >= 0", source=source, field=name)
    if arr.size and int(arr.max()) > MAX_COUNT:
        raise InputError(f"holds {int(arr.max())}, over the largest {name} index {MAX_COUNT}", source=source,
                         field=name)


def _check_weights(weights: np.ndarray, shape: tuple[int, ...], source: str | None) -> None:
    """Gate weights: numbers of the experts' shape, finite and >= 0 (checked block by block)."""
    if weights.shape != shape:
        raise InputError(f"shape {weights.shape} must equal experts' {shape}", source=source, field="weights")
    if weights.dtype.kind not in "fiu":
        raise InputError(f"must be numbers, got {weights.dtype}", source=source, field="weights")
    step = max(1, _VALIDATE_BLOCK // max(int(np.prod(shape[1:])), 1))
    for a in range(0, shape[0], step):
        blk = np.asarray(weights[a : a + step])
        bad = ~np.isfinite(blk) | (blk < 0)
        if bad.any():
            t, lay, k = (int(i[0]) for i in np.nonzero(bad))
            raise InputError(f"gate weight {blk[t, lay, k]} at token {a + t}, layer {lay}, choice {k} must be a finite "
                             "number >= 0", source=source, field="weights")


def is_trace_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` looks like a trace moesim wrote (a ``.npz`` holding ``experts`` and ``meta``)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return {"experts.npy", "meta.npy"} <= set(zf.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def save_trace(trace: Trace, path: str | os.PathLike[str], *, compress: bool = True) -> Path:
    """Write ``trace`` as ``.npz`` atomically (temporary file, then rename).

    ``compress=False`` stores the arrays uncompressed (ZIP_STORED, still a plain ``.npz``), so that
    :func:`load_trace` with ``mmap=True`` can memory-map ``experts`` and ``weights`` instead of reading them.
    Arrays are written in blocks, so a memory-mapped trace can be saved without loading it whole.
    """
    arrays: dict[str, np.ndarray] = {"experts": trace.experts}
    for name in ("weights", "home", "batch"):
        if getattr(trace, name) is not None:
            arrays[name] = getattr(trace, name)
    arrays["meta"] = np.array(json.dumps(trace.meta.to_json(), sort_keys=True))
    return atomic_write(path, lambda fh: _write_npz(fh, arrays, compress), binary=True)


def _write_npz(fh: Any, arrays: dict[str, np.ndarray], compress: bool) -> None:
    """``np.savez[_compressed]``, but copying each array in blocks of leading rows (bounded memory)."""
    mode = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(fh, mode="w", compression=mode, allowZip64=True) as zf:
        for name, arr in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as out:
                header = {"descr": np.lib.format.dtype_to_descr(arr.dtype), "fortran_order": False, "shape": arr.shape}
                np.lib.format.write_array_header_1_0(out, header)
                if arr.ndim == 0:
                    out.write(np.ascontiguousarray(arr).tobytes())
                    continue
                step = max(1, (16 << 20) // max(arr[:1].nbytes, 1))
                for a in range(0, arr.shape[0], step):
                    out.write(np.ascontiguousarray(arr[a : a + step]).tobytes())


def save_trace_blocks(path: str | os.PathLike[str], meta: TraceMeta,
                      blocks: Iterable[tuple[np.ndarray, np.ndarray | None]], *, num_tokens: int,
                      home: np.ndarray | None = None, batch: np.ndarray | None = None,
                      with_weights: bool = False) -> Path:
    """Write a trace given as consecutive token blocks ``(experts, weights or None)`` as an uncompressed
    ``.npz`` (memory-mappable), atomically, holding one block in memory at a time. Weights, when given, are
    spooled to a temporary file beside ``path`` and copied in after the expert ids."""
    path = Path(path)
    shape = (num_tokens, meta.num_layers, meta.top_k)
    dtype = np.int16 if meta.num_experts < 2**15 else np.int32

    def write(fh: Any) -> None:
        spool = tempfile.TemporaryFile(dir=path.parent) if with_weights else None
        try:
            with zipfile.ZipFile(fh, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                with zf.open("experts.npy", "w", force_zip64=True) as out:
                    np.lib.format.write_array_header_1_0(
                        out, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                              "shape": shape})
                    seen = 0
                    for ex, w in blocks:
                        if ex.shape[1:] != shape[1:]:
                            raise ValueError(f"block of shape {ex.shape} does not fit a trace of {shape}")
                        out.write(np.ascontiguousarray(ex, dtype=dtype).tobytes())
                        if spool is not None:
                            assert w is not None and w.shape == ex.shape
                            spool.write(np.ascontiguousarray(w, dtype=np.float32).tobytes())
                        seen += ex.shape[0]
                    if seen != num_tokens:
                        raise ValueError(f"blocks held {seen} tokens, expected {num_tokens}")
                if spool is not None:
                    spool.seek(0)
                    with zf.open("weights.npy", "w", force_zip64=True) as out:
                        np.lib.format.write_array_header_1_0(
                            out, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                                  "shape": shape})
                        while chunk := spool.read(16 << 20):
                            out.write(chunk)
                small = {"home": home, "batch": batch, "meta": np.array(json.dumps(meta.to_json(), sort_keys=True))}
                for name, arr in small.items():
                    if arr is not None:
                        with zf.open(f"{name}.npy", "w", force_zip64=True) as out:
                            np.lib.format.write_array(out, np.asarray(arr), allow_pickle=False)
        finally:
            if spool is not None:
                spool.close()

    return atomic_write(path, write, binary=True)


def _check_magic(path: str | os.PathLike[str], src: str) -> None:
    """A ``.npz`` (a ZIP archive) by its first bytes; a raw array or a text log is named as such."""
    require_regular_file(path, src)
    try:
        with open(path, "rb") as fh:
            magic = fh.read(6)
    except FileNotFoundError:
        raise InputError("file not found", source=src) from None
    except OSError as exc:
        raise InputError(f"cannot read ({exc.strerror})", source=src) from None
    if magic.startswith(b"\x93NUMPY"):
        raise InputError("a raw numpy array, not a moesim trace: convert it with 'moesim trace import' "
                         "(docs/traces.md)", source=src)
    if not magic.startswith(b"PK"):
        raise InputError("not a .npz trace (a routing log? convert it with 'moesim trace import', docs/traces.md)",
                         source=src)


def _read_members(path: str | os.PathLike[str], src: str, mmap: bool) -> dict[str, np.ndarray]:
    """Every array of the archive (headers checked first), the big ones memory-mapped when asked and
    stored uncompressed; an unknown member is an error before anything is read."""
    names = npz_names(path, src)
    if "loads" in names and "experts" not in names:
        raise InputError("is a count trace (expert loads per window, no per-token paths), and this needs per-token "
                         "routing: use a per-token dump, or expand the counts (moesim.traces.count_trace."
                         "expand_counts: synthetic, labelled, no cross-layer affinity)", source=src)
    if "meta" not in names:
        raise InputError("missing (JSON with num_experts, num_layers, top_k): a plain array archive, not a moesim "
                         "trace? convert it with 'moesim trace import'", source=src, field="meta")
    for key in names:
        if key not in _ARRAYS:
            raise InputError("unknown array; expected experts, weights, home, batch, meta", source=src, field=key)
    return read_npz(path, src, mmap=_MMAP_ARRAYS if mmap else ())


def _parse_meta(data: dict[str, np.ndarray], src: str) -> TraceMeta:
    """The archive's arrays are the known ones, with ``experts``; ``meta`` is JSON with positive sizes."""
    if "meta" not in data:
        raise InputError("missing (JSON with num_experts, num_layers, top_k): a plain array archive, not a moesim "
                         "trace? convert it with 'moesim trace import'", source=src, field="meta")
    if "experts" not in data:
        raise InputError("missing", source=src, field="experts")
    meta_arr = data["meta"]
    if meta_arr.ndim != 0 or meta_arr.dtype.kind != "U":
        raise InputError(f"must be a JSON object as one string, got {meta_arr.dtype} {meta_arr.shape}", source=src,
                         field="meta")
    try:
        meta_raw = load_json(str(meta_arr), src)
    except InputError as exc:
        raise exc.at(field_prefix="meta") from None
    if not isinstance(meta_raw, dict):
        raise InputError("must be a JSON object", source=src, field="meta")
    for key in ("num_experts", "num_layers", "top_k"):
        value = meta_raw.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_COUNT:
            raise InputError(f"must be a positive integer up to {MAX_COUNT}, got {meta_raw.get(key)!r}", source=src,
                             field=f"meta.{key}")
    return TraceMeta(
        num_experts=meta_raw["num_experts"], num_layers=meta_raw["num_layers"], top_k=meta_raw["top_k"],
        model=str(meta_raw.get("model", "")), source=str(meta_raw.get("source", "")),
        extra={k: v for k, v in meta_raw.items() if k not in META_KEYS},
    )


def load_trace(path: str | os.PathLike[str], *, mmap: bool = False) -> Trace:
    """Read and validate a ``.npz`` trace; every problem is an :class:`InputError` naming file and field.

    With ``mmap=True``, ``experts`` and ``weights`` stored uncompressed (``save_trace(..., compress=False)``)
    are memory-mapped read-only instead of read; compressed members are read as usual.
    """
    src = str(path)
    _check_magic(path, src)
    data = _read_members(path, src, mmap)
    meta = _parse_meta(data, src)
    trace = Trace(experts=data["experts"], meta=meta, weights=data.get("weights"),
                  home=data.get("home"), batch=data.get("batch")).validate(src)
    if trace.num_tokens == 0:
        raise InputError("holds no tokens: a trace needs at least one", source=src, field="experts")
    return trace
