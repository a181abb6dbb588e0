"""Does planning with the engine's own cost model pay? ``ilp`` on the DeepSeek-V3 scenario, planned with the
shared costs (moesim/sim/costs.py: the kernel pipeline's marginal cost per token-expert pair at the workload's
operating point) and with the former estimate (6 d f / tp / achieved FLOP/s), both simulated by the same engine.
Also the ILP's objective beside what it estimates, the simulated sum over layers of the slowest rank's expert
time (its compute term; plus the dispatch term when the objective has one).

    python benchmarks/bench_shared_costs.py [scenario.yaml]      # about 4 minutes on 2 cores
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from moesim.metrics.summary import summarize
from moesim.placement.registry import make_placement
from moesim.study import load_scenario, prepare
from moesim.study.config import PlacementEntry

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "scenarios" / "deepseek_v3_64gpu.yaml"
    sc = load_scenario(path)
    t0 = time.perf_counter()
    plan = prepare(sc, placements=[PlacementEntry(name="contiguous", policy="contiguous")])
    cp = plan.clusters[0]
    assert cp.problem is not None and cp.workload is not None and cp.costs is not None
    m, spec = sc.model, cp.cluster.spec
    former = 6.0 * m.d_model * m.d_ff / cp.cluster.tp / spec.gpu.flops_per_s
    print(f"{path.name}: prepared in {time.perf_counter() - t0:.0f} s; compute per token-expert pair: shared "
          f"{cp.costs.compute_s_per_pair * 1e9:.1f} ns, former {former * 1e9:.1f} ns")
    sim = plan.simulation(cp)
    work = cp.workload
    former_problem = replace(cp.problem, costs=replace(cp.costs, compute_s_per_pair=former))
    for label, problem in (("shared costs", cp.problem), ("former costs", former_problem)):
        t0 = time.perf_counter()
        placement = make_placement("ilp", problem)
        solve = time.perf_counter() - t0
        rec = sim.run(work.trace, work.layout, placement, name=f"ilp ({label})")
        e2e = summarize(rec).e2e_ms["mean"]
        tail = float((rec.gpu["t_compute_end"] - rec.gpu["t_compute_start"]).max(axis=2).sum(axis=1).mean())
        info = placement.info
        profile = work.profile.num_tokens / (work.trace.num_tokens / work.layout.num_batches)
        predicted = cp.costs.predicted_batch_s(info["objective"], profile, m.num_layers,
                                               dispatch_counted=bool(info.get("dispatch_objective"))) * 1e3
        print(f"  ilp planned on {label}: simulated e2e {e2e:8.2f} ms per batch, its model predicts {predicted:8.2f} "
              f"({(predicted / e2e - 1) * 100:+.1f}%); objective {info['objective'] * 1e3:.2f} ms (compute "
              f"{info.get('load_objective', 0) * 1e3:.2f}, dispatch {info.get('dispatch_objective', 0) * 1e3:.2f}) vs "
              f"simulated expert tail {tail * 1e3:.2f} ms; gap {info.get('gap', float('nan')) * 100:.2f}%; "
              f"solved in {solve:.0f} s")
    base = summarize(sim.run(work.trace, work.layout, cp.placement("contiguous"))).e2e_ms["mean"]
    print(f"  contiguous: simulated e2e {base:8.2f} ms per batch")
    np.set_printoptions(precision=3)


if __name__ == "__main__":
    main()
