"""Placement layer: every registered policy against the one validator, the registry, the JSON format."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.errors import InputError
from moesim.placement import (
    Capacity, Placement, PlacementProblem, get_policy, load_placement, make_placement, policy_names,
    policy_options, register, save_placement, validate_placement,
)
from moesim.placement.policies import lpt

BASELINES = {"contiguous", "round_robin", "random", "greedy"}


def problem(num_layers: int, num_experts: int, num_ranks: int, load: np.ndarray | None = None,
            seed: int = 0, gpus_per_node: int | None = None) -> PlacementProblem:
    if load is None:
        load = np.random.default_rng(seed).random((num_layers, num_experts))
    return PlacementProblem(num_layers=num_layers, num_experts=num_experts, num_ranks=num_ranks,
                            gpus_per_node=gpus_per_node or num_ranks, slots_per_gpu=-(-num_experts // num_ranks),
                            load=load, seed=seed)


def gpu_loads(placement: Placement, load: np.ndarray) -> np.ndarray:
    """[layers, gpus] summed load of the experts each GPU holds (single-copy placements)."""
    out = np.zeros((placement.num_layers, placement.num_ranks))
    for layer in range(placement.num_layers):
        np.add.at(out[layer], placement.gpus[layer, :, 0], load[layer])
    return out


def zipf_loads(layers: int, experts: int, alpha: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.arange(1, experts + 1) ** -alpha
    return np.stack([base[rng.permutation(experts)] * 1000 for _ in range(layers)])


def test_baseline_policies_are_registered():
    assert BASELINES <= set(policy_names())
    assert policy_names() == sorted(policy_names())
    assert policy_options("random") == {"seed": None}
    assert policy_options("greedy") == {"redundant_experts": 0}


# ---------------------------------------------------------------- every policy, one validator

@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 12), st.integers(1, 40), st.integers(0, 1000),
       st.sampled_from(["uniform", "zipf", "zeros", "ints"]))
def test_every_policy_gives_a_valid_placement(layers, gpus, experts, seed, kind):
    rng = np.random.default_rng(seed)
    load = {"uniform": rng.random((layers, experts)), "zipf": zipf_loads(layers, experts, 1.0, seed),
            "zeros": np.zeros((layers, experts)),
            "ints": rng.integers(0, 4, (layers, experts)).astype(float)}[kind]
    prob = problem(layers, experts, gpus, load, seed=seed)
    slots = prob.slots_per_gpu
    for name in policy_names():
        p = make_placement(name, prob)
        validate_placement(p, num_layers=layers, num_experts=experts, num_ranks=gpus,
                           capacity=Capacity(slots_per_gpu=slots, expert_bytes_per_gpu=1.0,
                                             memory_bytes_per_gpu=float(layers * slots)))
        copies = p.copies_per_gpu()
        assert copies.max() <= slots, name
        assert (p.replicas() >= 1).all(), name
        if name in BASELINES:
            assert (p.replicas() == 1).all() and copies.sum() == layers * experts
            if experts % gpus == 0:
                assert (copies == experts // gpus).all(), name  # equal slot counts
        again = make_placement(name, prob)
        np.testing.assert_array_equal(again.gpus, p.gpus)  # pure: same problem, same placement


def test_policies_do_not_change_the_load():
    load = zipf_loads(2, 16, 1.0, 0)
    keep = load.copy()
    for name in policy_names():
        make_placement(name, problem(2, 16, 4, load))
    np.testing.assert_array_equal(load, keep)


def test_contiguous_and_round_robin_layouts():
    prob = problem(2, 8, 4)
    np.testing.assert_array_equal(make_placement("contiguous", prob).gpus[:, :, 0], [[0, 0, 1, 1, 2, 2, 3, 3]] * 2)
    np.testing.assert_array_equal(make_placement("round_robin", prob).gpus[:, :, 0], [[0, 1, 2, 3, 0, 1, 2, 3]] * 2)


def test_random_policy_seed():
    prob = problem(3, 16, 4, seed=0)
    a = make_placement("random", prob)
    assert a.info == {"seed": 0}
    np.testing.assert_array_equal(make_placement("random", prob, seed=0).gpus, a.gpus)
    b = make_placement("random", prob, seed=1)
    assert b.info == {"seed": 1} and not np.array_equal(a.gpus, b.gpus)
    assert not np.array_equal(a.gpus[0], a.gpus[1])  # a fresh permutation per layer


# ---------------------------------------------------------------- greedy balances load

@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("experts, gpus", [(16, 4), (32, 8), (64, 8), (60, 8)])
def test_greedy_beats_contiguous_on_skewed_loads(seed, experts, gpus):
    load = zipf_loads(2, experts, 1.2, seed)
    prob = problem(2, experts, gpus, load)
    greedy = gpu_loads(make_placement("greedy", prob), load).max(axis=1)
    contiguous = gpu_loads(make_placement("contiguous", prob), load).max(axis=1)
    assert (greedy <= contiguous + 1e-9).all()


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 8), st.integers(1, 32),
       st.lists(st.floats(0, 100, allow_subnormal=False), min_size=1, max_size=32))
def test_greedy_max_load_within_lpt_bound(gpus, experts, values):
    load = np.resize(np.array(values), experts)[None, :]
    prob = problem(1, experts, gpus, load)
    bins = gpu_loads(make_placement("greedy", prob), load)[0]
    assert bins.max() <= load.sum() / gpus + load.max() + 1e-9
    assert bins.sum() == pytest.approx(load.sum())


def test_lpt_is_deterministic_on_ties():
    np.testing.assert_array_equal(lpt(np.zeros(4), num_bins=2, slots=2), [0, 0, 1, 1])
    np.testing.assert_array_equal(lpt(np.array([1.0, 5.0, 3.0, 3.0]), num_bins=2, slots=2), [0, 0, 1, 1])
    np.testing.assert_array_equal(lpt(np.array([4.0, 4, 4, 1, 1, 1]), num_bins=3, slots=2), [0, 1, 2, 0, 1, 2])


def test_greedy_obeys_slots_even_if_unbalanced():
    load = np.array([[100.0, 1.0, 1.0, 1.0]])
    p = make_placement("greedy", problem(1, 4, 2, load))
    assert p.copies_per_gpu().tolist() == [[2, 2]]
    assert gpu_loads(p, load).max() == 101.0


# ---------------------------------------------------------------- registry errors

def test_unknown_policy_lists_the_valid_ones():
    with pytest.raises(KeyError, match="unknown placement policy 'nope'; valid: .*contiguous.*greedy"):
        get_policy("nope")
    with pytest.raises(KeyError, match="round_robin"):
        make_placement("nope", problem(1, 4, 2))


def test_duplicate_registration_raises_and_keeps_the_original():
    original = get_policy("greedy")
    with pytest.raises(ValueError, match="'greedy' is already registered"):
        register("greedy")(lambda problem: None)
    assert get_policy("greedy") is original


def test_duplicate_registration_lists_the_registered_names():
    with pytest.raises(ValueError) as exc:
        register("greedy")(lambda problem: None)
    assert all(name in str(exc.value) for name in BASELINES)


def test_unknown_option_is_rejected_listing_valid_options():
    with pytest.raises(KeyError, match="no option 'bogus'; valid: seed"):
        make_placement("random", problem(1, 4, 2), bogus=1)
    with pytest.raises(KeyError, match="no option 'seed'; valid: none"):
        make_placement("contiguous", problem(1, 4, 2), seed=3)


# ---------------------------------------------------------------- JSON format

def test_placement_json_round_trip(tmp_path):
    p = Placement.from_lists([[[0], [1, 2], [3]], [[2], [0], [1, 3, 0]]], num_ranks=4, policy="hand",
                             info={"note": "replicas"})
    path = save_placement(p, tmp_path / "a" / "p.json")
    raw = json.loads(path.read_text())
    assert raw["format"] == "moesim.placement/1" and raw["num_ranks"] == 4
    assert raw["layers"][1]["expert_gpus"] == [[2], [0], [1, 3, 0]]
    back = load_placement(path)
    np.testing.assert_array_equal(back.gpus, p.gpus)
    assert (back.num_ranks, back.policy, back.info) == (4, "hand", {"note": "replicas"})
    np.testing.assert_array_equal(back.replicas(), [[1, 2, 1], [1, 1, 3]])
    np.testing.assert_array_equal(back.copies_per_gpu(), [[1, 1, 1, 1], [2, 1, 1, 1]])
    assert [q.name for q in path.parent.iterdir()] == ["p.json"]


def test_policy_output_round_trips(tmp_path):
    p = make_placement("greedy", problem(3, 10, 4, zipf_loads(3, 10, 1.0, 2)))
    back = load_placement(save_placement(p, tmp_path / "g.json"))
    np.testing.assert_array_equal(back.gpus, p.gpus)
    assert back.policy == "greedy"


def good_json() -> dict:
    return {"format": "moesim.placement/1", "num_ranks": 2, "policy": "x",
            "layers": [{"expert_gpus": [[0], [1]]}, {"expert_gpus": [[1], [0]]}]}


def mutate(**changes):
    def apply(raw: dict) -> dict:
        for path, value in changes.items():
            node = raw
            *parents, leaf = path.split("__")
            for p in parents:
                node = node[int(p)] if p.isdigit() else node[p]
            node[int(leaf) if leaf.isdigit() else leaf] = value
        return raw
    return apply


@pytest.mark.parametrize("change, field, message", [
    (mutate(format="moesim.placement/2"), "format", "moesim.placement/1"),
    (mutate(num_ranks=0), "num_ranks", "positive integer"),
    (mutate(num_ranks=True), "num_ranks", "positive integer"),
    (mutate(num_gpus=2), "num_gpus", "num_ranks only"),
    (mutate(layers=[]), "layers", "non-empty"),
    (mutate(layers__1={"gpus": [[0]]}), "layers[1]", "expert_gpus"),
    (mutate(layers__0__expert_gpus=[]), "layers[0].expert_gpus", "non-empty"),
    (mutate(layers__0__expert_gpus__1=["1"]), "layers[0].expert_gpus[1]", "GPU indices"),
    (mutate(layers__0__expert_gpus__1=[1.0]), "layers[0].expert_gpus[1]", "GPU indices"),
    (mutate(layers__1__expert_gpus__0=[True]), "layers[1].expert_gpus[0]", "GPU indices"),
    (mutate(layers__1__expert_gpus__0=1), "layers[1].expert_gpus[0]", "GPU indices"),
    (mutate(layers__1__expert_gpus=[[0], [1], [0]]), "layers", "same number of experts"),
    (mutate(extra=1), "extra", "unknown key"),
])
def test_load_placement_errors_name_file_and_field(tmp_path, change, field, message):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(change(good_json())))
    with pytest.raises(InputError, match=message) as exc:
        load_placement(path)
    text = str(exc.value)
    assert text.startswith(f"{path}: {field}: "), text
    assert "\n" not in text


def test_load_placement_reads_the_former_field_name(tmp_path):
    """Files written before num_ranks was named so give it as num_gpus."""
    raw = good_json()
    raw["num_gpus"] = raw.pop("num_ranks")
    path = tmp_path / "old.json"
    path.write_text(json.dumps(raw))
    back = load_placement(path)
    assert back.num_ranks == 2 and back.gpus.shape == (2, 2, 1)
    assert "num_ranks" in json.loads(save_placement(back, tmp_path / "new.json").read_text())
    path.write_text(json.dumps({**raw, "num_gpus": 0}))
    with pytest.raises(InputError, match="positive integer") as exc:
        load_placement(path)
    assert str(exc.value).startswith(f"{path}: num_gpus: ")


@pytest.mark.parametrize("content, message", [(None, "not found"), ("{not json", "not valid JSON"),
                                              ("[1, 2]", "JSON object")])
def test_load_placement_unreadable(tmp_path, content, message):
    path = tmp_path / "p.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=message) as exc:
        load_placement(path)
    assert str(exc.value).startswith(str(path))


def test_load_placement_non_object_info(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({**good_json(), "info": "abc"}))
    with pytest.raises(InputError, match="info"):
        load_placement(path)


# ---------------------------------------------------------------- validate_placement

def check(layers, num_ranks=4, num_experts=3, num_layers=1, capacity=None):
    p = Placement.from_lists(layers, num_ranks=num_ranks, policy="t")
    return validate_placement(p, num_layers=num_layers, num_experts=num_experts, num_ranks=4, capacity=capacity,
                              source="p.json")


def test_valid_placement_passes():
    p = check([[[0], [1, 2], [3]]])
    assert p.num_experts == 3


@pytest.mark.parametrize("layers, kw, field, message", [
    ([[[0], [4], [1]]], {}, "layers[0].expert_gpus[1]", "GPU 4 out of range"),
    ([[[0], [1], [-2]]], {}, "layers[0].expert_gpus[2]", "out of range"),
    ([[[0], [], [1]]], {}, "layers[0].expert_gpus[1]", "no GPU"),
    ([[[0], [1, 1], [2]]], {}, "layers[0].expert_gpus[1]", "twice"),
    ([[[0], [1], [2]]], {"num_ranks": 8}, "num_ranks", "8 GPUs"),
    ([[[0], [1], [2]]] * 2, {}, "layers", "2 layers"),
    ([[[0], [1]]], {}, "layers[0].expert_gpus", "2 experts"),
])
def test_validate_catches(layers, kw, field, message):
    with pytest.raises(InputError, match=message) as exc:
        check(layers, **kw)
    assert str(exc.value).startswith(f"p.json: {field}: ")


def test_validate_catches_slot_overflow():
    cap = Capacity(slots_per_gpu=1, expert_bytes_per_gpu=1.0, memory_bytes_per_gpu=100.0)
    check([[[0], [1], [2]]], capacity=cap)
    with pytest.raises(InputError, match="GPU 0 holds 2 experts in layer 0, over its 1 slots") as exc:
        check([[[0], [0], [2]]], capacity=cap)
    assert exc.value.field == "layers[0]"


def test_validate_catches_memory_overflow():
    cap = Capacity(slots_per_gpu=None, expert_bytes_per_gpu=10e9, memory_bytes_per_gpu=25e9)
    check([[[0], [1, 2], [0, 3]]], capacity=cap)  # GPU 0: 2 copies = 20 GB
    with pytest.raises(InputError, match="GPU 0 needs 30.0 GB .* 25.0 GB") as exc:
        check([[[0], [0, 1], [0, 3]]], capacity=cap)
    assert exc.value.field == "layers"
