"""The hgx-h200 preset (fitted on ../shared/calibration, another host) against a2a_paths.json (this folder).

    python benchmarks/validation/a2a_paths/compare.py

Each measured case is replayed as one collective through moesim's fabric; the error is per case and size.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moesim.calibration.fit import predict_transfer
from moesim.hardware import ClusterSpec, preset

HERE = Path(__file__).resolve().parent


def matrices(case: str, b: float, w: int = 2) -> np.ndarray:
    m = np.zeros((w, w))
    if case in ("equal_no_splits", "equal_explicit_splits"):
        m[:] = b
    elif case == "one_direction":
        m[0, 1:] = b
    else:  # both directions, no self copy
        m[:] = b
        np.fill_diagonal(m, 0.0)
    return m


def main() -> None:
    data = json.loads((HERE / "a2a_paths.json").read_text())
    spec = ClusterSpec(**preset("hgx-h200"))
    cases = [k for k in data["ms_slowest_rank_median"][0] if k != "bytes_per_pair"]
    print(f"{data['device']} x{data['world']}, torch {data['torch']}, NCCL {data['nccl']}; ms, slowest rank")
    print(f"{'bytes/pair':>11s} " + " ".join(f"{c[:22]:>22s}" for c in cases))
    errors = []
    for row in data["ms_slowest_rank_median"]:
        b = row["bytes_per_pair"]
        cells = []
        for c in cases:
            pred = float(predict_transfer(spec, matrices(c, b, data["world"])).max())
            err = pred / row[c] - 1
            errors.append((b, err))
            cells.append(f"{row[c]:.3f}/{pred:.3f} {err * 100:+5.0f}%")
        print(f"{b:11d} " + " ".join(f"{c:>22s}" for c in cells))
    for label, keep in (("< 1 MiB", lambda b: b < 2**20), (">= 1 MiB", lambda b: b >= 2**20)):
        e = np.abs([err for b, err in errors if keep(b)])
        print(f"{label:9s} n={e.size:2d} median |error| {np.median(e) * 100:5.1f}%  max {e.max() * 100:5.1f}%")


if __name__ == "__main__":
    main()
