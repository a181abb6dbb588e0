"""Traces layer: the .npz format (round trip, every load error names file and field) and the generator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moesim.traces.synthetic as synthetic
from moesim.errors import InputError
from moesim.traces import Layout, SyntheticParams, Trace, TraceMeta, generate_trace, load_trace, save_trace


def small_trace(*, with_optional: bool = True) -> Trace:
    rng = np.random.default_rng(0)
    T, L, K, E = 12, 3, 2, 6
    experts = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(T)])
    experts = experts.astype(np.int32)
    experts[0, 1, 1] = -1  # "no expert" is allowed
    meta = TraceMeta(num_experts=E, num_layers=L, top_k=K, model="m", source="unit", extra={"note": "x"})
    if not with_optional:
        return Trace(experts=experts, meta=meta)
    return Trace(experts=experts, meta=meta, weights=rng.random((T, L, K)).astype(np.float32),
                 home=(np.arange(T) % 4).astype(np.int32), batch=(np.arange(T) // 6).astype(np.int32))


def write_npz(path: Path, meta: dict | None = None, **arrays: np.ndarray) -> Path:
    if meta is not None:
        arrays["meta"] = np.array(json.dumps(meta))
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    return path


META = {"num_experts": 4, "num_layers": 2, "top_k": 2}


def good_experts() -> np.ndarray:
    return np.array([[[0, 1], [2, 3]], [[3, 2], [1, -1]]], dtype=np.int64)


# ---------------------------------------------------------------- round trip

def test_save_load_round_trip(tmp_path):
    trace = small_trace()
    path = save_trace(trace, tmp_path / "sub" / "t.npz")
    back = load_trace(path)
    np.testing.assert_array_equal(back.experts, trace.experts)
    np.testing.assert_array_equal(back.weights, trace.weights)
    np.testing.assert_array_equal(back.home, trace.home)
    np.testing.assert_array_equal(back.batch, trace.batch)
    assert back.meta == trace.meta
    assert back.num_tokens == 12
    assert [p.name for p in path.parent.iterdir()] == ["t.npz"]  # no temporary file left behind


def test_round_trip_without_optional_arrays(tmp_path):
    trace = small_trace(with_optional=False)
    back = load_trace(save_trace(trace, tmp_path / "t.npz"))
    assert back.weights is None and back.home is None and back.batch is None
    np.testing.assert_array_equal(back.experts, trace.experts)


def test_generated_trace_round_trips(tmp_path):
    trace = generate_trace(num_layers=2, num_experts=8, top_k=2, num_gpus=2, tokens_per_gpu=16, batches=2,
                           params=SyntheticParams(), rng=np.random.default_rng(1), model="gen")
    back = load_trace(save_trace(trace, tmp_path / "g.npz"))
    np.testing.assert_array_equal(back.experts, trace.experts)
    assert back.meta.model == "gen" and back.meta.source == "moesim.synthetic"
    assert back.meta.extra["synthetic"]["num_gpus"] == 2


# ---------------------------------------------------------------- load errors

def assert_names(exc: pytest.ExceptionInfo, path: Path, field: str | None) -> None:
    text = str(exc.value)
    assert "\n" not in text
    assert text.startswith(str(path)), text
    if field is not None:
        assert f": {field}:" in text, text
        assert exc.value.field == field


def test_missing_file(tmp_path):
    path = tmp_path / "nope.npz"
    with pytest.raises(InputError, match="not found") as exc:
        load_trace(path)
    assert_names(exc, path, None)


def test_not_an_npz(tmp_path):
    path = tmp_path / "t.npz"
    path.write_text("experts,meta\n1,2\n")
    with pytest.raises(InputError, match="npz") as exc:
        load_trace(path)
    assert_names(exc, path, None)


@pytest.mark.parametrize("arrays, meta, field, message", [
    ({}, META, "experts", "missing"),
    ({"experts": good_experts()}, None, "meta", "missing"),
    ({"experts": good_experts(), "extra": np.zeros(3)}, META, "extra", "unknown array"),
    ({"experts": good_experts()}, {**META, "num_experts": 0}, "meta.num_experts", "positive integer"),
    ({"experts": good_experts()}, {**META, "top_k": "2"}, "meta.top_k", "positive integer"),
    ({"experts": good_experts()}, {**META, "num_layers": 3}, "experts", "does not match meta"),
    ({"experts": good_experts()[:, :, :1]}, META, "experts", "does not match meta"),
    ({"experts": good_experts()[:, 0, :]}, META, "experts", "3-D"),
    ({"experts": good_experts().astype(float)}, META, "experts", "integer"),
    ({"experts": np.where(good_experts() == 3, 4, good_experts())}, META, "experts", "out of range"),
    ({"experts": np.where(good_experts() == 3, -2, good_experts())}, META, "experts", "out of range"),
    ({"experts": np.where(good_experts() == 1, 0, good_experts())}, META, "experts", "same expert twice"),
    ({"experts": good_experts(), "home": np.array([0, -1])}, META, "home", ">= 0"),
    ({"experts": good_experts(), "home": np.array([0.0, 1.0])}, META, "home", "integer"),
    ({"experts": good_experts(), "batch": np.array([0, 0, 1])}, META, "batch", "tokens=2"),
    ({"experts": good_experts(), "weights": np.ones((2, 2, 3))}, META, "weights", "must equal"),
])
def test_load_errors_name_file_and_field(tmp_path, arrays, meta, field, message):
    path = write_npz(tmp_path / "bad.npz", meta, **arrays)
    with pytest.raises(InputError, match=message) as exc:
        load_trace(path)
    assert_names(exc, path, field)


def test_bad_meta_json(tmp_path):
    path = tmp_path / "bad.npz"
    with open(path, "wb") as fh:
        np.savez(fh, experts=good_experts(), meta=np.array("[1, 2]"))
    with pytest.raises(InputError, match="JSON object") as exc:
        load_trace(path)
    assert_names(exc, path, "meta")


def test_out_of_range_message_locates_the_entry(tmp_path):
    experts = good_experts()
    experts[1, 0, 1] = 7
    path = write_npz(tmp_path / "bad.npz", META, experts=experts)
    with pytest.raises(InputError, match="expert id 7 .*token 1, layer 0, choice 1"):
        load_trace(path)


def test_boolean_meta_count_is_rejected(tmp_path):
    path = write_npz(tmp_path / "bad.npz", {**META, "num_experts": True, "top_k": 1},
                     experts=np.zeros((2, 2, 1), dtype=np.int64))
    with pytest.raises(InputError) as exc:
        load_trace(path)
    assert_names(exc, path, "meta.num_experts")


def test_home_out_of_range_for_the_cluster(tmp_path):
    trace = small_trace()  # homes 0..3
    path = save_trace(trace, tmp_path / "t.npz")
    loaded = load_trace(path)
    assert loaded.layout(4, None, source=str(path)).home.max() == 3
    with pytest.raises(InputError, match="out of range for a cluster of 2 GPUs") as exc:
        loaded.layout(2, None, source=str(path))
    assert_names(exc, path, "home")


# ---------------------------------------------------------------- layout

def test_default_layout_spreads_each_batch_evenly():
    trace = small_trace(with_optional=False)  # 12 tokens
    layout = trace.layout(num_gpus=2, tokens_per_gpu=3)
    assert layout.num_batches == 2
    np.testing.assert_array_equal(layout.batch, [0] * 6 + [1] * 6)
    np.testing.assert_array_equal(layout.home, [0, 0, 0, 1, 1, 1] * 2)
    one = trace.layout(num_gpus=4, tokens_per_gpu=None)
    assert one.num_batches == 1
    np.testing.assert_array_equal(np.bincount(one.home), [3, 3, 3, 3])


def test_trace_home_and_batch_take_precedence():
    trace = small_trace()
    layout = trace.layout(num_gpus=4, tokens_per_gpu=1)
    np.testing.assert_array_equal(layout.home, trace.home)
    np.testing.assert_array_equal(layout.batch, trace.batch)
    assert layout.num_batches == 2


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=0, max_size=40))
def test_batch_indices_cover_every_token_once(batches):
    batch = np.array(batches, dtype=np.int32)
    num_batches = int(batch.max()) + 1 if batch.size else 0
    layout = Layout(home=np.zeros(batch.size, dtype=np.int32), batch=batch, num_batches=num_batches)
    parts = layout.batch_indices()
    assert len(parts) == num_batches
    joined = np.concatenate(parts) if parts else np.array([], dtype=np.int64)
    np.testing.assert_array_equal(np.sort(joined), np.arange(batch.size))
    for b, idx in enumerate(parts):
        assert (batch[idx] == b).all()
        assert (np.diff(idx) > 0).all()  # token order kept inside a batch


# ---------------------------------------------------------------- generator

def gen(seed: int = 0, *, num_layers: int = 3, num_experts: int = 16, top_k: int = 2, num_gpus: int = 4,
        tokens_per_gpu: int = 64, batches: int = 2, structure_seed: int | None = None, **params) -> Trace:
    return generate_trace(num_layers=num_layers, num_experts=num_experts, top_k=top_k, num_gpus=num_gpus,
                          tokens_per_gpu=tokens_per_gpu, batches=batches, params=SyntheticParams(**params),
                          rng=np.random.default_rng(seed),
                          structure_rng=None if structure_seed is None else np.random.default_rng(structure_seed))


def test_generator_is_deterministic_for_a_seed():
    a, b, c = gen(3), gen(3), gen(4)
    np.testing.assert_array_equal(a.experts, b.experts)
    np.testing.assert_array_equal(a.weights, b.weights)
    assert not np.array_equal(a.experts, c.experts)


def test_structure_rng_shares_the_distribution_not_the_tokens():
    a = gen(1, structure_seed=9, zipf_alpha=1.2, tokens_per_gpu=512)
    b = gen(2, structure_seed=9, zipf_alpha=1.2, tokens_per_gpu=512)
    assert not np.array_equal(a.experts, b.experts)
    # the same hot experts in every layer
    for layer in range(3):
        la = np.bincount(a.experts[:, layer].ravel(), minlength=16)
        lb = np.bincount(b.experts[:, layer].ravel(), minlength=16)
        assert la.argmax() == lb.argmax()


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 12), st.integers(1, 4), st.integers(1, 3), st.integers(1, 8),
       st.integers(1, 2), st.floats(0, 1.5), st.floats(0, 1), st.integers(0, 2**31))
def test_generator_shapes_dtypes_and_distinct_picks(L, E, K, G, tpg, B, alpha, affinity, seed):
    K = min(K, E)
    trace = generate_trace(num_layers=L, num_experts=E, top_k=K, num_gpus=G, tokens_per_gpu=tpg, batches=B,
                           params=SyntheticParams(zipf_alpha=alpha, affinity=affinity, affinity_fanout=E),
                           rng=np.random.default_rng(seed))
    T = B * G * tpg
    assert trace.experts.shape == (T, L, K) and trace.weights.shape == (T, L, K)
    assert np.issubdtype(trace.experts.dtype, np.integer) and trace.weights.dtype == np.float32
    assert trace.experts.min() >= 0 and trace.experts.max() < E
    srt = np.sort(trace.experts, axis=2)
    assert (np.diff(srt, axis=2) > 0).all()  # distinct experts per token and layer
    np.testing.assert_allclose(trace.weights.sum(axis=2), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(np.bincount(trace.home, minlength=G), [B * tpg] * G)
    np.testing.assert_array_equal(np.bincount(trace.batch), [G * tpg] * B)
    assert trace.meta == TraceMeta(num_experts=E, num_layers=L, top_k=K, source="moesim.synthetic",
                                   extra=trace.meta.extra)
    trace.validate()


def test_generator_rejects_top_k_over_experts():
    with pytest.raises(ValueError, match="top_k"):
        gen(num_experts=2, top_k=3)


def load_skew(trace: Trace) -> float:
    """Mean over layers of the hottest expert's load over the mean load."""
    E = trace.meta.num_experts
    out = []
    for layer in range(trace.meta.num_layers):
        load = np.bincount(trace.experts[:, layer].ravel(), minlength=E)
        out.append(load.max() / load.mean())
    return float(np.mean(out))


