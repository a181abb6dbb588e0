"""Fit the generator of :mod:`moesim.traces.fitted_generator` to a real trace: popularity, transitions, drift.

Two steps:
1. Closed form, from the trace's counts (:func:`initial_params`): popularity = each layer's load shares;
   for every expert p of layer l, the pointwise mutual information of (p at l, e at l+1),
   log P(e | p) / P(e) from the transition counts (smoothed), of its ``fanout`` best successors e.
2. Calibration against simulated samples (:func:`calibrate`): the generator adds the boosts of a token's k
   experts and picks k without replacement, so step 1 is only a start. Each round generates a sample (the
   same random numbers every round, so the map from parameters to statistics is smooth), measures it with
   :mod:`moesim.traces.stats`, and corrects, per layer, the popularity (multiplicatively, towards the real
   load shares), the coupling (towards the real top-8 successor share) and the drift strength (towards the
   real window-to-window distance beyond sampling noise). Each round draws a fresh sample and the steps
   shrink, and the result averages the last rounds, so it fits the generator's average behaviour rather
   than one sample. Drift persistence comes from the ratio of consecutive-window to whole-trace distances.
   Tolerances the fit is tested to (DeepSeek-V2-Lite): per-layer max/mean load within 10%, per-layer top-8
   successor share within 0.05.

Only aggregate numbers leave the trace (shares, successor lists and their boosts), never per-token data.
Ignored: per-GPU mix (most real logs have no homes), gate weights, layers further apart than one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np

from moesim.budget import require_memory, require_time
from moesim.errors import InputError
from moesim.traces.fitted_generator import FittedParams, fitted_cost, generate_fitted
from moesim.traces.format import Trace
from moesim.traces.stats import (TraceStats, expert_counts, finite_median, num_windows, stats_cost, trace_stats,
                                  transition_counts, weighted_top_share, window_counts)

TOP_M = 8
LOAD_TOLERANCE = 0.10  # relative, per-layer max/mean load
SUCCESSOR_TOLERANCE = 0.05  # absolute, per-layer top-8 successor share


def initial_params(load: np.ndarray, transitions: np.ndarray, top_k: int, *, fanout: int, name: str = "fitted",
                   smoothing: float = 1.0) -> FittedParams:
    """Step 1 (see the module docstring) from counts: load [L, E], transitions [L-1, E, E]."""
    L, E = load.shape
    F = min(fanout, E)
    share = load / np.maximum(load.sum(axis=1, keepdims=True), 1)
    floor = 0.05 / (E * max(int(load.sum(axis=1).min()), 1))  # unseen experts keep a tiny chance
    pop = np.maximum(share, floor)
    pop /= pop.sum(axis=1, keepdims=True)
    succ = np.zeros((max(L - 1, 0), E, F), dtype=np.int64)
    logits = np.zeros((max(L - 1, 0), E, F))
    for pair in range(L - 1):  # per layer pair, vectorised over experts
        rows = transitions[pair].astype(float)
        cond = (rows + smoothing * pop[pair + 1]) / (rows.sum(axis=1, keepdims=True) + smoothing)
        pmi = np.log(cond / pop[pair + 1])
        ids = np.argsort(-pmi, axis=1, kind="stable")[:, :F]
        succ[pair], logits[pair] = ids, np.take_along_axis(pmi, ids, axis=1)
    return FittedParams(name=name, num_layers=L, num_experts=E, top_k=top_k, popularity=pop, successors=succ,
                        successor_logits=logits, coupling=np.full(max(L - 1, 0), 0.5))


@dataclass(frozen=True)
class Targets:
    """What the calibration aims at: per-layer load shares [L, E] and max/mean [L], top-8 successor shares
    [L-1], and drift (consecutive-window TV beyond sampling noise, persistence)."""

    share: np.ndarray
    max_over_mean: np.ndarray
    succ: np.ndarray
    drift_excess: float = 0.0
    drift_rho: float = 0.0

    @classmethod
    def of_stats(cls, st: TraceStats) -> "Targets":
        share = st.load / np.maximum(st.load.sum(axis=1, keepdims=True), 1)
        if st.windows < 2:
            return cls(share, st.max_over_mean, st.succ_top_share)
        noise = finite_median(st.drift_tv_noise, 0.0)
        cons = finite_median(st.drift_tv_consecutive, 0.0)
        to_all = finite_median(st.drift_tv_to_all, 0.0)
        ex_cons = float(np.sqrt(max(cons**2 - 2 * noise**2, 0.0)))  # two windows' noise, in quadrature
        ex_all = float(np.sqrt(max(to_all**2 - noise**2, 0.0)))
        rho = float(np.clip(1 - (ex_cons / ex_all) ** 2 / 2, 0.0, 0.95)) if ex_all > 0 else 0.0
        return cls(share, st.max_over_mean, st.succ_top_share, ex_cons, rho)

    @classmethod
    def of_counts(cls, load: np.ndarray, transitions: np.ndarray) -> "Targets":
        mean = np.maximum(load.mean(axis=1), 1e-12)
        return cls(load / np.maximum(load.sum(axis=1, keepdims=True), 1), load.max(axis=1) / mean,
                   weighted_top_share(transitions, TOP_M))


@dataclass(frozen=True)
class _Measured:
    max_over_mean: np.ndarray
    share: np.ndarray
    succ: np.ndarray
    drift_excess: float


def _measure(params: FittedParams, per_window: int, batches: int, seed: int) -> _Measured:
    gen = generate_fitted(params, num_gpus=1, tokens_per_gpu=per_window, batches=batches,
                          rng=np.random.default_rng(seed), weights=False)
    load = expert_counts(gen)
    mean = np.maximum(load.mean(axis=1), 1e-12)
    succ = weighted_top_share(transition_counts(gen), TOP_M)
    drift = 0.0
    if params.drift_sigma > 0 and batches > 1:
        wl = window_counts(gen, np.asarray(gen.batch, dtype=np.int64))
        shares = wl / np.maximum(wl.sum(axis=2, keepdims=True), 1)
        cons = float(np.median(0.5 * np.abs(shares[1:] - shares[:-1]).sum(axis=2).mean(axis=0)))
        p = load / np.maximum(load.sum(axis=1, keepdims=True), 1)
        noise = float(np.median(0.5 * np.sqrt(2 * p * (1 - p) / (np.pi * per_window * params.top_k)).sum(axis=1)))
        drift = float(np.sqrt(max(cons**2 - 2 * noise**2, 1e-12)))
    return _Measured(load.max(axis=1) / mean, load / np.maximum(load.sum(axis=1, keepdims=True), 1), succ, drift)


def calibrate(params: FittedParams, real: Targets, *, per_window: int, tokens: int, rounds: int, seed: int,
              progress: Callable[[int], object] | None = None) -> FittedParams:
    """Step 2 (see the module docstring): ``rounds`` rounds of generate, measure, correct (``rounds + 1``
    samples, the first measuring the start); ``progress(1)`` is told of each.

    Every round draws a fresh sample, and the corrections shrink after the first third of the rounds
    (stochastic approximation); the result averages the last third (Polyak), so that it fits what the
    generator does on average, not one lucky sample."""
    share, target_drift, rho = real.share, real.drift_excess, real.drift_rho
    batches = max(2, -(-tokens // per_window))
    # Drift strength to start from: TV ~ 0.5 E|dz| = 0.4 sigma sqrt(2 (1 - rho)) for small normal tilts.
    sigma = target_drift / (0.4 * np.sqrt(2 * (1 - rho))) if target_drift > 0 else 0.0
    p = replace(params, drift_sigma=float(sigma), drift_rho=rho)
    warm = max(1, rounds // 3)
    acc_logpop, acc_coupling = np.zeros(p.popularity.shape), np.zeros(p.coupling.shape)
    acc_sigma, n_acc = 0.0, 0
    for r in range(rounds + 1):
        got = _measure(p, per_window, batches, seed + r)
        gain = 1.0 if r < warm else warm / r
        ratio = np.where(share > 0, share / np.maximum(got.share, 1e-9), 0.5)
        pop = p.popularity * np.clip(ratio, 0.5, 2.0) ** (0.7 * gain)
        pop /= pop.sum(axis=1, keepdims=True)
        ok = np.isfinite(real.succ) & (got.succ > 0)
        step = np.where(ok, real.succ / np.where(ok, got.succ, 1.0), 1.0)
        coupling = np.clip(p.coupling * np.clip(step, 0.85, 1.15) ** gain, 0.0, 10.0)
        if target_drift > 0 and got.drift_excess > 0:
            sigma = float(np.clip(p.drift_sigma * np.clip(target_drift / got.drift_excess, 0.7, 1.4) ** gain, 0.0, 5.0))
        p = replace(p, popularity=pop, coupling=coupling, drift_sigma=sigma)
        if r >= rounds - warm:
            acc_logpop = acc_logpop + np.log(pop)
            acc_coupling, acc_sigma, n_acc = acc_coupling + coupling, acc_sigma + sigma, n_acc + 1
        if progress is not None:
            progress(1)
    pop = np.exp(acc_logpop / n_acc)
    return replace(p, popularity=pop / pop.sum(axis=1, keepdims=True), coupling=acc_coupling / n_acc,
                   drift_sigma=float(acc_sigma / n_acc))


def fit_steps(rounds: int) -> int:
    """How many steps :func:`fit_trace` tells its ``progress`` of: the trace's statistics, then each of the
    ``rounds + 1`` calibration samples."""
    return rounds + 2


def fit_trace(trace: Trace, *, fanout: int = 16, calibration_tokens: int | None = None, rounds: int = 24, seed: int = 0,
              name: str = "fitted", window: int | None = None,
              progress: Callable[[int], object] | None = None) -> FittedParams:
    """Fit :class:`FittedParams` to ``trace`` (steps 1 and 2 of the module docstring).

    Drift is measured per window: the trace's batches, or ``window`` tokens (default: 16 windows).
    Calibration samples default to the real trace's size, so that sampling noise inflates the skew of both
    alike (max/mean over a few thousand tokens runs above its expectation). ``progress(n)`` is told of
    finished steps (:func:`fit_steps` in all); it changes nothing in the result."""
    if fanout < 1:
        raise InputError(f"must be >= 1, got {fanout}", field="fanout")
    calibration_tokens = calibration_tokens or max(trace.num_tokens, 8192)  # as noisy as the real trace
    if rounds < 0 or calibration_tokens < 1:
        raise InputError("rounds must be >= 0 and calibration_tokens >= 1")
    if trace.num_tokens == 0:
        raise InputError("the trace has no tokens")
    m = trace.meta
    per_window = max(1, trace.num_tokens // max(num_windows(trace, window), 1))
    nbytes, seconds, what = fitted_cost(num_layers=m.num_layers, num_experts=m.num_experts, top_k=m.top_k, num_gpus=1,
                                        tokens_per_gpu=per_window, batches=max(2, -(-calibration_tokens // per_window)),
                                        in_memory=True, weights=False)
    require_memory(nbytes + stats_cost(trace, window)[0], f"fitting a generator to {what}",
                   field="--calibration-tokens")
    require_time(seconds * (rounds + 1), f"{rounds} calibration rounds on {what}", field="--rounds")
    real = trace_stats(trace, top_m=TOP_M, window=window)
    if progress is not None:
        progress(1)
    params = initial_params(real.load, real.transitions, trace.meta.top_k, fanout=fanout, name=name)
    per_window = max(1, trace.num_tokens // max(real.windows, 1))
    params = calibrate(params, Targets.of_stats(real), per_window=per_window, tokens=calibration_tokens,
                       rounds=rounds, seed=seed, progress=progress)
    s = real.summary()
    fitted_to: dict[str, Any] = {
        "tokens": trace.num_tokens, "source": trace.meta.model or trace.meta.source, "top_m": TOP_M,
        "tokens_per_window": per_window,
        "load_max_over_mean": [round(float(v), 4) for v in real.max_over_mean],
        "successor_top_m_share": [round(float(v), 4) for v in real.succ_top_share],
        "drift_tv_consecutive_median": s["drift_tv_consecutive_median"],
    }
    return replace(params, fitted_to=fitted_to).check()


def fit_counts(load: np.ndarray, transitions: np.ndarray, top_k: int, *, fanout: int = 16,
               calibration_tokens: int = 16384, rounds: int = 16, seed: int = 0, name: str = "fitted",
               fitted_to: dict[str, Any] | None = None) -> FittedParams:
    """Fit from aggregate counts alone (no per-token trace): load [L, E] and adjacent transitions
    [L-1, E, E]. No drift (counts carry no time). Used for published statistics such as OLMoE's."""
    load = np.asarray(load)
    transitions = np.asarray(transitions)
    L, E = load.shape
    if transitions.shape != (L - 1, E, E):
        raise InputError(f"transitions must be [{L - 1}, {E}, {E}] for load [{L}, {E}], got {transitions.shape}")
    params = initial_params(load, transitions, top_k, fanout=fanout, name=name)
    params = calibrate(params, Targets.of_counts(load, transitions), per_window=calibration_tokens,
                       tokens=calibration_tokens, rounds=rounds, seed=seed)
    return replace(params, fitted_to=fitted_to or {}).check()
