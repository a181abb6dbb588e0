"""The fast synthetic sampler (issue 18) against the sampler it replaced (tests/reference_synthetic.py) and against
closed forms: the same routing law, another random stream.

The two generators share the routing structure (popularity ranks, per-GPU tilts, successors: one
``structure_rng`` seed); their tokens are compared with a two-sample chi-square of homogeneity per statistic:
pick counts per (home GPU, expert), per pick position (the order of successive sampling), same-token pairs,
and transitions from a token's top-1 expert to its next layer's picks. Bins with fewer than 10 counts in both
samples together are pooled. A statistic passes when chi2/dof stays within 6 standard deviations of 1; the
same check tells two seeds of the old sampler apart no more, and tells a sampler with another affinity
apart (power).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from moesim.traces.counts import count_coactivations
from moesim.traces.sampling import PackedAlias, label_bits, successive_sampling
from moesim.traces.synthetic import SyntheticParams, generate_layers, group_set_law
from reference_synthetic import reference_experts

SHAPE = dict(num_layers=3, num_experts=64, top_k=6, num_gpus=8, tokens_per_gpu=6000, batches=1)
PARAMS = SyntheticParams(zipf_alpha=0.6, gpu_mix_sigma=0.4, affinity=0.4, affinity_fanout=8, groups=8, topk_groups=3)


def new_experts(seed: int, params: SyntheticParams = PARAMS, **shape) -> np.ndarray:
    kw = SHAPE | shape
    out = np.empty((kw["batches"] * kw["num_gpus"] * kw["tokens_per_gpu"], kw["num_layers"], kw["top_k"]),
                   dtype=np.int64)
    layers = generate_layers(**kw, params=params, rng=np.random.default_rng(seed),
                             structure_rng=np.random.default_rng(99))
    for lay, (picks, _) in enumerate(layers):
        out[:, lay] = picks
    return out


def old_experts(seed: int, params: SyntheticParams = PARAMS, **shape) -> np.ndarray:
    return reference_experts(**(SHAPE | shape), params=params, rng=np.random.default_rng(seed),
                             structure_rng=np.random.default_rng(99)).astype(np.int64)


def statistics(ex: np.ndarray) -> dict[str, np.ndarray]:
    """Count vectors of the routing statistics a placement study depends on."""
    T, L, K = ex.shape
    E, G = SHAPE["num_experts"], SHAPE["num_gpus"]
    home = np.arange(T) // SHAPE["tokens_per_gpu"] % G
    out = {}
    for lay in range(L):
        picks = ex[:, lay]
        out[f"home x expert, layer {lay}"] = np.bincount((home[:, None] * E + picks).ravel(), minlength=G * E)
        out[f"position x expert, layer {lay}"] = np.bincount((np.arange(K) * E + picks).ravel(), minlength=K * E)
        out[f"pairs, layer {lay}"] = count_coactivations(ex[:, lay : lay + 1], E)[0].ravel()
        if lay:
            prev = ex[:, lay - 1, 0]
            out[f"top-1 -> next picks, layer {lay}"] = np.bincount((prev[:, None] * E + picks).ravel(),
                                                                   minlength=E * E)
    return out


def chi2_per_dof(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    """Two-sample chi-square of homogeneity over the bins of count vectors ``a`` and ``b`` (sparse bins pooled)."""
    big = (a + b) >= 10
    a = np.append(a[big], a[~big].sum()).astype(float)
    b = np.append(b[big], b[~big].sum()).astype(float)
    keep = (a + b) > 0
    a, b = a[keep], b[keep]
    na, nb = a.sum(), b.sum()
    x2 = float((((a * math.sqrt(nb / na) - b * math.sqrt(na / nb)) ** 2) / (a + b)).sum())
    dof = a.size - 1
    return x2 / dof, dof


def worst(x: np.ndarray, y: np.ndarray) -> tuple[float, str]:
    """The largest excess of chi2/dof over 1, in standard deviations (sqrt(2 / dof)), over every statistic."""
    sx, sy = statistics(x), statistics(y)
    scores = []
    for key in sx:
        r, dof = chi2_per_dof(sx[key], sy[key])
        scores.append(((r - 1) / math.sqrt(2 / dof), key))
    return max(scores)


@pytest.fixture(scope="module")
def samples() -> dict[str, np.ndarray]:
    return {"new": new_experts(1), "old": old_experts(2), "old2": old_experts(3)}


def test_fast_sampler_has_the_old_samplers_law(samples):
    score, key = worst(samples["new"], samples["old"])
    assert score < 6, f"{key}: chi2/dof {score:.1f} sd above 1"


def test_the_check_passes_two_seeds_of_the_old_sampler_and_fails_another_law(samples):
    score, _ = worst(samples["old"], samples["old2"])
    assert score < 6
    other = new_experts(1, SyntheticParams(**(PARAMS.__dict__ | {"affinity": 0.3})))
    score, _ = worst(other, samples["old"])
    assert score > 10


def test_fast_sampler_invariants(samples):
    ex = samples["new"]
    size = SHAPE["num_experts"] // PARAMS.groups
    srt = np.sort(ex, axis=2)
    assert (np.diff(srt, axis=2) > 0).all()  # k distinct experts per token and layer
    assert ex.min() >= 0 and ex.max() < SHAPE["num_experts"]
    groups = np.sort(ex // size, axis=2)
    used = 1 + (np.diff(groups, axis=2) > 0).sum(axis=2)
    assert used.max() <= PARAMS.topk_groups  # the group limit always holds


def test_without_group_limit_and_affinity_the_laws_agree():
    params = SyntheticParams(zipf_alpha=0.8, gpu_mix_sigma=0.3, affinity=0.6, affinity_fanout=6)
    score, key = worst(new_experts(4, params), old_experts(5, params))
    assert score < 6, key


def test_group_set_law_is_successive_sampling_of_groups():
    """P(set) summed over the orders of successive sampling, by brute force, for random group masses."""
    rng = np.random.default_rng(0)
    mass = rng.random((3, 6)) + 0.05
    for k in (1, 2, 4, 6):
        p, members = group_set_law(mass, k)
        assert members.shape == (math.comb(6, k), k)
        np.testing.assert_allclose(p.sum(axis=1), 1.0)
        m = mass / mass.sum(axis=1, keepdims=True)
        for s, groups in enumerate(members):
            want = np.zeros(3)
            for order in itertools.permutations(groups):
                prob, left = np.ones(3), np.ones(3)
                for g in order:
                    prob *= m[:, g] / left
                    left = left - m[:, g]
                want += prob
            np.testing.assert_allclose(p[:, s], want, rtol=1e-9)
    assert group_set_law(np.ones((1, 20)), 10) is None  # too many sets: groups drawn one by one


def test_packed_alias_draws_follow_the_weights():
    rng = np.random.default_rng(1)
    weights = np.array([[5.0, 1.0, 0.0, 2.0, 0.5], [1.0, 1.0, 1.0, 1.0, 1.0]])
    labels = np.array([[10, 11, 12, 13, 14], [20, 21, 22, 23, 24]])
    table = PackedAlias([(weights, labels), (np.array([[3.0, 1.0]]), np.array([[30, 31]]))], label_bits(32))
    n = 400_000
    for row, start, width, w, lab in ((0, 0, 5, weights[0], labels[0]), (1, 5, 5, weights[1], labels[1]),
                                      (2, 10, 2, np.array([3.0, 1.0]), np.array([30, 31]))):
        got = table.draw(np.full(n, start), width, rng.bit_generator.random_raw(n))
        freq = np.array([(got == x).sum() for x in lab]) / n
        p = w / w.sum()
        assert np.abs(freq - p).max() < 5 * np.sqrt(p * (1 - p) / n).max() + 1e-12, row
        assert np.isin(got, lab).all()


def test_successive_sampling_without_allowed_is_the_order_of_first_appearance():
    """Top-2 of a fixed categorical: P(first=e, second=f) = p_e p_f / (1 - p_e)."""
    rng = np.random.default_rng(2)
    p = np.array([0.5, 0.3, 0.15, 0.05])
    table = PackedAlias([(p[None, :], np.arange(4)[None, :])], label_bits(4))
    n = 300_000

    def draw(tokens, m):
        size = n if tokens is None else tokens.size
        return table.draw(np.zeros(size, dtype=np.int64), 4, rng.bit_generator.random_raw((m, size)))

    picks = successive_sampling(draw, n, 2)
    joint = np.bincount(picks[0] * 4 + picks[1], minlength=16).reshape(4, 4) / n
    want = p[:, None] * p[None, :] / (1 - p[:, None])
    np.fill_diagonal(want, 0)
    assert np.abs(joint - want).max() < 0.004


def test_successive_sampling_gives_plackett_luce_orders():
    """A skewed law over 5 labels, 4 picks on uint8 labels (re-draws in most tokens, batches of candidates in
    later rounds): every ordered 4-tuple at its Plackett-Luce probability
    prod_i p_(x_i) / (1 - p_(x_0) - ... - p_(x_(i-1))), by a chi-square over the 120 orders."""
    rng = np.random.default_rng(3)
    p = np.array([0.55, 0.25, 0.12, 0.06, 0.02])
    table = PackedAlias([(p[None, :], np.arange(5)[None, :])], label_bits(5))
    n = 240_000

    def draw(tokens, m):
        size = n if tokens is None else tokens.size
        return table.draw(np.zeros(size, dtype=np.int64), 5, rng.bit_generator.random_raw((m, size)))

    picks = successive_sampling(draw, n, 4, dtype=np.uint8).astype(np.int64)
    assert (np.sort(picks, axis=0)[1:] != np.sort(picks, axis=0)[:-1]).all()
    orders = list(itertools.permutations(range(5), 4))
    code = ((picks[0] * 5 + picks[1]) * 5 + picks[2]) * 5 + picks[3]
    counts = np.bincount(code, minlength=5**4)
    got = np.array([counts[((a * 5 + b) * 5 + c) * 5 + d] for a, b, c, d in orders], dtype=float)
    want = np.array([math.prod(p[x[i]] / (1 - p[list(x[:i])].sum()) for i in range(4)) for x in orders]) * n
    assert got.sum() == n
    chi2 = float(((got - want) ** 2 / want).sum())
    dof = len(orders) - 1
    assert (chi2 / dof - 1) / math.sqrt(2 / dof) < 6, chi2


def test_groups_drawn_one_by_one_have_the_old_samplers_law():
    """Too many sets of groups for one draw (16 groups, 8 per token: 12,870 sets): the token's groups are drawn by
    successive sampling and its segments built per token; the law is still the old sampler's."""
    params = SyntheticParams(zipf_alpha=0.6, gpu_mix_sigma=0.4, affinity=0.4, affinity_fanout=8, groups=16,
                             topk_groups=8)
    assert group_set_law(np.ones((1, 16)), 8) is None
    score, key = worst(new_experts(1, params), old_experts(2, params))
    assert score < 6, f"{key}: chi2/dof {score:.1f} sd above 1"
