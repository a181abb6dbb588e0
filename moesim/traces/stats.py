"""What a routing trace holds that matters for expert placement: load skew, co-activation, cross-layer
transitions and drift, computed as pure functions of a :class:`~moesim.traces.format.Trace`.

- Load: picks per expert and layer [L, E]; skew as max/mean (MoETuner's hot GPU comes from hot experts),
  coefficient of variation, TensorRT-LLM's (max-mean)/mean, and the hottest experts with their shares.
- Co-activation: pairs of experts picked by the same token at the same layer [L, E, E] (what Occult-style
  co-location saves); per expert, the share of its pairs that go to its top-m partners.
- Transitions: (expert at layer l, expert at layer l+1) pairs of the same token, every pick with every pick
  [L-1, E, E] (MoETuner's R); per expert, the share of its next-layer picks that go to its top-m successors
  ("top-8 successor share"; independent routing gives m/E), and the mutual information between the expert
  at l and the expert at l+1 of one pick pair, in bits.
- Drift: load shares per window (the trace's batches, or fixed windows of tokens), total-variation
  distance between consecutive windows and to the whole trace, set against the distance that sampling
  alone would give (multinomial noise, normal approximation), and churn of the hottest-expert set.

Every count comes from :mod:`moesim.traces.counts`, accumulated over blocks of tokens, so a memory-mapped
trace of any length is read once, block by block, and never copied whole. Ignored: gate weights (placement
moves tokens, not weights), the order of the top-k picks, and token homes (see the engine for per-GPU load).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moesim.budget import require_memory, require_time
from moesim.fileio import FolderKind, atomic_write, contains, figure, is_matplotlib_png, plain_text
from moesim.traces.counts import (Progress, count_coactivations, count_picks, count_transitions,
                                  count_window_picks)
from moesim.traces.format import Trace


def expert_counts(trace: Trace, progress: Progress | None = None) -> np.ndarray:
    """Picks per (layer, expert): int64 [L, E]; -1 (no expert) is not counted."""
    return count_picks(trace.experts, trace.meta.num_experts, progress)


def coactivation_counts(trace: Trace, progress: Progress | None = None) -> np.ndarray:
    """Same-token, same-layer expert pairs: int64 [L, E, E], symmetric, zero diagonal."""
    return count_coactivations(trace.experts, trace.meta.num_experts, progress)


def transition_counts(trace: Trace, progress: Progress | None = None) -> np.ndarray:
    """Adjacent-layer pairs of one token, every pick at l with every pick at l+1: int64 [L-1, E, E]."""
    return count_transitions(trace.experts, trace.meta.num_experts, progress)


def window_ids(trace: Trace, window: int | None = None) -> np.ndarray:
    """The drift window of every token: its batch when the trace has batches and no ``window`` is given,
    else consecutive blocks of ``window`` tokens (default: 16 windows)."""
    T = trace.num_tokens
    if window is None and trace.batch is not None:
        return np.asarray(trace.batch, dtype=np.int64)
    size = window or max(1, -(-T // 16))
    return np.arange(T, dtype=np.int64) // size


def window_counts(trace: Trace, windows: np.ndarray, progress: Progress | None = None) -> np.ndarray:
    """Picks per (window, layer, expert): int64 [W, L, E]."""
    return count_window_picks(trace.experts, trace.meta.num_experts, windows, progress)


def top_share(counts: np.ndarray, m: int) -> np.ndarray:
    """Per row of ``counts`` [..., n]: the share of the row's total in its ``m`` largest entries (nan for
    empty rows)."""
    total = counts.sum(axis=-1)
    top = -np.sort(-counts, axis=-1)[..., :m].sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, top / np.maximum(total, 1), np.nan)


def weighted_top_share(counts: np.ndarray, m: int) -> np.ndarray:
    """Per leading index of ``counts`` [X, E, E]: the top-m share of every row, weighted by the row's total
    (the share of all pair traffic that goes to each expert's m favourites)."""
    total = counts.sum(axis=-1)
    top = -np.sort(-counts, axis=-1)[..., :m].sum(axis=-1)
    denom = total.sum(axis=-1)
    return np.where(denom > 0, top.sum(axis=-1) / np.maximum(denom, 1), np.nan)


def mutual_information(counts: np.ndarray) -> np.ndarray:
    """Mutual information in bits of the joint distribution ``counts`` [X, E, E] normalised, per X."""
    total = counts.sum(axis=(1, 2), keepdims=True).astype(float)
    p = counts / np.maximum(total, 1)
    pr, pc = p.sum(axis=2, keepdims=True), p.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log2(p / (pr * pc)), 0.0)
    return terms.sum(axis=(1, 2))


