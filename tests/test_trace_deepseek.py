"""Real routing: the DeepSeek-V2-Lite prefill logs in ../shared (skipped without them). Import, the
statistics SOURCE.md reports, and the shipped fitted parameters against the real trace, within the
tolerances the fit promises (per-layer max/mean load within 10%, per-layer top-8 successor share within
0.05)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moesim.traces.fitted_generator import generate_fitted, load_params
from moesim.traces.generator_fit import LOAD_TOLERANCE, SUCCESSOR_TOLERANCE
from moesim.traces.readers import import_trace
from moesim.traces.stats import trace_stats

LOGS = Path(__file__).resolve().parents[2] / "shared" / "traces" / "deepseek-v2-lite-prefill"
FILES = sorted(LOGS.glob("*.csv.gz"))
pytestmark = pytest.mark.skipif(len(FILES) != 250, reason="needs ../shared/traces/deepseek-v2-lite-prefill")


@pytest.fixture(scope="module")
def real():
    res = import_trace(FILES, num_experts=64, num_gpus=8, tokens_per_gpu=256, model="deepseek-v2-lite-chat")
    return res, trace_stats(res.trace)


def test_import_reads_every_record(real):
    res, st = real
    tr = res.trace
    assert (tr.num_tokens, tr.meta.num_layers, tr.meta.top_k, tr.meta.num_experts) == (23785, 26, 6, 64)
    assert (res.records, res.requests, res.skipped, res.padded, res.missing) == (23785 * 26, 250, 0, 0, 0)
    assert tr.meta.extra["layer_ids"] == list(range(1, 27))
    per = np.zeros((int(tr.batch.max()) + 1, 8), dtype=int)
    np.add.at(per, (tr.batch, tr.home), 1)
    assert per.max() <= 256


def test_statistics_match_the_published_figures(real):
    _, st = real
    assert np.median(st.max_over_mean) == pytest.approx(1.8, abs=0.1)  # SOURCE.md: 1.8x the mean
    assert np.mean(st.succ_top_share) == pytest.approx(0.37, abs=0.03)  # SOURCE.md: 37%, uniform 12.5%


def test_shipped_parameters_reproduce_the_real_statistics(real):
    res, st = real
    params = load_params("deepseek-v2-lite")
    per_window = params.fitted_to["tokens_per_window"]
    gen = generate_fitted(params, num_gpus=1, tokens_per_gpu=per_window, batches=-(-res.trace.num_tokens // per_window),
                          rng=np.random.default_rng(2024), weights=False)
    g = trace_stats(gen)
    load_err = np.abs(g.max_over_mean / st.max_over_mean - 1)
    succ_err = np.abs(g.succ_top_share - st.succ_top_share)
    assert load_err.max() < LOAD_TOLERANCE, f"layer {load_err.argmax()}: {load_err.max():.3f}"
    assert succ_err.max() < SUCCESSOR_TOLERANCE, f"layer pair {succ_err.argmax()}: {succ_err.max():.3f}"
    # Drift between batches: the same order as the real one, well above sampling noise.
    assert np.median(g.drift_tv_consecutive) == pytest.approx(np.median(st.drift_tv_consecutive), rel=0.25)
