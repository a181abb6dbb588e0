"""A routing generator whose parameters are fitted to a real trace (see :mod:`moesim.traces.generator_fit`).

The model is log-linear: at MoE layer l a token of batch b scores every expert e with the logit
``log popularity[l, e] + z[b, l, e] + coupling[l-1] * sum over its k experts p at layer l-1 of
successor_logit[l-1, p, e]`` and picks the k best of the logits plus independent Gumbel noise, which is
exactly sampling k experts without replacement in proportion to exp(logit) (Plackett-Luce). So:
- popularity: a per-layer distribution over experts (identities kept, so placements planned on the real
  trace meet the same hot experts);
- cross-layer transitions: each expert p of layer l-1 boosts its ``fanout`` favourite successors by
  ``successor_logit`` (pointwise mutual information in the fit) and the boosts of a token's k experts add
  up. Successors shared by several of its experts win: that is how one token's picks stay together across
  layers (adding probabilities instead, a mixture, dilutes them k-fold and cannot reach real concentration);
- same-layer co-activation is not a parameter: it arises from picks that share predecessors;
- drift: per batch and layer a tilt ``z[b, l, e]`` of the logits, an AR(1) process over batches
  (innovation ``drift_sigma``, persistence ``drift_rho``), centred so that each expert's tilt exp(z)
  averages to 1 over the generated batches and the whole trace keeps the fitted popularity; optional per-GPU
  mix: a fixed tilt per home GPU (``gpu_mix_sigma``), as in the plain generator.
Group-limited routing (DeepSeek-V3's ``n_group``/``topk_group``, the model's, passed as ``groups``): a token
keeps only its ``topk_groups`` groups with the best perturbed logit and picks its k there. A fit of another shape
carried over to a bigger model: :mod:`moesim.traces.fitted_expand`.
Gate weights are the softmax of the picked experts' logits. Generation runs block by block of whole batches
with one ``numpy.random.Generator``, so traces of any length can be streamed to disk
(:func:`write_fitted_trace`, stored uncompressed and memory-mapped on load). Cost: tokens x experts per
layer (the Gumbel draws). Ignored: token order inside a batch, dependence on layers before l-1 other than
through the chain, sequence structure beyond batches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import numpy as np

from moesim.budget import require_memory, require_time
from moesim.errors import InputError
from moesim.fileio import atomic_write, head
from moesim.loaders import dump_yaml, read_yaml
from moesim.traces.format import Trace, TraceMeta, save_trace_blocks

FORMAT = "moesim.fitted/1"
DATA_DIR = Path(__file__).resolve().parent.parent / "data"
_TOKEN_BLOCK = 8192  # tokens scored per numpy call (tokens x experts logits)
_TOKENS_PER_BLOCK = 1 << 16  # tokens generated per block (whole batches, at least one)


@dataclass(frozen=True)
class FittedParams:
    """Parameters of the fitted generator. Arrays: popularity [L, E] (rows sum to 1), successors [L-1, E, F]
    (expert ids), successor_logits [L-1, E, F], coupling [L-1] (>= 0)."""

    name: str
    num_layers: int
    num_experts: int
    top_k: int
    popularity: np.ndarray
    successors: np.ndarray
    successor_logits: np.ndarray
    coupling: np.ndarray
    drift_sigma: float = 0.0
    drift_rho: float = 0.0
    gpu_mix_sigma: float = 0.0
    fitted_to: dict[str, Any] = field(default_factory=dict)

    @property
    def fanout(self) -> int:
        return int(self.successors.shape[2]) if self.successors.ndim == 3 else 0

    def check(self, source: str | None = None) -> "FittedParams":
        """Shapes, ranges and normalisation; an :class:`InputError` naming the field otherwise."""
        L, E, K = self.num_layers, self.num_experts, self.top_k
        for name, value in (("num_layers", L), ("num_experts", E), ("top_k", K)):
            if not isinstance(value, int) or value < 1:
                raise InputError(f"must be a positive integer, got {value!r}", source=source, field=name)
        if K > E:
            raise InputError(f"top_k={K} exceeds num_experts={E}", source=source, field="top_k")
        pop = self.popularity
        if pop.shape != (L, E) or not np.isfinite(pop).all() or (pop < 0).any() or (pop.sum(axis=1) <= 0).any():
            raise InputError(f"must be {L} rows of {E} non-negative numbers, not all zero", source=source,
                             field="layers[].popularity")
        if ((pop > 0).sum(axis=1) < K).any():
            bad = int(np.argmax((pop > 0).sum(axis=1) < K))
            raise InputError(f"fewer than top_k={K} experts have popularity > 0", source=source,
                             field=f"layers[{bad}].popularity")
        F = self.fanout
        if self.successors.shape != (max(L - 1, 0), E, F) or self.successor_logits.shape != self.successors.shape:
            raise InputError(f"successors and successor_logits must be [{E} experts x fanout] for each of the "
                             f"first {L - 1} layers", source=source, field="layers[].successors")
        if self.successors.size and (self.successors.min() < 0 or self.successors.max() >= E):
            raise InputError(f"expert ids must be in [0, {E})", source=source, field="layers[].successors")
        if not np.isfinite(self.successor_logits).all():
            raise InputError("must be finite numbers", source=source, field="layers[].successor_logits")
        c = self.coupling
        if c.shape != (max(L - 1, 0),) or not np.isfinite(c).all() or (c < 0).any():
            raise InputError(f"must be a number >= 0 for each of the first {L - 1} layers", source=source,
                             field="layers[].coupling")
        for name in ("drift_sigma", "gpu_mix_sigma"):
            v = getattr(self, name)
            if not np.isfinite(v) or v < 0:
                raise InputError(f"must be >= 0, got {v!r}", source=source, field=name)
        if not 0 <= self.drift_rho < 1:
            raise InputError(f"must be in [0, 1), got {self.drift_rho!r}", source=source, field="drift_rho")
        return self

    def first_layers(self, n: int) -> "FittedParams":
        """The generator of the first ``n`` MoE layers (a fitted model cut short is a fitted model)."""
        if not 1 <= n <= self.num_layers:
            raise ValueError(f"n={n} must be in [1, {self.num_layers}]")
        return replace(self, num_layers=n, popularity=self.popularity[:n], successors=self.successors[: n - 1],
                       successor_logits=self.successor_logits[: n - 1], coupling=self.coupling[: n - 1])

    def dense_logits(self, pair: int) -> np.ndarray:
        """Successor boosts of layer pair ``pair`` -> ``pair + 1`` as a dense [E + 1, E] matrix, coupling
        applied; the last row (a predecessor of -1, no expert) is zero."""
        E = self.num_experts
        out = np.zeros((E + 1, E))
        np.put_along_axis(out[:E], self.successors[pair], self.successor_logits[pair] * self.coupling[pair], axis=1)
        return out

    def to_yaml(self, header: str = "") -> str:
        def r(a: np.ndarray) -> Any:
            return np.round(np.asarray(a, dtype=float), 5).tolist()

        layers = []
        for i in range(self.num_layers):
            entry: dict[str, Any] = {"popularity": r(self.popularity[i] / self.popularity[i].sum())}
            if i < self.num_layers - 1:
                entry["coupling"] = round(float(self.coupling[i]), 5)
                entry["successors"] = self.successors[i].tolist()
                entry["successor_logits"] = np.round(self.successor_logits[i], 3).tolist()
            layers.append(entry)
        doc = {"format": FORMAT, "name": self.name, "num_layers": self.num_layers, "num_experts": self.num_experts,
               "top_k": self.top_k, "fanout": self.fanout, "drift_sigma": round(float(self.drift_sigma), 5),
               "drift_rho": round(float(self.drift_rho), 5), "gpu_mix_sigma": round(float(self.gpu_mix_sigma), 5),
               "fitted_to": self.fitted_to, "layers": layers}
        body = dump_yaml(doc, sort_keys=False, default_flow_style=None, width=1 << 16)
        prefix = "".join(f"# {line}\n" for line in header.splitlines()) if header else ""
        return prefix + body


def save_params(params: FittedParams, path: str | os.PathLike[str], *, header: str = "") -> Path:
    text = params.check().to_yaml(header)

    def write(fh: IO[str]) -> None:
        fh.write(text)

    return atomic_write(path, write)


def is_params_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` looks like generator parameters moesim wrote (``format: moesim.fitted/1``)."""
    return f"format: {FORMAT}".encode() in head(Path(path), 16384)


