"""Scenario files: the shipped ones load; every kind of bad input is one InputError naming file and field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from moesim.errors import InputError
from moesim.placement import Placement, save_placement
from moesim.study import Scenario, load_scenario, parse_scenario, run_study
from moesim.traces import SyntheticParams, Trace, TraceMeta, generate_trace, save_trace

SCENARIO_FILES = sorted((Path(__file__).resolve().parents[1] / "scenarios").glob("*.yaml"))


@pytest.mark.parametrize("path", SCENARIO_FILES, ids=lambda p: p.stem)
def test_shipped_scenarios_load(path):
    sc = load_scenario(path)
    assert isinstance(sc, Scenario)
    assert sc.source == str(path) and sc.name == path.stem
    names = [p.name for p in sc.placements]
    assert sc.baseline in names and len(set(names)) == len(names)
    for c in sc.clusters:
        assert c.spec.gpus_per_node % c.tp == 0 and c.ep * c.tp == c.spec.num_gpus
    assert sc.workload.synthetic is not None or sc.workload.trace is not None


def test_shipped_scenarios_exist():
    assert {p.stem for p in SCENARIO_FILES} >= {"singlenode", "multinode", "deepseek_v3_64gpu"}


def test_defaults(tiny_scenario_data):
    del tiny_scenario_data["baseline"], tiny_scenario_data["engine"], tiny_scenario_data["name"]
    sc = parse_scenario(tiny_scenario_data, "x/tiny.yaml")
    assert sc.baseline == "contiguous"  # the first placement
    assert sc.name == "tiny" and sc.output == Path("results/tiny")
    assert sc.engine.dispatch is None and sc.engine.rate_tolerance == 0.01
    assert sc.engine.options().moe_kernels == "torch_reference" and not sc.engine.options().dedup  # a row per pick
    assert [p.name for p in sc.placements] == ["contiguous", "round_robin", "random", "greedy"]
    assert sc.placements[2].options == {"seed": 1}


def test_cluster_name_defaults_and_preset_strings(tiny_scenario_data):
    tiny_scenario_data["clusters"] = ["dgx-h100", {"preset": "hgx-h200", "nodes": 2, "tp": 2}]
    sc = parse_scenario(tiny_scenario_data, "s.yaml")
    assert [c.name for c in sc.clusters] == ["dgx-h100-1x8", "hgx-h200-2x8"]
    assert (sc.clusters[1].tp, sc.clusters[1].ep) == (2, 8)


# ---------------------------------------------------------------- bad input


def setter(path: str, value: Any) -> Callable[[dict], None]:
    """Set a nested key; ``path`` is dotted, list indices are numbers."""
    def apply(data: dict) -> None:
        *parents, leaf = path.split(".")
        node: Any = data
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        node[int(leaf) if leaf.isdigit() else leaf] = value
    return apply


def deleter(key: str) -> Callable[[dict], None]:
    return lambda data: data.pop(key)


BAD = [
    ("unknown top-level key", setter("runs", 3), "runs", "unknown key"),
    ("unknown cluster key", setter("clusters.0.gpus", 8), "clusters[0].gpus", "unknown key"),
    ("unknown nested cluster key", setter("clusters.0.network", {"nic_gbps": 400}), "clusters[0].network.nic_gbps",
     "unknown key"),
    ("negative nic_Gbps", setter("clusters.0.network", {"nic_Gbps": -400}), "clusters[0].network.nic_Gbps",
     "greater than 0"),
    ("zero gpus_per_node", setter("clusters.0.gpus_per_node", 0), "clusters[0].gpus_per_node", "greater than or equal"),
    ("unknown preset", setter("clusters.0.preset", "dgx-h999"), "clusters[0].preset", "valid: dgx-a100"),
    ("cluster not a mapping", setter("clusters.0", 5), "clusters[0]", "preset name or a mapping"),
    ("empty clusters", setter("clusters", []), "clusters", "non-empty"),
    ("duplicate cluster names", setter("clusters", ["hgx-h200", "hgx-h200"]), "clusters", "unique"),
    ("tp not dividing gpus_per_node", setter("clusters.0.tp", 3), "clusters[0].tp", "tp=3 must divide"),
    ("tp not positive", setter("clusters.0.tp", 0), "clusters[0].tp", "positive integer"),
    ("unknown policy", setter("placements.0", "best"), "placements[0].policy", "unknown policy 'best'; valid: "),
    ("unknown policy option", setter("placements.2", {"policy": "random", "sed": 1}), "placements[2].sed",
     "valid options: seed"),
    ("placement without policy", setter("placements.0", {"name": "x"}), "placements[0]", "needs 'policy'"),
    ("duplicate placement names", setter("placements", ["greedy", "greedy"]), "placements", "'greedy' repeats"),
    ("placement file missing", setter("placements.0", {"file": "nope.json"}), "placements[0].file", "not found"),
    ("baseline not a placement", setter("baseline", "eplb"), "baseline", "not one of the placements"),
    ("missing workload", deleter("workload"), "workload", "missing"),
    ("missing model", deleter("model"), "model", "missing"),
    ("both trace and synthetic", setter("workload.trace", {"file": "t.npz"}), "workload", "exactly one"),
    ("neither trace nor synthetic", setter("workload", {}), "workload", "exactly one"),
    ("trace file missing", setter("workload", {"trace": {"file": "missing.npz"}}), "workload.trace.file",
     "not found"),
    ("negative tokens", setter("workload.synthetic.tokens_per_gpu", -1), "workload.synthetic.tokens_per_gpu",
     "greater than or equal to 1"),
    ("affinity over 1", setter("workload.synthetic.affinity", 1.5), "workload.synthetic.affinity", "less than"),
    ("unknown model key", setter("model.experts", 8), "model.experts", "unknown key"),
    ("top_k over experts", setter("model.top_k", 32), "model", "exceeds num_experts"),
    ("model not a mapping", setter("model", "mixtral"), "model", ""),
    ("bad engine dispatch", setter("engine", {"dispatch": "deepep"}), "engine.dispatch", "per_gpu"),
    ("rate tolerance too big", setter("engine", {"rate_tolerance": 0.5}), "engine.rate_tolerance", "0.2"),
    ("cuda graphs of a host-synced pipeline", setter("engine", {"launch": "cuda_graph"}), "engine",
     "needs moe_kernels fused"),
    ("unknown launch", setter("engine", {"launch": "graphs"}), "engine.launch", "cuda_graph"),
]


@pytest.mark.parametrize("case, change, field, message", BAD, ids=[b[0] for b in BAD])
def test_bad_scenario_names_file_and_field(tmp_path, tiny_scenario_data, yaml_writer, case, change, field, message):
    change(tiny_scenario_data)
    path = yaml_writer(tmp_path / "bad.yaml", tiny_scenario_data)
    with pytest.raises(InputError) as exc:
        load_scenario(path)
    text = str(exc.value)
    assert text.startswith(f"{path}: {field}: "), text
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize("text, line", [("name: x\nclusters: [hgx-h200\nmodel: {}\n", 3),
                                        ("name: x\n  bad: indent\n", 2),
                                        ("name: x\nclusters:\n- a\n b: c\n", 4)])
def test_malformed_yaml_gives_the_line(tmp_path, text, line):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match="malformed YAML") as exc:
        load_scenario(path)
    assert str(exc.value).startswith(f"{path}: line {line}, column ")


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_scenario_must_be_a_mapping(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match="must be a YAML mapping") as exc:
        load_scenario(path)
    assert str(exc.value).startswith(str(path))


def test_missing_scenario_file(tmp_path):
    with pytest.raises(InputError, match="not found") as exc:
        load_scenario(tmp_path / "none.yaml")
    assert str(tmp_path / "none.yaml") in str(exc.value)


# ---------------------------------------------------------------- errors found when the run is prepared

def tiny_trace(tmp_path: Path, num_experts: int = 16, num_layers: int = 4) -> Path:
    trace = generate_trace(num_layers=num_layers, num_experts=num_experts, top_k=2, num_gpus=8, tokens_per_gpu=8,
                           batches=1, params=SyntheticParams(), rng=np.random.default_rng(0))
    return save_trace(trace, tmp_path / "trace.npz")


def test_relative_trace_path_resolves_against_the_scenario(tmp_path, tiny_scenario_data, yaml_writer):
    tiny_trace(tmp_path)
    tiny_scenario_data["workload"] = {"trace": {"file": "trace.npz", "tokens_per_gpu": 8}}
    sc = load_scenario(yaml_writer(tmp_path / "s.yaml", tiny_scenario_data))
    assert sc.workload.trace.file == tmp_path / "trace.npz"
    result = run_study(sc, progress=False)
    assert len(result.runs) == 4
    assert result.workloads["1x8-h200"]["tokens"] == 64


@pytest.mark.parametrize("key, value", [("num_experts", 32), ("num_layers", 2)])
def test_trace_model_mismatch_at_run_time(tmp_path, tiny_scenario_data, yaml_writer, key, value):
    trace = tiny_trace(tmp_path, **{key: value})
    tiny_scenario_data["workload"] = {"trace": {"file": str(trace)}}
    sc = load_scenario(yaml_writer(tmp_path / "s.yaml", tiny_scenario_data))
    with pytest.raises(InputError, match=f"trace has {key}={value}, the scenario's model has") as exc:
        run_study(sc, progress=False)
    assert str(exc.value).startswith(f"{trace}: meta.{key}: ")


def test_trace_homes_out_of_range_for_the_cluster(tmp_path, tiny_scenario_data, yaml_writer):
    trace = tiny_trace(tmp_path)  # homes on 8 GPUs
    tiny_scenario_data["workload"] = {"trace": {"file": str(trace)}}
    tiny_scenario_data["clusters"] = [{"preset": "hgx-h200", "gpus_per_node": 4}]
    sc = load_scenario(yaml_writer(tmp_path / "s.yaml", tiny_scenario_data))
    with pytest.raises(InputError, match="out of range for a cluster of 4 GPUs") as exc:
        run_study(sc, progress=False)
    assert str(exc.value).startswith(f"{trace}: home: ")


def write_placement(tmp_path: Path, assign: list[list[int]], num_ranks: int = 8) -> Path:
    return save_placement(Placement.from_assignment(np.array(assign), num_ranks, "hand"), tmp_path / "p.json")


def test_placement_file_with_out_of_range_gpu(tmp_path, tiny_scenario_data, yaml_writer):
    row = list(range(8)) * 2
    row[5] = 8  # GPU 8 on an 8-GPU cluster
    pfile = write_placement(tmp_path, [list(range(8)) * 2, row, row, row])
    tiny_scenario_data["placements"].append({"file": "p.json", "name": "hand"})
    sc = load_scenario(yaml_writer(tmp_path / "s.yaml", tiny_scenario_data))
    assert sc.placements[-1].file == pfile
    with pytest.raises(InputError, match="GPU 8 out of range") as exc:
        run_study(sc, progress=False)
    assert str(exc.value).startswith(f"{pfile}: layers[1].expert_gpus[5]: ")


def test_placement_file_for_another_cluster(tmp_path, tiny_scenario_data, yaml_writer):
    pfile = write_placement(tmp_path, [[0, 1, 2, 3] * 4] * 4, num_ranks=4)
    tiny_scenario_data["placements"] = [{"file": str(pfile)}]
    del tiny_scenario_data["baseline"]
    sc = load_scenario(yaml_writer(tmp_path / "s.yaml", tiny_scenario_data))
    assert sc.baseline == "p"
    with pytest.raises(InputError, match="placement is for 4 GPUs") as exc:
        run_study(sc, progress=False)
    assert str(exc.value).startswith(f"{pfile}: num_ranks: ")


def test_placement_file_is_used(tmp_path, tiny_scenario_data, yaml_writer):
    write_placement(tmp_path, [[0] * 2 + list(range(1, 8)) * 2] * 4)
    tiny_scenario_data["placements"] = ["contiguous", {"file": "p.json", "name": "hand"}]
    result = run_study(load_scenario(yaml_writer(tmp_path / "s.yaml", tiny_scenario_data)), progress=False)
    hand = next(r for r in result.runs if r.name == "hand")
    assert hand.placement.gpus[0, :, 0].tolist() == [0, 0] + list(range(1, 8)) * 2
    assert hand.metrics.speedup_vs_baseline > 0


def test_experts_that_cannot_fit_in_memory(tmp_path, tiny_scenario_data, yaml_writer):
    tiny_scenario_data["model"].update({"d_model": 16384, "d_ff": 65536, "num_layers": 40})
    sc = load_scenario(yaml_writer(tmp_path / "s.yaml", tiny_scenario_data))
    with pytest.raises(InputError, match="expert weights per GPU") as exc:
        run_study(sc, progress=False)
    assert str(exc.value).startswith(f"{tmp_path / 's.yaml'}: clusters[0]: ")


def test_policy_option_of_the_wrong_type(tmp_path, tiny_scenario_data, yaml_writer):
    tiny_scenario_data["placements"][2] = {"policy": "random", "seed": "abc"}
    path = yaml_writer(tmp_path / "s.yaml", tiny_scenario_data)
    with pytest.raises(InputError) as exc:
        run_study(load_scenario(path), progress=False)
    assert str(exc.value).startswith(f"{path}: placements[2]")


def test_unsatisfiable_affinity_is_an_input_error(tmp_path, tiny_scenario_data, yaml_writer):
    tiny_scenario_data["workload"]["synthetic"].update({"affinity": 1.0, "affinity_fanout": 1, "tokens_per_gpu": 1,
                                                        "batches": 1})
    path = yaml_writer(tmp_path / "s.yaml", tiny_scenario_data)
    with pytest.raises(InputError) as exc:
        run_study(load_scenario(path), progress=False)
    assert str(exc.value).startswith(f"{path}: workload.synthetic")


def test_error_messages_are_one_line():
    err = InputError("a\n  b", source="f.yaml", field="x.y")
    assert str(err) == "f.yaml: x.y: a b"
    assert str(err.at(field_prefix="top")) == "f.yaml: top.x.y: a b"
    assert str(InputError("plain")) == "plain"
    assert json.dumps(str(err))  # printable


# ---------------------------------------------------------------- workloads the runner builds

def test_expert_loads_counts_every_pick():
    from moesim.study import expert_loads

    experts = np.array([[[0, 1], [2, -1]], [[1, 0], [2, 1]], [[3, 1], [-1, -1]]])
    trace = Trace(experts=experts, meta=TraceMeta(num_experts=4, num_layers=2, top_k=2))
    np.testing.assert_array_equal(expert_loads(trace), [[2, 3, 0, 1], [0, 1, 2, 0]])


def test_synthetic_profile_is_independent_of_the_evaluation(tiny_scenario_data):
    from moesim.study import build_workload

    tiny_scenario_data["workload"]["synthetic"]["profile_batches"] = 3
    sc = parse_scenario(tiny_scenario_data, "s.yaml")
    work = build_workload(sc, sc.clusters[0])
    assert work.trace.num_tokens == 2 * 8 * 64 and work.profile.num_tokens == 3 * 8 * 64
    assert not work.profile_in_sample
    assert not np.array_equal(work.profile.experts[:1024], work.trace.experts)
    again = build_workload(sc, sc.clusters[0])
    np.testing.assert_array_equal(again.trace.experts, work.trace.experts)


def test_trace_workload_profile_batches(tmp_path, tiny_scenario_data, yaml_writer):
    trace = generate_trace(num_layers=4, num_experts=16, top_k=2, num_gpus=8, tokens_per_gpu=8, batches=3,
                           params=SyntheticParams(), rng=np.random.default_rng(0))
    save_trace(trace, tmp_path / "t.npz")
    tiny_scenario_data["workload"] = {"trace": {"file": "t.npz", "profile_batches": 1}}
    result = run_study(load_scenario(yaml_writer(tmp_path / "s.yaml", tiny_scenario_data)), progress=False)
    work = result.workloads["1x8-h200"]
    assert work == {"tokens": 192, "batches": 3, "profile_tokens": 64, "profile_in_sample": False}
    del tiny_scenario_data["workload"]["trace"]["profile_batches"]
    result = run_study(load_scenario(yaml_writer(tmp_path / "s.yaml", tiny_scenario_data)), progress=False)
    assert result.workloads["1x8-h200"]["profile_in_sample"] is True


@pytest.mark.parametrize("text", ["0E0", "1e3", "-2.5e-3", "+.5E+2", "1.5", "true", "null", "2024-01-01", "e3", "名前"])
def test_yaml_moesim_writes_reads_back_as_written(text):
    """moesim reads a plain 1e-3 as a number (YAML 1.2), so what it writes must quote a string that looks like
    one: a cluster named 1e3 by `moesim calibrate --name` stays the string '1e3'."""
    from moesim.loaders import dump_yaml, load_yaml

    doc = {"name": text, "values": [text, 1e-3, 2, None, True]}
    assert load_yaml(dump_yaml(doc, sort_keys=False), "x.yaml") == doc
