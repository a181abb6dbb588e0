"""Published MoE serving deployments, reproduced: moesim's throughput beside the published one, point by point.

Each point is a shipped scenario of scenarios/deployments/ (its header gives the source, the settings the source
states and every assumption moesim makes), run as it ships or with the one change the point names (prompt
length, requests per GPU, overlap, placement). Throughput per node = tokens per GPU per forward / the simulated
forward time x GPUs per node: input tokens for prefill, output tokens for decode (one per request per step, or
1 + the accepted drafts with multi-token prediction), as moesim.metrics.serving computes them for every run. Gains
are ratios of two simulated throughputs beside the published ratio.

    python benchmarks/deployments.py            # every point and Day 6 disaggregated, about 30 minutes on 2 cores
    python benchmarks/deployments.py --quick    # DeepSeek's two profiled points only
    python benchmarks/deployments.py --r1-skew  # the SGLang 4K prefill point and EPLB's gain with R1's skew, 1 minute
    python benchmarks/deployments.py --mtp      # DeepSeek's profiled and Day-6 decode read as MTP runs, 2 minutes

The SGLang and Day-6 scenarios route as DeepSeek-V2-Lite really does (the shipped fit carried over to V3's shape,
``fitted: {params: deepseek-v2-lite, expand_experts: 4}``), the profile-data ones balanced, as those runs were;
the imbalance of that routing at EP32 is printed beside TensorRT-LLM's DeepSeek-R1 figures. V2-Lite is not R1: the
R1-skew section reruns the SGLang 4K prefill point with the synthetic generator at R1's skew instead (a Zipf exponent
fitted to TensorRT-LLM's by-slot imbalance of R1, by benchmarks/fit_r1_skew.py).

Nothing here is fitted to these figures: the GPUs, kernels and networks are the presets' (calibrated on other
measurements), and the kernels' published rates (FlashMLA's) are cited where they are used.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moesim.study import load_scenario, run_study  # noqa: E402
from moesim.study.config import Scenario  # noqa: E402

DEPLOYMENTS = ROOT / "scenarios" / "deployments"
LMSYS = "LMSYS 2025-05-05 (large-scale EP on 96 H100s)"


@dataclass(frozen=True)
class Point:
    label: str
    scenario: str
    published: float  # tokens/s per node
    source: str
    placement: str | None = None  # the scenario's baseline when None
    change: dict[str, Any] = field(default_factory=dict)  # "seq_len", "kv_len", "tokens_per_gpu", "overlap",
    # "balanced" (routing with every expert equally loaded)


POINTS = (
    Point("DeepSeek profile, prefill EP32, 4K prompts, 16K tok/GPU", "deepseek_prefill_profile", 62_713,
          "profile-data via " + LMSYS),
    Point("DeepSeek profile, decode EP128, 128 req/GPU, KV 4096", "deepseek_decode_profile", 18_598,
          "profile-data via " + LMSYS),
    Point("DeepSeek production (Day 6), decode EP144, KV 4989", "deepseek_decode_day6", 14_800,
          "open-infra-index Day 6 (24 h average)"),
    # the prefill pool of the disaggregated Day-6 scenario (the profiled prefill settings, production's routing)
    Point("DeepSeek production (Day 6), prefill EP32, computed tokens", "deepseek_day6_disaggregated:prefill", 32_206,
          "open-infra-index Day 6 (24 h average, cache hits excluded)"),
    Point("SGLang prefill EP32 H100, 1K prompts", "sglang_prefill_h100", 57_674, LMSYS, "eplb", {"seq_len": 1024}),
    Point("SGLang prefill EP32 H100, 2K prompts", "sglang_prefill_h100", 54_543, LMSYS, "eplb", {"seq_len": 2048}),
    Point("SGLang prefill EP32 H100, 4K prompts", "sglang_prefill_h100", 50_302, LMSYS, "eplb"),
    # LMSYS's own "simulated perfect EPLB" run: the routing skew (which moesim cannot know) taken out on both sides
    Point("SGLang prefill EP32 H100, 4K, perfect EPLB (balanced)", "sglang_prefill_h100", 59_337, LMSYS, "eplb",
          {"balanced": True}),
    Point("SGLang decode EP72 H100, 256 req/GPU, KV 2000", "sglang_decode_h100", 22_282, LMSYS),
    # LMSYS's "simulated MTP" run (128 requests, KV 4000, 60% acceptance); moesim runs real MTP (scenario header)
    Point("SGLang decode EP72 H100, 128 req/GPU + MTP, KV 4000", "sglang_decode_mtp_h100", 17_373, LMSYS),
)
QUICK = POINTS[:2]
# (label, scenario, change A, change B, published ratio B/A, its source): gains of one setting over another
GAINS = (
    ("two-batch overlap, SGLang prefill 4K (same tokens/GPU)", "sglang_prefill_h100", {"overlap": "none"},
     {}, (1.27, 1.35), LMSYS),
    ("two-batch overlap, SGLang decode 256 req/GPU", "sglang_decode_h100", {"overlap": "none"}, {}, (1.255,), LMSYS),
    ("two-batch overlap, SGLang decode 32 req/GPU", "sglang_decode_h100", {"overlap": "none", "tokens_per_gpu": 32},
     {"tokens_per_gpu": 32}, (0.73,), LMSYS),
    ("two-batch overlap, SGLang decode 128 req/GPU + MTP", "sglang_decode_mtp_h100", {"overlap": "none"}, {},
     (17_552 / 12_929,), LMSYS),
    # LMSYS's EPLB ablation ("in large-scale settings", in-distribution statistics, as moesim's profile batch); the
    # blog does not give the setting: moesim runs it at the prefill point (EP32, 4K, 16K tokens/GPU)
    ("EPLB vs none, SGLang prefill 4K", "sglang_prefill_h100", {"placement": "contiguous"}, {"placement": "eplb"},
     (1.49,), LMSYS),
    # the blog's two 4K prefill runs: simulated perfect EPLB (59,337) over EPLB on its default distribution (50,302)
    ("perfect EPLB vs EPLB, SGLang prefill 4K", "sglang_prefill_h100", {"placement": "eplb"},
     {"placement": "eplb", "balanced": True}, (59_337 / 50_302,), LMSYS),
)
# published, not reproduced: EPLB's 2.54x in decode. SGLang's decode runs EP72, which only EPLB's 288 slots allow
# (256 experts divide over powers of two); the blog gives no setting without EPLB to compare with like for like
NOT_REPRODUCED = ("EPLB vs none, SGLang decode: published 2.54x, setting not given (EP72 needs EPLB's 288 slots), "
                  "not simulated",)

# DeepSeek's Day-6 deployment with prefill and decode pools (moesim.study.disagg): the prefill:decode node ratio its
# request mix needs, beside the one Day 6's own rates imply (95.5 prefill + 131.4 decode nodes, SERVING.md)
DISAGG = ("Day 6, prefill:decode nodes for its request mix", "deepseek_day6_disaggregated", 95.5 / 131.4,
          "open-infra-index Day 6 (nodes derived from its rates)")


def node_ratio() -> None:
    """The disaggregated Day-6 scenario run whole: its combined figures beside the published ones."""
    from moesim.study.disagg import DisaggScenario, load_any, run_disaggregated

    label, scenario, published, source = DISAGG
    sc = load_any(DEPLOYMENTS / f"{scenario}.yaml")
    assert isinstance(sc, DisaggScenario)
    t0 = time.perf_counter()
    figures = run_disaggregated(sc, progress=False).figures
    print(f"  ({scenario}: {time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    ratio = figures["needed_nodes_ratio"]
    print(f"\n{'disaggregated':60s} {'moesim':>9s} {'published':>10s} {'error':>7s}  source")
    print(f"{label:60s} {ratio:9.3f} {published:10.3f} {ratio / published - 1:+7.1%}  {source}", flush=True)


# DeepSeek's decode profile read as a run with multi-token prediction (deepseek_decode_profile_mtp.yaml says why):
# its step beside a third-party reading of the profile (zdszero.github.io, "deepseek profile", column "h800 ds prof")
PROFILE_MTP = ("deepseek_decode_profile_mtp", 18_598, 87.32, 96.0)


def profile_mtp() -> None:
    """The DeepSeek decode profile point on the MTP reading: throughput and step time beside the published ones."""
    scenario, published, layers_ms, step_ms = PROFILE_MTP
    runs = throughput(scenario, {})
    sim, forward = runs["contiguous"], _FORWARD_MS[(scenario, ())]["contiguous"]
    title = "DeepSeek decode profile read as an MTP run (1 draft, 60% accepted)"
    print(f"\n{title:60s} {'moesim':>9s} {'published':>10s} {'error':>7s}")
    print(f"{'  output tokens/s per node':60s} {sim:9,.0f} {published:10,.0f} {sim / published - 1:+7.1%}  "
          f"profile-data via {LMSYS}")
    print(f"{'  step, ms (moesim: 61 layers + MTP module; published: 61 layers)':60s} {forward:9.2f} {layers_ms:10.2f} "
          f"{forward / layers_ms - 1:+7.1%}  third-party reading of the profile (zdszero.github.io)")
    print(f"{'  step, ms (published: end to end)':60s} {forward:9.2f} {step_ms:10.2f} {forward / step_ms - 1:+7.1%}",
          flush=True)


# Day 6's decode read as a run with multi-token prediction (deepseek_decode_day6_mtp.yaml says why): its two published
# figures, output tokens/s per node and per user (20-22)
DAY6_MTP = ("deepseek_decode_day6_mtp", 14_800, (20.0, 22.0))


def day6_mtp() -> None:
    """Day 6's decode on the MTP reading: tokens/s per node and per request beside both published figures."""
    scenario, node, per_user = DAY6_MTP
    runs = throughput(scenario, {})
    sim, forward = runs["eplb"], _FORWARD_MS[(scenario, ())]["eplb"]
    sc = _load(scenario)
    per_request = 1e3 * sc.output_per_step / forward
    mid = sum(per_user) / 2
    title = "Day 6 decode read as an MTP run (88 req/GPU, 87.5% accepted)"
    print(f"\n{title:60s} {'moesim':>9s} {'published':>10s} {'error':>7s}")
    print(f"{'  output tokens/s per node':60s} {sim:9,.0f} {node:10,.0f} {sim / node - 1:+7.1%}  "
          "open-infra-index Day 6")
    print(f"{'  output tokens/s per request':60s} {per_request:9.1f} {'20-22':>10s} {per_request / mid - 1:+7.1%}  "
          "open-infra-index Day 6", flush=True)


