"""A fitted generator carried over to a bigger model (moesim.traces.fitted_expand, workload.synthetic.fitted as a
mapping): the expanded popularity against its closed form on the shipped DeepSeek-V2-Lite fit, the shares the
generator draws, group-limited routing, and the scenario option's checks."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.cli import main
from moesim.errors import InputError
from moesim.traces.fitted_expand import expand_params, expanded_popularity, layer_map
from moesim.traces.fitted_generator import FittedParams, generate_fitted, load_params

V2 = load_params("deepseek-v2-lite")  # the shipped fit of real prefill routing: 26 layers x 64 experts, top-6


def test_layer_map_is_proportional_and_uses_every_fitted_layer():
    m = layer_map(58, 26)
    assert m[0] == 0 and m[-1] == 25 and (np.diff(m) >= 0).all()
    assert set(m.tolist()) == set(range(26))  # 58 > 26: every V2-Lite layer is used
    assert layer_map(3, 26).tolist() == [0, 8, 17]


def test_expanded_popularity_is_the_fit_split_in_four_and_shuffled():
    """DeepSeek-V3's shape from V2-Lite: rows sum to 1, and each row is the fitted layer's shares, each / 4, four
    times, shuffled by one permutation per layer drawn in layer order (bench_plan.py's count dump)."""
    pop = expanded_popularity(V2, num_layers=58, num_experts=256, rng=np.random.default_rng(7))
    assert pop.shape == (58, 256)
    np.testing.assert_allclose(pop.sum(axis=1), 1.0, rtol=1e-12)
    rng = np.random.default_rng(7)
    for lay, src in enumerate(layer_map(58, 26)):
        shares = V2.popularity[src] / V2.popularity[src].sum()
        want = np.repeat(shares, 4) / 4
        np.testing.assert_array_equal(pop[lay], want[rng.permutation(256)])
        np.testing.assert_allclose(np.sort(pop[lay]), np.sort(want))  # every expert's share preserved


def test_expansion_is_deterministic_by_seed():
    a = expanded_popularity(V2, num_layers=58, num_experts=256, rng=np.random.default_rng(1))
    b = expanded_popularity(V2, num_layers=58, num_experts=256, rng=np.random.default_rng(1))
    c = expanded_popularity(V2, num_layers=58, num_experts=256, rng=np.random.default_rng(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_allclose(np.sort(a, axis=1), np.sort(c, axis=1))  # same shares, other identities


def test_expansion_needs_a_multiple_of_the_fitted_experts():
    with pytest.raises(ValueError, match="multiple"):
        expanded_popularity(V2, num_layers=58, num_experts=200, rng=np.random.default_rng(0))


def test_expanded_params_route_top8_with_the_fitted_drift_and_no_transitions():
    p = expand_params(V2, num_layers=58, num_experts=256, top_k=8, rng=np.random.default_rng(0))
    assert (p.num_layers, p.num_experts, p.top_k, p.fanout) == (58, 256, 8, 0)
    assert (p.coupling == 0).all() and p.drift_sigma == V2.drift_sigma and p.drift_rho == V2.drift_rho
    assert p.fitted_to["expanded_from"] == "deepseek-v2-lite" and p.fitted_to["split"] == 4


def test_generated_shares_follow_the_expanded_popularity():
    """Top-8 picks drawn from the top-6 fit's shares: each expert's share of the picks is its popularity, up to
    sampling noise and the flattening of drawing without replacement (small at V3's 256 experts)."""
    p = expand_params(V2.first_layers(2), num_layers=2, num_experts=256, top_k=8, rng=np.random.default_rng(0))
    tr = generate_fitted(p, num_gpus=4, tokens_per_gpu=5000, batches=1, rng=np.random.default_rng(3), weights=False)
    for lay in range(2):
        got = np.bincount(tr.experts[:, lay].ravel().astype(np.int64), minlength=256) / (20000 * 8)
        assert 0.5 * np.abs(got - p.popularity[lay]).sum() < 0.05  # total variation
        assert np.corrcoef(got, p.popularity[lay])[0, 1] > 0.95


def _toy(E: int = 8, K: int = 2) -> FittedParams:
    pop = np.array([[0.4, 0.2, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05]])
    return FittedParams(name="toy", num_layers=1, num_experts=E, top_k=K, popularity=pop,
                        successors=np.zeros((0, E, 0), dtype=np.int64), successor_logits=np.zeros((0, E, 0)),
                        coupling=np.zeros(0)).check()


def test_group_limited_picks_stay_in_topk_groups():
    tr = generate_fitted(_toy(K=3), num_gpus=1, tokens_per_gpu=4000, batches=1, rng=np.random.default_rng(0),
                         weights=False, groups=(4, 2))
    groups = tr.experts[:, 0].astype(np.int64) // 2
    used = np.array([len(set(row)) for row in groups.tolist()])
    assert used.max() == 2 and used.min() == 2  # 3 picks need 2 groups of 2 experts
    free = generate_fitted(_toy(K=3), num_gpus=1, tokens_per_gpu=4000, batches=1, rng=np.random.default_rng(0),
                           weights=False)
    assert max(len(set(row)) for row in (free.experts[:, 0].astype(np.int64) // 2).tolist()) == 3


def test_one_group_per_token_is_drawn_by_the_groups_mass():
    """topk_groups 1: a token's group is the one holding its best perturbed logit, whose law is the group's
    share of the popularity (Gumbel-max), closed form."""
    n = 20000
    tr = generate_fitted(_toy(K=1), num_gpus=1, tokens_per_gpu=n, batches=1, rng=np.random.default_rng(5),
                         weights=False, groups=(4, 1))
    freq = np.bincount(tr.experts[:, 0, 0].astype(np.int64) // 2, minlength=4) / n
    mass = np.array([0.6, 0.2, 0.1, 0.1])
    assert np.abs(freq - mass).max() < 4 * np.sqrt(mass * (1 - mass) / n).max()


# ---------------------------------------------------------------- the scenario option

def _scenario(tiny_scenario_data, **fitted):
    data = tiny_scenario_data
    data["model"].update(num_layers=5, num_experts=128, top_k=4, expert_groups=8, topk_groups=2)
    data["workload"] = {"synthetic": {"fitted": {"params": "deepseek-v2-lite", **fitted}, "tokens_per_gpu": 32,
                                      "batches": 2, "seed": 1}}
    data["placements"] = ["contiguous", {"name": "eplb", "policy": "eplb", "redundant_experts": 8}]
    return data


def test_expanded_fit_runs_in_a_scenario_group_limited(tiny_scenario_data, tmp_path):
    from moesim.study import parse_scenario, run_study
    from moesim.study.config import ClusterEntry
    from moesim.study.workload import build_workload

    sc = parse_scenario(_scenario(tiny_scenario_data, expand_experts=2), "s.yaml", tmp_path)
    result = run_study(sc, progress=False)
    assert [r.name for r in result.runs] == ["contiguous", "eplb"]
    cluster: ClusterEntry = sc.clusters[0]
    a = build_workload(sc, cluster).trace
    b = build_workload(sc, cluster).trace
    np.testing.assert_array_equal(a.experts, b.experts)  # deterministic by seed
    assert a.meta.top_k == 4 and a.meta.num_experts == 128
    groups = a.experts.astype(np.int64) // 16  # 8 groups of 16: each token within its 2 groups at every layer
    assert max(len(set(row)) for row in groups.reshape(-1, 4).tolist()) <= 2


def test_expanded_fit_errors_name_file_and_field(tiny_scenario_data, tmp_path, capsys):
    from moesim.study import parse_scenario

    with pytest.raises(InputError, match=r"s\.yaml: workload\.synthetic\.fitted\.expand_experts: .* 64 experts x "
                                         r"expand_experts 3 = 192, the scenario's model has 128"):
        parse_scenario(_scenario(tiny_scenario_data, expand_experts=3), "s.yaml", tmp_path)
    data = _scenario(tiny_scenario_data, expand_experts=2, bogus=1)
    with pytest.raises(InputError, match=r"s\.yaml: workload\.synthetic\.fitted\.bogus: unknown key"):
        parse_scenario(data, "s.yaml", tmp_path)
    data = _scenario(tiny_scenario_data, expand_experts=2)
    data["workload"]["synthetic"]["fitted"]["params"] = "nope"
    with pytest.raises(InputError, match=r"workload\.synthetic\.fitted\.params: nope: no such params file"):
        parse_scenario(data, "s.yaml", tmp_path)
    data = _scenario(tiny_scenario_data, expand_experts=2)
    data["workload"]["synthetic"]["zipf_alpha"] = 0.3
    with pytest.raises(InputError, match=r"workload\.synthetic\.zipf_alpha: not used with 'fitted'"):
        parse_scenario(data, "s.yaml", tmp_path)


def test_validate_refuses_a_bad_expansion_in_one_line(tmp_path, yaml_writer, tiny_scenario_data, capsys):
    path = yaml_writer(tmp_path / "bad.yaml", _scenario(tiny_scenario_data, expand_experts=0))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "bad.yaml: workload.synthetic.fitted.expand_experts:" in err
