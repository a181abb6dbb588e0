"""The sustained clock against what was measured on the H200: kernels back to back, a whole prefill layer's compute
alone and beside a stand-in communication kernel on 24 SMs.

    python benchmarks/validation/power_h200/compare.py

Measured: ``sustained.json`` and ``sustained_run2.json`` (``measure_sustained.py``; the second run adds a fused
prefill layer and a decode layer, each with its parts timed alone) and ``interference.json``
(``measure_interference.py``).
The model: a tensor-core-bound kernel under sustained load runs at ``gpu.sustained_clock`` of its isolated rate
(fitted on the three tensor-core kernels of ``sustained.json``; everything else here is held out, the second run
whole), a memory-bound one
at its isolated rate; beside an all-to-all kernel holding ``comm_sms`` SMs a compute step is slowed further by
``sms / (sms - comm_sms)`` (moesim.sim.overlap). The fused layer's isolated time is its first chunk (two layers back
to back from an idle GPU); the model counts the whole layer as tensor-core bound (its norms and SwiGLUs are under
a tenth of it), an upper bound.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from moesim.calibration import load_bench  # noqa: E402
from moesim.calibration.sustained import predict_steady  # noqa: E402
from moesim.hardware import ClusterSpec, preset  # noqa: E402


def main() -> None:
    gpu = ClusterSpec(**preset("hgx-h200")).gpu
    clock = gpu.sustained_clock
    print(f"gpu.sustained_clock {clock:.4f} (hgx-h200): tensor-core work back to back at {1 / clock:.3f}x its "
          "isolated time")
    for run, fitted in (("sustained.json", True), ("sustained_run2.json", False)):
        print(f"\n{run + ': kernel back to back':48s} {'isolated':>9s} {'steady':>9s} {'ratio':>6s} {'model':>6s} "
              f"{'error':>7s}")
        _kernels(HERE / run, clock, fitted)
    _interference(clock)


def _kernels(path: Path, clock: float, fitted: bool) -> None:
    names = {"layer": "eager layer (boost)", "fused_layer": "fused layer", "decode_layer": "decode layer (boost)"}
    for p in load_bench([path]).sustained:
        pred = predict_steady(p, clock)
        tag = "fitted" if fitted and p.tensor_share == 1.0 and p.kernel != "fused_layer" else "held out"
        name = names.get(p.kernel, p.kernel)
        print(f"{name + ' (' + tag + f', tensor share {p.tensor_share:.0%})':48s} {p.burst_ms:8.3f}  "
              f"{p.steady_ms:8.3f}  {p.steady_ms / p.burst_ms:5.3f}  {pred / p.burst_ms:5.3f}  "
              f"{pred / p.steady_ms - 1:+6.1%}")


def _interference(clock: float) -> None:
    doc = json.loads((HERE / "interference.json").read_text())
    sms, comm = doc["sms"], doc["comm_sms"]
    slow = sms / (sms - comm)
    cases = {(c["kernel"], c["case"]): c for c in doc["cases"]}
    print(f"\nbeside a stand-in all-to-all kernel on {comm} of {sms} SMs (held out; x isolated time)")
    print(f"{'kernel, case':48s} {'measured':>9s} {'model':>9s} {'error':>7s}")
    for kernel in ("layer", "fp8_gemm"):  # the layer here: fused, its inputs quantised beforehand
        isolated = cases[(kernel, "alone")]["first_ms"]
        for case, model in (("alone", 1 / clock), ("spin", slow / clock), ("copy", slow / clock)):
            got = cases[(kernel, case)]["steady_ms"] / isolated
            print(f"{kernel + ', ' + case:48s} {got:8.3f}x {model:8.3f}x {model / got - 1:+6.1%}")
    print("\nspin: the stand-in polls on arithmetic and touches no memory; copy: it streams HBM as fast as it can. "
          "With cuBLAS told to leave the SMs free (SM carveout) the layer beside the spinning kernel stalled "
          f"({cases[('layer', 'spin+carveout')]['steady_ms']:.0f} ms a layer): not used.")


if __name__ == "__main__":
    main()
