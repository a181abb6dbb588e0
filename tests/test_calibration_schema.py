"""The benchmark files moesim calibrate reads (moesim.calibration.schema): a malformed file is refused as one line
naming the file and the field by its path, before any point is parsed; a fit that cannot be made, or that gives a
value outside its field's bounds, names the files.

tests/test_hostile_inputs.py runs some of these through the command line in a subprocess; these call
load_bench in-process and check the whole message."""

from __future__ import annotations

import copy
import json
from typing import Any, Callable

import pytest

from moesim.calibration import load_bench
from moesim.calibration import fit as fit_mod
from moesim.calibration.schema import MAX_SIZE, calibrate_checked, check_fitted
from moesim.cli import main
from moesim.errors import InputError
from moesim.hardware import ClusterSpec, preset
from moesim.traces.model import MAX_DIM

A2A: dict[str, Any] = {
    "world": 2, "device": "NVIDIA H200",
    "uniform": [{"bytes_per_pair": 1024 * 4**i, "ms_median_max_over_ranks": 0.04 + 0.01 * i} for i in range(6)],
    "skew": [{"bytes_matrix": [[1024, 2048], [4096, 8192]], "ms_median_per_rank": [0.05, 0.06]}],
    "p2p": [{"bytes": 1 << 20, "ms": 0.05}],
}
FFN: dict[str, Any] = {
    "device": "NVIDIA H200",
    "single": {"m": {"d_model": 4096, "d_ff": 14336, "rows": [[2**i, 0.1 + 0.01 * i] for i in range(8)]}},
    "multi": [{"shape": "m", "loads": [16, 1024, 0, 16], "ms": 1.3}],
}
RECORD: dict[str, Any] = {
    "shape": "s", "d_model": 256, "d_ff": 512, "num_experts": 8, "top_k": 2, "ep": 1, "local_experts": 8,
    "pipeline": "torch_reference", "dtype": "bf16", "routing": "uniform", "tokens": 32, "rows": 64,
    "rows_per_expert": [8] * 8, "send_rows": 64, "steps_ms": {"router": 0.1, "gemm_gate_up": 0.2, "gemm_down": 0.1},
    "steps_sum_ms": 0.4, "total_ms": 0.4,
}
MOE: dict[str, Any] = {"format": "moesim.bench.moe/1", "device": "NVIDIA H200",
                       "records": [RECORD, {**RECORD, "tokens": 64, "rows": 128, "rows_per_expert": [16] * 8,
                                            "send_rows": 128, "total_ms": 0.5}]}
TABLE_ROW: dict[str, Any] = {k: v for k, v in RECORD.items() if k not in ("steps_ms", "steps_sum_ms", "total_ms",
                                                                          "rows")}
TABLE: dict[str, Any] = {"format": "moesim.bench.moe_table/1", "device": "NVIDIA H200",  # a kernel-timing table
                         "records": [{**TABLE_ROW, "pipeline": "fused", "layer_us": 40.0},
                                     {**TABLE_ROW, "pipeline": "deepgemm", "dtype": "fp8", "layer_us": 50.0,
                                      "launch": "eager", "covers": ["gemm_gate_up", "gemm_down"], "harness": "h"}]}
MOST = f"at most {MAX_SIZE}"


def _set(path: str, value: Any) -> Callable[[dict], None]:
    """A change: the value at ``path`` (keys and list indices, dot-separated) replaced, or deleted with ``...``."""
    def change(data: dict) -> None:
        *parents, leaf = [int(p) if p.isdigit() else p for p in path.split(".")]
        node: Any = data
        for p in parents:
            node = node[p]
        if value is ...:
            del node[leaf]
        else:
            node[leaf] = value

    return change


def _write(tmp_path, base: dict, change: Callable[[dict], None] | None = None, name: str = "b.json"):
    data = copy.deepcopy(base)
    if change:
        change(data)
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_the_valid_files_load(tmp_path):
    data = load_bench([_write(tmp_path, A2A, name="a.json"), _write(tmp_path, FFN, name="f.json"),
                       _write(tmp_path, MOE, name="m.json")])
    assert data.world == 2 and len(data.a2a) == 6 + 1 and len(data.p2p) == 1
    assert len(data.ffn) == 8 + 1 and len(data.moe) == 2
    no_lists = load_bench([_write(tmp_path, {"world": 4, "skew": []}, name="s.json")])  # absent lists are empty
    assert no_lists.world == 4 and not no_lists.a2a and not no_lists.p2p