def _tv(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return 0.5 * np.abs(p - q).sum(axis=-1)


def load_skew(load: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per layer of ``load`` [L, E]: the busiest expert's load over the mean, and the coefficient of variation
    (NaN for a layer without picks)."""
    mean = load.mean(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mom = np.where(mean > 0, load.max(axis=1) / np.maximum(mean, 1e-300), np.nan)
        cv = np.where(mean > 0, load.std(axis=1) / np.maximum(mean, 1e-300), np.nan)
    return mom, cv


def window_drift(wload: np.ndarray, load: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Drift of the loads per window ``wload`` [W, L, E] (``load`` [L, E] their sum): per layer, the mean TV
    distance between consecutive windows' load shares, of a window to the whole, and from sampling alone; and
    the share of a window's top-``m`` hottest experts not in the previous window's."""
    W, L, E = wload.shape
    shares = wload / np.maximum(wload.sum(axis=2, keepdims=True), 1)
    overall = load / np.maximum(load.sum(axis=1, keepdims=True), 1)
    nonempty = wload.sum(axis=2) > 0  # [W, L]
    if W > 1:
        both = nonempty[1:] & nonempty[:-1]
        tv = _tv(shares[1:], shares[:-1])
        tv_cons = np.where(both.any(axis=0), (tv * both).sum(axis=0) / np.maximum(both.sum(axis=0), 1), np.nan)
    else:
        tv_cons = np.full(L, np.nan)
    tv_all = (_tv(shares, overall[None]) * nonempty).sum(axis=0) / np.maximum(nonempty.sum(axis=0), 1)
    # Sampling noise: E|X/n - p| ~ sqrt(2 p (1-p) / (pi n)) per expert for n picks per window and layer.
    n_w = np.maximum(wload.sum(axis=2), 1)[:, :, None]
    noise = 0.5 * np.sqrt(2 * overall[None] * (1 - overall[None]) / (np.pi * n_w)).sum(axis=2)
    tv_noise = (noise * nonempty).sum(axis=0) / np.maximum(nonempty.sum(axis=0), 1)
    if W > 1:
        hot = np.argsort(-wload, axis=2, kind="stable")[:, :, :m]  # [W, L, m]
        hot_mask = np.zeros((W, L, E), dtype=bool)
        np.put_along_axis(hot_mask, hot, True, axis=2)
        churn = float(1 - (hot_mask[1:] & hot_mask[:-1]).sum(axis=2).mean() / m)
    else:
        churn = float("nan")
    return tv_cons, tv_all, tv_noise, churn


@dataclass(frozen=True)
class TraceStats:
    """Placement-relevant statistics of one trace. Per-layer arrays are indexed by MoE layer."""

    num_tokens: int
    num_layers: int
    num_experts: int
    top_k: int
    top_m: int
    load: np.ndarray  # [L, E] picks
    max_over_mean: np.ndarray  # [L]
    cv: np.ndarray  # [L] coefficient of variation of expert loads
    coact_top_share: np.ndarray  # [L] share of same-layer pairs going to each expert's top-m partners
    succ_top_share: np.ndarray  # [L-1] share of next-layer picks going to each expert's top-m successors
    succ_mi_bits: np.ndarray  # [L-1]
    windows: int
    drift_tv_consecutive: np.ndarray  # [L] mean TV distance between consecutive windows' load shares
    drift_tv_to_all: np.ndarray  # [L] mean TV distance of a window to the whole trace
    drift_tv_noise: np.ndarray  # [L] expected TV distance from sampling alone, same window sizes
    hot_set_churn: float  # mean share of a window's top-m hottest experts not in the previous window's
    transitions: np.ndarray  # [L-1, E, E]
    coactivation: np.ndarray  # [L, E, E]
    window_load: np.ndarray  # [W, L, E]
    layer_ids: tuple[int, ...] | None = None  # the model's own id of each MoE layer (imported logs), if known

    def layer_name(self, layer: int) -> str:
        """``"13"``, or ``"13 (model layer 14)"`` when the model numbers its layers otherwise."""
        if self.layer_ids is None or self.layer_ids[layer] == layer:
            return str(layer)
        return f"{layer} (model layer {self.layer_ids[layer]})"

    @property
    def uniform_succ_share(self) -> float:
        return min(self.top_m, self.num_experts) / self.num_experts

    def hottest(self, layer: int, n: int = 3) -> list[tuple[int, float]]:
        """(expert, share of the layer's picks) of the ``n`` hottest experts of ``layer``."""
        row = self.load[layer]
        order = np.argsort(-row, kind="stable")[:n]
        total = max(int(row.sum()), 1)
        return [(int(e), float(row[e] / total)) for e in order]

    def summary(self) -> dict[str, Any]:
        """Flat, JSON-ready figures (medians over layers unless named otherwise)."""
        def med(a: np.ndarray) -> float | None:  # (a layer that no token reached has NaN figures: left out)
            a = a[np.isfinite(a)]
            return float(np.median(a)) if a.size else None

        def finite(a: np.ndarray, how: Any) -> float | None:
            a = a[np.isfinite(a)]
            return float(how(a)) if a.size else None

        return {
            "tokens": self.num_tokens, "layers": self.num_layers, "experts": self.num_experts, "top_k": self.top_k,
            "top_m": self.top_m,
            "load_max_over_mean_median": med(self.max_over_mean),
            "load_max_over_mean_max": finite(self.max_over_mean, np.max),
            "load_cv_median": med(self.cv),
            "coactivation_top_m_share_median": med(self.coact_top_share),
            "successor_top_m_share_mean": finite(self.succ_top_share, np.mean),
            "successor_top_m_share_uniform": self.uniform_succ_share,
            "successor_mi_bits_median": med(self.succ_mi_bits),
            "windows": self.windows,
            "drift_tv_consecutive_median": med(self.drift_tv_consecutive),
            "drift_tv_to_all_median": med(self.drift_tv_to_all),
            "drift_tv_noise_median": med(self.drift_tv_noise),
            "hot_set_churn": self.hot_set_churn,
            "layer_ids": list(self.layer_ids) if self.layer_ids is not None else None,
            "per_layer": [
                {"layer": i, "max_over_mean": _num(self.max_over_mean[i]), "cv": _num(self.cv[i]),
                 "hottest": [[e, round(s, 5)] for e, s in self.hottest(i)],
                 "coactivation_top_m_share": _num(self.coact_top_share[i]),
                 "successor_top_m_share": _num(self.succ_top_share[i]) if i < self.num_layers - 1 else None,
                 "successor_mi_bits": _num(self.succ_mi_bits[i]) if i < self.num_layers - 1 else None,
                 "drift_tv_consecutive": _num(self.drift_tv_consecutive[i])}
                for i in range(self.num_layers)
            ],
        }


def _num(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def finite_median(a: np.ndarray, default: float = float("nan")) -> float:
    """The median of the finite entries of ``a`` (a layer or window without tokens has NaN figures), or
    ``default`` when there are none - without numpy's warning about an all-NaN slice."""
    a = np.asarray(a, dtype=float)
    a = a[np.isfinite(a)]
    return float(np.median(a)) if a.size else default


def num_windows(trace: Trace, window: int | None = None) -> int:
    """How many drift windows :func:`window_ids` cuts ``trace`` into (without making them)."""
    T = trace.num_tokens
    if not T:
        return 0
    if window is None and trace.batch is not None:
        return int(np.max(trace.batch)) + 1
    size = window or max(1, -(-T // 16))
    return -(-T // size)


def stats_cost(trace: Trace, window: int | None = None) -> tuple[float, float, str]:
    """(bytes, seconds, the sizes in words) of :func:`trace_stats`: per layer the experts x experts
    co-activation and transition counts, and per drift window and layer the experts' loads and shares."""
    L, E, K, T = trace.meta.num_layers, trace.meta.num_experts, trace.meta.top_k, trace.num_tokens
    W = num_windows(trace, window)
    nbytes = 4.0 * L * E * E * 8 + 8.0 * W * L * E * 8 + T * 16.0
    seconds = T * L * K * K * 2e-8 + W * L * E * 5e-8 + L * E * E * 1e-8
    return nbytes, seconds, f"{L} layers x {E} experts (pairs of experts per layer; {W} drift windows)"


STATS_PASSES = 4  # trace_stats reads the trace once per kind of count: picks, co-activations, transitions, windows


def trace_stats(trace: Trace, *, top_m: int = 8, window: int | None = None,
                progress: Progress | None = None) -> TraceStats:
    """Compute every statistic of :class:`TraceStats` in one pass per kind of count (refused up front when
    that cannot fit the memory or time limit: :func:`stats_cost`). ``progress(n)`` is told of the tokens of
    each block counted, :data:`STATS_PASSES` times the trace's tokens in all."""
    nbytes, seconds, what = stats_cost(trace, window)
    require_memory(nbytes, f"statistics of {what}", field="--window" if window else None)
    require_time(seconds, f"statistics of {what}", field="--window" if window else None)
    L, E, K = trace.meta.num_layers, trace.meta.num_experts, trace.meta.top_k
    load = expert_counts(trace, progress)
    mom, cv = load_skew(load)
    coact = coactivation_counts(trace, progress)
    trans = transition_counts(trace, progress)
    wid = window_ids(trace, window)
    wload = window_counts(trace, wid, progress)
    W = wload.shape[0]
    m = min(top_m, E)
    tv_cons, tv_all, tv_noise, churn = window_drift(wload, load, m)
    return TraceStats(
        num_tokens=trace.num_tokens, num_layers=L, num_experts=E, top_k=K, top_m=m, load=load,
        max_over_mean=mom, cv=cv, coact_top_share=weighted_top_share(coact, m),
        succ_top_share=weighted_top_share(trans, m), succ_mi_bits=mutual_information(trans), windows=W,
        drift_tv_consecutive=tv_cons, drift_tv_to_all=tv_all, drift_tv_noise=tv_noise, hot_set_churn=churn,
        transitions=trans, coactivation=coact, window_load=wload, layer_ids=_layer_ids(trace),
    )


def _layer_ids(trace: Trace) -> tuple[int, ...] | None:
    """The model's layer ids an import kept in ``meta.layer_ids`` (None when absent, malformed or 0..L-1)."""
    ids = trace.meta.extra.get("layer_ids")
    if not isinstance(ids, list) or len(ids) != trace.meta.num_layers or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in ids):
        return None
    return None if ids == list(range(len(ids))) else tuple(ids)


def format_stats(st: TraceStats, *, name: str = "trace", layers: int | None = None) -> str:
    """The report ``moesim trace stats`` prints: a summary, then one row per layer."""
    s = st.summary()

    def f(x: float | None, fmt: str = ".3f") -> str:
        return "-" if x is None or not np.isfinite(x) else format(x, fmt)

    independent_coact = min(st.top_m, st.num_experts - 1) / max(st.num_experts - 1, 1)
    windows = f"{st.windows} window{'' if st.windows == 1 else 's'}"
    lines = [
        f"{name}: {st.num_tokens} tokens x {st.num_layers} layers x top-{st.top_k} of {st.num_experts} experts",
        f"  load skew        max/mean median {f(s['load_max_over_mean_median'], '.2f')} "
        f"(worst layer {f(s['load_max_over_mean_max'], '.2f')}), CV median {f(s['load_cv_median'], '.2f')}",
        f"  co-activation    top-{st.top_m} partners take {f(s['coactivation_top_m_share_median'])} of an expert's "
        f"same-layer pairs (median over layers; independent: {independent_coact:.3f})",
        f"  transitions      top-{st.top_m} successors take {f(s['successor_top_m_share_mean'])} of next-layer picks "
        f"(mean over layer pairs; independent: {st.uniform_succ_share:.3f}); MI median "
        f"{f(s['successor_mi_bits_median'])} bits",
        f"  drift            {windows}: TV consecutive {f(s['drift_tv_consecutive_median'])}, to whole "
        f"trace {f(s['drift_tv_to_all_median'])}, sampling noise alone {f(s['drift_tv_noise_median'])}; "
        f"hot-set churn {f(s['hot_set_churn'], '.2f')}",
        *([f"  layers are numbered 0..{st.num_layers - 1} over the MoE layers; 'id' is the model's own layer id"]
          if st.layer_ids is not None else []),
        "",
        ("   id " if st.layer_ids is not None else "")
        + f"{'layer':>5s} {'max/mean':>8s} {'cv':>6s}  {'hottest experts (share)':34s} {'coact':>6s} "
        f"{'succ':>6s} {'MI':>6s} {'drift':>6s}",
    ]
    shown = range(st.num_layers) if layers is None else range(min(layers, st.num_layers))
    for i in shown:
        row = s["per_layer"][i]
        hot = ", ".join(f"{e} ({v:.1%})" for e, v in row["hottest"])
        model_id = f"{st.layer_ids[i]:5d} " if st.layer_ids is not None else ""
        lines.append(model_id + f"{i:5d} {f(row['max_over_mean'], '.2f'):>8s} {f(row['cv'], '.2f'):>6s}  {hot:34s} "
                     f"{f(row['coactivation_top_m_share']):>6s} {f(row['successor_top_m_share']):>6s} "
                     f"{f(row['successor_mi_bits']):>6s} {f(row['drift_tv_consecutive']):>6s}")
    if layers is not None and layers < st.num_layers:
        lines.append(f"  ... {st.num_layers - layers} more layers (--all-layers to show them)")
    return "\n".join(lines)


# what ``moesim trace stats --plots`` writes into its folder (recognised when a later run replaces it)
STATS_PLOTS = FolderKind("moesim trace stats' plots", files={
    name: is_matplotlib_png for name in ("load.png", "transitions.png", "coactivation.png", "drift.png")})


def is_stats_json(path: Path) -> bool:
    """Whether ``path`` looks like a summary ``moesim trace stats --json`` wrote."""
    return contains(b'"load_max_over_mean_median"')(path)


def _layer_axis(ax: Any, st: TraceStats) -> None:
    """The y axis of a layers x experts heatmap: a tick on whole layers only, each labelled as the axis label
    says - the MoE layer index from 0 (what ``--layer`` and the printed table take), followed by the model's
    own id of that layer in parentheses when an import recorded ids that differ."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    def label(value: float, _pos: int) -> str:
        i = int(round(value))
        if abs(value - i) > 1e-6 or not 0 <= i < st.num_layers:
            return ""
        return f"{i} ({st.layer_ids[i]})" if st.layer_ids is not None else str(i)

    ax.yaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.yaxis.set_major_formatter(FuncFormatter(label))
    ax.set_ylabel("MoE layer, from 0" + (" (model layer id)" if st.layer_ids is not None else ""))


def _load_figure(st: TraceStats, name: str) -> Any:
    """load.png: layers x experts, each expert's picks over the layer's mean."""
    L = st.num_layers
    rel = st.load / np.maximum(st.load.mean(axis=1, keepdims=True), 1e-12)
    fig = figure(figsize=(min(16, 3 + st.num_experts * 0.08), min(12, 2 + L * 0.18)))
    ax = fig.subplots()
    im = ax.imshow(rel, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_xlabel("expert id")
    _layer_axis(ax, st)
    ax.set_title(f"{name}: expert load / layer mean\n(max/mean median {finite_median(st.max_over_mean):.2f}, "
                 f"{st.num_tokens} tokens, top-{st.top_k})")
    fig.colorbar(im, ax=ax, label="picks / mean picks of the layer")
    return fig


def plot_stats(st: TraceStats, folder: str | Path, *, layer: int | None = None, name: str = "trace") -> list[Path]:
    """Write heatmaps: load.png (layers x experts, load / layer mean), transitions.png and coactivation.png
    (one layer's expert x expert matrix, rows normalised), drift.png (windows x experts load / mean for that
    layer). ``layer`` defaults to the middle one. Each file is written atomically."""
    folder = Path(folder)
    name = plain_text(name)
    L = st.num_layers
    lay = L // 2 if layer is None else layer
    if not 0 <= lay < L:
        from moesim.errors import InputError

        raise InputError(f"layer {lay} out of range [0, {L})", field="--layer")
    written: list[Path] = []

    def save(fig: Any, fname: str) -> None:
        fig.tight_layout()
        written.append(atomic_write(folder / fname, lambda fh: fig.savefig(fh, format="png", dpi=110), binary=True))

    from matplotlib.ticker import MaxNLocator

    save(_load_figure(st, name), "load.png")

    for fname, mats in (("transitions.png", st.transitions), ("coactivation.png", st.coactivation)):
        idx = min(lay, mats.shape[0] - 1)
        if idx < 0:
            continue
        mat = mats[idx].astype(float)
        mat = mat / np.maximum(mat.sum(axis=1, keepdims=True), 1)
        fig = figure(figsize=(7, 6))
        ax = fig.subplots()
        im = ax.imshow(mat, cmap="viridis", interpolation="nearest")
        if fname == "transitions.png":
            share = st.succ_top_share[idx]
            ax.set_xlabel(f"expert id at MoE layer {st.layer_name(idx + 1)}")
            ax.set_title(f"{name}: successors, MoE layer {idx} -> {idx + 1}\n(top-{st.top_m} successors take "
                         f"{share:.2f} of next-layer picks; independent {st.uniform_succ_share:.2f})")
            label = "share of the row expert's tokens' next-layer picks"
        else:
            ax.set_xlabel("partner expert id (same token, same layer)")
            ax.set_title(f"{name}: co-activation, MoE layer {idx}\n(top-{st.top_m} partners take "
                         f"{st.coact_top_share[idx]:.2f} of the pairs)")
            label = "share of the row expert's pairs"
        ax.set_ylabel(f"expert id at MoE layer {st.layer_name(idx)}")
        fig.colorbar(im, ax=ax, label=label)
        save(fig, fname)

    wl = st.window_load[:, lay].astype(float)
    wl = wl / np.maximum(wl.mean(axis=1, keepdims=True), 1e-12)
    fig = figure(figsize=(min(16, 3 + st.num_experts * 0.08), min(10, 2.5 + st.windows * 0.15)))
    ax = fig.subplots()
    im = ax.imshow(wl, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_xlabel("expert id")
    ax.set_ylabel("window (batch)")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"{name}: drift at MoE layer {st.layer_name(lay)}\n({st.windows} windows; "
                 f"TV between consecutive windows {st.drift_tv_consecutive[lay]:.2f}, "
                 f"sampling noise alone {st.drift_tv_noise[lay]:.2f})")
    fig.colorbar(im, ax=ax, label="picks / mean picks of the window")
    save(fig, "drift.png")
    return written
