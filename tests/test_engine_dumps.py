"""Engine dump readers (moesim.traces.readers.engines): each format written here exactly as the engine writes it
(torch.save of the recorder's dicts, safetensors.torch.save_file of the bincounts, json.dumps lines), read back
against the routing they were made from; physical slots with redundant experts mapped back to logical experts;
each engine's layer-index convention; and bad dumps refused with one line naming file and field."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from moesim.errors import InputError
from moesim.traces.count_trace import CountTrace
from moesim.traces.counts import count_picks, count_window_picks
from moesim.traces.format import Trace
from moesim.traces.readers.dumps import DumpOptions
from moesim.traces.readers.engines import ENGINE_FORMATS, detect_engine, import_dump, read_dump

try:
    import safetensors.torch as safetensors_torch
    import torch
except ImportError:  # the engines extra: SGLang's and TensorRT-LLM's dumps cannot be written (nor read) without it
    torch = safetensors_torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="needs the engines extra (torch, safetensors)")

# A model of 4 decoder layers, layer 0 dense, 6 logical experts, top-2, on 2 EP ranks of 4 physical slots each
# (2 redundant slots per layer: replicas of experts 0 and 3 in layer 1, of 5 and 1 in layers 2 and 3).
DECODER, DENSE, E, K, RANKS = 4, 1, 6, 2, 2
P2L = np.array([[0, 1, 2, 3, 4, 5, 0, 1],  # dense layer 0: SGLang keeps a (trivial) row for it
                [0, 1, 2, 3, 4, 5, 0, 3],
                [5, 0, 1, 2, 3, 4, 5, 1],
                [0, 1, 2, 3, 4, 5, 1, 5]])
PASSES, TOKENS = 3, 5  # forward passes; tokens per pass per rank


def routing(seed: int = 0) -> np.ndarray:
    """Logical ids [passes, ranks, tokens, MoE layers, K]: every token two distinct experts per MoE layer."""
    rng = np.random.default_rng(seed)
    return np.array([[[[rng.choice(E, K, replace=False) for _ in range(DECODER - DENSE)] for _ in range(TOKENS)]
                      for _ in range(RANKS)] for _ in range(PASSES)])


def to_physical(logical: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-token physical slots [decoder layers, tokens, 8] (-1 padded, dense layer -1), a random replica each."""
    T = logical.shape[0]
    out = np.full((DECODER, T, 8), -1, dtype=np.int32)
    for m in range(DECODER - DENSE):
        lay = m + DENSE
        for t in range(T):
            for c in range(K):
                out[lay, t, c] = rng.choice(np.flatnonzero(P2L[lay] == logical[t, m, c]))
    return out


def sglang_dumps(tmp: Path, per_token: bool) -> tuple[list[Path], np.ndarray]:
    rng = np.random.default_rng(1)
    route = routing()
    paths = []
    for r in range(RANKS):
        records = []
        for f in range(PASSES):
            phys = to_physical(route[f, r], rng)
            count = np.zeros((DECODER, P2L.shape[1]), dtype=np.int32)
            for lay in range(DECODER):
                ids = phys[lay][phys[lay] >= 0]
                count[lay] = np.bincount(ids, minlength=P2L.shape[1])
            rec = {"forward_pass_id": 10 + f, "rank": r, "gatherer_key": "primary",
                   "global_physical_count": torch.from_numpy(count)}
            if per_token:
                rec.update(input_ids=list(range(100 * r, 100 * r + TOKENS)), positions=list(range(TOKENS)),
                           extend_seq_lens=[TOKENS], forward_mode=1, topk_ids_of_layer=torch.from_numpy(phys),
                           misc_objects=[])
            records.append(rec)
        path = tmp / f"expert_distribution_recorder_{1700000000.5 + r}_{r}.pt"
        torch.save({"records": records, "last_physical_to_logical_map": torch.from_numpy(P2L)}, path)
        paths.append(path)
    return paths, route


def logical_counts(route: np.ndarray) -> np.ndarray:
    """[passes, MoE layers, E] over both ranks."""
    flat = route.reshape(PASSES, RANKS * TOKENS, DECODER - DENSE, K)
    return np.stack([count_picks(flat[f], E) for f in range(PASSES)])


# ---------------------------------------------------------------- SGLang

