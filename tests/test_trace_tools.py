"""Trace tools: import (CSV / JSONL / numpy, packing, errors), statistics against brute force and closed
forms, the memory-mappable stored layout, the fitted generator and its fit, and the `moesim trace` CLI."""

from __future__ import annotations

import csv
import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moesim.traces.counts as counts_mod
import moesim.traces.format as fmt
import moesim.traces.stats as stats_mod
from moesim.cli import main
from moesim.errors import InputError
from moesim.traces import Trace, TraceMeta, load_trace, save_trace
from moesim.traces.fitted_generator import (FittedParams, generate_fitted, load_params, save_params,
                                            shipped_params, write_fitted_trace)
from moesim.traces.format import save_trace_blocks
from moesim.traces.generator_fit import fit_trace, initial_params
from moesim.traces.readers import ReadOptions, import_trace, pack_requests
from moesim.traces.readers.numpy_reader import read_numpy
from moesim.traces.readers.records import MAX_ID
from moesim.traces.readers.table import READERS, Reader, _table, detect_format, read_files, reader_for
from moesim.traces.stats import (coactivation_counts, expert_counts, mutual_information, trace_stats,
                                 transition_counts)

DATA = Path(__file__).resolve().parents[1] / "moesim" / "data"


def random_trace(T: int = 40, L: int = 3, K: int = 2, E: int = 8, seed: int = 0, weights: bool = False) -> Trace:
    rng = np.random.default_rng(seed)
    ex = np.argsort(rng.random((T, L, E)), axis=2)[:, :, :K].astype(np.int16)
    w = rng.random((T, L, K)).astype(np.float32) if weights else None
    return Trace(experts=ex, meta=TraceMeta(num_experts=E, num_layers=L, top_k=K), weights=w)


