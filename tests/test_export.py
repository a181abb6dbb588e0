"""Placements in the engines' formats: each file read back as the engine reads it, same placement.

The readers below are written from each engine's documented format and loader (sources in
docs/engine_formats.md), not from moesim's writers: SGLang's ``init_by_mapping`` (one row per decoder layer, keys
passed as keyword arguments), TensorRT-LLM's ``MoeLoadBalancerConfig`` (three keys, decoder-layer int keys,
``num_slots / ep_size`` consecutive slots per rank), vLLM #41141's ``_load_initial_mapping`` checks, and
vllm-ascend's ``expert_map_path`` JSON.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from moesim.cli import main
from moesim.cli.export import ENGINES
from moesim.errors import InputError
from moesim.placement import PlacementProblem, make_placement
from moesim.placement.export import LayerLayout, export_placement, placement_from_map, slot_map, writer_names
from moesim.placement.format import Placement, load_placement, save_placement
from moesim.traces.model import ModelSpec
from moesim.traces.model_presets import model_preset


def _ranks_of(phy2log: np.ndarray, num_experts: int, num_ranks: int) -> list[list[set[int]]]:
    """Per layer, per logical expert, the EP ranks holding it (slot p on rank p // (P / R))."""
    L, P = phy2log.shape
    assert P % num_ranks == 0, "slots must split evenly over the ranks"
    per = P // num_ranks
    out = [[set() for _ in range(num_experts)] for _ in range(L)]
    for l in range(L):
        for p, e in enumerate(phy2log[l]):
            out[l][int(e)].add(p // per)
    assert all(reps for layer in out for reps in layer), "every logical expert needs a slot in every layer"
    return out


def _ranks_of_placement(p: Placement) -> list[list[set[int]]]:
    return [[{int(g) for g in reps if g >= 0} for reps in layer] for layer in p.gpus]


def read_sglang(path, layout: LayerLayout, num_experts: int) -> np.ndarray:
    data = json.loads(path.read_text())
    assert set(data) == {"physical_to_logical_map"}  # init_by_mapping(server_args, model_config, **data)
    m = np.array(data["physical_to_logical_map"])
    assert m.shape[0] == layout.num_decoder_layers  # num_hidden_layers rows
    P = m.shape[1]
    for d in layout.dense_layer_ids:  # what init_trivial gives a layer: arange(P) % E
        assert (m[d] == np.arange(P) % num_experts).all()
    return m[list(layout.layer_ids)]


def read_trtllm(path, layout: LayerLayout) -> np.ndarray:
    cfg = yaml.safe_load(path.read_text())
    assert set(cfg) == {"num_slots", "initial_global_assignments", "layer_updates_per_iter"}
    assert cfg["layer_updates_per_iter"] == 0
    assign = cfg["initial_global_assignments"]
    assert list(assign) == list(layout.layer_ids) and all(isinstance(k, int) for k in assign)
    assert all(len(v) == cfg["num_slots"] for v in assign.values())
    return np.array([assign[k] for k in layout.layer_ids])


def read_vllm(path, num_moe_layers: int, num_experts: int, redundant: int) -> np.ndarray:
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    rec = json.loads(lines[0])
    assert rec["record_type"] == "eplb_initial_mapping" and rec["version"] == 1
    assert rec["num_redundant_experts"] == redundant and rec["num_slots"] == num_experts + redundant
    g = rec["initial_global_assignments"]
    assert set(g) == {str(l) for l in range(num_moe_layers)}
    m = np.array([g[str(l)] for l in range(num_moe_layers)])
    assert ((m >= 0) & (m < num_experts)).all() and m.shape[1] == rec["num_slots"]
    return m


def read_vllm_ascend(path, num_ranks: int) -> np.ndarray:
    data = json.loads(path.read_text())
    layers = data["layer_list"]
    assert data["moe_layer_count"] == len(layers)
    rows = []
    for l, layer in enumerate(layers):
        assert layer["layer_id"] == l and layer["device_count"] == num_ranks == len(layer["device_list"])
        devices = sorted(layer["device_list"], key=lambda d: d["device_id"])
        rows.append([e for d in devices for e in d["device_expert"]])
    return np.array(rows)


def _problem(L=3, E=16, R=4, seed=0) -> PlacementProblem:
    rng = np.random.default_rng(seed)
    load = rng.zipf(1.6, size=(L, E)).astype(float)
    return PlacementProblem(num_layers=L, num_experts=E, num_ranks=R, gpus_per_node=R, slots_per_gpu=E // R,
                            load=load, seed=seed)


def _placements() -> list[Placement]:
    prob = _problem()
    return [make_placement("greedy", prob), make_placement("greedy", prob, redundant_experts=4),
            make_placement("eplb", prob, redundant_experts=8), make_placement("contiguous", prob)]


def _read(engine: str, path, layout: LayerLayout, p: Placement, redundant: int) -> np.ndarray:
    if engine == "sglang":
        return read_sglang(path, layout, p.num_experts)
    if engine == "trtllm":
        return read_trtllm(path, layout)
    if engine == "vllm":
        return read_vllm(path, p.num_layers, p.num_experts, redundant)
    return read_vllm_ascend(path, p.num_ranks)


@pytest.mark.parametrize("engine", ["sglang", "trtllm", "vllm", "vllm-ascend"])
def test_round_trip_through_the_engines_reading(engine, tmp_path):
    layout = LayerLayout.from_counts(3, first_dense_layers=2, moe_layer_step=2, num_decoder_layers=9)
    for i, p in enumerate(_placements()):
        path = tmp_path / f"{i}.out"
        done = export_placement(p, engine, path, layout)
        m = _read(engine, path, layout, p, done.redundant)
        assert m.shape == (p.num_layers, done.num_slots)
        assert _ranks_of(m, p.num_experts, p.num_ranks) == _ranks_of_placement(p)
        back = placement_from_map(m, p.num_experts, p.num_ranks, "back")
        assert _ranks_of_placement(back) == _ranks_of_placement(p)


def test_layer_index_conventions_of_deepseek_v3_and_llama4(tmp_path):
    ds = ModelSpec.model_validate(model_preset("deepseek-v3").fields)
    lay = LayerLayout.from_model(ds)
    assert lay.num_decoder_layers == 61 and lay.layer_ids[0] == 3 and lay.layer_ids[-1] == 60
    prob = PlacementProblem(num_layers=58, num_experts=256, num_ranks=32, gpus_per_node=8, slots_per_gpu=8,
                            load=np.ones((58, 256)))
    p = make_placement("eplb", prob, redundant_experts=32)
    export_placement(p, "trtllm", tmp_path / "t.yaml", lay)
    keys = list(yaml.safe_load((tmp_path / "t.yaml").read_text())["initial_global_assignments"])
    assert keys == list(range(3, 61))  # TensorRT-LLM's README: 3 ... 60 for DeepSeek-R1
    export_placement(p, "sglang", tmp_path / "s.json", lay)
    rows = json.loads((tmp_path / "s.json").read_text())["physical_to_logical_map"]
    assert len(rows) == 61 and len(rows[0]) == 288 and rows[0] == [i % 256 for i in range(288)]
    export_placement(p, "vllm", tmp_path / "v.jsonl", lay)
    assert list(json.loads((tmp_path / "v.jsonl").read_text())["initial_global_assignments"])[-1] == "57"
    llama = LayerLayout.from_model(ModelSpec.model_validate(model_preset("llama-4-maverick").fields))
    assert llama.layer_ids[:3] == (1, 3, 5) and llama.num_decoder_layers == 48  # moe_layers 1, 3, ..., 47


def test_eplb_twins_come_back_as_slots_on_the_same_rank():
    # one very hot expert, 2 ranks x 3 slots: EPLB puts two of its copies on one rank, moesim merges them
    prob = PlacementProblem(num_layers=1, num_experts=4, num_ranks=2, gpus_per_node=2, slots_per_gpu=2,
                            load=np.array([[100.0, 1, 1, 1]]))
    p = make_placement("eplb", prob, redundant_experts=2)
    m = slot_map(p)
    assert p.info["merged_twins"] == 6 - int(p.copies_per_gpu().sum()) > 0
    assert m.shape == (1, 6) and np.bincount(m[0], minlength=4).min() >= 1
    assert _ranks_of(m, 4, 2) == _ranks_of_placement(p)


def test_what_an_engine_cannot_express_is_refused(tmp_path):
    unequal = Placement.from_lists([[[0], [0], [0], [1]]], 2, "hand")  # rank 0: 3 experts, rank 1: 1
    with pytest.raises(InputError, match="same number of slots"):
        export_placement(unequal, "sglang", tmp_path / "x.json")
    missing = Placement.from_lists([[[0], [1], []]], 2, "hand")
    with pytest.raises(InputError, match="no EP rank"):
        export_placement(missing, "vllm", tmp_path / "x.jsonl")
    assert not list(tmp_path.iterdir())
    save_placement(unequal, tmp_path / "u.json")
    assert main(["export", str(tmp_path / "u.json"), "--to", "trtllm", "-o", str(tmp_path / "t.yaml")]) == 2
    assert not (tmp_path / "t.yaml").exists()


def test_cli_export_and_place_to(tmp_path, capsys):
    p = _placements()[1]
    save_placement(p, tmp_path / "p.json")
    out = tmp_path / "v.jsonl"
    assert main(["export", str(tmp_path / "p.json"), "--to", "vllm", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "unmerged proposal" in text and "num_redundant_experts" in text
    m = read_vllm(out, p.num_layers, p.num_experts, 4)
    assert _ranks_of(m, p.num_experts, p.num_ranks) == _ranks_of_placement(p)
    assert main(["export", str(tmp_path / "p.json"), "--to", "vllm", "-o", str(out)]) == 0  # its own: replaced
    foreign = tmp_path / "foreign.json"
    foreign.write_text("{}")
    assert main(["export", str(tmp_path / "p.json"), "--to", "sglang", "-o", str(foreign)]) == 2
    assert foreign.read_text() == "{}"
    assert main(["export", str(tmp_path / "p.json"), "--to", "nope", "-o", str(tmp_path / "n")]) == 2
    assert main(["export", str(tmp_path / "p.json"), "--to", "sglang", "-o", str(tmp_path / "s.json"),
                 "--model", "deepseek-v3"]) == 2  # 3 layers x 16 experts is not DeepSeek-V3
    assert main(["export", str(tmp_path / "p.json"), "--to", "moesim", "-o", str(tmp_path / "m.json")]) == 0
    assert _ranks_of_placement(load_placement(tmp_path / "m.json")) == _ranks_of_placement(p)
    assert main(["export", str(tmp_path / "p.json"), "--to", "sglang", "-o", str(tmp_path / "s.json"),
                 "--first-dense-layers", "1"]) == 0
    read_sglang(tmp_path / "s.json", LayerLayout.from_counts(3, first_dense_layers=1), p.num_experts)


def test_place_to_writes_the_engine_file(tiny_scenario_file, tmp_path):
    out = tmp_path / "t.yaml"
    assert main(["place", str(tiny_scenario_file), "--policy", "greedy", "-o", str(out), "--to", "trtllm", "-q"]) == 0
    assert yaml.safe_load(out.read_text())["layer_updates_per_iter"] == 0


def test_cli_engine_names_are_the_writers():
    assert list(ENGINES) == writer_names()


@pytest.mark.parametrize("engine", ["sglang", "trtllm", "vllm", "vllm-ascend", "moesim"])
def test_read_map_takes_back_every_format(engine, tmp_path):
    from moesim.placement.export.read import read_map

    layout = LayerLayout.from_counts(3, first_dense_layers=1, num_decoder_layers=5)
    for i, p in enumerate(_placements()):
        export_placement(p, engine, tmp_path / f"{i}", layout)
        back = read_map(tmp_path / f"{i}", layout, p.num_experts, p.num_ranks)
        assert _ranks_of_placement(back) == _ranks_of_placement(p)


def test_read_map_names_the_file_and_field(tmp_path):
    from moesim.placement.export.read import read_map

    layout = LayerLayout.moe_only(2)
    bad = tmp_path / "s.json"
    bad.write_text(json.dumps({"physical_to_logical_map": [[0, 1, 2, 3], [0, 1, 2, 2]]}))
    with pytest.raises(InputError, match="s.json: physical_to_logical_map: expert 3 has no slot in layer 1"):
        read_map(bad, layout, 4, 2)
    bad.write_text("num_slots: 4\ninitial_global_assignments: {0: [0, 1, 2, 3]}\n")
    with pytest.raises(InputError, match="initial_global_assignments: has no layer 1"):
        read_map(bad, layout, 4, 2)