@needs_torch
def test_sglang_stat(tmp_path):
    buffer = np.zeros((8, DECODER, E), dtype=np.int32)  # a circular buffer of 8 passes, 3 filled
    buffer[:PASSES, DENSE:] = logical_counts(routing())
    path = tmp_path / "expert_distribution_recorder_1700000000.1.pt"
    torch.save({"rank": 0, "logical_count": torch.from_numpy(buffer), "average_utilization_rate_over_window": None},
               path)
    assert detect_engine([path]) == "sglang-stat"
    dump = read_dump([path], options=DumpOptions(top_k=K))
    ct = dump.data
    assert isinstance(ct, CountTrace)
    np.testing.assert_array_equal(ct.loads, logical_counts(routing()))
    assert ct.layer_ids == (1, 2, 3) and ct.num_decoder_layers == DECODER  # rows = every decoder layer
    assert ct.meta.top_k == K and ct.meta.num_experts == E
    assert any("5 buffer rows" in n for n in dump.notes) and any("dense" in n for n in dump.notes)
    with pytest.raises(InputError, match="top_k.*--top-k"):
        import_dump(path)


@needs_torch
def test_sglang_per_pass_maps_redundant_slots_to_logical(tmp_path):
    paths, route = sglang_dumps(tmp_path, per_token=False)
    assert detect_engine(paths) == "sglang-per-pass"
    ct = import_dump(paths, top_k=K)
    assert isinstance(ct, CountTrace)
    np.testing.assert_array_equal(ct.loads, logical_counts(route))  # summed over ranks, slots -> experts
    assert ct.layer_ids == (1, 2, 3) and ct.meta.extra["forward_pass_ids"] == [10, 11, 12]
    assert import_dump([tmp_path], "sglang-per-pass", top_k=K).loads.sum() == ct.loads.sum()  # a folder


@needs_torch
def test_sglang_per_token(tmp_path):
    paths, route = sglang_dumps(tmp_path, per_token=True)
    assert detect_engine(paths) == "sglang-per-token"
    tr = import_dump(paths)
    assert isinstance(tr, Trace)
    assert tr.meta.top_k == K and tr.meta.num_layers == DECODER - DENSE and tr.meta.extra["layer_ids"] == [1, 2, 3]
    assert tr.num_tokens == PASSES * RANKS * TOKENS
    # tokens by pass then rank: batch = pass, home = rank
    expect = np.sort(route.reshape(-1, DECODER - DENSE, K), axis=2)
    np.testing.assert_array_equal(np.sort(tr.experts, axis=2), expect)
    np.testing.assert_array_equal(tr.batch, np.repeat(np.arange(PASSES), RANKS * TOKENS))
    np.testing.assert_array_equal(tr.home, np.tile(np.repeat(np.arange(RANKS), TOKENS), PASSES))
    # the same dump read as per-pass counts agrees with the per-token trace
    ct = import_dump(paths, "sglang-per-pass", top_k=K)
    np.testing.assert_array_equal(ct.loads, count_window_picks(tr.experts, E, tr.batch.astype(np.int64)))


@needs_torch
def test_sglang_tensor_parallel_replicas_kept_once(tmp_path):
    paths, route = sglang_dumps(tmp_path, per_token=True)
    data = torch.load(paths[0], weights_only=True)
    for rec in data["records"]:
        rec["rank"] = 1
    torch.save(data, tmp_path / "copy_rank1.pt")  # rank 1 recorded rank 0's very tokens
    dump = read_dump([paths[0], tmp_path / "copy_rank1.pt"], "sglang-per-token")
    assert dump.data.num_tokens == PASSES * TOKENS
    assert any("replicas" in n for n in dump.notes)


class Hostile:
    """Unpickling this would write a file: torch.load(weights_only=True) must refuse it before."""

    marker = ""

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "ran"))


@needs_torch
def test_sglang_refuses_pickled_objects_without_running_them(tmp_path):
    marker = tmp_path / "code_ran"
    obj = Hostile()
    obj.marker = str(marker)
    path = tmp_path / "expert_distribution_recorder_1.pt"
    torch.save({"logical_count": torch.zeros(1, 2, 3), "evil": obj}, path)
    with pytest.raises(InputError) as exc:
        import_dump(path, top_k=2)
    assert not marker.exists()
    assert str(exc.value).startswith(f"{path}: not a file of plain tensors") and "\n" not in str(exc.value)