def write_csv(path: Path, requests: list[np.ndarray], *, first_layer: int = 1, bad_line: int | None = None) -> Path:
    """DeepSeek-V2-Lite layout: one file, rows grouped by layer then token; several batches = requests."""
    rows = [["Layer ID", "Batch Number", "Token", "Activated Expert IDs"]]
    for r, ex in enumerate(requests):
        for l in range(ex.shape[1]):
            for t in range(ex.shape[0]):
                rows.append([str(l + first_layer), str(r), f'tok,"[{t}', "[" + ", ".join(map(str, ex[t, l])) + "]"])
    if bad_line is not None:
        rows[bad_line - 1][3] = "[1, x]"
    with gzip.open(path, "wt", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return path


# ---------------------------------------------------------------- import

def test_csv_import_round_trip_keeps_every_pick(tmp_path):
    a, b = random_trace(T=7, seed=1).experts, random_trace(T=5, seed=2).experts
    path = write_csv(tmp_path / "p.csv.gz", [a, b])
    res = import_trace([path], num_experts=8)
    tr = res.trace
    np.testing.assert_array_equal(tr.experts, np.concatenate([a, b]))  # request 0 then request 1, in order
    assert (res.records, res.skipped, res.padded, res.missing, res.requests) == (36, 0, 0, 0, 2)
    assert tr.meta.extra["layer_ids"] == [1, 2, 3] and tr.home is None and tr.batch is None


def test_csv_fast_path_equals_the_csv_module(tmp_path, monkeypatch):
    import moesim.traces.readers.csv_reader as csv_reader

    reqs = [random_trace(T=n, seed=n).experts for n in (4, 6)]
    path = write_csv(tmp_path / "p.csv.gz", reqs)  # tokens hold commas, quotes and brackets
    with gzip.open(path, "rt", newline="") as fh:
        assert csv_reader._csv_bytes_fast(fh.read(), True) is not None
    fast = import_trace([path], num_experts=8)
    monkeypatch.setattr(csv_reader, "_csv_bytes_fast", lambda *a: None)
    slow = import_trace([path], num_experts=8)
    np.testing.assert_array_equal(fast.trace.experts, slow.trace.experts)
    np.testing.assert_array_equal(fast.trace.experts, np.concatenate(reqs))


def test_csv_bad_row_names_file_and_line_and_skip_counts(tmp_path):
    ex = random_trace(T=6).experts
    path = write_csv(tmp_path / "p.csv.gz", [ex], bad_line=5)
    with pytest.raises(InputError, match=r"p\.csv\.gz: line 5: expert ids '\[1, x\]'"):
        import_trace([path])
    res = import_trace([path], num_experts=8, skip_bad=True, allow_missing=True)
    assert res.skipped == 1 and res.missing == 1 and res.records == 17
    t, l = 3, 0  # line 5 = header + 4th row of layer 1 (layer index 0)
    assert (res.trace.experts[t, l] == -1).all()
    np.testing.assert_array_equal(np.delete(res.trace.experts.reshape(18, 2), t * 3 + l, axis=0),
                                  np.delete(ex.reshape(18, 2), t * 3 + l, axis=0))


def test_jsonl_import_with_weights_requests_and_multi_token_records(tmp_path):
    tr = random_trace(T=6, L=2, weights=True, seed=3)
    lines = []
    for l in range(2):
        for t in range(6):
            req, pos = divmod(t, 3)
            lines.append({"layer": l, "token": pos, "request_id": f"r{req}",
                          "topk_ids": tr.experts[t, l].tolist(), "topk_weights": tr.weights[t, l].tolist()})
    lines[-3:] = [{"layer": 1, "token": 0, "request_id": "r1", "topk_ids": tr.experts[3:, 1].tolist(),
                   "topk_weights": tr.weights[3:, 1].tolist()}]  # one record of three tokens
    path = tmp_path / "route.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    res = import_trace([path], num_experts=8)
    np.testing.assert_array_equal(res.trace.experts, tr.experts)
    np.testing.assert_array_equal(res.trace.weights, tr.weights)
    assert res.requests == 2 and res.records == 12


def test_jsonl_fast_paths_equal_the_line_by_line_parse(tmp_path, monkeypatch):
    import moesim.traces.readers.jsonl_reader as jsonl_reader

    tr = random_trace(T=9, L=3, K=4, E=16, weights=True, seed=4)
    path = tmp_path / "uniform.jsonl"
    with open(path, "w") as fh:  # what a logger writes: one record per token and layer, same keys every line
        for l in range(3):
            for t in range(9):
                fh.write(json.dumps({"request_id": t // 5, "layer": l, "token": t % 5,
                                     "topk_ids": tr.experts[t, l].tolist(),
                                     "topk_weights": [float(x) for x in tr.weights[t, l]]}) + "\n")
    assert jsonl_reader._jsonl_numbers(path.read_text()) is not None  # the one-pass numeric reader applies
    fast = import_trace([path], num_experts=16)
    monkeypatch.setattr(jsonl_reader, "_jsonl_numbers", lambda text: None)
    middle = import_trace([path], num_experts=16)
    monkeypatch.setattr(jsonl_reader, "_jsonl_fast", lambda *a: None)
    slow = import_trace([path], num_experts=16)
    for res in (fast, middle, slow):
        np.testing.assert_array_equal(res.trace.experts, tr.experts)
        np.testing.assert_allclose(res.trace.weights, tr.weights, rtol=1e-6)
        assert res.requests == 2


@pytest.mark.parametrize("line, expected", [
    ('{"layer": 0, "token": 0, "experts": [1, 2]}\n{"layer": 0, "token": 1, "experts": [1, 2]\n',
     r"x\.jsonl: line 2: Expecting"),
    ('{"layer": 0, "token": 0, "experts": [1, 2]}\n{"layer": 0, "token": 0, "experts": [3, 4]}\n',
     r"x\.jsonl: line 2: second record for request x\.jsonl, token 0, layer 0 \(first at .*x\.jsonl: line 1\)"),
    ('{"layer": 0, "token": 0, "experts": [1, 1]}\n', r"line 1: expert 1 appears twice"),
    ('{"layer": 0, "token": 0, "experts": [1, 9]}\n', r"line 1: expert id 9 out of range for num_experts=8"),
    ('{"layer": 0, "token": 0, "experts": [1, 2]}\n{"layer": 1, "token": 1, "experts": [1, 2]}\n',
     r"x\.jsonl: line 1: token 0 of request x\.jsonl \(its first record is here\) has no record for layer 1 "
     r"\(2 \(token, layer\) records missing .* --allow-missing"),
    ('{"layer": "a", "token": 0, "experts": [1, 2]}\n', r"line 1: needs an integer 'layer'"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, line, expected):
    path = tmp_path / "x.jsonl"
    path.write_text(line)
    with pytest.raises(InputError, match=expected):
        import_trace([path], num_experts=8)


def test_numpy_import_other_axis_order_and_padding(tmp_path):
    tr = random_trace(T=5, L=3, K=3)
    ltk = np.transpose(tr.experts, (1, 0, 2)).copy()
    ltk[1, 2, 2] = -1  # one record with two picks only
    np.save(tmp_path / "ids.npy", ltk)
    res = import_trace([tmp_path / "ids.npy"], axes="ltk", num_experts=8)
    assert res.padded == 1
    np.testing.assert_array_equal(res.trace.experts, np.transpose(ltk, (1, 0, 2)))


def test_packing_keeps_requests_on_one_gpu_and_batches_within_budget(tmp_path):
    reqs = [random_trace(T=n, seed=n).experts for n in (5, 9, 3, 7, 2, 4)]
    path = write_csv(tmp_path / "p.csv.gz", reqs)
    res = import_trace([path], num_experts=8, num_gpus=2, tokens_per_gpu=8, assign="least_loaded")
    tr = res.trace
    per = np.zeros((int(tr.batch.max()) + 1, 2), dtype=int)
    np.add.at(per, (tr.batch, tr.home), 1)
    assert per.max() <= 8 and per.sum() == 30
    assert np.all(np.diff(tr.batch) >= 0)  # batches contiguous, in order
    assert tr.meta.extra["packing"] == {"num_gpus": 2, "tokens_per_gpu": 8, "assign": "least_loaded"}
    # Every pick is still there, as a multiset of token rows.
    got = sorted(map(bytes, tr.experts.reshape(30, -1)))
    assert got == sorted(map(bytes, np.concatenate(reqs).reshape(30, -1)))


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=30), gpus=st.integers(1, 4),
       budget=st.integers(1, 16), assign=st.sampled_from(["round_robin", "least_loaded"]))
def test_pack_requests_properties(lengths, gpus, budget, assign):
    req, batch, home = pack_requests(np.array(lengths), num_gpus=gpus, tokens_per_gpu=budget, assign=assign)
    chunks = -(-np.array(lengths) // budget)
    np.testing.assert_array_equal(np.bincount(req, minlength=len(lengths)), chunks)  # every token, in chunks
    assert np.all(np.diff(req) >= 0) and np.all(np.diff(batch) >= 0)  # arrival order kept
    unit_len = np.minimum(np.array(lengths)[req] - (np.arange(req.size) - np.searchsorted(req, req)) * budget, budget)
    load = np.zeros((int(batch.max()) + 1, gpus), dtype=int)
    np.add.at(load, (batch, home), unit_len)
    assert load.max() <= budget and load.sum() == sum(lengths)


def test_import_cli_writes_nothing_on_bad_input_and_reports_counts(tmp_path, capsys):
    path = write_csv(tmp_path / "p.csv.gz", [random_trace(T=4).experts], bad_line=3)
    out = tmp_path / "out.npz"
    assert main(["trace", "import", str(path), "-o", str(out)]) == 2
    assert "p.csv.gz: line 3" in capsys.readouterr().err and not out.exists()
    assert main(["trace", "import", str(path), "-o", str(out), "--skip-bad", "--allow-missing", "--num-experts", "8",
                 "--gpus", "2"]) == 0
    text = capsys.readouterr().out
    assert "skipped 1 malformed record;" in text and "filled 1 missing" in text
    assert load_trace(out).home is not None
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


GOOD_ROWS = ['1,0,"a,b",' + '"[0, 1, 2]"', '1,0,tok,"[3, 4, 5]"', '1,0,c,"[5, 6, 7]"', '1,0,d,"[0, 3, 6]"',
             '2,0,x,"[1, 2, 6]"', '2,0,y,"[7, 0, 3]"', '2,0,z,"[4, 2, 1]"', '2,0,w,"[3, 5, 7]"']


@pytest.mark.parametrize("row, expected", [
    ('1,0,tok,"[3, 4, 9]"', r"line 3: expert id 9 out of range for num_experts=8"),
    ('1,0,tok,"[3, 4, -2]"', r"line 3: expert id -2 is negative"),
    ('1,0,tok,"[3, 4, 5]",extra', r"line 3: 5 columns, expected 4"),
    ('1,0', r"line 3: 2 columns, expected 4"),
    ('1,0,tok,"[3, 4.5, 5]"', r"line 3: expert ids '\[3, 4\.5, 5\]' are not a list of integers"),
    ('one,0,tok,"[3, 4, 5]"', r"line 3: layer 'one' is not an integer \(column 'Layer ID'\)"),
    ('1,zero,tok,"[3, 4, 5]"', r"line 3: request 'zero' is not an integer \(column 'Batch Number'\)"),
    ('-1,0,tok,"[3, 4, 5]"', r"line 3: layer -1 must be >= 0"),
    ('9,0,tok,"[3, 4, 5]"', r"line 3: layer 9 has records for only 1 of 4 tokens \(the other layer ids: 1-2\)"),
    ('1,0,tok,"[3, 4]"', r"line 3: 2 expert ids, fewer than top_k=3 .*--allow-missing"),
    ('1,0,tok,"[]"', r"line 3: 0 expert ids, fewer than top_k=3"),
    ('1,0,tok,"[3, 4, 5', r"line 3: \d+ columns, expected 4"),  # an open quote: named where the record starts
])
def test_malformed_csv_rows_fail_with_file_and_line_and_write_nothing(tmp_path, capsys, row, expected):
    rows = list(GOOD_ROWS)
    rows[1] = row  # file line 3
    path = tmp_path / "log.csv"
    path.write_text("Layer ID,Batch Number,Token,Activated Expert IDs\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out" / "t.npz"
    assert main(["trace", "import", str(path), "--num-experts", "8", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(r"log\.csv: " + expected, err), err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["log.csv"]  # no output, no temporary file, no folder


def test_short_records_are_padded_only_when_allowed_and_the_count_shown(tmp_path, capsys):
    path = tmp_path / "log.csv"
    path.write_text("Layer ID,Batch Number,Token,Activated Expert IDs\n" + "\n".join(
        [GOOD_ROWS[0], '1,0,tok,"[3, 4]"', *GOOD_ROWS[2:]]) + "\n")
    out = tmp_path / "t.npz"
    assert main(["trace", "import", str(path), "--num-experts", "8", "-o", str(out), "--allow-missing"]) == 0
    assert "padded 1 record with fewer than top_k ids" in capsys.readouterr().out
    assert load_trace(out).experts[1, 0].tolist() == [3, 4, -1] and load_trace(out).num_tokens == 4


def test_csv_header_without_a_layer_column_is_named(tmp_path):
    path = tmp_path / "h.csv"
    path.write_text('lyr,request,experts\n0,0,"[1, 2]"\n')
    with pytest.raises(InputError, match=r"h\.csv: line 1: no layer column in the header \['lyr', 'request', "
                                         r"'experts'\]; expected one of 'layer'"):
        import_trace([path])


@pytest.mark.parametrize("lines, expected", [
    (['{"layer": 0, "token": 0, "topk_ids": [1, 2], "topk_weights": [0.6, 0.4]}',
      '{"layer": 0, "token": 1, "topk_ids": [1, 3]}'],
     r"line 2: no weights, but line 1 has them: give weights on every record or on none"),
    (['{"layer": 0, "token": 0, "topk_ids": [1, 2]}',
      '{"layer": 0, "token": 1, "topk_ids": [1, 3], "topk_weights": [0.6, 0.4]}'],
     r"line 1: no weights, but line 2 has them"),
    (['{"layer": 0, "token": 0, "topk_ids": [1, 2], "topk_weights": [0.6, 0.4]}',
      '{"layer": 0, "token": 1, "topk_ids": [1, 3], "topk_weights": [NaN, 0.4]}'],
     r"line 2: gate weight nan must be a finite number >= 0"),
    (['{"layer": 0, "token": 0, "topk_ids": [1, 2], "topk_weights": [0.6, 0.4]}',
      '{"layer": 0, "token": 1, "topk_ids": [1, 3], "topk_weights": [-1.5, 0.4]}'],
     r"line 2: gate weight -1\.5 must be a finite number >= 0 \(gate weights after softmax or sigmoid, not raw"),
    (['{"layer": 0, "token": 0, "topk_ids": [1, 2]}', '{"layer": 0, "token": 1, "topk_ids": [1, true]}'],
     r"line 2: expert ids must be a list of integers, got \[1, True\]"),
    (['{"layer": 0, "token": 0, "topk_ids": [1, 2]}', '{"layer": -1, "token": 0, "topk_ids": [1, 3]}'],
     r"line 2: layer -1 must be >= 0"),
])
def test_jsonl_weights_and_values_are_checked_per_line(tmp_path, lines, expected):
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"r\.jsonl: " + expected):
        import_trace([path], num_experts=8)


def test_numpy_import_notes_a_likely_axis_mix_up(tmp_path):
    np.save(tmp_path / "ltk.npy", np.transpose(random_trace(T=20, L=3).experts, (1, 0, 2)).copy())
    res = import_trace([tmp_path / "ltk.npy"], num_experts=8)
    assert res.trace.num_tokens == 3 and any("pass --axes ltk" in n for n in res.notes)


def test_numpy_npz_records_follow_the_documented_layout(tmp_path):
    """An .npz of topk_ids and topk_weights in [layer, token, k] order: one record per (token, layer), tokens in
    order, -1 meaning "no expert" (counted short), weights as float32."""
    tr = random_trace(T=4, L=3, K=2, weights=True)
    ids = tr.experts.astype(np.int64)
    ids[2, 1, 1] = -1
    path = tmp_path / "log.npz"
    np.savez(path, topk_ids=np.transpose(ids, (1, 0, 2)), topk_weights=np.transpose(tr.weights, (1, 0, 2)).astype(
        np.float64), other=np.zeros(3))
    rec = read_numpy(path, ReadOptions(axes="ltk"))
    assert rec.layer.tolist() == [0, 1, 2] * 4 and rec.pos.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert rec.request.tolist() == [0] * 12 and rec.request_names == ["log.npz"]
    np.testing.assert_array_equal(rec.ids, ids.reshape(12, 2))
    assert rec.count.tolist() == [2] * 7 + [1] + [2] * 4  # record 7: token 2 at layer 1
    assert rec.weights.dtype == np.float32
    np.testing.assert_array_equal(rec.weights, tr.weights.reshape(12, 2))
    assert rec.where(7) == f"{path}: record 7" and rec.explicit.all() and rec.notes == []
    experts_only = tmp_path / "e.npz"
    np.savez(experts_only, expert_ids=ids)
    rec = read_numpy(experts_only, ReadOptions())
    assert rec.weights is None and rec.ids.shape == (12, 2)


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(("make", "expected"), [
    (lambda d: _npz(d / "t.npz", experts=np.zeros((2, 2, 1), np.int16), meta=np.array("{}")),
     "{d}/t.npz: already a moesim trace (has 'meta'): use it directly"),
    (lambda d: _npz(d / "t.npz", ids=np.zeros((2, 2, 1), np.int16), scores=np.zeros(2)),
     "{d}/t.npz: no 'experts' or 'topk_ids' array (has ['ids', 'scores'])"),
    (lambda d: _npz(d / "t.npz", experts=np.zeros((5, 3, 2), np.float32)),
     "{d}/t.npz: experts: must be an integer array of 3 axes (tlk), got float32 (5, 3, 2)"),
    (lambda d: _npz(d / "t.npz", experts=np.zeros((5, 3, 2), np.int16), weights=np.zeros((5, 3, 1), np.float32)),
     "{d}/t.npz: weights: shape (5, 3, 1) must equal the expert ids' (5, 3, 2)"),
    (lambda d: _npz(d / "t.npz", experts=np.zeros((5, 3, 2), np.int16), weights=np.ones((5, 3, 2), bool)),
     "{d}/t.npz: weights: must be numbers, got bool"),
    (lambda d: _npz(d / "t.npz", experts=np.zeros((5, 3, 0), np.int16)),
     "{d}/t.npz: experts: has no expert ids (shape (5, 3, 0) in axes 'tlk': top_k is 0)"),
    (lambda d: _npz(d / "t.npz", experts=np.full((2, 1, 1), MAX_ID + 1, np.int64)),
     "{d}/t.npz: experts: expert id 2147483648 out of range (at most 2147483647)"),
    (lambda d: _npz(d / "t.npz", experts=np.full((2, 1, 1), -2**40, np.int64)),
     "{d}/t.npz: experts: expert id -1099511627776 out of range (at most 2147483647)"),
])
def test_numpy_reader_errors_name_the_file_and_array(tmp_path, make, expected):
    path = make(tmp_path)
    with pytest.raises(InputError) as err:
        read_numpy(path, ReadOptions())
    assert str(err.value) == expected.format(d=tmp_path)


def test_numpy_axes_must_be_a_permutation_of_tlk(tmp_path):
    path = _npz(tmp_path / "t.npz", experts=np.zeros((2, 2, 1), np.int16))
    for axes in ("tlx", "tl", "tllk"):
        with pytest.raises(InputError) as err:
            read_numpy(path, ReadOptions(axes=axes))
        assert str(err.value) == f"axes: must order the letters t (token), l (layer), k (choice), got {axes!r}"


def test_format_detection_by_suffix_and_the_table(tmp_path):
    assert list(READERS) == ["csv", "jsonl", "numpy"]
    for name, format_name in (("a.csv", "csv"), ("A.TSV.GZ", "csv"), ("r.ndjson", "jsonl"), ("r.json.gz", "jsonl"),
                              ("ids.npy", "numpy"), ("ids.npz", "numpy")):
        assert detect_format(Path(name)) == format_name
        assert reader_for(format_name) is READERS[format_name]
    with pytest.raises(InputError) as err:
        detect_format(tmp_path / "log.parquet.gz")
    assert str(err.value) == (f"{tmp_path}/log.parquet.gz: cannot tell the format from the file name; give --format "
                              "csv, jsonl or numpy")
    with pytest.raises(InputError) as err:
        reader_for("parquet")
    assert str(err.value) == "format: unknown format 'parquet'; valid: csv, jsonl, numpy"
    with pytest.raises(ValueError, match=r"^trace reader 'csv' is listed twice; listed: csv, jsonl$"):
        _table(READERS["csv"], READERS["jsonl"], Reader("csv", (".txt",), READERS["csv"].read))


def test_read_files_concatenates_in_order_and_refuses_mixtures(tmp_path):
    a, b = random_trace(T=3, seed=1).experts, random_trace(T=2, seed=2).experts
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    rec = read_files([tmp_path / "a.npy", tmp_path / "b.npy"], None, ReadOptions())
    assert rec.request_names == ["a.npy", "b.npy"] and rec.request.tolist() == [0] * 9 + [1] * 6
    np.testing.assert_array_equal(rec.ids, np.concatenate([a, b]).reshape(15, 2))
    assert rec.where(10) == f"{tmp_path / 'b.npy'}: record 1"  # each record still names its own file
    with pytest.raises(InputError) as err:
        read_files([], None, ReadOptions())
    assert str(err.value) == "no routing records found"
    np.save(tmp_path / "empty.npy", np.zeros((0, 3, 2), np.int16))
    with pytest.raises(InputError) as err:
        read_files([tmp_path / "empty.npy"], "numpy", ReadOptions())
    assert str(err.value) == f"{tmp_path / 'empty.npy'}: no routing records found"
    np.savez(tmp_path / "w.npz", experts=b, weights=np.ones(b.shape, np.float32))
    with pytest.raises(InputError) as err:
        read_files([tmp_path / "w.npz", tmp_path / "a.npy"], None, ReadOptions())
    assert str(err.value) == f"{tmp_path / 'a.npy'}: has no gate weights while other files do; import them separately"
    log = write_csv(tmp_path / "log.csv.gz", [a])  # the DeepSeek layout gives no positions
    with pytest.raises(InputError) as err:
        read_files([tmp_path / "a.npy", log], None, ReadOptions())
    assert str(err.value) == f"{log}: some files give token positions and others do not"


def test_the_old_importers_module_still_imports():
    import moesim.traces.importers as importers
    import moesim.traces.readers as readers

    assert importers.__all__ == ["ASSIGN_POLICIES", "ImportResult", "import_trace", "pack_requests"]
    assert all(getattr(importers, name) is getattr(readers, name) for name in importers.__all__)


# ---------------------------------------------------------------- statistics

def brute_force(tr: Trace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    L, E = tr.meta.num_layers, tr.meta.num_experts
    load, co, trans = np.zeros((L, E), int), np.zeros((L, E, E), int), np.zeros((L - 1, E, E), int)
    for t in range(tr.num_tokens):
        for l in range(L):
            picks = [e for e in tr.experts[t, l] if e >= 0]
            for e in picks:
                load[l, e] += 1
                for f in picks:
                    if f != e:
                        co[l, e, f] += 1
                if l + 1 < L:
                    for f in tr.experts[t, l + 1]:
                        if f >= 0:
                            trans[l, e, f] += 1
    return load, co, trans


def test_counts_match_brute_force_in_any_block_size(monkeypatch):
    tr = random_trace(T=30, L=4, K=3, E=6, seed=5)
    tr.experts[3, 2, 1] = -1
    want = brute_force(tr)
    for block in (1 << 22, 7):  # one block, and many blocks of a token or two
        monkeypatch.setattr(counts_mod, "_PAIR_BLOCK", block)
        for got, exp in zip((expert_counts(tr), coactivation_counts(tr), transition_counts(tr)), want):
            np.testing.assert_array_equal(got, exp)


def test_placement_profile_counts_are_the_trace_counts():
    from moesim.placement import profile

    tr = random_trace(T=30, L=4, K=3, E=6, seed=6)
    tr.experts[3, 2, 1] = -1
    E = tr.meta.num_experts
    for got, exp in ((profile.expert_loads(tr.experts, E), expert_counts(tr)),
                     (profile.transition_counts(tr.experts, E), transition_counts(tr)),
                     (profile.coactivation_counts(tr.experts, E), coactivation_counts(tr))):
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, exp)


def test_closed_forms_deterministic_chain_and_independence():
    rng = np.random.default_rng(0)
    E, T = 8, 4000
    first = rng.integers(0, E, T)
    chain = np.stack([first, (first + 3) % E], axis=1)[:, :, None]  # layer 1 expert = f(layer 0 expert)
    tr = Trace(experts=chain.astype(np.int16), meta=TraceMeta(num_experts=E, num_layers=2, top_k=1))
    s = trace_stats(tr, top_m=1)
    assert s.succ_top_share[0] == 1.0
    assert mutual_information(s.transitions)[0] == pytest.approx(np.log2(E), abs=0.01)
    indep = Trace(experts=rng.integers(0, E, (10 * T, 2, 1)).astype(np.int16),  # top-m shares of few samples run high
                  meta=TraceMeta(num_experts=E, num_layers=2, top_k=1))
    si = trace_stats(indep, top_m=2)
    assert si.succ_top_share[0] == pytest.approx(2 / E, abs=0.03)
    assert si.succ_mi_bits[0] < 0.02 and si.max_over_mean.max() < 1.2


def test_drift_is_seen_beyond_sampling_noise():
    rng = np.random.default_rng(1)
    E, T = 16, 8000
    hot = np.where(np.arange(T)[:, None] < T // 2, rng.integers(0, 4, (T, 1)), rng.integers(8, 12, (T, 1)))
    shifting = Trace(experts=hot[:, :, None].astype(np.int16), meta=TraceMeta(num_experts=E, num_layers=1, top_k=1),
                     batch=(np.arange(T) // 1000).astype(np.int32))
    steady = Trace(experts=rng.integers(0, E, (T, 1, 1)).astype(np.int16), meta=shifting.meta, batch=shifting.batch)
    a, b = trace_stats(shifting), trace_stats(steady)
    assert a.windows == b.windows == 8
    # Each half uses experts the other never does: TV to the even mixture of both halves is 1/2.
    assert a.drift_tv_to_all[0] == pytest.approx(0.5, abs=0.03)
    assert a.drift_tv_consecutive[0] == pytest.approx((1.0 + 6 * a.drift_tv_noise[0] * np.sqrt(2)) / 7, abs=0.05)
    assert b.drift_tv_to_all[0] == pytest.approx(b.drift_tv_noise[0], rel=0.3)  # steady: noise only


def test_stats_cli_prints_writes_json_and_heatmaps(tmp_path, capsys):
    path = save_trace(random_trace(T=60, L=3, K=2, E=8), tmp_path / "t.npz")
    assert main(["trace", "stats", str(path), "--plots", str(tmp_path / "p"), "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "60 tokens x 3 layers x top-2 of 8 experts" in out and "top-8 successors take" in out
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["coactivation.png", "drift.png", "load.png",
                                                                  "transitions.png"]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["tokens"] == 60 and len(summary["per_layer"]) == 3
    assert main(["trace", "stats", str(path), "--layer", "5", "--plots", str(tmp_path / "q")]) == 2
    assert not (tmp_path / "q").exists()


def test_stats_name_the_models_layer_ids_and_every_plot_is_labelled(tmp_path, monkeypatch):
    import matplotlib.figure

    tr = random_trace(T=60, L=3, K=2, E=8)
    tr = Trace(experts=tr.experts, meta=TraceMeta(num_experts=8, num_layers=3, top_k=2, extra={"layer_ids": [1, 2, 3]}))
    st = trace_stats(tr)
    text = stats_mod.format_stats(st)
    assert "'id' is the model's own layer id" in text and "hot-set churn 0." in text
    assert st.summary()["layer_ids"] == [1, 2, 3] and st.layer_name(1) == "1 (model layer 2)"
    one = trace_stats(Trace(experts=tr.experts[:5], meta=TraceMeta(num_experts=8, num_layers=3, top_k=2)), window=10)
    assert "1 window:" in stats_mod.format_stats(one) and "hot-set churn -" in stats_mod.format_stats(one)
    seen = {}
    real_savefig = matplotlib.figure.Figure.savefig

    def savefig(fig, fh, **kw):  # what a reader sees: title, axis labels, colour-bar label
        main_ax, bar = fig.axes
        seen[len(seen)] = (main_ax.get_title(), main_ax.get_xlabel(), main_ax.get_ylabel(), bar.get_ylabel())
        return real_savefig(fig, fh, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    written = stats_mod.plot_stats(st, tmp_path, layer=2, name="t.npz")
    assert [p.name for p in written] == ["load.png", "transitions.png", "coactivation.png", "drift.png"]
    assert all(all(part.strip() for part in labels) for labels in seen.values()), seen
    load, trans, coact, drift = seen.values()
    assert "(model layer id)" in load[2] and "MoE layer 1 -> 2" in trans[0]  # the last layer has no successor
    assert "model layer 3" in trans[1] and "model layer 3" in coact[2] and "model layer 3" in drift[0]
    assert all(png.stat().st_size > 5000 for png in written)


@pytest.mark.parametrize("ids", [None, list(range(1, 27)), [3 * i + 7 for i in range(26)]],
                         ids=["index", "ids from 1", "ids apart"])
def test_load_plot_layer_ticks_read_as_the_axis_label_says(ids, tmp_path, monkeypatch):
    """load.png's layer axis: a tick on whole layers only, each labelled in the numbering the axis label names
    (the index from 0 that --layer takes, and the model's id beside it when the import recorded one)."""
    import matplotlib.figure

    tr = random_trace(T=40, L=26, K=2, E=8)
    extra = {"layer_ids": ids} if ids is not None else {}
    st = trace_stats(Trace(experts=tr.experts, meta=TraceMeta(num_experts=8, num_layers=26, top_k=2, extra=extra)))
    axes = {}
    real_savefig = matplotlib.figure.Figure.savefig

    def savefig(fig, fh, **kw):
        fig.canvas.draw()
        axes.setdefault("load", fig.axes[0])  # load.png is written first
        return real_savefig(fig, fh, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    stats_mod.plot_stats(st, tmp_path, name="t.npz")
    ax = axes["load"]
    low, high = sorted(ax.get_ylim())
    ticks = [(t.get_position()[1], t.get_text()) for t in ax.get_yticklabels() if low <= t.get_position()[1] <= high]
    assert len(ticks) >= 4 and ticks[0][0] == 0, ticks
    for pos, text in ticks:
        assert pos == int(pos) and 0 <= pos < 26, ticks  # whole layers, no tick beside the rows
        assert text == (str(int(pos)) if ids is None else f"{int(pos)} ({ids[int(pos)]})"), ticks
    assert ax.get_ylabel() == "MoE layer, from 0" + ("" if ids is None else " (model layer id)")


def test_trace_commands_on_a_log_or_raw_array_say_to_import_it(tmp_path, capsys):
    np.save(tmp_path / "ids.npy", random_trace().experts)
    np.savez(tmp_path / "plain.npz", topk_ids=random_trace().experts)
    log = write_csv(tmp_path / "log.csv.gz", [random_trace().experts])
    for path, expected in ((tmp_path / "ids.npy", "a raw numpy array, not a moesim trace"),
                           (tmp_path / "plain.npz", "meta: missing .* convert it with 'moesim trace import'"),
                           (log, "not a .npz trace .*'moesim trace import'")):
        assert main(["trace", "stats", str(path)]) == 2
        assert re.search(re.escape(str(path)) + ": " + expected, capsys.readouterr().err)
    assert main(["trace", "fit", str(log), "-o", str(tmp_path / "p.yaml")]) == 2
    assert "convert it with 'moesim trace import'" in capsys.readouterr().err and not (tmp_path / "p.yaml").exists()


# ---------------------------------------------------------------- stored layout, memory mapping

def test_stored_npz_is_memory_mapped_and_equal(tmp_path, monkeypatch):
    tr = random_trace(T=50, weights=True)
    tr = Trace(experts=tr.experts, meta=tr.meta, weights=tr.weights, home=np.zeros(50, np.int32),
               batch=(np.arange(50) // 25).astype(np.int32))
    stored = save_trace(tr, tmp_path / "s.npz", compress=False)
    packed = save_trace(tr, tmp_path / "c.npz")
    m = load_trace(stored, mmap=True)
    assert isinstance(m.experts, np.memmap) and isinstance(m.weights, np.memmap)
    assert not isinstance(load_trace(packed, mmap=True).experts, np.memmap)  # compressed: read as before
    for got in (m, load_trace(stored), load_trace(packed)):
        np.testing.assert_array_equal(got.experts, tr.experts)
        np.testing.assert_array_equal(got.weights, tr.weights)
        np.testing.assert_array_equal(got.batch, tr.batch)
    bad = tr.experts.copy()
    bad[37, 1, 0] = 99  # found in a late validation block, named by its global token index
    monkeypatch.setattr(fmt, "_VALIDATE_BLOCK", 12)
    save_trace(Trace(experts=bad, meta=tr.meta), tmp_path / "bad.npz", compress=False)
    with pytest.raises(InputError, match=r"bad\.npz: experts: expert id 99 out of range .* at token 37, layer 1"):
        load_trace(tmp_path / "bad.npz", mmap=True)


def test_save_trace_blocks_round_trip_and_all_or_nothing(tmp_path):
    tr = random_trace(T=20, weights=True)
    blocks = [(tr.experts[a : a + 7], tr.weights[a : a + 7]) for a in range(0, 20, 7)]
    path = save_trace_blocks(tmp_path / "b.npz", tr.meta, iter(blocks), num_tokens=20, with_weights=True)
    back = load_trace(path, mmap=True)
    np.testing.assert_array_equal(back.experts, tr.experts)
    np.testing.assert_array_equal(back.weights, tr.weights)
    with pytest.raises(ValueError, match="blocks held 14 tokens, expected 20"):
        save_trace_blocks(tmp_path / "short.npz", tr.meta, iter(blocks[:2]), num_tokens=20, with_weights=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.npz"]


# ---------------------------------------------------------------- fitted generator and fit

def small_params(seed: int = 0, L: int = 4, E: int = 16, K: int = 2, F: int = 4) -> FittedParams:
    rng = np.random.default_rng(seed)
    pop = rng.random((L, E)) ** 3 + 0.05
    succ = np.argsort(rng.random((L - 1, E, E)), axis=2)[:, :, :F]
    return FittedParams(name="small", num_layers=L, num_experts=E, top_k=K, popularity=pop / pop.sum(1, keepdims=True),
                        successors=succ, successor_logits=np.full((L - 1, E, F), 2.0), coupling=np.full(L - 1, 1.0),
                        drift_sigma=0.3, drift_rho=0.5)


def test_generation_is_seeded_and_streaming_equals_in_memory(tmp_path):
    p = small_params()
    a = generate_fitted(p, num_gpus=2, tokens_per_gpu=50, batches=3, rng=np.random.default_rng(4), weights=False)
    b = generate_fitted(p, num_gpus=2, tokens_per_gpu=50, batches=3, rng=np.random.default_rng(4), weights=False)
    np.testing.assert_array_equal(a.experts, b.experts)
    a.validate("generated")  # ids in range, k distinct per token and layer
    path = write_fitted_trace(p, tmp_path / "g.npz", num_gpus=2, tokens_per_gpu=50, batches=3, seed=4)
    g = load_trace(path, mmap=True)
    np.testing.assert_array_equal(g.experts, a.experts)
    np.testing.assert_array_equal(g.batch, a.batch)


def test_successor_boosts_shape_transitions():
    p = FittedParams(**{**small_params(F=1).__dict__, "successor_logits": np.full((3, 16, 1), 4.0)})
    strong = generate_fitted(p, num_gpus=1, tokens_per_gpu=3000, batches=1, rng=np.random.default_rng(0), weights=False)
    off = FittedParams(**{**p.__dict__, "coupling": np.zeros(3)})
    weak = generate_fitted(off, num_gpus=1, tokens_per_gpu=3000, batches=1, rng=np.random.default_rng(0), weights=False)
    s_strong, s_weak = trace_stats(strong, top_m=1), trace_stats(weak, top_m=1)
    assert (s_strong.succ_top_share > s_weak.succ_top_share + 0.1).all()
    # The boosted successor is each expert's most frequent one.
    hits = [np.mean(np.argmax(s_strong.transitions[l], axis=1)[s_strong.load[l] > 100] ==
                    p.successors[l, :, 0][s_strong.load[l] > 100]) for l in range(3)]
    assert min(hits) > 0.8


def test_initial_params_find_the_real_successors():
    E = 8
    trans = np.ones((1, E, E))
    trans[0, np.arange(E), (np.arange(E) + 1) % E] = 50
    p = initial_params(np.full((2, E), 100.0), trans, 1, fanout=2)
    np.testing.assert_array_equal(p.successors[0, :, 0], (np.arange(E) + 1) % E)
    assert (p.successor_logits[0, :, 0] > p.successor_logits[0, :, 1] + 1).all()


def test_fit_recovers_statistics_of_a_known_generator():
    truth = small_params(seed=2)
    real = generate_fitted(truth, num_gpus=1, tokens_per_gpu=1000, batches=6, rng=np.random.default_rng(1),
                           weights=False)
    fitted = fit_trace(real, fanout=4, calibration_tokens=6000, rounds=15, seed=0)
    again = generate_fitted(fitted, num_gpus=1, tokens_per_gpu=1000, batches=6, rng=np.random.default_rng(9),
                            weights=False)
    a, b = trace_stats(real), trace_stats(again)
    assert np.abs(b.max_over_mean / a.max_over_mean - 1).max() < 0.10
    assert np.abs(b.succ_top_share - a.succ_top_share).max() < 0.05
    assert fitted.drift_sigma > 0


def test_params_yaml_round_trip_and_errors(tmp_path):
    p = small_params()
    path = save_params(p, tmp_path / "p.yaml", header="test")
    back = load_params(path)
    np.testing.assert_allclose(back.popularity, p.popularity, atol=1e-5)
    np.testing.assert_array_equal(back.successors, p.successors)
    assert back.drift_rho == 0.5 and path.read_text().startswith("# test\n")
    text = path.read_text()
    (tmp_path / "bad.yaml").write_text(text.replace("num_experts: 16", "num_experts: 15"))
    with pytest.raises(InputError, match=r"bad\.yaml: layers\[0\]\.popularity: shape \(16,\), expected \(15,\)"):
        load_params(tmp_path / "bad.yaml")
    (tmp_path / "bad2.yaml").write_text(text.replace("drift_rho: 0.5", "drift_rho: 1.5"))
    with pytest.raises(InputError, match=r"bad2\.yaml: drift_rho: must be in \[0, 1\)"):
        load_params(tmp_path / "bad2.yaml")
    with pytest.raises(InputError, match="not a shipped name"):
        load_params(tmp_path / "nope.yaml")
    cut = p.first_layers(2).check()
    assert cut.successors.shape == (1, 16, 4) and cut.coupling.shape == (1,)


# ---------------------------------------------------------------- shipped data, scenarios

def test_shipped_data_load():
    assert {"deepseek-v2-lite", "olmoe-1b-7b-c4", "mixtral-8x7b-c4"} <= set(shipped_params())
    assert load_params("deepseek-v2-lite").num_layers == 26
    tr = load_trace(DATA / "olmoe-1b-7b-c4.small.npz")
    assert (tr.meta.num_layers, tr.meta.num_experts, tr.meta.top_k, tr.num_tokens) == (3, 64, 8, 2048)
    assert trace_stats(tr).max_over_mean.min() > 1.5  # OLMoE's skew survives in the fixture
    assert "Apache" in (DATA / "NOTICE.md").read_text()


def test_fitted_workload_in_a_scenario(tiny_scenario_data, tmp_path):
    from moesim.study import parse_scenario, run_study

    data = tiny_scenario_data
    data["model"].update(num_layers=3, num_experts=64, top_k=8)
    data["workload"] = {"synthetic": {"fitted": "olmoe-1b-7b-c4", "tokens_per_gpu": 32, "batches": 2, "seed": 1}}
    data["placements"] = ["contiguous", "greedy"]
    result = run_study(parse_scenario(data, "s.yaml", tmp_path), progress=False)
    assert [r.name for r in result.runs] == ["contiguous", "greedy"]
    assert result.workloads["1x8-h200"]["tokens"] == 2 * 8 * 32
    data["model"]["top_k"] = 6
    with pytest.raises(InputError,
                       match=r"s\.yaml: workload\.synthetic\.fitted: .* has top_k=8, the scenario's model has 6"):
        parse_scenario(data, "s.yaml", tmp_path)
    data["model"]["top_k"] = 8
    data["workload"]["synthetic"]["zipf_alpha"] = 0.5
    with pytest.raises(InputError, match=r"workload\.synthetic\.zipf_alpha: not used with 'fitted'"):
        parse_scenario(data, "s.yaml", tmp_path)


# ---------------------------------------------------------------- progress on stderr, nothing else changed

def test_long_steps_tell_their_progress(tmp_path, monkeypatch):
    """fit, stats and generate tell a callback of every step they finish, adding up to what they announce."""
    import moesim.traces.fitted_generator as gen_mod
    from moesim.traces.fitted_generator import write_fitted_trace
    from moesim.traces.generator_fit import fit_steps

    tr = random_trace(T=300, L=3, K=2, E=8)
    told: list[int] = []
    quiet = fit_trace(tr, rounds=3, calibration_tokens=300, seed=1)
    loud = fit_trace(tr, rounds=3, calibration_tokens=300, seed=1, progress=told.append)
    assert told == [1] * fit_steps(3)
    assert save_params(loud, tmp_path / "l.yaml").read_bytes() == save_params(quiet, tmp_path / "q.yaml").read_bytes()
    told.clear()
    a, b = trace_stats(tr), trace_stats(tr, progress=told.append)
    assert sum(told) == stats_mod.STATS_PASSES * 300 and json.dumps(a.summary()) == json.dumps(b.summary())
    told.clear()
    params = load_params("mixtral-8x7b-c4")
    monkeypatch.setattr(gen_mod, "_TOKENS_PER_BLOCK", 12000)  # two batches a block
    write_fitted_trace(params, tmp_path / "g.npz", num_gpus=2, tokens_per_gpu=3000, batches=5, progress=told.append)
    write_fitted_trace(params, tmp_path / "q.npz", num_gpus=2, tokens_per_gpu=3000, batches=5)
    assert told == [12000, 12000, 6000]  # block by block
    assert (tmp_path / "g.npz").read_bytes() == (tmp_path / "q.npz").read_bytes()


@pytest.mark.parametrize("command", ["fit", "stats", "generate"])
def test_trace_commands_show_progress_on_stderr_only(command, tmp_path, capsys, monkeypatch):
    """A bar on stderr once a step runs past PROGRESS_DELAY_S (0 here, so that a small input shows it), none
    with -q; the files written are byte for byte the same either way."""
    import moesim.cli.common as common

    monkeypatch.setattr(common, "PROGRESS_DELAY_S", 0.0)
    trace = save_trace(random_trace(T=300, L=3, K=2, E=8), tmp_path / "t.npz")
    argv = {"fit": ["trace", "fit", str(trace), "--rounds", "3", "--check-tokens", "300", "-o"],
            "stats": ["trace", "stats", str(trace), "--json"],
            "generate": ["trace", "generate", "mixtral-8x7b-c4", "--gpus", "2", "--tokens-per-gpu", "3000",
                         "--batches", "5", "-o"]}[command]
    suffix = {"fit": ".yaml", "stats": ".json", "generate": ".npz"}[command]
    label = {"fit": "fitting t.npz", "stats": "counting t.npz", "generate": "generating shown"}[command]
    assert main([*argv, str(tmp_path / f"shown{suffix}")]) == 0
    shown_out, shown_err = capsys.readouterr()
    assert label in shown_err and "|" in shown_err, shown_err  # the bar: its label, count and rate
    assert main([*argv, str(tmp_path / f"quiet{suffix}"), "-q"]) == 0
    quiet_out, quiet_err = capsys.readouterr()
    assert quiet_err == ""
    assert (tmp_path / f"shown{suffix}").read_bytes() == (tmp_path / f"quiet{suffix}").read_bytes()
    times = re.compile(r"\d+\.\d s|shown|quiet")  # stdout differs only in the times and the file names
    assert times.sub("", shown_out) == times.sub("", quiet_out)


def test_generate_cli_and_fit_cli(tmp_path, capsys):
    out = tmp_path / "g.npz"
    assert main(["trace", "generate", "mixtral-8x7b-c4", "-o", str(out), "--gpus", "2", "--tokens-per-gpu", "100",
                 "--batches", "3"]) == 0
    assert isinstance(load_trace(out, mmap=True).experts, np.memmap)
    assert main(["trace", "fit", str(out), "-o", str(tmp_path / "p.yaml"), "--rounds", "2",
                 "--calibration-tokens", "400", "--check-tokens", "600"]) == 0
    text = capsys.readouterr().out
    assert "top-8 successor share (mean)" in text and load_params(tmp_path / "p.yaml").num_experts == 8
    assert main(["trace", "generate", str(tmp_path / "missing.yaml"), "-o", str(tmp_path / "x.npz")]) == 2
    assert not (tmp_path / "x.npz").exists()
