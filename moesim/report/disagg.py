"""Outputs of a disaggregated deployment (:mod:`moesim.study.disagg`): each pool's run folder and the combined
figures.

``prefill/`` and ``decode/`` are each what ``moesim run`` writes for a scenario (:func:`moesim.report.files.
write_outputs`); ``disaggregation.json`` holds the request mix, each pool's serving figures and the combined ones
(:func:`moesim.metrics.serving.disaggregated_figures`). All are written at once (:func:`moesim.fileio.
output_folder`): the older outputs or the new ones, never a mix.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from moesim.fileio import FolderKind, output_folder, starts_with
from moesim.report.files import RUN_OUTPUTS, _round, write_outputs
from moesim.report.serving import SERVING_OUTPUTS
from moesim.study.disagg import DisaggResult

DISAGG_FORMAT = "moesim.disaggregation/1"
DISAGG_OUTPUTS = FolderKind("moesim run's outputs (disaggregated)",
                            files={"disaggregation.json": starts_with(f'{{\n "format": "{DISAGG_FORMAT}"'.encode())},
                            folders={"prefill": RUN_OUTPUTS, "decode": RUN_OUTPUTS},
                            # moesim serving --pool's default folders: carried over when a run replaces the folder
                            keep={"serving-prefill": SERVING_OUTPUTS, "serving-decode": SERVING_OUTPUTS})


def disagg_json(result: DisaggResult) -> dict[str, Any]:
    sc = result.scenario
    pools = {}
    for name, run in result.served.items():
        serving = run.metrics.serving
        assert serving is not None
        pools[name] = {"cluster": run.cluster.name, "ep": run.cluster.ep, "tp": run.cluster.tp, "placement": run.name,
                       "serving": serving.to_json()}
    return _round({"format": DISAGG_FORMAT, "scenario": sc.name, "requests": asdict(sc.mix) if sc.mix else None,
                   "pools": pools, "combined": result.figures})


def disagg_lines(result: DisaggResult) -> list[str]:
    """The combined figures in a few lines: each pool's throughput per node and latency, then what the request mix
    needs of them."""
    f = result.figures
    lines = [f"prefill pool ({f['prefill_nodes']:g} nodes, {f['prefill_placement']}): "
             f"{f['input_tokens_per_s_per_prefill_node']:,.0f} input tok/s per node, "
             f"{f['prefill_forward_ms']:.1f} ms per forward (TTFT at least)",
             f"decode pool ({f['decode_nodes']:g} nodes, {f['decode_placement']}): "
             f"{f['output_tokens_per_s_per_decode_node']:,.0f} output tok/s per node, TPOT {f['tpot_ms']:.2f} ms "
             f"({f['output_tokens_per_s_per_request']:.1f} tok/s per request)"]
    if "needed_nodes_ratio" not in f:
        lines.append(f"prefill:decode nodes {f['nodes_ratio']:.3f} as sized (give 'requests' for the ratio a request "
                     "mix needs)")
        return lines
    lines += [
        f"requests of {f['input_tokens_per_request']:,.0f} input tokens ({f['cache_hit_rate']:.1%} cache hits: "
        f"{f['input_tokens_per_s_per_prefill_node_with_cache_hits']:,.0f} input tok/s per prefill node counting them)"
        f" and {f['output_tokens_per_request']:,.0f} output tokens need prefill:decode nodes "
        f"{f['needed_nodes_ratio']:.3f} (as sized: {f['nodes_ratio']:.3f})",
        f"as sized, the pools sustain {f['requests_per_s']:,.1f} requests/s, limited by the {f['limited_by']} pool "
        f"(prefill {f['requests_per_s_prefill_pool']:,.1f}, decode {f['requests_per_s_decode_pool']:,.1f}); sized at "
        f"the needed ratio: {f['output_tokens_per_s_per_node_balanced']:,.0f} output tok/s per node of both pools"]
    return lines


def write_disaggregated(result: DisaggResult, out_dir: str | os.PathLike[str], *,
                        plots_on: bool = True) -> list[Path]:
    """``prefill/``, ``decode/`` and disaggregation.json into ``out_dir``, all or nothing; returns the paths."""
    out = Path(out_dir)
    with output_folder(out, DISAGG_OUTPUTS) as tmp:
        for name, pool in result.pools.items():
            write_outputs(pool, tmp / name, plots_on=plots_on)
        (tmp / "disaggregation.json").write_text(json.dumps(disagg_json(result), indent=1) + "\n")
        written = sorted(p.relative_to(tmp) for p in tmp.rglob("*") if p.is_file())
    return [out / rel for rel in written]