# TensorRT-LLM's DeepSeek-R1 EP32 imbalance, (max - mean) / mean of tokens per rank averaged over layers and
# iterations (examples/wide_ep/ep_load_balancer/README.md; benchmarks/bench_plan.py)
TRTLLM_EP32 = {"contiguous": 1.564272, "eplb": 0.115378}


def routing_imbalance() -> None:
    """The SGLang prefill scenario's routing at EP32 (4K prompts), measured as TensorRT-LLM measures R1's."""
    runs = _IMBALANCE[("sglang_prefill_h100", ())]
    print(f"\n{'routing imbalance at EP32, (max-mean)/mean tokens per rank':60s} {'moesim':>9s} {'R1 (TRT)':>10s}")
    for name, label in (("contiguous", "no EPLB (contiguous)"), ("eplb", "EPLB, 32 redundant experts")):
        print(f"{'  ' + label:60s} {runs[name]:9.3f} {TRTLLM_EP32[name]:10.3f}")
    print("  (DeepSeek-V2-Lite's real prefill routing carried over to V3's shape; V2-Lite is not R1, and "
          "TensorRT-LLM's EPLB runs on\n  past statistics under drift, moesim's on a profile batch of the same "
          "routing)", flush=True)


# DeepSeek-R1's routing skew at EP32 as the synthetic generator's Zipf exponent: fitted to TensorRT-LLM's by-slot
# imbalance of R1 (10.948), its by-rank one (1.564) held out at -0.6% / -5.3% (python benchmarks/fit_r1_skew.py)
R1_ZIPF = 0.63