@pytest.mark.parametrize("mutate, field, words", [
    (lambda d: d.update(last_physical_to_logical_map=torch.tensor([[0, 1]])), "records[0].topk_ids_of_layer",
     "the map has 1"),
    (lambda d: d["records"][0].update(topk_ids_of_layer=torch.full((DECODER, 2, 8), 9)), "records[0].topk_ids_of_layer",
     "physical expert id 9 out of range [0, 8)"),
    (lambda d: d["records"][1].update(topk_ids_of_layer=torch.zeros((2, 2, 8), dtype=torch.int32)),
     "records[1].topk_ids_of_layer", "2 layers"),
    (lambda d: d["records"][0].update(forward_pass_id="x"), "records[0].forward_pass_id", "integer"),
    (lambda d: d["last_physical_to_logical_map"].__setitem__((1, 4), 0), "last_physical_to_logical_map",
     "logical expert 4 has no physical slot"),
])
@needs_torch
def test_sglang_bad_dumps(tmp_path, mutate, field, words):
    paths, _ = sglang_dumps(tmp_path, per_token=True)
    data = torch.load(paths[0], weights_only=True)
    mutate(data)
    torch.save(data, paths[0])
    with pytest.raises(InputError) as exc:
        import_dump(paths[0])
    assert exc.value.source == str(paths[0]) and exc.value.field == field and words in str(exc.value)


# ---------------------------------------------------------------- TensorRT-LLM

MOE_LAYERS = (3, 4, 6)  # decoder-layer index of each MoE layer (no keys for dense layers 0-2 and 5)


def trtllm_folder(tmp: Path, raw: bool) -> tuple[Path, np.ndarray]:
    route = routing(2)  # [iters, ranks, tokens, MoE layers, K]
    folder = tmp / "expert_statistic"
    folder.mkdir()
    (folder / "meta_info.json").write_text(json.dumps({"num_experts": E, "num_experts_per_token": K}))
    for r in range(RANKS):
        counts, tokens = {}, {}
        for it in range(PASSES):
            for m, lay in enumerate(MOE_LAYERS):
                sel = torch.from_numpy(route[it, r, :, m].astype(np.int32))
                counts[f"{100 + it}_{lay}"] = torch.bincount(sel.flatten(), minlength=E)
                tokens[f"{100 + it}_{lay}"] = sel
        safetensors_torch.save_file(counts, str(folder / f"rank{r}.safetensors"))
        if raw:
            safetensors_torch.save_file(tokens, str(folder / f"rank{r}_raw.safetensors"))
    return folder, route


@needs_torch
def test_trtllm_counts(tmp_path):
    folder, route = trtllm_folder(tmp_path, raw=False)
    assert detect_engine([folder]) == "trtllm"
    ct = import_dump(folder)
    assert isinstance(ct, CountTrace)
    np.testing.assert_array_equal(ct.loads, logical_counts(route))  # summed over rank files
    assert ct.layer_ids == MOE_LAYERS and ct.num_decoder_layers is None  # keys = decoder index of MoE layers
    np.testing.assert_array_equal(ct.window_tokens, [RANKS * TOKENS] * PASSES)
    assert ct.meta.extra["iterations"] == [100, 101, 102]


@needs_torch
def test_trtllm_raw_per_token(tmp_path):
    folder, route = trtllm_folder(tmp_path, raw=True)
    tr = import_dump(folder)
    assert isinstance(tr, Trace) and tr.meta.extra["layer_ids"] == list(MOE_LAYERS)
    np.testing.assert_array_equal(np.sort(tr.experts, axis=2), np.sort(route.reshape(-1, 3, K), axis=2))
    np.testing.assert_array_equal(tr.home, np.tile(np.repeat([0, 1], TOKENS), PASSES))


@needs_torch
def test_trtllm_truncated_safetensors(tmp_path):
    folder, _ = trtllm_folder(tmp_path, raw=False)
    f = folder / "rank1.safetensors"
    f.write_bytes(f.read_bytes()[:-20])
    with pytest.raises(InputError) as exc:
        import_dump(folder)
    assert exc.value.source == str(f) and exc.value.field == "102_6" and "truncated" in str(exc.value)
    f.write_bytes(b"\x05\x00")
    with pytest.raises(InputError, match="rank1.safetensors: header: damaged"):
        import_dump(folder)