@pytest.mark.parametrize(("base", "change", "expected"), [
    (A2A, _set("world", ...), "world: missing"),
    (A2A, _set("world", 2.0), "world: must be an integer, got 2.0"),
    (A2A, _set("world", True), "world: must be an integer, got True"),
    (A2A, _set("world", 10**9), "world: must be an integer > 0 and at most 4096, got 1000000000"),
    (A2A, _set("uniform", {"0": 1}), "uniform: must be a list, got dict"),
    (A2A, _set("uniform.0", 1024), "uniform[0]: must be a JSON object"),
    (A2A, _set("uniform.1.bytes_per_pair", -1), f"uniform[1].bytes_per_pair: must be a number >= 0 and {MOST}, got -1"),
    (A2A, _set("uniform.2.ms_median_max_over_ranks", 0),
     f"uniform[2].ms_median_max_over_ranks: must be a number > 0 and {MOST}, got 0"),
    (A2A, _set("uniform.3.ms_median_max_over_ranks", "0.1"),
     "uniform[3].ms_median_max_over_ranks: must be a number, got '0.1'"),
    (A2A, _set("skew.0.bytes_matrix", [[1, 2]]), "skew[0].bytes_matrix: must be 2 x 2"),
    (A2A, _set("skew.0.bytes_matrix.1", [1]), "skew[0].bytes_matrix[1]: must be a list of 2 numbers"),
    (A2A, _set("skew.0.bytes_matrix.1.0", None), "skew[0].bytes_matrix[1][0]: must be a number, got None"),
    (A2A, _set("skew.0.ms_median_per_rank", 0.05), "skew[0].ms_median_per_rank: must be a list of 2 numbers"),
    (A2A, _set("skew.0.ms_median_per_rank.1", 0), f"skew[0].ms_median_per_rank[1]: must be a number > 0 and {MOST}, "
                                                   "got 0"),
    (A2A, _set("p2p.0.bytes", ...), "p2p[0].bytes: missing"),
    (FFN, _set("single", [1, 2]), "single: must be a mapping of shape name to d_model, d_ff, rows"),
    (FFN, _set("single.m", 4096), "single.m: must be a JSON object"),
    (FFN, _set("single.m.d_ff", 2**31), f"single.m.d_ff: must be an integer > 0 and at most {MAX_DIM}, got 2147483648"),
    (FFN, _set("single.m.rows", ...), "single.m.rows: missing"),
    (FFN, _set("single.m.rows.1", [16]), "single.m.rows[1]: must be [tokens, ms]"),
    (FFN, _set("single.m.rows.1.0", 16.5), "single.m.rows[1][0]: must be an integer, got 16.5"),
    (FFN, _set("multi.0.shape", "nope"), "multi[0].shape: not one of the shapes in 'single' (m; got 'nope')"),
    (FFN, _set("multi.0.shape", ["m"]), "multi[0].shape: not one of the shapes in 'single' (m; got ['m'])"),
    (FFN, _set("multi.0.loads", []), "multi[0].loads: must be a non-empty list of token counts"),
    (FFN, _set("multi.0.ms", ...), "multi[0].ms: missing"),
    (MOE, _set("records", ...), "records: missing"),
    (MOE, _set("records.1", [RECORD]), "records[1]: must be a JSON object"),
    (MOE, _set("records.0.dtype", 16), "records[0].dtype: must be a string, got 16"),
    (MOE, _set("records.0.top_k", 9), "records[0]: top_k (9) and local_experts (8) must be at most num_experts (8)"),
    (MOE, _set("records.0.local_experts", 16),
     "records[0]: top_k (2) and local_experts (16) must be at most num_experts (8)"),
    (MOE, _set("records.0.steps_ms", {}), "records[0].steps_ms: must be a mapping of step name to milliseconds"),
    (MOE, _set("records.0.steps_ms", [0.1]), "records[0].steps_ms: must be a mapping of step name to milliseconds"),
    (MOE, _set("records.1.steps_sum_ms", 0), f"records[1].steps_sum_ms: must be a number > 0 and {MOST}, got 0"),
    (TABLE, _set("records.0.layer_us", ...), "records[0].layer_us: missing"),
    (TABLE, _set("records.0.layer_us", -3), f"records[0].layer_us: must be a number > 0 and {MOST}, got -3"),
    (TABLE, _set("records.0.pipeline", "torch_reference"),
     "records[0]: a table row must be of pipeline fused or deepgemm in bf16 or fp8, got 'torch_reference' 'bf16'"),
    (TABLE, _set("records.1.launch", "graph"), "records[1].launch: must be eager or cuda_graph, got 'graph'"),
    (TABLE, _set("records.1.covers", ["permute"]), "records[1].covers: must list steps among router, align, "
                                                   "gemm_gate_up, activation, gemm_down, reduce"),
    (TABLE, _set("records.0.rows_per_expert", [8] * 7), "records[0].rows_per_expert: must be a list of 8 numbers"),
])
def test_malformed_files_are_one_line_naming_file_and_field(tmp_path, base, change, expected):
    good = _write(tmp_path, A2A, name="a.json")
    path = _write(tmp_path, base, change)
    with pytest.raises(InputError) as err:
        load_bench([good, path])
    assert str(err.value) == f"{path}: {expected}"
    assert err.value.source == str(path) and str(err.value).count("\n") == 0


