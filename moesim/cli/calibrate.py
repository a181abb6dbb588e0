"""``moesim calibrate``: fit a preset's hardware parameters to ``moesim bench`` JSON, write a cluster YAML.

Prints the fitted values and the median / max relative error on fitted and held-out points per group; the
YAML's header repeats the held-out errors, so the file says how far to trust it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from moesim.cli.common import progress_bar
from moesim.errors import InputError
from moesim.fileio import atomic_write, check_output_file, starts_with
from moesim.hardware.presets import preset
from moesim.loaders import dump_yaml

if TYPE_CHECKING:
    from moesim.calibration import BenchData, Calibration

CALIBRATED_HEADER = b"# moesim calibrate "  # the first line of every cluster YAML this command writes

# GPU names as torch.cuda.get_device_name reports them -> the preset that models that GPU
_DEVICE_PRESETS = (("GB200", "gb200-nvl72"), ("B200", "gb200-nvl72"), ("H800", "h800"), ("H200", "hgx-h200"),
                   ("H100", "dgx-h100"), ("A100", "dgx-a100"))

# point groups whose errors are printed (and, held out, written into the YAML's header): label -> point kinds
_ERROR_GROUPS = {"network": ("a2a-uniform", "a2a-skew", "p2p"), "expert FFN": ("ffn",),
                 "attention core": ("attention",), "attention projections": ("projection",),
                 "MoE layer (torch_reference), decode": ("moe-decode",),
                 "MoE layer (torch_reference), prefill": ("moe-prefill",),
                 "MoE layer (torch_reference) vs the median of its runs, decode": ("moe-median-decode",),
                 "MoE layer (torch_reference) vs the median of its runs, prefill": ("moe-median-prefill",),
                 "our fused_moe stand-in, eager, decode": ("moe-eager-fused-decode",),
                 "our fused_moe stand-in, eager, prefill": ("moe-eager-fused-prefill",),
                 "our fused_moe stand-in in CUDA graphs, decode": ("moe-graph-decode",),
                 "our fused_moe stand-in in CUDA graphs, prefill": ("moe-graph-prefill",),
                 "vLLM fused_moe from a kernel table, decode": ("moe-table-fused-decode",),
                 "vLLM fused_moe from a kernel table, prefill": ("moe-table-fused-prefill",),
                 "DeepEP+DeepGEMM from a kernel table, decode": ("moe-table-deepgemm-decode",),
                 "DeepEP+DeepGEMM from a kernel table, prefill": ("moe-table-deepgemm-prefill",),
                 "plain GEMMs": ("gemm",), "plain GEMMs in CUDA graphs": ("gemm-graph",),
                 "expert GEMMs' backward, from the measured forward": ("train-bwd-ratio",),
                 "expert GEMMs' backward, from the modelled forward": ("train-bwd",),
                 "all-gather and reduce-scatter (not fitted)": ("all_gather", "reduce_scatter"),
                 "FA-2 prefill forward (not fitted here)": ("attention-fa2-fwd",),
                 "FA-2 prefill backward": ("attention-fa2-bwd",),
                 "cuDNN attention prefill forward": ("attention-cudnn-fwd",),
                 "cuDNN attention prefill backward": ("attention-cudnn-bwd",),
                 "tensor-core kernels back to back (sustained clock)": ("sustained",),
                 "HBM copy and a whole layer back to back (not fitted)": ("sustained-check",)}


def _rounded(value: Any, digits: int = 4) -> Any:
    """Floats to ``digits`` significant digits, recursively (fitted values carry no more)."""
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    return value


def _preset_of_device(device: str) -> str | None:
    return next((name for key, name in _DEVICE_PRESETS if key in device.upper()), None)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from moesim.calibration import load_bench
    from moesim.calibration.fit import calibration_steps
    from moesim.calibration.schema import calibrate_checked

    check_output_file(args.output, owned=starts_with(CALIBRATED_HEADER), what="a cluster YAML moesim calibrate wrote")
    data = load_bench(args.bench)
    if not (data.a2a or data.ffn or data.attention or data.moe or data.moe_graphs or data.moe_table or data.gemms
            or data.train_gemms or data.attention_kernels or data.sustained):
        raise InputError("no all-to-all, expert-FFN, attention-core, MoE-layer or training points in the benchmark "
                         "files")
    devices = ", ".join(sorted(data.devices))
    name = _choose_preset(args.preset, data, devices)
    with progress_bar(calibration_steps(data), f"fitting {name}", "iteration", quiet=args.quiet) as bar:
        result = calibrate_checked(data, name, name=args.name, progress=bar.update)
    _print_fit(result, data, name, devices)
    out = Path(args.output)
    _write_cluster_yaml(result, out, name, args.bench)
    print(f"wrote {out}: use it in a scenario as clusters: [{{file: {out}, nodes: N}}]")
    return 0


def _choose_preset(asked: str | None, data: BenchData, devices: str) -> str:
    """The preset to fit: ``--preset`` if given, else the one that models the measured GPU (else hgx-h200)."""
    matched = {_preset_of_device(d) for d in data.devices}
    guess = matched.pop() if len(matched) == 1 else None
    name = asked
    if name is None:
        name = guess or "hgx-h200"
        print(f"fitting the {name} preset's parameters" + (
            f" (measured on {devices})" if guess else
            f": no single preset matches the devices measured ({devices}); choose with --preset"))
    try:
        preset(name)
    except KeyError as exc:
        raise InputError(str(exc.args[0]), field="--preset") from None
    if guess and guess != name:
        print(f"note: measured on {devices}, which the {guess} preset models; fitting "
              f"{name}'s parameters as asked (those not fitted stay {name}'s)")
    return name


def _print_fit(result: Calibration, data: BenchData, name: str, devices: str) -> None:
    """The points used, the fitted values, and per group the errors on fitted and held-out points."""
    import numpy as np

    timings = sorted({p.timing for p in data.attention})
    print(f"calibrated {name} on {len(data.a2a)} all-to-all, {len(data.p2p)} p2p, {len(data.ffn)} FFN, "
          f"{len(data.attention)} attention-core{' (' + ' and '.join(timings) + ')' if timings else ''}, "
          f"{len(data.projections)} attention-projection, {len(data.moe)} MoE-layer, {len(data.moe_graphs)} "
          f"MoE-layer-in-CUDA-graphs, {len(data.moe_table)} kernel-table MoE-layer and {len(data.gemms)} plain-GEMM "
          f"points from {devices}")
    for key, value in result.fitted.items():
        print(f"  {key:26s} {value:10.4g}")
    print(f"{'points':46s} {'n':>4s} {'median |err|':>13s} {'max |err|':>10s}")
    steps = tuple(sorted({p.kind for p in result.predictions if p.kind.startswith("moe-step:")}))
    graph_steps = tuple(sorted({p.kind for p in result.predictions if p.kind.startswith("moe-graph-step:")}))
    for label, kinds in {**_ERROR_GROUPS, "MoE pipeline steps": steps,
                         "MoE pipeline steps in CUDA graphs": graph_steps}.items():
        for held in (False, True):
            e = result.errors(held, kinds)
            if e.size:
                print(f"{label + (' held-out' if held else ' fit'):46s} {e.size:4d} {np.median(e) * 100:12.1f}% "
                      f"{e.max() * 100:9.1f}%")


def _write_cluster_yaml(result: Calibration, out: Path, name: str, bench: list[str]) -> None:
    """The calibrated cluster as YAML (the preset it starts from and the fitted sections), atomically."""
    import numpy as np

    spec = _rounded(result.spec.model_dump(mode="json"))
    doc = {"preset": name, **{k: spec[k] for k in ("name", "gpu", "nvlink", "a2a_launch_us", "a2a_self_launch_us")}}
    held = [f"{label} {np.median(e) * 100:.1f}%" for label, kinds in _ERROR_GROUPS.items()
            if (e := result.errors(True, kinds)).size]
    command = " ".join(f"{' '.join(bench)} --preset {name}".split())  # one comment line, whatever the paths hold
    header = (f"{CALIBRATED_HEADER.decode()}{command}\n"
              f"# held-out median |error|: {', '.join(held) or 'no held-out points'}\n")

    def write(fh: IO[Any]) -> None:
        fh.write(header + dump_yaml(doc, sort_keys=False))

    atomic_write(out, write)


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``moesim calibrate`` on the top-level subparsers."""
    cal = sub.add_parser("calibrate", help="fit the hardware model to micro-benchmark JSON and write a cluster YAML")
    cal.add_argument("bench", nargs="+", help="a2a_<world>.json, expert_ffn*.json and/or attention*.json files")
    cal.add_argument("--preset", help="preset whose parameters are fitted (default: the one that models the GPU "
                     "named in the benchmark files, else hgx-h200)")
    cal.add_argument("--name", help="name of the calibrated cluster")
    cal.add_argument("-o", "--output", required=True, help="cluster YAML to write")
    cal.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    cal.set_defaults(func=_cmd_calibrate)
