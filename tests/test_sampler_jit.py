"""The synthetic generator's compiled sampler (moesim/traces/sampling_jit.py, the extra 'fast') against its numpy
path: byte-identical picks, gate weights and random streams, so a trace never depends on whether numba is
installed.

Covered: numpy's PCG64 words and jumps reproduced; one chunk's picks and the generator's state after it, for the
plain mixture (affinity 0, between, 1), group-limited routing with precomputed sets of groups (affinity 0 and
between), narrow tables that force many rejection rounds (up to the 64 draws a round), widths that are not powers
of two, more than 256 experts (int16 ids); whole traces over several chunks and threads; the paths that fall back
to numpy (groups drawn one by one, another bit generator) and the errors both paths raise.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.traces import sampling, sampling_jit, synthetic
from moesim.traces.synthetic import SyntheticParams, generate_trace

needs_numba = pytest.mark.skipif(not sampling_jit.AVAILABLE, reason="numba (the extra 'fast') is not installed")
M64 = (1 << 64) - 1


def layer_inputs(E: int, G: int, n: int, params: SyntheticParams, seed: int, affinity: float
                 ) -> tuple[synthetic._LayerTables, np.ndarray, np.ndarray]:
    """Layer 1's tables of a random routing structure, ``n`` tokens spread over the ``G`` homes in order, and
    random previous top-1 experts."""
    pops, succ_ids, succ_w = synthetic._routing_structure(2, E, G, params, np.random.default_rng(seed))
    tab = synthetic._layer_tables(pops[1], succ_ids[1], succ_w[1], affinity, params)
    home = (np.arange(n) * G // n).astype(np.int64)
    prev = np.random.default_rng(seed + 1).integers(0, E, n)
    return tab, home, prev


def both_paths(tab: synthetic._LayerTables, home: np.ndarray, prev: np.ndarray, k: int, seed: int
               ) -> tuple[tuple[np.ndarray, dict], tuple[np.ndarray, dict]]:
    """(picks, generator state after) of the numpy path and of the compiled one, from the same stream; the compiled
    one really compiled wherever it covers the tables (no groups, or sets of groups tabulated)."""
    if tab.groups is None or tab.group_sets is not None:
        assert synthetic._compiled_picks(tab, home, prev, k, np.random.default_rng([seed, 7])) is not None
    out = []
    for compiled in (False, True):
        rng = np.random.default_rng([seed, 7])
        picks = synthetic._layer_picks(tab, home, prev, k, rng, compiled=compiled)
        out.append((picks, rng.bit_generator.state))
    return out[0], out[1]


def assert_identical(want: tuple[np.ndarray, dict], got: tuple[np.ndarray, dict]) -> None:
    assert got[0].dtype == want[0].dtype and got[0].shape == want[0].shape
    assert got[0].tobytes() == want[0].tobytes()
    assert got[1] == want[1]  # the same number of words drawn


@needs_numba
@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_pcg64_words_and_jumps_are_numpys(seed):
    """The compiled PCG64 step gives random_raw's words, and a jump gives numpy's advance (both from the state
    the bit generator reports)."""
    bg = np.random.default_rng(seed).bit_generator
    s = sampling_jit.pcg64_state(bg)
    assert s is not None
    want = bg.random_raw(50)
    hi, lo, words = s[0], s[1], []
    for _ in range(50):
        hi, lo, w = (np.uint64(x) for x in sampling_jit._pcg64(hi, lo, s[2], s[3]))  # numba hands back ints
        words.append(int(w))
    assert words == [int(x) for x in want]
    for delta in (0, 1, 3, 16384, 8 * 16384 + 5, 2**40 + 17):
        ref = np.random.default_rng(seed).bit_generator
        ref.advance(delta)
        hi, lo = sampling_jit._advance(s[0], s[1], s[2], s[3], np.int64(delta))
        assert (int(hi) << 64) | int(lo) == ref.state["state"]["state"]
    copy = np.random.default_rng(seed + 1).bit_generator
    sampling_jit.store_pcg64_state(copy, s)
    assert copy.random_raw(3).tolist() == np.random.default_rng(seed).bit_generator.random_raw(3).tolist()


MIXTURE = SyntheticParams(zipf_alpha=0.6, gpu_mix_sigma=0.4, affinity=0.4, affinity_fanout=8)
GROUPED = SyntheticParams(zipf_alpha=0.6, gpu_mix_sigma=0.4, affinity=0.4, affinity_fanout=8, groups=8, topk_groups=4)


@needs_numba
@pytest.mark.parametrize("seed", [0, 3, 17])
@pytest.mark.parametrize("params,affinity", [(MIXTURE, 0.0), (MIXTURE, 0.4), (GROUPED, 0.0), (GROUPED, 0.4),
                                             (SyntheticParams(affinity=1.0, affinity_fanout=10), 1.0),
                                             (SyntheticParams(affinity=1.0, affinity_fanout=256, groups=8,
                                                              topk_groups=4), 1.0)])
def test_chunk_picks_are_byte_identical(seed, params, affinity):
    """One chunk (DeepSeek-V3's shape: 256 experts, top-8; 8 groups, top-4 groups): the same picks and the same
    stream position after them."""
    tab, home, prev = layer_inputs(256, 16, 5000, params, seed, affinity)
    if params.groups > 1:
        assert tab.group_sets is not None  # the compiled group path, not the fallback
    want, got = both_paths(tab, home, prev, 8, seed)
    assert_identical(want, got)


class CountingStream:
    """A PCG64 stream that records the shapes its words are asked in (the numpy path's rounds)."""

    def __init__(self, seed: list[int]) -> None:
        self.bit_generator = self
        self.inner = np.random.default_rng(seed).bit_generator
        self.shapes: list = []

    def random_raw(self, size):  # noqa: ANN001, ANN201
        self.shapes.append(size)
        return self.inner.random_raw(size)


@needs_numba
@pytest.mark.parametrize("groups,topk_groups", [(1, None), (4, 2)])
def test_many_rejection_rounds_are_byte_identical(groups, topk_groups):
    """Top-7 of 8 experts (top-4 of 2 groups of 4) under heavy skew: tokens need many rejection rounds, up to the
    cap of 64 draws a round, each round's words consumed as numpy consumes them."""
    params = SyntheticParams(zipf_alpha=2.5, gpu_mix_sigma=1.5, affinity=0.5, affinity_fanout=8, groups=groups,
                             topk_groups=topk_groups)
    k = 7 if groups == 1 else 4
    tab, home, prev = layer_inputs(8, 4, 3000, params, 5, 0.5)
    want, got = both_paths(tab, home, prev, k, 5)
    assert_identical(want, got)
    counting = CountingStream([5, 7])
    again = synthetic._layer_picks(tab, home, prev, k, counting, compiled=False)  # type: ignore[arg-type]
    assert again.tobytes() == want[0].tobytes()
    assert max(np.atleast_1d(shape)[0] for shape in counting.shapes[1:]) == sampling.MAX_DRAWS_PER_ROUND


@needs_numba
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([(12, 3, 2), (24, 3, 2), (40, 5, 3), (300, 6, 2), (20, 1, None), (300, 1, None)]),
       st.integers(1, 6), st.sampled_from([0.0, 0.25, 0.9]), st.integers(1, 6), st.integers(0, 2**32 - 1),
       st.integers(1, 700))
def test_random_shapes_are_byte_identical(grouping, k, affinity, fanout, seed, n):
    """Any shape the generator accepts: widths that are not powers of two, int16 ids (300 experts), few tokens."""
    E, groups, topk_groups = grouping
    params = SyntheticParams(zipf_alpha=0.8, gpu_mix_sigma=0.5, affinity=affinity, affinity_fanout=fanout,
                             groups=groups, topk_groups=topk_groups)
    k = min(k, E // groups * (topk_groups or 1))
    tab, home, prev = layer_inputs(E, 3, n, params, seed % 1000, affinity)
    want, got = both_paths(tab, home, prev, k, seed)
    assert_identical(want, got)


@needs_numba
@pytest.mark.parametrize("params", [MIXTURE, GROUPED])
def test_whole_traces_are_byte_identical(params, monkeypatch):
    """A trace of several chunks sampled by parallel threads: the same expert ids and gate weights."""
    monkeypatch.setattr(synthetic, "_TOKEN_CHUNK", 1000)
    traces = [generate_trace(num_layers=3, num_experts=64, top_k=6, num_gpus=8, tokens_per_gpu=600, batches=1,
                             params=params, rng=np.random.default_rng(2), compiled=compiled)
              for compiled in (False, True)]
    assert traces[0].experts.tobytes() == traces[1].experts.tobytes()
    assert traces[0].weights is not None and traces[1].weights is not None
    assert traces[0].weights.tobytes() == traces[1].weights.tobytes()


@needs_numba
def test_environment_variable_selects_the_numpy_path(monkeypatch):
    monkeypatch.setenv(sampling_jit.ENV, "0")
    assert not sampling_jit.enabled()
    assert sampling_jit.enabled(True)
    monkeypatch.setenv(sampling_jit.ENV, "1")
    assert sampling_jit.enabled()
    assert not sampling_jit.enabled(False)


@needs_numba
def test_fallbacks_to_numpy_are_byte_identical():
    """Groups drawn one by one (too many sets of groups to tabulate) and a bit generator other than PCG64 take
    the numpy path, with the same result."""
    params = SyntheticParams(affinity=0.3, affinity_fanout=8, groups=16, topk_groups=8)
    tab, home, prev = layer_inputs(64, 4, 2000, params, 1, 0.3)
    assert tab.group_sets is None
    want, got = both_paths(tab, home, prev, 6, 1)
    assert_identical(want, got)
    assert sampling_jit.pcg64_state(np.random.Generator(np.random.Philox(1)).bit_generator) is None
    tab, home, prev = layer_inputs(64, 4, 2000, MIXTURE, 1, 0.4)
    picks = [synthetic._layer_picks(tab, home, prev, 6, np.random.Generator(np.random.Philox(3)), compiled=c)
             for c in (False, True)]
    assert picks[0].tobytes() == picks[1].tobytes()


@needs_numba
@pytest.mark.parametrize("compiled", [False, True])
def test_both_paths_refuse_segments_without_mass(compiled):
    """Affinity 1 under group-limited routing: a token whose groups hold none of its successors has nothing to
    draw from; both paths say so."""
    params = SyntheticParams(affinity=1.0, affinity_fanout=2, groups=8, topk_groups=2)
    tab, home, prev = layer_inputs(64, 4, 500, params, 0, 1.0)
    with pytest.raises(ValueError, match="could not draw top_k distinct experts"):
        synthetic._layer_picks(tab, home, prev, 2, np.random.default_rng(0), compiled=compiled)


def test_compiled_without_numba_is_refused(monkeypatch):
    monkeypatch.setattr(sampling_jit, "AVAILABLE", False)
    assert not sampling_jit.enabled()
    with pytest.raises(ValueError, match="numba"):
        sampling_jit.enabled(True)
