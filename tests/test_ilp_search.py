"""The local search shared by the ``ilp`` stages and ``ilp_moetuner`` (moesim.placement.ilp.search).

Properties of the two shapes: best-improvement descent (``improve_layer``, ``deviation_search``) never
worsens its objective, keeps every rank within its slots and leaves its input alone; best-first
screened swaps keep only improving swaps and stop at a local optimum.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.placement.ilp import improve_layer, layer_max_load, lpt
from moesim.placement.ilp.search import descend, screened_swaps
from moesim.placement.ilp_moetuner import deviation, deviation_search


@st.composite
def layers(draw):
    G = draw(st.integers(2, 6))
    E = draw(st.integers(G, 4 * G))
    slots = -(-E // G) + draw(st.integers(0, 1))
    load = np.array(draw(st.lists(st.integers(0, 50), min_size=E, max_size=E)), dtype=float)
    return load, G, slots


@settings(max_examples=60, deadline=None)
@given(layers())
def test_descent_never_worsens_and_keeps_slots(layer):
    load, G, slots = layer
    start = lpt(load[::-1].copy(), G, slots)  # a balanced but not load-sorted start
    before = start.copy()
    a = improve_layer(load, start, G, slots)
    assert np.array_equal(start, before)
    assert layer_max_load(load, a, G) <= layer_max_load(load, start, G)
    assert np.bincount(a, minlength=G).max() <= slots
    d = deviation_search(load, start, G)
    assert deviation(load, d, G) <= deviation(load, start, G) + 1e-9
    assert np.array_equal(np.bincount(d, minlength=G), np.bincount(start, minlength=G))  # swaps only


def test_descent_without_a_move_returns_a_copy():
    a = np.array([0, 1, 1])
    out = descend(np.ones(3), a, 2, lambda p, a, loads, counts: None, max_iter=5)
    assert out is not a and np.array_equal(out, a)


class Sorting:
    """Toy swap search: place values so that position i holds a value near ``target[i]``."""

    def __init__(self, values, target):
        self.v, self.t = np.array(values, dtype=float), np.array(target, dtype=float)

    def cost(self) -> float:
        return float(((self.v - self.t) ** 2).sum())

    def screen(self) -> np.ndarray:
        v, t = self.v, self.t
        new = (v[None, :] - t[:, None]) ** 2 + (v[:, None] - t[None, :]) ** 2
        old = ((v - t) ** 2)[:, None] + ((v - t) ** 2)[None, :]
        delta = new - old
        delta[np.tri(v.size, dtype=bool)] = np.inf
        return delta

    def try_swap(self, i: int, j: int) -> bool:
        before = self.cost()
        self.v[[i, j]] = self.v[[j, i]]
        if self.cost() < before:
            return True
        self.v[[i, j]] = self.v[[j, i]]
        return False


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 100), min_size=2, max_size=12, unique=True))
def test_screened_swaps_reach_a_local_optimum(values):
    target = sorted(values)
    search = Sorting(values, target)
    start = search.cost()
    kept = screened_swaps(search, candidates=len(values) ** 2, rounds=100)
    assert kept == (search.cost() < start)
    assert not (search.screen() < 0).any()  # no improving swap left
    assert list(search.v) == target  # with distinct targets, no inversion survives: sorted


def test_screened_swaps_with_no_rounds_keep_nothing():
    search = Sorting([3, 1, 2], [1, 2, 3])
    assert not screened_swaps(search, candidates=9, rounds=0)
    assert list(search.v) == [3, 1, 2]