def test_skew_increases_with_zipf_alpha():
    skews = [load_skew(gen(5, num_experts=32, tokens_per_gpu=512, zipf_alpha=a, gpu_mix_sigma=0.0, affinity=0.0))
             for a in (0.0, 0.5, 1.0, 1.5)]
    assert skews == sorted(skews)
    assert skews[0] < 1.3  # uniform popularity: only sampling noise
    assert skews[-1] > 2 * skews[0]


def top_successor_share(trace: Trace) -> float:
    """Share of layer-l picks that go to the most common choice among tokens with the same top-1 at l-1."""
    E = trace.meta.num_experts
    top, total = 0, 0
    for layer in range(1, trace.meta.num_layers):
        prev = trace.experts[:, layer - 1, 0].astype(np.int64)
        cur = trace.experts[:, layer, :].astype(np.int64)
        counts = np.zeros((E, E), dtype=np.int64)
        np.add.at(counts, (np.repeat(prev, cur.shape[1]), cur.ravel()), 1)
        top += counts.max(axis=1).sum()
        total += counts.sum()
    return top / total


def test_affinity_raises_the_top_successor_share():
    kw = dict(num_experts=32, tokens_per_gpu=512, num_layers=4, zipf_alpha=0.3, affinity_fanout=4)
    none, strong = (top_successor_share(gen(6, affinity=a, **kw)) for a in (0.0, 0.8))
    assert strong > 2 * none
    assert strong > 0.25