def shipped_params() -> list[str]:
    """Names of the parameter files shipped in ``moesim/data`` (usable wherever a params file is asked)."""
    return sorted(p.name.removesuffix(".params.yaml") for p in DATA_DIR.glob("*.params.yaml"))


def resolve_params(name: str | os.PathLike[str], base_dir: Path | None = None) -> Path:
    """A params file: a path (relative to ``base_dir`` first), or the name of a shipped one."""
    path = Path(name)
    candidates = [path] if path.is_absolute() else [(base_dir or Path(".")) / path, path]
    for c in candidates:
        if c.is_file():
            return c
    shipped = DATA_DIR / f"{name}.params.yaml"
    if shipped.is_file():
        return shipped
    raise InputError(f"no such params file, and not a shipped name ({', '.join(shipped_params()) or 'none'})",
                     source=str(name))


_PARAM_KEYS = frozenset({"format", "name", "num_layers", "num_experts", "top_k", "fanout", "drift_sigma", "drift_rho",
                         "gpu_mix_sigma", "fitted_to", "layers"})


def _read_params_yaml(p: Path, src: str) -> dict[str, Any]:
    """The params YAML as a mapping whose format, keys and sizes are checked (not yet the layers)."""
    raw = read_yaml(p, src)
    if not isinstance(raw, dict):
        raise InputError("must be a YAML mapping", source=src)
    if raw.get("format") != FORMAT:
        raise InputError(f"must be {FORMAT!r}, got {raw.get('format')!r}", source=src, field="format")
    for key in raw:
        if key not in _PARAM_KEYS:
            raise InputError(f"unknown key; valid: {', '.join(sorted(_PARAM_KEYS))}", source=src, field=str(key))
    for key in ("num_layers", "num_experts", "top_k", "fanout", "layers"):
        if key not in raw:
            raise InputError("missing", source=src, field=key)
    for key in ("num_layers", "num_experts", "top_k", "fanout"):
        if not isinstance(raw[key], int) or isinstance(raw[key], bool) or raw[key] < 1:
            raise InputError(f"must be a positive integer, got {raw[key]!r}", source=src, field=key)
    return raw