@needs_torch
def test_trtllm_bad_statistics(tmp_path):
    folder, _ = trtllm_folder(tmp_path, raw=False)
    safetensors_torch.save_file({"100_3": torch.zeros(E + 1, dtype=torch.int64)}, str(folder / "rank1.safetensors"))
    with pytest.raises(InputError, match=r"rank1.safetensors: 100_3: shape \(7,\) must be \[num_experts=6\]"):
        import_dump(folder)
    safetensors_torch.save_file({"100_3": torch.zeros(E, dtype=torch.int64), "101_4": torch.zeros(E)},
                                str(folder / "rank1.safetensors"))
    with pytest.raises(InputError, match="rank1.safetensors: 100_4: no statistics for iteration 100, layer 4"):
        import_dump(folder)
    (folder / "meta_info.json").write_text('{"num_experts": 0}')
    with pytest.raises(InputError, match="meta_info.json: num_experts: must be a positive integer"):
        import_dump(folder)


@needs_torch
def test_trtllm_raw_ids_out_of_range(tmp_path):
    folder, _ = trtllm_folder(tmp_path, raw=True)
    ids = torch.tensor([[0, 9]], dtype=torch.int32)
    raw = {f"100_{lay}": ids.clone() for lay in MOE_LAYERS}
    safetensors_torch.save_file(raw, str(folder / "rank0_raw.safetensors"))
    with pytest.raises(InputError, match=r"rank0_raw.safetensors: 100_3: expert id 9 out of range \[0, 6\)"):
        import_dump(folder)


# ---------------------------------------------------------------- Megatron-LM

def megatron_files(tmp: Path, microbatches: int = 1) -> tuple[list[Path], np.ndarray]:
    route = routing(3)
    paths = []
    for r in range(RANKS):
        lines = []
        for step in range(PASSES):
            for mb in range(microbatches):
                for m, lay in enumerate(MOE_LAYERS):
                    idx = route[step, r, :, m].tolist()
                    lines.append({"step": step, "stage": "pre_dispatch", "block": "decoder", "layer": lay, "rank": r,
                                  "num_tokens": TOKENS, "topk": K, "top_indices": idx})
            lines.append({"step": step, "stage": "pre_dispatch", "block": "mtp", "layer": 0, "rank": r,
                          "num_tokens": TOKENS, "topk": K, "top_indices": route[step, r, :, 0].tolist(), "mtp_idx": 0})
        path = tmp / f"router_trace_rank{r}.jsonl"
        path.write_text("".join(json.dumps(rec) + "\n" for rec in lines))
        paths.append(path)
    return paths, route


def test_megatron(tmp_path):
    paths, route = megatron_files(tmp_path)
    assert detect_engine(paths) == "megatron" and detect_engine([tmp_path]) == "megatron"
    dump = read_dump(paths)
    tr = dump.data
    assert isinstance(tr, Trace) and tr.meta.extra["layer_ids"] == list(MOE_LAYERS)  # `layer` as written
    np.testing.assert_array_equal(np.sort(tr.experts, axis=2), np.sort(route.reshape(-1, 3, K), axis=2))
    np.testing.assert_array_equal(tr.batch, np.repeat(np.arange(PASSES), RANKS * TOKENS))
    assert any("MTP" in n for n in dump.notes)


def test_megatron_microbatches_and_pipeline_stages(tmp_path):
    paths, _ = megatron_files(tmp_path, microbatches=2)
    assert import_dump(paths).num_tokens == 2 * PASSES * RANKS * TOKENS
    lines = paths[1].read_text().splitlines()
    paths[1].write_text("\n".join(ln for ln in lines if '"layer": 6' not in ln) + "\n")
    with pytest.raises(InputError, match=r"rank 1, step 0 has no record for layers \[6\].*pipeline stages"):
        import_dump(paths)


@pytest.mark.parametrize("edit, words", [
    ({"num_tokens": 4}, "do not match num_tokens=4"),
    ({"top_indices": [[0, -3]] * TOKENS}, "expert id -3 is negative"),
    ({"step": -1}, "step must be an integer >= 0"),
    ({"top_indices": "x"}, "must be a 2-D array"),
])
def test_megatron_bad_lines(tmp_path, edit, words):
    paths, _ = megatron_files(tmp_path)
    lines = paths[0].read_text().splitlines()
    rec = json.loads(lines[1])
    rec.update(edit)
    lines[1] = json.dumps(rec)
    paths[0].write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError) as exc:
        import_dump(paths)
    assert exc.value.source == str(paths[0]) and exc.value.field.startswith("line 2") and words in str(exc.value)


# ---------------------------------------------------------------- vLLM

