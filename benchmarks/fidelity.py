"""How accurate is moesim? Predicted vs measured, for every number we have a measurement of.

    python benchmarks/fidelity.py [--shared ../shared] [-q]

The figures go to stdout, line by line as each is ready (also into a file or a pipe); a progress bar over the
sections, and over the runs of section 6 (a few minutes), goes to stderr (``-q``: none).

1. Micro-benchmarks on 2x H200 (../shared/calibration): the hgx-h200 parameters are fitted on two thirds of
   the points (``moesim calibrate``) and the error is reported on the held-out third, per point.
2. A real expert-parallel MoE layer on 2x H200 under three placements (benchmarks/validation/ep_layer):
   moesim's layer time and the speedups between placements, against the measurement; then whole layers
   (attention + experts) on one H200 and one H100 in prefill and decode: layer time and the attention's share.
3. Expert-FFN timings on one H100 (benchmarks/validation/ffn_h100): the dgx-h100 preset, which ``moesim
   calibrate`` fits on two thirds of them, on the held-out third; and the H200's efficiencies carried to the
   H100 (what a GPU without its own measurement gets).
4. DeepEP's published tables (H800; ../shared/reference/DOMAIN.md section 6): normal-kernel bandwidths
   (intranode EP8, internode EP16/32/64, hierarchical all-to-all) and low-latency latencies and bandwidths
   (EP8-256), simulated on the unchanged ``h800`` preset and measured the way DeepEP's tests measure them
   (:mod:`moesim.calibration.deepep`).
5. A second 2x H200 host, measured with ``moesim bench`` (benchmarks/validation/h200_host2 and a2a_paths): the
   shipped preset predicting it as it is, then ``moesim calibrate`` on it with a held-out third.
6. MoETuner's single- vs multi-node gains (arXiv 2502.06643): ``ilp`` over ``contiguous`` on the shipped
   scenarios/moetuner_standard.yaml (Megatron's dispatch/combine dataflow) and moetuner_coherent.yaml (ExFlow's
   context-coherent dataflow, the one the paper's cross-layer traffic term describes), EP4 x TP2 on one DGX
   H100 and EP4 x TP4 on two HGX H200, every layer's tensor-parallel attention and its collectives included:
   the workload's skew beside the paper's motivation figure, the gains per component and end to end beside
   the paper's, then the end-to-end gains across prefill and decode regimes, both dataflows and both readings
   of the paper's network, since the paper's available text gives neither its batch nor its lengths.
7. The attention core on one H100 and one H200 (benchmarks/validation/attention_h100, attention_h200): fitted on
   Mixtral's attention shape, error on Qwen3-30B-A3B's; the shipped presets, and the H100's fit on the H200.
Nothing here is fitted to the points it reports as held out.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path
from typing import Any, Callable, TextIO

import numpy as np

from moesim.calibration import calibrate, load_bench

ROOT = Path(__file__).resolve().parents[1]


def micro_benchmarks(shared: Path) -> None:
    files = [shared / "calibration" / "a2a_2xh200.json", shared / "calibration" / "expert_ffn_h200.json"]
    if not all(f.is_file() for f in files):
        print(f"(skipped: {files[0].parent} not found)")
        return
    result = calibrate(load_bench(files))
    print("fitted:", ", ".join(f"{k}={v:.4g}" for k, v in result.fitted.items()))
    print(f"\n{'held-out point':62s} {'measured ms':>11s} {'moesim ms':>10s} {'error':>7s}")
    for p in result.predictions:
        if p.held_out:
            print(f"{p.label[:62]:62s} {p.measured_ms:11.4f} {p.predicted_ms:10.4f} {p.error * 100:+6.1f}%")
    print()
    for label, kinds in (("all-to-all + p2p", ("a2a-uniform", "a2a-skew", "p2p")), ("expert FFN", ("ffn",))):
        for held in (False, True):
            e = result.errors(held, kinds)
            print(f"{label:18s} {'held-out' if held else 'fitted':9s} n={e.size:3d}  median |error| "
                  f"{np.median(e) * 100:5.1f}%  max {e.max() * 100:5.1f}%")


def ffn_h100() -> None:
    from moesim.calibration import predict_ffn
    from moesim.hardware import ClusterSpec, preset
    from moesim.hardware.presets import deep_merge

    data = load_bench([ROOT / "benchmarks" / "validation" / "ffn_h100" / "expert_ffn_h100.json"])
    fit = calibrate(data, "dgx-h100")  # what calibrated/dgx-h100.yaml holds: every third point held out
    e = fit.errors(True, ("ffn",))
    print(f"dgx-h100 preset (moesim calibrate on this file), held out  n={e.size:3d}  median |error| "
          f"{np.median(e) * 100:5.1f}%  max {e.max() * 100:5.1f}%")
    h200 = preset("hgx-h200")["gpu"]
    assumed = ClusterSpec(**deep_merge(preset("dgx-h100"), {"gpu": {k: h200[k] for k in (
        "compute_efficiency", "hbm_efficiency", "ffn_overhead_us", "ffn_floor_us")}}))
    rows = [(p, (predict_ffn(assumed, p) - p.ms) / p.ms) for p in data.ffn]
    for label, keep in (("< 1024 tokens", lambda p: sum(p.tokens) < 1024),
                        (">= 1024 tokens", lambda p: sum(p.tokens) >= 1024)):
        e = np.abs([err for p, err in rows if keep(p)])
        print(f"the H200's FFN efficiencies on the H100, {label:15s} n={e.size:3d}  median |error| "
              f"{np.median(e) * 100:5.1f}%  max {e.max() * 100:5.1f}%")


def deepep() -> None:
    from moesim.calibration.deepep import low_latency_points, normal_points

    points = normal_points() + low_latency_points()
    print(f"{'DeepEP kernel':12s} {'EP':>4s} {'phase':9s} {'quantity':15s} {'published':>9s} {'moesim':>8s} "
          f"{'error':>7s}")
    for p in points:
        print(f"{p.kernel:12s} {p.ep:4d} {p.phase:9s} {p.quantity:15s} {p.published:9.1f} {p.predicted:8.1f} "
              f"{p.error * 100:+6.1f}%")
    for kernel in ("normal", "low_latency"):
        e = np.abs([p.error for p in points if p.kernel == kernel])
        print(f"{kernel:12s} n={e.size:2d}  median |error| {np.median(e) * 100:5.1f}%  max {e.max() * 100:5.1f}%")
    e = np.abs([p.error for p in points])
    print(f"{'all DeepEP':12s} n={e.size:2d}  median |error| {np.median(e) * 100:5.1f}%  max {e.max() * 100:5.1f}%")


# MoETuner, Figure 1 and section 5 (../shared/reference/DOMAIN.md section 1): (single node, two nodes)
MOETUNER = {"e2e speedup": (1.093, 1.175), "a2a tail": (-0.363, -0.305), "a2a mean": (-0.354, -0.247),
            "token-processing tail": (-0.36, -0.27)}
MOETUNER_HOT_GPU = (0.64, 0.69)  # "one GPU can take 64-69% of a layer's tokens" under contiguous placement
MOETUNER_A2A_SHARE = 0.357  # "all-to-all is 35.7% of Mixtral inference time" (motivation, contiguous)


def _moetuner_runs(scenario):
    """ilp and contiguous on both clusters: per cluster, (e2e ms, a2a tail, a2a mean, token-processing tail,
    MoE share) for each placement, every all-to-all timed as the GPU running it times it (NCCL, Megatron's
    profiles: from joining to done, the wait for the slowest rank included); tail = the slowest GPU per layer
    per step, as MoETuner reports. MoE share: the part of the step a GPU spends outside its attention block
    (the block's tensor-parallel collectives included), mean over GPUs; all-to-all share: the part it spends in
    all-to-alls, joining to done (the paper: 35.7% of Mixtral's inference time)."""
    from moesim.study.runner import run_study

    scenario = scenario.model_copy(update={"placements": tuple(p for p in scenario.placements
                                                               if p.name in ("contiguous", "ilp"))})
    out = {}
    for r in run_study(scenario, progress=False).runs:
        g = r.records.gpu
        spans = [g["t_dispatch_done"] - g["t_dispatch_join"], g["t_combine_done"] - g["t_combine_join"]]
        spans = [s for s in spans if s.any()]  # the coherent dataflow has no combine but the last layer's
        step = r.records.batch_end - r.records.batch_start
        attention = (g["t_dense_end"] - g["t_layer_start"]).sum(axis=1).mean(axis=1)
        share = float(np.mean(1 - attention / step))
        a2a_share = float(np.mean(sum(s.sum(axis=1).mean(axis=1) for s in spans) / step))
        out[r.cluster.name, r.name] = (r.metrics.e2e_ms["mean"], np.mean([s.max(axis=2).mean() for s in spans]),
                                       np.mean([s.mean() for s in spans]), r.metrics.compute_ms["mean"], share,
                                       a2a_share)
    return out


def _variant(scenario, *, kv_len=None, tokens_per_gpu=None, nics_per_node="keep"):
    """The scenario with a decode workload and/or another reading of the two-node NICs."""
    update = {}
    if kv_len is not None:
        work = scenario.workload
        update["workload"] = work.model_copy(update={
            "seq_len": None, "kv_len": kv_len,
            "synthetic": work.synthetic.model_copy(update={"tokens_per_gpu": tokens_per_gpu})})
    if nics_per_node != "keep":
        update["clusters"] = tuple(c.model_copy(update={"spec": c.spec.model_copy(update={
            "network": c.spec.network.model_copy(update={"nics_per_node": nics_per_node})})})
            for c in scenario.clusters)
    return scenario.model_copy(update=update)


def _hot_rank(scenario) -> list[tuple[float, float]]:
    """Per cluster, under contiguous placement: the share of a layer's tokens that visit the busiest expert-
    parallel rank, and that rank's share of the (token, expert) picks, each averaged over layers and batches."""
    from moesim.study import build_workload

    out = []
    E = scenario.model.num_experts
    for c in scenario.clusters:
        w = build_workload(scenario, c)
        ep = c.spec.num_gpus // c.tp
        rank = np.asarray(w.trace.experts) // (E // ep)  # contiguous: expert e on EP rank e // (E / EP)
        visit, picks = [], []
        for b in np.unique(w.layout.batch):
            sel = rank[w.layout.batch == b]
            for lay in range(sel.shape[1]):
                onehot = sel[:, lay, :, None] == np.arange(ep)
                visit.append(onehot.any(axis=1).mean(axis=0).max())
                picks.append(onehot.mean(axis=(0, 1)).max())
        out.append((float(np.mean(visit)), float(np.mean(picks))))
    return out


MOETUNER_STEPS = 1 + 2 + 2 * 4 * 2  # what moetuner() tells ``tick`` of: the skew, the shipped scenarios, the regimes


def moetuner(tick: Callable[[int], object] = lambda n: None) -> None:
    """Section 6; ``tick(1)`` is told of each of its :data:`MOETUNER_STEPS` steps (a study of both clusters)."""
    from moesim.study.config import load_scenario

    scenarios = {flow: load_scenario(ROOT / "scenarios" / f"moetuner_{flow}.yaml") for flow in ("standard", "coherent")}
    one, two = (c.name for c in scenarios["standard"].clusters)
    lo, hi = MOETUNER_HOT_GPU
    print(f"workload skew under contiguous placement (the paper: one GPU takes {lo:.0%}-{hi:.0%} of a layer's tokens):")
    for c, (visit, picks) in zip((one, two), _hot_rank(scenarios["standard"])):
        print(f"  {c}: the busiest EP rank is visited by {visit:.0%} of the tokens and serves {picks:.0%} of the picks")
    tick(1)

    ours: dict[str, dict[str, list[float]]] = {}
    shares = {}
    for flow, scenario in scenarios.items():
        runs = _moetuner_runs(scenario)
        tick(1)
        ours[flow] = {k: [] for k in MOETUNER}
        for c in (one, two):
            base, ilp = runs[c, "contiguous"], runs[c, "ilp"]
            ours[flow]["e2e speedup"].append(base[0] / ilp[0])
            for i, k in ((1, "a2a tail"), (2, "a2a mean"), (3, "token-processing tail")):
                ours[flow][k].append(ilp[i] / base[i] - 1)
            shares[flow, c] = base[4]
    print("\nthe shipped scenarios, prefill of 4096-token prompts, 4096 tokens per GPU; ilp vs contiguous "
          "(standard: moetuner_standard.yaml, coherent: moetuner_coherent.yaml):")
    print(f"{'':22s} {'---------- 1 node ----------':>30s} {'---------- 2 nodes ---------':>30s}")
    print(f"{'':22s} {'paper':>8s} {'standard':>10s} {'coherent':>10s} {'paper':>8s} {'standard':>10s} "
          f"{'coherent':>10s}")
    for k, paper in MOETUNER.items():
        fmt = (lambda v: f"{v:.3f}x") if k == "e2e speedup" else (lambda v: f"{v * 100:+.1f}%")
        cells = [f"{fmt(paper[i]):>8s} {fmt(ours['standard'][k][i]):>10s} {fmt(ours['coherent'][k][i]):>10s}"
                 for i in (0, 1)]
        print(f"{k:22s} {cells[0]} {cells[1]}")
    # the paper's MoE share of step time: e2e saving = share x MoE-layer saving (MoE time ~ token-processing
    # tail + a2a tail)
    implied = []
    for i in (0, 1):
        saving = 1 - 1 / MOETUNER["e2e speedup"][i]
        implied.append(saving / (-(MOETUNER["a2a tail"][i] + MOETUNER["token-processing tail"][i]) / 2))
    print(f"{'MoE share of the step':22s} {implied[0] * 100:7.0f}% {shares['standard', one] * 100:9.0f}% "
          f"{shares['coherent', one] * 100:9.0f}% {implied[1] * 100:7.0f}% {shares['standard', two] * 100:9.0f}% "
          f"{shares['coherent', two] * 100:9.0f}%   (paper: implied by its gains; moesim: under contiguous)")
    floor = 1 / (1 - MOETUNER_A2A_SHARE * -MOETUNER["a2a tail"][0])
    print(f"the paper's own figures pull apart: all-to-all at {MOETUNER_A2A_SHARE:.1%} of the time (its motivation), "
          f"cut by {-MOETUNER['a2a tail'][0]:.1%}, alone gives {floor:.3f}x on one node, above its "
          f"{MOETUNER['e2e speedup'][0]:.3f}x: the share was likely measured on another configuration")

    # The paper gives neither its batch nor its sequence lengths nor (in the text available here) whether its
    # modified Megatron sends tokens home after every layer, so regimes and dataflows are swept: the end-to-end
    # gain is the MoE-layer gain diluted by the attention's share of the step, which grows in decode.
    print("\nend-to-end speedup by regime and dataflow (2 nodes under both readings of 'ConnectX-7 800 Gb/s'):")
    print(f"{'dataflow, regime':46s} {'1 node':>7s} {'2 nodes, 2 NICs/node':>21s} {'NIC per GPU':>12s}  "
          f"{'MoE share 1/2 nodes':>19s}  {'a2a share 1/2 nodes':>19s}  direction")
    print(f"{'paper (Figure 1)':46s} {MOETUNER['e2e speedup'][0]:6.3f}x {MOETUNER['e2e speedup'][1]:20.3f}x "
          f"{'':>12s}  {f'~{implied[0]:.0%} / ~{implied[1]:.0%}':>19s}  {f'{MOETUNER_A2A_SHARE:.1%} / -':>19s}"
          "  2 nodes > 1 node")
    regimes = [("prefill, 4096-token prompts", {}),
               *[(f"decode, KV 2048, {t} tokens/GPU", {"kv_len": 2048, "tokens_per_gpu": t}) for t in (64, 256, 1024)]]
    verdicts = []
    for flow, scenario in scenarios.items():
        for label, kw in regimes:
            speed, share, a2a = {}, {}, {}
            for nics in ("keep", None):
                r = _moetuner_runs(_variant(scenario, nics_per_node=nics, **kw))
                tick(1)
                for c in (one, two):
                    speed[c, nics] = r[c, "contiguous"][0] / r[c, "ilp"][0]
                    share[c, nics] = r[c, "contiguous"][4]
                    a2a[c, nics] = r[c, "contiguous"][5]
            same = tuple(speed[two, n] > speed[one, "keep"] for n in ("keep", None))
            verdict = {(True, True): "reproduced", (False, False): "NOT reproduced"}.get(
                same, "2 NICs/node only" if same[0] else "NIC per GPU only")
            verdicts.append(verdict)
            shares_txt = f"{share[one, 'keep'] * 100:.0f}% / {share[two, 'keep'] * 100:.0f}%"
            a2a_txt = f"{a2a[one, 'keep'] * 100:.0f}% / {a2a[two, 'keep'] * 100:.0f}%"
            print(f"{flow + ', ' + label:46s} {speed[one, 'keep']:6.3f}x {speed[two, 'keep']:20.3f}x "
                  f"{speed[two, None]:11.3f}x  {shares_txt:>19s}  {a2a_txt:>19s}  {verdict}")
    print(f"direction reproduced under both NIC readings in {verdicts.count('reproduced')} of {len(verdicts)} "
          "regimes; which one the paper ran is not known here")


def _scripts(*names: str) -> Callable[[argparse.Namespace, Callable[[int], object]], None]:
    """A section that runs the compare scripts under benchmarks/validation/ (``tick(1)`` after each)."""
    def run(args: argparse.Namespace, tick: Callable[[int], object]) -> None:
        for name in names:
            runpy.run_path(str(ROOT / "benchmarks" / "validation" / name), run_name="__main__")
            tick(1)
    return run


def _once(fn: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace, Callable[[int], object]], None]:
    def run(args: argparse.Namespace, tick: Callable[[int], object]) -> None:
        fn(args)
        tick(1)
    return run


# (header, what runs it, the steps it tells the progress bar of)
SECTIONS: list[tuple[str, Callable[[argparse.Namespace, Callable[[int], object]], None], int]] = [
    ("1. micro-benchmarks, 2x H200, held-out points", _once(lambda a: micro_benchmarks(a.shared)), 1),
    ("2. expert-parallel MoE layer, 2x H200, three placements; whole layers on one H200 / H100",
     _scripts("ep_layer/compare.py"), 1),
    ("3. expert FFN, one H100: the dgx-h100 preset fitted on two thirds; the H200's efficiencies",
     _once(lambda a: ffn_h100()), 1),
    ("4. DeepEP's published tables, h800 preset (not fitted to these)", _once(lambda a: deepep()), 1),
    ("5. a second 2x H200 host (not fitted to the shipped preset)",
     _scripts("h200_host2/compare.py", "a2a_paths/compare.py"), 2),
    ("6. MoETuner's single- vs multi-node gains (scenarios/moetuner_{standard,coherent}.yaml)",
     lambda a, tick: moetuner(tick), MOETUNER_STEPS),
    ("7. attention core, one H100 and one H200 (fitted on one shape, error on the other)",
     _scripts("attention_h100/compare.py"), 1),
    ("8. the whole MoE layer's kernel pipeline, one H200, 8 model shapes (moesim bench moe)",
     _scripts("moe_h200/compare.py"), 1),
    ("9. multi-layer MoE blocks with real DeepSeek-V2-Lite routing, one H200 (not fitted to these)",
     _scripts("moe_h200/compare_block.py"), 1),
    ("10. prefill attention kernels forward and backward (FlashAttention-2, cuDNN), and DeepSeek-V3's whole attention "
     "block, one H200", _scripts("attention_h200/compare_kernels.py", "attention_h200/compare_mla_block.py"), 2),
    ("11. kernels and layers under sustained load (the power cap), alone and beside a 24-SM all-to-all, one H200",
     _scripts("power_h200/compare.py"), 1),
    ("12. prefill after a cached prefix (cuDNN, FlashAttention-2; GQA, MLA and its latent decompression), one H200 "
     "(not fitted to these)", _scripts("prefix_h200/compare.py"), 1),
]


class _LinesAboveBar:
    """stdout while a progress bar shows on stderr: whole lines only, each written (and flushed) with the bar
    cleared first and drawn again below it when both streams go to one terminal, so a line never lands after
    the bar's text. What is written is exactly what print() gave."""

    def __init__(self, out: TextIO, bar: Any) -> None:
        self.out, self.bar, self.pending = out, bar, ""
        self.mixed = out.isatty() and sys.stderr.isatty() and not bar.disable

    def write(self, text: str) -> int:
        self.pending += text
        if "\n" in self.pending:
            lines, _, self.pending = self.pending.rpartition("\n")
            if self.mixed:
                self.bar.clear()
            self.out.write(lines + "\n")
            self.out.flush()
            if self.mixed:
                self.bar.refresh()
        return len(text)

    def flush(self) -> None:
        self.out.flush()

    def close_line(self) -> None:
        if self.pending:
            self.out.write(self.pending)
            self.pending = ""
        self.out.flush()


def main() -> None:
    from contextlib import redirect_stdout

    from tqdm import tqdm

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar on stderr")
    args = ap.parse_args()
    out = sys.stdout
    with tqdm(total=sum(steps for _, _, steps in SECTIONS), desc="fidelity", unit="step", disable=args.quiet,
              leave=False) as bar:
        lines = _LinesAboveBar(out, bar)
        with redirect_stdout(lines):
            for i, (header, run, _) in enumerate(SECTIONS):
                bar.set_postfix_str(f"section {header.split('.')[0]}", refresh=False)
                print(("\n" if i else "") + f"== {header} ==")
                run(args, bar.update)
        lines.close_line()


if __name__ == "__main__":
    main()