def r1_skew() -> None:
    """The SGLang prefill point and EPLB's gain with R1's skew in place of V2-Lite's routing (``--r1-skew``)."""
    key = ("sglang_prefill_h100", (("r1_skew", True),))
    runs = throughput("sglang_prefill_h100", {"r1_skew": True})
    print(f"\n{'with R1-like skew (synthetic, Zipf ' + str(R1_ZIPF) + ', fit_r1_skew.py)':60s} {'moesim':>9s} "
          f"{'published':>10s} {'error':>7s}")
    for name, label in (("contiguous", "no EPLB (contiguous)"), ("eplb", "EPLB, 32 redundant experts")):
        got = _IMBALANCE[key][name]
        print(f"{'  imbalance at EP32 by rank, ' + label:60s} {got:9.3f} {TRTLLM_EP32[name]:10.3f} "
              f"{got / TRTLLM_EP32[name] - 1:+7.1%}  TensorRT-LLM (R1)")
    gain = runs["eplb"] / runs["contiguous"]
    print(f"{'  EPLB vs none, SGLang prefill 4K':60s} {gain:8.2f}x {1.49:9.2f}x {gain / 1.49 - 1:+7.1%}  {LMSYS}")
    print(f"{'  SGLang prefill EP32 H100, 4K prompts (EPLB)':60s} {runs['eplb']:9,.0f} {50_302:10,} "
          f"{runs['eplb'] / 50_302 - 1:+7.1%}  {LMSYS}", flush=True)


