"""Count traces (moesim.traces.count_trace): validation naming the field, the moesim.counts/1 round trip, and
the synthetic expansion (counts reproduced exactly, distinct picks, labelled, no cross-layer affinity)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moesim.errors import InputError
from moesim.traces.count_trace import (
    FORMAT, SYNTHETIC, CountTrace, counts_of_trace, expand_counts, is_counts_file, load_counts, refuse_counts,
    save_counts, what_counts_support)
from moesim.traces.counts import count_picks, count_transitions
from moesim.traces.format import Trace, TraceMeta, save_trace


def meta(L: int = 2, E: int = 6, K: int = 2) -> TraceMeta:
    return TraceMeta(num_experts=E, num_layers=L, top_k=K, model="m", source="unit")


def sample(W: int = 3, L: int = 2, E: int = 6, K: int = 2, T: int = 10, seed: int = 0) -> CountTrace:
    """Counts of a real per-token routing (each token K distinct experts), so they are consistent."""
    rng = np.random.default_rng(seed)
    loads = np.zeros((W, L, E), dtype=np.int64)
    for w in range(W):
        for lay in range(L):
            for _ in range(T):
                loads[w, lay, rng.choice(E, K, replace=False)] += 1
    return CountTrace(loads=loads, meta=meta(L, E, K), layer_ids=tuple(range(1, 2 * L, 2)), num_decoder_layers=2 * L,
                      window_tokens=np.full(W, T))


def test_round_trip(tmp_path):
    ct = sample()
    path = save_counts(tmp_path / "sub" / "c.npz", ct)
    assert is_counts_file(path)
    back = load_counts(path)
    np.testing.assert_array_equal(back.loads, ct.loads)
    np.testing.assert_array_equal(back.window_tokens, ct.window_tokens)
    assert back.meta == ct.meta and back.layer_ids == (1, 3) and back.num_decoder_layers == 4
    assert back.loads.dtype == np.int64
    assert [p.name for p in path.parent.iterdir()] == ["c.npz"]  # atomic: nothing else left behind
    with np.load(path) as z:
        assert json.loads(str(z["meta"]))["format"] == FORMAT


def test_round_trip_without_optional_fields(tmp_path):
    ct = CountTrace(loads=np.ones((1, 2, 4), dtype=np.int32), meta=meta(2, 4, 2))
    back = load_counts(save_counts(tmp_path / "c.npz", ct))
    assert back.layer_ids is None and back.window_tokens is None and back.num_decoder_layers is None
    np.testing.assert_array_equal(back.tokens(), [2])  # 4 picks / top-2


@pytest.mark.parametrize("kwargs, field, words", [
    ({"loads": np.zeros((2, 6), dtype=np.int64)}, "loads", "3-D"),
    ({"loads": np.zeros((1, 2, 6), dtype=np.float32)}, "loads", "integer"),
    ({"loads": np.zeros((1, 3, 6), dtype=np.int64)}, "loads", "does not match"),
    ({"loads": np.zeros((0, 2, 6), dtype=np.int64)}, "loads", "no windows"),
    ({"loads": np.full((1, 2, 6), -1)}, "loads", "window 0, layer 0, expert 0"),
    ({"layer_ids": (1,)}, "layer_ids", "2 integers"),
    ({"layer_ids": (3, 1)}, "layer_ids", "increasing"),
    ({"layer_ids": (1, 5), "num_decoder_layers": 4}, "layer_ids", "out of range"),
    ({"num_decoder_layers": 1}, "num_decoder_layers", "from num_layers=2"),
    ({"window_tokens": np.array([1, 2])}, "window_tokens", "windows=1"),
    ({"window_tokens": np.array([-1])}, "window_tokens", ">= 0"),
    ({"loads": np.full((1, 2, 6), 1), "window_tokens": np.array([2])}, "window_tokens", "more than its 2 tokens"),
    ({"loads": np.eye(6, dtype=np.int64)[None, [0, 1]] * 3, "window_tokens": np.array([2])}, "window_tokens",
     "counted 3 times"),
])
def test_validation_names_the_field(kwargs, field, words):
    args = {"loads": np.zeros((1, 2, 6), dtype=np.int64), "meta": meta(), **kwargs}
    with pytest.raises(InputError) as exc:
        CountTrace(**args)
    assert exc.value.field == field and words in str(exc.value)


def test_top_k_above_experts_refused():
    with pytest.raises(InputError, match="meta.top_k"):
        CountTrace(loads=np.zeros((1, 2, 6), dtype=np.int64), meta=meta(K=7))


def test_load_refuses_a_per_token_trace_and_damage(tmp_path):
    tr = Trace(experts=np.zeros((2, 1, 1), dtype=np.int32), meta=TraceMeta(num_experts=2, num_layers=1, top_k=1))
    save_trace(tr, tmp_path / "t.npz")
    with pytest.raises(InputError, match=r"t.npz: loads: missing: a per-token trace"):
        load_counts(tmp_path / "t.npz")
    (tmp_path / "x.npz").write_bytes(b"garbage")
    with pytest.raises(InputError, match="x.npz: not a .npz count trace"):
        load_counts(tmp_path / "x.npz")
    path = save_counts(tmp_path / "c.npz", sample())
    data = dict(np.load(path))
    m = json.loads(str(data["meta"]))
    for key, value, field in (("format", "moesim.trace/1", "meta.format"), ("top_k", 0, "meta.top_k"),
                              ("layer_ids", [2, 1], "meta.layer_ids"), ("layer_ids", "x", "meta.layer_ids")):
        bad = dict(m, **{key: value})
        np.savez(tmp_path / "bad.npz", loads=data["loads"], meta=np.array(json.dumps(bad)))
        with pytest.raises(InputError) as exc:
            load_counts(tmp_path / "bad.npz")
        assert exc.value.field == field and exc.value.source == str(tmp_path / "bad.npz")
    np.savez(tmp_path / "extra.npz", loads=data["loads"], meta=data["meta"], other=data["loads"])
    with pytest.raises(InputError, match="other: unknown array"):
        load_counts(tmp_path / "extra.npz")


def test_expand_reproduces_counts_exactly():
    ct = sample(W=4, L=3, E=8, K=3, T=20)
    tr = expand_counts(ct, None, np.random.default_rng(1))
    assert tr.meta.source.startswith(SYNTHETIC) and "no cross-layer affinity" in tr.meta.source
    assert tr.num_tokens == 80
    np.testing.assert_array_equal(np.bincount(tr.batch), [20] * 4)
    for w in range(4):
        np.testing.assert_array_equal(count_picks(tr.experts[tr.batch == w], 8), ct.loads[w])
    tr.validate()  # distinct picks per token, ids in range


def test_expand_scales_to_another_token_count():
    ct = CountTrace(loads=np.array([[[30, 10, 0, 20]]]), meta=meta(1, 4, 2), window_tokens=np.array([30]))
    tr = expand_counts(ct, 15, np.random.default_rng(0))
    np.testing.assert_array_equal(count_picks(tr.experts, 4)[0], [15, 5, 0, 10])  # halved; an expert on every token
    assert tr.num_tokens == 15


def test_expand_has_no_cross_layer_affinity():
    """Two layers with identical counts: real routing would tie them; the expansion's transitions are those of
    independent layers, count_a x count_b / T for every pair (law of large numbers, 4000 tokens)."""
    T, E = 4000, 4
    layer = np.array([2000, 1000, 600, 400])
    ct = CountTrace(loads=np.stack([layer, layer])[None], meta=meta(2, E, 1), window_tokens=np.array([T]))
    tr = expand_counts(ct, None, np.random.default_rng(2))
    trans = count_transitions(tr.experts, E)[0]
    expected = np.outer(layer, layer) / T
    assert np.abs(trans - expected).max() < 5 * np.sqrt(expected.max())  # within 5 sigma


def test_expand_inclusion_is_proportional():
    """A token picks expert e with probability count_e / T: over many seeds, token 0's picks follow the counts."""
    ct = CountTrace(loads=np.array([[[9, 6, 3, 2]]]), meta=meta(1, 4, 2), window_tokens=np.array([10]))
    hits = np.zeros(4)
    for seed in range(2000):
        tr = expand_counts(ct, None, np.random.default_rng(seed))
        hits[tr.experts[0, 0]] += 1
    np.testing.assert_allclose(hits / 2000, [0.9, 0.6, 0.3, 0.2], atol=0.04)