def _layer_arrays(layers: list[Any], L: int, E: int, F: int, src: str
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(popularity [L, E], successors [L-1, E, F], successor_logits [L-1, E, F], coupling [L-1]) from the
    ``layers`` list, each entry's shape checked."""
    def arr(i: int, key: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
        entry = layers[i]
        if not isinstance(entry, dict) or key not in entry:
            raise InputError("missing", source=src, field=f"layers[{i}].{key}")
        try:
            a: np.ndarray = np.array(entry[key], dtype=dtype)
        except (TypeError, ValueError):
            raise InputError(f"must be numbers of shape {shape}", source=src, field=f"layers[{i}].{key}") from None
        if a.shape != shape:
            raise InputError(f"shape {a.shape}, expected {shape}", source=src, field=f"layers[{i}].{key}")
        return a

    pairs = range(L - 1)
    pop = np.stack([arr(i, "popularity", (E,), float) for i in range(L)])
    succ = np.stack([arr(i, "successors", (E, F), np.int64) for i in pairs]) if L > 1 else np.zeros((0, E, F), np.int64)
    logit = np.stack([arr(i, "successor_logits", (E, F), float) for i in pairs]) if L > 1 else np.zeros((0, E, F))
    coupling = np.array([arr(i, "coupling", (), float) for i in pairs], dtype=float).reshape(L - 1)
    return pop, succ, logit, coupling


def load_params(path: str | os.PathLike[str], base_dir: Path | None = None) -> FittedParams:
    """Read and check a params YAML (or a shipped name); errors name the file and the field."""
    p = resolve_params(path, base_dir)
    src = str(p)
    raw = _read_params_yaml(p, src)
    L, E, F = raw["num_layers"], raw["num_experts"], raw["fanout"]
    layers = raw["layers"]
    if not isinstance(layers, list) or len(layers) != L:
        raise InputError(f"must be a list of {L} layers", source=src, field="layers")
    pop, succ, logit, coupling = _layer_arrays(layers, L, E, F, src)
    try:
        params = FittedParams(name=str(raw.get("name", p.stem)), num_layers=L, num_experts=E, top_k=raw["top_k"],
                              popularity=pop, successors=succ, successor_logits=logit, coupling=coupling,
                              drift_sigma=float(raw.get("drift_sigma", 0.0)),
                              drift_rho=float(raw.get("drift_rho", 0.0)),
                              gpu_mix_sigma=float(raw.get("gpu_mix_sigma", 0.0)),
                              fitted_to=dict(raw.get("fitted_to") or {}))
    except (TypeError, ValueError) as exc:
        raise InputError(f"bad number ({exc})", source=src) from None
    return params.check(src)


def fitted_cost(*, num_layers: int, num_experts: int, top_k: int, num_gpus: int, tokens_per_gpu: int, batches: int,
                in_memory: bool, weights: bool = True) -> tuple[float, float, str]:
    """(bytes, seconds, the sizes in words) the fitted generator needs: the drift tilts of every batch, the GPU
    tilts, a layer's dense successor logits, one block of Gumbel-scored tokens, and with ``in_memory`` the
    whole trace (twice while the blocks are joined). Its time is tokens x experts per layer."""
    L, E, K, G = num_layers, num_experts, top_k, num_gpus
    T = batches * G * tokens_per_gpu
    per_token = K * (2 + (4 if weights else 0))
    nbytes = (batches * L * E * 24 + L * G * E * 12 + (E + 1) * E * 12 + _TOKEN_BLOCK * E * 16 + T * 16
              + (2 * T * L * per_token if in_memory else min(T, _TOKENS_PER_BLOCK) * L * per_token * 2))
    seconds = T * L * E * 5e-9 + T * L * K * 1e-8
    return nbytes, seconds, f"{batches} batches x {G} GPUs x {tokens_per_gpu} tokens x {L} layers of {E} experts"


def _require(params: FittedParams, **sizes: Any) -> None:
    nbytes, seconds, what = fitted_cost(num_layers=params.num_layers, num_experts=params.num_experts,
                                        top_k=params.top_k, **sizes)
    require_memory(nbytes, f"a fitted-generator trace of {what}")
    require_time(seconds, f"generating a fitted-generator trace of {what}")


def drift_tilts(params: FittedParams, batches: int, rng: np.random.Generator) -> np.ndarray:
    """Logit tilts z [batches, L, E]: AR(1) over batches, exp(z) centred to mean 1 over the batches (zeros
    without drift)."""
    L, E = params.num_layers, params.num_experts
    z = np.zeros((batches, L, E))
    if params.drift_sigma <= 0 or batches < 2:
        return z
    rho, sigma = params.drift_rho, params.drift_sigma
    noise = rng.standard_normal((batches, L, E)) * sigma
    z[0] = noise[0]  # stationary: every z[b] has standard deviation sigma
    for b in range(1, batches):  # per batch, not per token
        z[b] = rho * z[b - 1] + np.sqrt(1 - rho * rho) * noise[b]
    # Centred so that every expert's tilt averages to 1 over the batches: drift moves load between batches,
    # not over the whole trace (whose popularity stays the fitted one).
    return z - np.log(np.exp(z).mean(axis=0, keepdims=True))


def _group_limited(keys: np.ndarray, groups: tuple[int, int] | None) -> np.ndarray:
    """Group-limited routing on the perturbed logits [n, E]: a token keeps the ``topk_groups`` groups (of
    ``groups`` equal contiguous ones) holding its best keys and may pick only there (the rest set to -inf).
    A group's best key is Gumbel with location log(group mass), so the groups come by successive sampling on
    their popularity mass, the plain generator's rule. (DeepSeek-V3 ranks groups by the sum of their two best
    scores.)"""
    if groups is None:
        return keys
    n_groups, topk_groups = groups
    n, E = keys.shape
    best = keys.reshape(n, n_groups, E // n_groups).max(axis=2)
    dropped = np.argpartition(-best, topk_groups - 1, axis=1)[:, topk_groups:]
    out = keys.reshape(n, n_groups, E // n_groups)
    np.put_along_axis(out, dropped[:, :, None], -np.inf, axis=1)
    return keys


def _generate_block(params: FittedParams, tilt: np.ndarray, gpu_tilt: np.ndarray | None, num_gpus: int,
                    tokens_per_gpu: int, rng: np.random.Generator, with_weights: bool,
                    groups: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Tokens of ``tilt.shape[0]`` consecutive batches: experts [T, L, K] (and weights), batch-major,
    tokens of a batch in home-GPU blocks. ``tilt`` [B, L, E] holds each batch's drift; ``groups``
    (groups, topk_groups) limits each token's picks to its best groups."""
    B, L, E = tilt.shape
    K, G = params.top_k, num_gpus
    T = B * G * tokens_per_gpu
    local_batch = np.arange(T) // (G * tokens_per_gpu)
    home = (np.arange(T) % (G * tokens_per_gpu)) // tokens_per_gpu
    dtype = np.int16 if E < 2**15 else np.int32
    experts = np.empty((T, L, K), dtype=dtype)
    weights = np.empty((T, L, K), dtype=np.float32) if with_weights else None
    logpop = np.log(np.maximum(params.popularity, 1e-300))
    prev = np.empty((T, K), dtype=np.int64)
    for lay in range(L):
        base = (logpop[lay][None, :] + tilt[:, lay]).astype(np.float32)  # [B, E]
        coupled = lay > 0 and params.fanout > 0 and params.coupling[lay - 1] > 0
        boost = params.dense_logits(lay - 1).astype(np.float32) if coupled else None
        for a in range(0, T, _TOKEN_BLOCK):
            blk = slice(a, min(a + _TOKEN_BLOCK, T))
            logits = base[local_batch[blk]]
            if gpu_tilt is not None:
                logits = logits + gpu_tilt[lay][home[blk]]
            if boost is not None:
                p = prev[blk]
                logits = logits + boost[np.where(p >= 0, p, E)].sum(axis=1)
            u = rng.random(logits.shape, dtype=np.float32)
            keys = _group_limited(logits - np.log(-np.log(np.maximum(u, np.float32(1e-30)))), groups)  # + Gumbel
            top = np.argpartition(-keys, K - 1, axis=1)[:, :K]
            experts[blk, lay] = top
            if weights is not None:
                chosen = np.take_along_axis(logits, top, axis=1)
                w = np.exp(chosen - chosen.max(axis=1, keepdims=True))
                weights[blk, lay] = w / w.sum(axis=1, keepdims=True)
        prev = experts[:, lay].astype(np.int64)
    return experts, weights


def check_groups(params: FittedParams, groups: tuple[int, int] | None) -> tuple[int, int] | None:
    """``groups`` (groups, topk_groups) where they limit the routing of ``params``' experts, else None;
    ValueError when they cannot."""
    if groups is None or groups[1] >= groups[0] or groups[0] <= 1:
        return None
    n_groups, topk_groups = groups
    size = params.num_experts // n_groups
    if params.num_experts % n_groups or topk_groups < 1 or topk_groups * size < params.top_k:
        raise ValueError(f"groups={groups} cannot limit top-{params.top_k} routing over {params.num_experts} experts")
    return groups


def iter_fitted(params: FittedParams, *, num_gpus: int, tokens_per_gpu: int, batches: int,
                rng: np.random.Generator, weights: bool = False, groups: tuple[int, int] | None = None
                ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Blocks of whole batches, in order: (experts [t, L, K], weights or None). ``groups``: (groups,
    topk_groups) of group-limited routing (DeepSeek-V3: (8, 4)), or None."""
    limit = check_groups(params, groups)
    G = num_gpus
    z = drift_tilts(params, batches, rng)
    gpu_tilt = None
    if params.gpu_mix_sigma > 0:
        gpu_tilt = (params.gpu_mix_sigma * rng.standard_normal((params.num_layers, G, params.num_experts))
                    ).astype(np.float32)
    per_block = max(1, _TOKENS_PER_BLOCK // (G * tokens_per_gpu))
    for b0 in range(0, batches, per_block):
        yield _generate_block(params, z[b0 : b0 + per_block], gpu_tilt, G, tokens_per_gpu, rng, weights, limit)


def _meta(params: FittedParams, num_gpus: int, model: str) -> TraceMeta:
    return TraceMeta(num_experts=params.num_experts, num_layers=params.num_layers, top_k=params.top_k,
                     model=model or params.name, source="moesim.fitted",
                     extra={"fitted": {"name": params.name, "num_gpus": num_gpus}})


def _layout(num_gpus: int, tokens_per_gpu: int, batches: int) -> tuple[np.ndarray, np.ndarray]:
    T = batches * num_gpus * tokens_per_gpu
    home = ((np.arange(T) % (num_gpus * tokens_per_gpu)) // tokens_per_gpu).astype(np.int32)
    batch = (np.arange(T) // (num_gpus * tokens_per_gpu)).astype(np.int32)
    return home, batch


def generate_fitted(params: FittedParams, *, num_gpus: int, tokens_per_gpu: int, batches: int,
                    rng: np.random.Generator, weights: bool = True, model: str = "",
                    groups: tuple[int, int] | None = None) -> Trace:
    """``batches x num_gpus x tokens_per_gpu`` tokens in memory (see :func:`write_fitted_trace` for big ones)."""
    _require(params, num_gpus=num_gpus, tokens_per_gpu=tokens_per_gpu, batches=batches, in_memory=True,
             weights=weights)
    blocks = list(iter_fitted(params, num_gpus=num_gpus, tokens_per_gpu=tokens_per_gpu, batches=batches, rng=rng,
                              weights=weights, groups=groups))
    experts = np.concatenate([b[0] for b in blocks])
    w = np.concatenate([b[1] for b in blocks if b[1] is not None]) if weights else None
    home, batch = _layout(num_gpus, tokens_per_gpu, batches)
    return Trace(experts=experts, meta=_meta(params, num_gpus, model), weights=w, home=home, batch=batch)


def _told(blocks: Iterator[tuple[np.ndarray, np.ndarray | None]], progress: Callable[[int], object] | None
          ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """``blocks``, telling ``progress`` of each block's tokens once it has been used (the next is asked for)."""
    for block in blocks:
        yield block
        if progress is not None:
            progress(int(block[0].shape[0]))


def write_fitted_trace(params: FittedParams, path: str | os.PathLike[str], *, num_gpus: int, tokens_per_gpu: int,
                       batches: int, seed: int = 0, weights: bool = False, model: str = "",
                       progress: Callable[[int], object] | None = None) -> Path:
    """Generate block by block straight into an uncompressed ``.npz`` (memory-mappable), atomically.
    Memory stays at one block of tokens, whatever the trace length. ``progress(n)`` is told of the ``n`` tokens
    of each block written (``batches x num_gpus x tokens_per_gpu`` in all)."""
    _require(params, num_gpus=num_gpus, tokens_per_gpu=tokens_per_gpu, batches=batches, in_memory=False,
             weights=weights)
    home, batch = _layout(num_gpus, tokens_per_gpu, batches)
    blocks = iter_fitted(params, num_gpus=num_gpus, tokens_per_gpu=tokens_per_gpu, batches=batches,
                         rng=np.random.default_rng(seed), weights=weights)
    return save_trace_blocks(path, _meta(params, num_gpus, model), _told(blocks, progress), num_tokens=home.size,
                             home=home, batch=batch, with_weights=weights)


def fitted_vs_real(params: FittedParams, real: Trace, *, tokens: int | None = None, seed: int = 0,
                   top_m: int = 8) -> list[tuple[str, float, float]]:
    """(statistic, real, fitted) for the figures the fit targets, on a generated trace as large as the real
    one (or ``tokens``), batched like the real trace's drift windows."""
    from moesim.traces.stats import trace_stats

    st_real = trace_stats(real, top_m=top_m)
    T = tokens or real.num_tokens
    per_window = max(1, real.num_tokens // max(st_real.windows, 1))
    batches = max(1, round(T / per_window))
    gen = generate_fitted(params, num_gpus=1, tokens_per_gpu=per_window, batches=batches,
                          rng=np.random.default_rng(seed), weights=False)
    st_gen = trace_stats(gen, top_m=top_m)
    a, b = st_real.summary(), st_gen.summary()
    rows = []
    for key, label in (("load_max_over_mean_median", "load max/mean (median layer)"),
                       ("load_max_over_mean_max", "load max/mean (worst layer)"),
                       ("load_cv_median", "load CV (median layer)"),
                       ("successor_top_m_share_mean", f"top-{top_m} successor share (mean)"),
                       ("successor_mi_bits_median", "successor MI bits (median)"),
                       ("coactivation_top_m_share_median", f"top-{top_m} co-activation share"),
                       ("drift_tv_consecutive_median", "drift TV consecutive (median)")):
        if a[key] is not None and b[key] is not None:
            rows.append((label, float(a[key]), float(b[key])))
    return rows