def changed(sc: Scenario, change: dict[str, Any]) -> Scenario:
    """The scenario with a point's changes applied (prompt or KV length, tokens per GPU, overlap)."""
    work, engine = sc.workload, sc.engine
    if "seq_len" in change:
        work = work.model_copy(update={"seq_len": change["seq_len"]})
    if "kv_len" in change:
        work = work.model_copy(update={"kv_len": change["kv_len"]})
    if "tokens_per_gpu" in change and work.synthetic is not None:
        work = work.model_copy(update={"synthetic": work.synthetic.model_copy(
            update={"tokens_per_gpu": change["tokens_per_gpu"]})})
    if change.get("balanced") and work.synthetic is not None:  # every expert equally loaded, no GPU mix
        m = sc.model  # (the plain generator, group-limited as the model routes, in place of a fitted one)
        work = work.model_copy(update={"synthetic": work.synthetic.model_copy(
            update={"zipf_alpha": 0.0, "gpu_mix_sigma": 0.0, "affinity": 0.0, "fitted": None,
                    "groups": m.expert_groups, "topk_groups": m.topk_groups})})
    if change.get("r1_skew") and work.synthetic is not None:  # R1's skew (R1_ZIPF), the generator's defaults else
        m = sc.model
        work = work.model_copy(update={"synthetic": work.synthetic.model_copy(
            update={"zipf_alpha": R1_ZIPF, "gpu_mix_sigma": 0.3, "affinity": 0.5, "fitted": None,
                    "groups": m.expert_groups, "topk_groups": m.topk_groups})})
    if "overlap" in change:
        engine = engine.model_copy(update={"overlap": change["overlap"]})
    return sc.model_copy(update={"workload": work, "engine": engine.model_copy(update={"progress": False})})