class _NumpyWithDirtyEmpty:
    """numpy, except that ``empty`` hands out arrays full of junk (as it may: its contents are undefined)."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def empty(shape, dtype=float, **kwargs):
        out = np.empty(shape, dtype=dtype, **kwargs)
        out[...] = 77 if np.issubdtype(np.dtype(dtype), np.integer) else 1.0
        return out


def test_generator_does_not_read_uninitialised_memory(monkeypatch):
    """Control for the next test: with fanout <= experts every np.empty cell is written before it is read."""
    want = gen(1, num_experts=8, affinity=0.9, affinity_fanout=8)
    monkeypatch.setattr(synthetic, "np", _NumpyWithDirtyEmpty())
    got = gen(1, num_experts=8, affinity=0.9, affinity_fanout=8)
    np.testing.assert_array_equal(got.experts, want.experts)


def test_fanout_above_num_experts_gives_a_valid_trace(monkeypatch):
    monkeypatch.setattr(synthetic, "np", _NumpyWithDirtyEmpty())
    trace = gen(1, num_experts=4, top_k=1, affinity=0.9, affinity_fanout=64)
    trace.validate()
    assert trace.experts.max() < 4


def test_generator_matches_zipf_popularity_exactly_in_distribution():
    """With no per-GPU mix and no affinity, pick frequencies follow 1/rank^alpha (closed form)."""
    from moesim.traces import SyntheticParams, generate_trace

    E, alpha, T = 8, 1.0, 200_000
    trace = generate_trace(num_layers=1, num_experts=E, top_k=1, num_gpus=1, tokens_per_gpu=T, batches=1,
                           params=SyntheticParams(zipf_alpha=alpha, gpu_mix_sigma=0.0, affinity=0.0),
                           rng=np.random.default_rng(3))
    freq = np.sort(np.bincount(trace.experts[:, 0, 0], minlength=E))[::-1] / T
    expected = np.arange(1, E + 1, dtype=float) ** -alpha
    expected /= expected.sum()
    assert np.abs(freq - expected).max() < 0.005  # binomial sd at p=0.37, n=2e5 is 0.0011


def test_generator_top2_is_successive_sampling():
    """P(e among the top-2) = p_e + sum_{f != e} p_f p_e / (1 - p_f), sampling without replacement."""
    from moesim.traces import SyntheticParams, generate_trace

    E, T = 6, 200_000
    trace = generate_trace(num_layers=1, num_experts=E, top_k=2, num_gpus=1, tokens_per_gpu=T, batches=1,
                           params=SyntheticParams(zipf_alpha=1.0, gpu_mix_sigma=0.0, affinity=0.0),
                           rng=np.random.default_rng(4))
    picks = trace.experts[:, 0, :]
    assert (picks[:, 0] != picks[:, 1]).all()
    first = np.bincount(picks[:, 0], minlength=E) / T  # estimates p (ranks are shuffled per layer)
    order = np.argsort(-first)
    p = np.arange(1, E + 1, dtype=float) ** -1.0
    p /= p.sum()
    p_by_expert = np.empty(E)
    p_by_expert[order] = p
    expected = p_by_expert + np.array([sum(p_by_expert[f] * p_by_expert[e] / (1 - p_by_expert[f])
                                           for f in range(E) if f != e) for e in range(E)])
    either = np.bincount(picks.ravel(), minlength=E) / T
    assert np.abs(either - expected).max() < 0.006