def vllm_stats(tmp: Path, header: bool) -> tuple[Path, np.ndarray]:
    """#41141's JSONL: expert_load per physical slot of the 3 MoE layers (MoE-layer index 0..2)."""
    rng = np.random.default_rng(4)
    p2l = P2L[DENSE:]
    lines, logical = [], []
    if header:
        lines.append({"record_type": "eplb_load_meta", "version": 1, "model": "m", "num_ranks": RANKS, "num_groups": 1,
                      "num_nodes": 1, "num_layers": 3, "num_redundant_experts": 2})
    for step in range(PASSES):
        load = rng.integers(0, 50, size=p2l.shape)
        logical.append(np.stack([np.bincount(p2l[m], weights=load[m], minlength=E) for m in range(3)]))
        rec = {"record_type": "eplb_load_stats", "version": 1, "step": 100 * step, "expert_load": load.tolist(),
               "p2l_map": p2l.tolist()}
        if not header:
            rec.update(model="m", next_rearrange=3000, num_ranks=RANKS, num_layers=3, experts_per_rank=[[0, 3], [4, 1]],
                       tokens=load.reshape(3, RANKS, -1).sum(axis=2).tolist())
        lines.append(rec)
    path = tmp / "eplb_stats.jsonl"
    path.write_text("".join(json.dumps(rec) + "\n" for rec in lines))
    return path, np.array(logical, dtype=np.int64)


@pytest.mark.parametrize("header", [False, True])
def test_vllm_stats_both_revisions(tmp_path, header):
    path, logical = vllm_stats(tmp_path, header)
    assert detect_engine([path]) == "vllm-stats"
    dump = read_dump([path], options=DumpOptions(top_k=K))
    ct = dump.data
    np.testing.assert_array_equal(ct.loads, logical)
    assert ct.layer_ids is None and ct.meta.extra["steps"] == [0, 100, 200] and ct.meta.model == "m"
    assert "unmerged" in ct.meta.source and any("unmerged" in n for n in dump.notes)


def test_vllm_stats_bad(tmp_path):
    path, _ = vllm_stats(tmp_path, header=True)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[1:] + lines[:1]) + "\n")
    with pytest.raises(InputError, match="line 4: eplb_load_meta must come first"):
        import_dump(path, top_k=K)
    rec = json.loads(lines[1])
    rec["p2l_map"][0][0] = 7
    path.write_text(json.dumps(rec) + "\n")
    with pytest.raises(InputError, match="line 1: p2l_map: layer 0: logical expert 6 has no physical slot"):
        import_dump(path, top_k=K)


def test_routed_experts_json_and_base64(tmp_path):
    route = routing(5)[0, 0]  # [tokens, MoE layers, K]
    full = np.full((TOKENS, DECODER, K), -1, dtype=np.int32)  # SGLang returns every layer, -1 where dense
    full[:, DENSE:] = route
    b64 = base64.b64encode(full.astype("<i4").tobytes()).decode()
    (tmp_path / "sglang.json").write_text(json.dumps([{"text": "x", "meta_info": {"routed_experts": b64}}] * 2))
    (tmp_path / "vllm.jsonl").write_text(json.dumps({"routed_experts": route.tolist()}) + "\n")
    assert detect_engine([tmp_path / "sglang.json"]) == "routed-experts"
    with pytest.raises(InputError, match="give --layers and --top-k"):
        import_dump(tmp_path / "sglang.json")
    tr = import_dump(tmp_path / "sglang.json", layers=DECODER, top_k=K)
    assert tr.num_tokens == 2 * TOKENS and tr.batch is None and tr.meta.extra["layer_ids"] == [1, 2, 3]
    np.testing.assert_array_equal(tr.experts[:TOKENS], route)
    tr2 = import_dump(tmp_path / "vllm.jsonl")
    np.testing.assert_array_equal(tr2.experts, route)
    with pytest.raises(InputError, match="not whole tokens"):
        import_dump(tmp_path / "sglang.json", layers=3, top_k=K)


def test_every_format_is_listed():
    assert set(ENGINE_FORMATS) == {"sglang-stat", "sglang-per-pass", "sglang-per-token", "trtllm", "megatron",
                                   "vllm-stats", "routed-experts"}


# ---------------------------------------------------------------- the CLI: moesim trace import / stats