def _load(scenario: str) -> Scenario:
    """A scenario of scenarios/deployments/ by name, or ``NAME:POOL``, one pool of a disaggregated one."""
    from moesim.study.disagg import DisaggScenario, load_any

    name, _, pool = scenario.partition(":")
    if not pool:
        return load_scenario(DEPLOYMENTS / f"{name}.yaml")
    sc = load_any(DEPLOYMENTS / f"{name}.yaml")
    assert isinstance(sc, DisaggScenario)
    return sc.pools[pool]


_CACHE: dict[tuple, dict[str, float]] = {}
_IMBALANCE: dict[tuple, dict[str, float]] = {}  # TensorRT-LLM's (max - mean) / mean of tokens per EP rank
_FORWARD_MS: dict[tuple, dict[str, float]] = {}


def throughput(scenario: str, change: dict[str, Any]) -> dict[str, float]:
    """Tokens/s per node of every placement of ``scenario`` with ``change`` (cached per distinct run)."""
    key = (scenario, tuple(sorted((k, v) for k, v in change.items() if k != "placement")))
    if key not in _CACHE:
        sc = changed(_load(scenario), change)
        t0 = time.perf_counter()
        result = run_study(sc, progress=False)
        out = {}
        for run in result.runs:  # input tokens/s per node in prefill, output tokens/s per node in decode
            serving = run.metrics.serving
            assert serving is not None and serving.phase in ("prefill", "decode")
            out[run.name] = (serving.output_tokens_per_s_per_node if serving.phase == "decode"  # type: ignore[assignment]
                             else serving.input_tokens_per_s_per_node)
        _IMBALANCE[key] = {run.name: run.metrics.compute_skew["imbalance"] for run in result.runs}
        _FORWARD_MS[key] = {run.name: run.metrics.serving.forward_ms for run in result.runs}  # type: ignore[union-attr]
        print(f"  ({scenario} {dict(key[1])}: {time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        _CACHE[key] = out
    return _CACHE[key]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="DeepSeek's two profiled points only")
    ap.add_argument("--r1-skew", action="store_true", help="only the SGLang prefill point and EPLB gain with R1's "
                    "skew (fit_r1_skew.py)")
    ap.add_argument("--mtp", action="store_true", help="only the two decode points read as MTP runs (DeepSeek's "
                    "profile, Day 6)")
    a = ap.parse_args()
    if a.r1_skew:
        r1_skew()
        return
    if a.mtp:
        profile_mtp()
        day6_mtp()
        return
    print(f"{'point':60s} {'moesim':>9s} {'published':>10s} {'error':>7s}  source")
    errors = []
    for p in QUICK if a.quick else POINTS:
        runs = throughput(p.scenario, p.change)
        sim = runs[p.placement or next(iter(runs))]
        err = sim / p.published - 1
        errors.append(abs(err))
        print(f"{p.label:60s} {sim:9,.0f} {p.published:10,.0f} {err:+7.1%}  {p.source}", flush=True)
    if not a.quick:
        print(f"\n{'gain':60s} {'moesim':>9s} {'published':>10s} {'error':>7s}")
        for label, scenario, before, after, published, _source in GAINS:
            pa = before.get("placement")
            pb = after.get("placement")
            ta = throughput(scenario, before)
            tb = throughput(scenario, after)
            ratio = tb[pb or next(iter(tb))] / ta[pa or next(iter(ta))]
            mid = sum(published) / len(published)
            shown = "-".join(f"{x:.2f}" for x in published)
            print(f"{label:60s} {ratio:8.2f}x {shown:>9s}x {ratio / mid - 1:+7.1%}", flush=True)
        for line in NOT_REPRODUCED:
            print(line)
        profile_mtp()
        day6_mtp()
        routing_imbalance()
        r1_skew()
        node_ratio()
    print(f"\nthroughput: median |error| {sorted(errors)[len(errors) // 2]:.1%}, max {max(errors):.1%} "
          f"over {len(errors)} points")


if __name__ == "__main__":
    main()