def test_expand_skips_empty_windows_and_refuses_nothing():
    loads = np.zeros((3, 1, 4), dtype=np.int64)
    loads[1, 0, :2] = 1
    tr = expand_counts(CountTrace(loads=loads, meta=meta(1, 4, 2)), None, np.random.default_rng(0))
    assert tr.num_tokens == 1 and tr.meta.extra["expanded_from"]["windows"] == [1]
    with pytest.raises(InputError, match="no picks"):
        expand_counts(CountTrace(loads=np.zeros((1, 1, 4), dtype=np.int64), meta=meta(1, 4, 2)), None,
                      np.random.default_rng(0))
    with pytest.raises(InputError, match="tokens_per_window"):
        expand_counts(sample(), 0, np.random.default_rng(0))


def test_counts_of_trace_and_windows():
    experts = np.array([[[0, 1]], [[1, 2]], [[2, 3]]], dtype=np.int32)
    tr = Trace(experts=experts, meta=meta(1, 4, 2), batch=np.array([0, 0, 1], dtype=np.int32))
    ct = counts_of_trace(tr)
    np.testing.assert_array_equal(ct.loads, [[[1, 2, 1, 0]], [[0, 0, 1, 1]]])
    np.testing.assert_array_equal(ct.window_tokens, [2, 1])
    np.testing.assert_array_equal(ct.total(), [[1, 2, 2, 1]])
    later = ct.windows(slice(1, None))
    assert later.num_windows == 1 and later.window_tokens.tolist() == [1]


def test_refusal_and_support_table():
    err = refuse_counts("co-activation statistics", source="dump.pt")
    assert str(err).startswith("dump.pt: is a count trace") and "expand_counts" in str(err)
    assert what_counts_support["eplb"].startswith("yes")
    assert "expand_counts" in what_counts_support["cross-layer affinity and co-activation"]