@needs_torch
def test_cli_import_counts_and_stats(tmp_path, capsys):
    from moesim.cli import main
    from moesim.traces.count_trace import load_counts

    folder, route = trtllm_folder(tmp_path, raw=False)
    out = tmp_path / "out" / "counts.npz"
    assert main(["trace", "import", str(folder), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "counts (trtllm) of 3 windows x 3 MoE layers x 6 experts, top-2" in text
    assert "decoder-layer ids 3, 4, 6" in text
    assert "supports: EPLB" in text
    np.testing.assert_array_equal(load_counts(out).loads, logical_counts(route))
    assert main(["trace", "import", str(folder), "-o", str(out)]) == 0  # replaces its own counts file
    assert main(["trace", "stats", str(out), "--json", str(tmp_path / "s.json")]) == 0
    text = capsys.readouterr().out
    assert "counts of 3 windows x 3 MoE layers" in text and "not from counts" in text
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["kind"] == "counts" and summary["picks"] == PASSES * RANKS * TOKENS * 3 * K
    assert main(["trace", "stats", str(out), "--plots", str(tmp_path / "p")]) == 2
    assert "is a count trace" in capsys.readouterr().err and not (tmp_path / "p").exists()
    assert main(["trace", "fit", str(out), "-o", str(tmp_path / "f.yaml")]) == 2
    assert "is a count trace" in capsys.readouterr().err and not (tmp_path / "f.yaml").exists()


def test_cli_import_per_token(tmp_path, capsys):
    from moesim.cli import main
    from moesim.traces.format import load_trace

    paths, _ = megatron_files(tmp_path)
    out = tmp_path / "t.npz"
    assert main(["trace", "import", *map(str, paths), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "per-token trace (megatron) of 30 tokens x 3 MoE layers x top-2" in text and "3 batches" in text
    assert load_trace(out).meta.extra["layer_ids"] == list(MOE_LAYERS)
    assert main(["trace", "import", *map(str, paths), "-o", str(out), "--gpus", "4"]) == 2
    assert "--gpus: does not apply to engine dumps" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["pickle", "truncated", "ids", "shape", "top_k"])
@needs_torch
def test_cli_bad_dumps_exit_2_and_write_nothing(tmp_path, capsys, case):
    from moesim.cli import main

    out = tmp_path / "o" / "x.npz"
    if case == "pickle":
        obj = Hostile()
        obj.marker = str(tmp_path / "ran")
        torch.save({"records": [obj], "last_physical_to_logical_map": torch.zeros(1, 2)}, tmp_path / "d.pt")
        args, words = [str(tmp_path / "d.pt")], "not a file of plain tensors"
    elif case == "truncated":
        folder, _ = trtllm_folder(tmp_path, raw=True)
        raw = folder / "rank0_raw.safetensors"
        raw.write_bytes(raw.read_bytes()[:-20])
        args, words = [str(folder)], "truncated or damaged: data_offsets"
    elif case == "ids":
        paths, _ = megatron_files(tmp_path)
        args, words = [*map(str, paths), "--num-experts", "3"], "line 1: expert id"
    elif case == "shape":
        torch.save({"rank": 0, "logical_count": torch.zeros(3, dtype=torch.int32)}, tmp_path / "s.pt")
        args, words = [str(tmp_path / "s.pt"), "--top-k", "2"], "logical_count: must be [buffer, layers, experts]"
    else:
        path, _ = vllm_stats(tmp_path, header=True)
        args, words = [str(path)], "top_k: vLLM load statistics do not record top_k"
    assert main(["trace", "import", *args, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1
    assert not out.parent.exists() and not (tmp_path / "ran").exists()


@needs_torch
def test_missing_torch_names_the_extra(tmp_path, monkeypatch):
    import sys

    paths, _ = sglang_dumps(tmp_path, per_token=False)
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(InputError, match=r"needs torch: pip install 'moesim\[engines\]'"):
        import_dump(paths, "sglang-per-pass", top_k=K)


def test_recognised_when_the_first_line_is_longer_than_the_sniffed_megabyte(tmp_path):
    rec = {"step": 0, "stage": "pre_dispatch", "block": "decoder", "layer": 3, "rank": 0, "num_tokens": 70000,
           "topk": 8, "top_indices": [list(range(8))] * 70000}
    path = tmp_path / "router_trace_rank0.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    assert path.stat().st_size > 1 << 20
    assert detect_engine([path]) == "megatron"
    assert import_dump(path).num_tokens == 70000


def test_flags_that_contradict_the_dump(tmp_path):
    paths, _ = megatron_files(tmp_path)
    with pytest.raises(InputError, match="--top-k: the dump says 2, --top-k says 4"):
        import_dump(paths, top_k=4)
    assert import_dump(paths, top_k=2, num_experts=6).meta.num_experts == 6