def test_a_kernel_table_loads_as_whole_layer_points(tmp_path):
    points = load_bench([_write(tmp_path, TABLE)]).moe_table
    assert [(p.pipeline, p.launch, p.covers, p.harness) for p in points] == [
        ("fused", "cuda_graph", (), ""), ("deepgemm", "eager", ("gemm_gate_up", "gemm_down"), "h")]
    assert points[0].total_ms == pytest.approx(0.040) and points[0].table


def test_skipped_moe_records_are_not_checked(tmp_path):
    data = copy.deepcopy(MOE)
    data["records"].append({"shape": "s", "tokens": "many", "skipped": "time budget of the run exhausted"})
    assert len(load_bench([_write(tmp_path, data)]).moe) == 2


def test_calibrate_cli_refuses_a_malformed_file_before_writing(tmp_path, capsys):
    path = _write(tmp_path, FFN, _set("multi.0.loads", []))
    out = tmp_path / "c.yaml"
    assert main(["calibrate", str(path), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"moesim: error: {path}: multi[0].loads: must be a non-empty list of token counts\n"
    assert not out.exists()


def test_a_fit_that_fails_names_the_files(tmp_path, monkeypatch):
    data = load_bench([_write(tmp_path, A2A, name="a.json"), _write(tmp_path, FFN, name="f.json")])

    def degenerate(*args, **kwargs):
        raise ZeroDivisionError("float division\n   by zero")

    monkeypatch.setattr(fit_mod, "calibrate", degenerate)
    with pytest.raises(InputError) as err:
        calibrate_checked(data, "hgx-h200")
    assert str(err.value) == (f"{tmp_path / 'a.json'}, {tmp_path / 'f.json'}: cannot fit these points "
                              "(ZeroDivisionError: float division by zero)")

    def refused(*args, **kwargs):
        raise InputError("no such preset", field="--preset")

    monkeypatch.setattr(fit_mod, "calibrate", refused)
    with pytest.raises(InputError, match=r"^--preset: no such preset$"):  # an InputError passes unchanged
        calibrate_checked(data, "hgx-h200")


def test_the_fitted_cluster_is_validated_again(tmp_path):
    data = load_bench([_write(tmp_path, FFN, name="f.json")])
    result = calibrate_checked(data, "hgx-h200", name="fitted")
    assert result.spec.name == "fitted" and 0 < result.spec.gpu.compute_efficiency <= 1
    spec = ClusterSpec(**preset("hgx-h200"))
    bad = spec.model_copy(update={"gpu": spec.gpu.model_copy(update={"compute_efficiency": 1.7})})  # not validated
    with pytest.raises(InputError) as err:
        check_fitted(bad, ["a.json", "f.json"])
    assert str(err.value) == ("a.json, f.json: gpu.compute_efficiency: the fit gives 1.7, which is not a valid value "
                              "(Input should be less than or equal to 1); check the timings in the benchmark files")
    check_fitted(spec, ["a.json"])
