"""Real routing through the engines' formats: DeepSeek-V2-Lite prefill routing from ../shared (27 decoder layers,
layer 0 dense, 26 MoE layers of 64 experts, top-6; skipped without it) written as SGLang's per_token and stat
recorders and TensorRT-LLM's statistics write it - SGLang with 16 redundant physical slots on 8 ranks - and
read back: the same picks, in the same order, at the same decoder-layer ids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moesim.traces.count_trace import CountTrace
from moesim.traces.counts import count_window_picks
from moesim.traces.readers import import_trace
from moesim.traces.readers.engines import import_dump

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

LOGS = Path(__file__).resolve().parents[2] / "shared" / "traces" / "deepseek-v2-lite-prefill"
FILES = sorted(LOGS.glob("*.csv.gz"))[:24]
pytestmark = pytest.mark.skipif(len(FILES) < 24, reason="needs ../shared/traces/deepseek-v2-lite-prefill")
E, RANKS, SLOTS = 64, 8, 80  # 16 redundant slots: 10 per rank


@pytest.fixture(scope="module")
def real():
    tr = import_trace(FILES, num_experts=E, num_gpus=RANKS, tokens_per_gpu=256).trace
    assert tr.meta.extra["layer_ids"] == list(range(1, 27))  # the logs number MoE layers 1..26
    return tr


def p2l_map(rng: np.random.Generator) -> np.ndarray:
    """[27 decoder layers, 80 slots]: every expert once, 16 replicas of random experts, shuffled per layer."""
    rows = [np.concatenate([np.arange(E), rng.choice(E, SLOTS - E, replace=False)]) for _ in range(27)]
    return np.stack([rng.permutation(r) for r in rows])


def test_sglang_per_token_and_stat_of_real_routing(tmp_path, real):
    rng = np.random.default_rng(0)
    p2l = p2l_map(rng)
    ex = real.experts.astype(np.int64)  # [T, 26, 6]
    copies = [np.bincount(row, minlength=E) for row in p2l]
    replicas = [np.stack([np.pad(np.flatnonzero(row == e), (0, 4))[:4] for e in range(E)]) for row in p2l]
    paths = []
    for r in range(RANKS):
        records = []
        for b in range(int(real.batch.max()) + 1):
            idx = np.flatnonzero((real.batch == b) & (real.home == r))
            phys = np.full((27, idx.size, 8), -1, dtype=np.int32)  # SGLang's 8 columns, top-6 used
            for lay in range(26):
                e = ex[idx, lay]  # [tokens, 6] logical ids -> a random replica's slot each
                phys[lay + 1, :, :6] = replicas[lay + 1][e, rng.integers(0, 1 << 30, e.shape) % copies[lay + 1][e]]
            records.append({"forward_pass_id": b, "rank": r, "gatherer_key": "primary",
                            "input_ids": idx.tolist(), "positions": list(range(idx.size)), "extend_seq_lens": None,
                            "forward_mode": 1, "topk_ids_of_layer": torch.from_numpy(phys), "misc_objects": [],
                            "global_physical_count": torch.zeros(27, SLOTS, dtype=torch.int32)})
        path = tmp_path / f"expert_distribution_recorder_1.0_{r}.pt"
        torch.save({"records": records, "last_physical_to_logical_map": torch.from_numpy(p2l)}, path)
        paths.append(path)
    back = import_dump(paths)
    order = np.lexsort((np.arange(real.num_tokens), real.home, real.batch))  # by pass, then rank
    np.testing.assert_array_equal(back.experts, real.experts[order])
    assert back.meta.extra["layer_ids"] == list(range(1, 27)) and back.meta.extra["num_decoder_layers"] == 27
    assert (back.meta.top_k, back.meta.num_experts) == (6, 64)

    windows = count_window_picks(real.experts, E, real.batch.astype(np.int64))
    buffer = np.zeros((windows.shape[0] + 3, 27, E), dtype=np.int32)  # rows = all decoder layers, 3 unfilled
    buffer[:-3, 1:] = windows
    torch.save({"rank": 0, "logical_count": torch.from_numpy(buffer), "average_utilization_rate_over_window": None},
               tmp_path / "expert_distribution_recorder_2.0.pt")
    ct = import_dump(tmp_path / "expert_distribution_recorder_2.0.pt", top_k=6)
    assert isinstance(ct, CountTrace) and ct.layer_ids == tuple(range(1, 27)) and ct.num_decoder_layers == 27
    np.testing.assert_array_equal(ct.loads, windows)


def test_trtllm_statistics_of_real_routing(tmp_path, real):
    folder = tmp_path / "stats"
    folder.mkdir()
    (folder / "meta_info.json").write_text(json.dumps({"num_experts": E, "num_experts_per_token": 6}))
    for r in range(RANKS):
        counts, raw = {}, {}
        for b in range(int(real.batch.max()) + 1):
            sel = real.experts[(real.batch == b) & (real.home == r)].astype(np.int32)
            for lay in range(26):
                t = torch.from_numpy(np.ascontiguousarray(sel[:, lay]))
                counts[f"{b}_{lay + 1}"] = torch.bincount(t.flatten(), minlength=E)
                raw[f"{b}_{lay + 1}"] = t
        safetensors_torch.save_file(counts, str(folder / f"rank{r}.safetensors"))
    ct = import_dump(folder)
    windows = count_window_picks(real.experts, E, real.batch.astype(np.int64))
    np.testing.assert_array_equal(ct.loads, windows)
    np.testing.assert_array_equal(ct.window_tokens, np.bincount(real.batch))
    assert ct.layer_ids == tuple(range(1, 27)) and ct.meta.top_k == 6
