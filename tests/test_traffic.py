"""layer_traffic (vectorised, chunked token bookkeeping) against a token-by-token reference written from its
definition: copies per (source, destination GPU) with and without deduplication, token-expert pairs per EP rank,
copies per (source, destination node), with replicas, tensor parallelism, missing choices and several chunks."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import moesim.sim.traffic as traffic
from moesim.sim.traffic import layer_traffic


def reference(experts, home, token_ids, gpus, *, num_gpus, tp, num_experts, dedup, gpus_per_node, replica_ranks):
    """One token and one choice at a time: the rules of moesim.sim.traffic's docstring."""
    G, R, E = num_gpus, num_gpus // tp, num_experts
    N = -(-G // gpus_per_node)
    copies = np.zeros((G, G), dtype=np.int64)
    expert_tokens = np.zeros((R, E), dtype=np.int64)
    node_copies = np.zeros((G, N), dtype=np.int64)
    replicas = (gpus >= 0).sum(axis=1)
    for t, (h, tid) in enumerate(zip(home, token_ids)):
        ranks, nodes = [], set()
        for j, e in enumerate(experts[t]):
            if e < 0:
                continue
            if replica_ranks is not None:
                r = int(replica_ranks[j, t])
            else:
                r = int(gpus[e, tid % replicas[e]]) if replicas[e] else -1
            if r < 0:
                continue
            expert_tokens[r, e] += 1
            if not dedup or r not in ranks:
                copies[h, r * tp + h % tp] += 1
            ranks.append(r)
            nodes.add((r * tp + h % tp) // gpus_per_node)
        for n in nodes:
            node_copies[h, n] += 1
    return copies, expert_tokens, node_copies


@st.composite
def instances(draw):
    tp = draw(st.sampled_from([1, 2]))
    gpn = tp * draw(st.integers(1, 3))
    G = gpn * draw(st.integers(1, 3))
    R = G // tp
    E = draw(st.integers(2, 3 * R + 2))
    K = draw(st.integers(1, min(E, 5)))
    T = draw(st.integers(1, 40))
    reps = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    gpus = np.full((E, reps), -1)
    for e in range(E):  # single copies may be unplaced; replicated experts have at least one copy
        k = int(rng.integers(0 if reps == 1 and rng.random() < 0.1 else 1, reps + 1))
        gpus[e, :k] = rng.choice(R, size=k, replace=False) if k <= R else rng.integers(0, R, k)
    experts = np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(np.int16)
    if draw(st.booleans()):
        experts[rng.random((T, K)) < 0.2] = -1  # padded picks
    replica_ranks = None
    if reps > 1 and draw(st.booleans()):  # another rule chose the serving ranks
        replica_ranks = np.where(experts.T >= 0, rng.integers(0, R, (K, T)), -1)
    return dict(experts=experts, home=rng.integers(0, G, T), token_ids=rng.integers(0, 1000, T), gpus=gpus,
                num_gpus=G, tp=tp, num_experts=E, dedup=draw(st.booleans()), gpus_per_node=gpn,
                replica_ranks=replica_ranks)


@settings(max_examples=150, deadline=None)
@given(instances(), st.sampled_from([1, 3, 1 << 15]))
def test_layer_traffic_equals_token_by_token_reference(case, chunk):
    copies, expert_tokens, node_copies = reference(**case)
    own = traffic._CHUNK
    traffic._CHUNK = chunk  # several chunks, a chunk per token, one chunk
    try:
        got = layer_traffic(**case)
        plain = layer_traffic(**{**case, "gpus_per_node": None})
    finally:
        traffic._CHUNK = own
    assert np.array_equal(got.copies, copies)
    assert np.array_equal(got.expert_tokens, expert_tokens)
    assert np.array_equal(got.node_copies, node_copies)
    assert np.array_equal(got.recv_copies, copies.sum(axis=0))
    assert plain.node_copies is None and np.array_equal(plain.copies, copies)  # node counts change nothing else


def test_layer_traffic_reads_a_strided_layer_of_a_trace():
    """The engine passes ``trace.experts[:, l, :]``, a strided view: same counts as a contiguous copy."""
    rng = np.random.default_rng(0)
    T, L, K, E, G = 500, 3, 4, 16, 8
    trace = np.stack([rng.permutation(E)[:K] for _ in range(T * L)]).reshape(T, L, K).astype(np.int16)
    home = np.arange(T) % G
    gpus = (np.arange(E) * G // E)[:, None]
    kw = dict(num_gpus=G, tp=1, num_experts=E, dedup=True, gpus_per_node=4)
    view = layer_traffic(trace[:, 1, :], home, np.arange(T), gpus, **kw)
    copy = layer_traffic(np.ascontiguousarray(trace[:, 1, :]), home, np.arange(T), gpus, **kw)
    assert np.array_equal(view.copies, copy.copies) and np.array_equal(view.node_copies, copy.node_copies)
    assert view.copies.sum() <= T * K and view.expert_tokens.sum() == T * K


@settings(max_examples=100, deadline=None)
@given(instances(), st.sampled_from([1, 5, 1 << 13]))
def test_single_copy_counting_equals_the_replica_path(case, chunk):
    """With one copy of every expert, layer_traffic counts (source, expert, flags) keys; the same placement with
    an empty second replica column goes through the per-(source, destination) path: same counts."""
    gpus = case["gpus"][:, :1]
    if case["replica_ranks"] is not None or (gpus < 0).all():
        return
    own = traffic._CHUNK
    traffic._CHUNK = chunk
    try:
        single = layer_traffic(**{**case, "gpus": gpus})
        padded = layer_traffic(**{**case, "gpus": np.hstack([gpus, np.full_like(gpus, -1)])})
    finally:
        traffic._CHUNK = own
    assert np.array_equal(single.copies, padded.copies)
    assert np.array_equal(single.expert_tokens, padded.expert_tokens)
    assert np.array_equal(single.recv_copies, padded.recv_copies)
    assert np.array_equal(single.node_copies, padded.node_copies)
