"""Command line: ``moesim run | validate | place | cluster | bench | calibrate | trace``.

Bad input of any kind prints one line naming the file and field, and exits with status 2, before any
output file is written.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import yaml

from moesim.errors import InputError
from moesim.fileio import atomic_write
from moesim.hardware.presets import deep_merge, preset, preset_names
from moesim.hardware.spec import ClusterSpec
from moesim.hardware.topology import build_topology


def _cmd_run(args: argparse.Namespace) -> int:
    from moesim.report.files import write_outputs
    from moesim.report.text import format_report, solve_summary
    from moesim.study import load_scenario, run_study

    scenario = load_scenario(args.scenario)
    out = Path(args.output) if args.output else scenario.output
    t0 = time.perf_counter()
    result = run_study(scenario, progress=False if args.quiet else None)
    wall = time.perf_counter() - t0
    print(format_report(result.metrics(), scenario.baseline))
    solves = [(r, solve_summary(r.placement.info)) for r in result.runs]
    if any(line for _, line in solves):
        print("\nOptimising placements (gap: how far above the proven lower bound; see docs/ilp.md):")
        print("\n".join(f"  {r.cluster.name} / {r.name}: {line}" for r, line in solves if line))
    if result.rebalance:  # the scenario's rebalance section (moesim.study.rebalance)
        from moesim.report.files import rebalance_infos
        from moesim.report.rebalance import verdict as rebalance_verdict

        infos = rebalance_infos(result)
        print("\nRebalancing:\n" + "\n".join(f"  {rebalance_verdict(r, infos.get(r.cluster))}" for r in result.rebalance))
    written = write_outputs(result, out, plots_on=not args.no_plots)
    print(f"\n{len(result.runs)} runs simulated in {wall:.1f} s; results in {out}/ "
          f"({', '.join(p.name for p in written if p.parent == out)})")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from moesim.study import load_scenario, prepare

    scenario = load_scenario(args.scenario)
    prepare(scenario, build=False)
    names = ", ".join(f"{c.name} ({c.spec.num_gpus} GPUs, EP{c.ep}" + (f" x TP{c.tp})" if c.tp > 1 else ")")
                      for c in scenario.clusters)
    print(f"{args.scenario}: ok - {len(scenario.clusters)} cluster(s): {names}; "
          f"{len(scenario.placements)} placement(s); baseline {scenario.baseline}")
    return 0


def _cmd_place(args: argparse.Namespace) -> int:
    from moesim.placement.format import save_placement
    from moesim.placement.registry import policy_names
    from moesim.report.text import solve_summary
    from moesim.study import load_scenario, prepare
    from moesim.study.config import PlacementEntry

    if args.list:
        print("\n".join(policy_names()))
        return 0
    if not args.scenario or not args.policy or not args.output:
        raise InputError("moesim place needs SCENARIO, --policy and -o (or --list)")
    scenario = load_scenario(args.scenario)
    options = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"--set needs KEY=VALUE, got {item!r}")
        options[key] = yaml.safe_load(value)
    if args.policy not in policy_names():
        raise InputError(f"unknown policy {args.policy!r}; valid: {', '.join(policy_names())}", field="--policy")
    entry = PlacementEntry(name=args.policy, policy=args.policy, options=options)
    plan = prepare(scenario, placements=[entry], where={entry.name: f"--policy {args.policy}"},
                   clusters=[args.cluster or scenario.clusters[0].name], cluster_field="--cluster")
    cp = plan.clusters[0]
    placement = cp.placement(entry.name)
    save_placement(placement, args.output)
    print(f"wrote {args.output}: {args.policy} for {cp.cluster.name} (EP{cp.cluster.ep}), "
          f"{placement.num_layers} layers x {placement.num_experts} experts")
    solved = solve_summary(placement.info)
    if solved:
        print(f"  {solved}")
    return 0


def _cluster_spec(name: str, overrides: list[str]) -> ClusterSpec:
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise InputError(f"cannot read cluster file ({' '.join(str(exc).split())})", source=name) from None
        if not isinstance(raw, dict):
            raise InputError("a cluster file must be a YAML mapping", source=name)
        base: dict = {}
        if "preset" in raw:
            try:
                base = preset(str(raw.pop("preset")))
            except KeyError as exc:
                raise InputError(str(exc.args[0]), source=name, field="preset") from None
        raw = deep_merge(base, raw)
    else:
        try:
            raw = preset(name)
        except KeyError as exc:
            raise InputError(str(exc.args[0])) from None
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"--set needs KEY=VALUE, got {item!r}")
        node: dict = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    from moesim.study.config import _pydantic_error  # one formatter for every config error
    from pydantic import ValidationError

    try:
        return ClusterSpec(**raw)
    except ValidationError as exc:
        raise _pydantic_error(exc, name, "") from None


def _nics(spec: ClusterSpec) -> str:
    """'one 400 Gb/s NIC per GPU' or '2 x 400 Gb/s NICs per node, each shared by 4 GPUs'."""
    rate = f"{spec.network.nic_Gbps:.0f} Gb/s"
    if spec.gpus_per_nic == 1:
        return f"one {rate} NIC per GPU"
    return f"{spec.nics_per_node_effective} x {rate} NICs per node, each shared by {spec.gpus_per_nic} GPUs"


def _cmd_cluster(args: argparse.Namespace) -> int:
    if args.action == "list":
        for name in preset_names():
            spec = ClusterSpec(**preset(name))
            print(f"{name:12s} {spec.gpus_per_node} x {spec.gpu.name}, {spec.nvlink.name} "
                  f"{spec.nvlink.GBps:.0f} GB/s, {_nics(spec)}")
        return 0
    if not args.name:
        raise InputError("moesim cluster show needs a preset name or a cluster YAML file")
    spec = _cluster_spec(args.name, args.set or [])
    topo = build_topology(spec)
    g, nv, net = spec.gpu, spec.nvlink, spec.network
    kinds: dict[str, int] = {}
    for k in topo.link_kind:
        kinds[k] = kinds.get(k, 0) + 1
    lines = [
        f"{spec.name}: {spec.nodes} node(s) x {spec.gpus_per_node} GPUs = {spec.num_gpus} GPUs",
        f"  GPU       {g.name}: {g.bf16_tflops:.0f} TFLOP/s bf16 dense (x{g.compute_efficiency} achieved), "
        f"{g.hbm_GBps:.0f} GB/s HBM (x{g.hbm_efficiency}), {g.memory_GB:.0f} GB, {g.ffn_overhead_us:.0f} us per FFN launch",
        f"  NVLink    {nv.name}: {nv.GBps:.0f} GB/s per GPU per direction (x{nv.efficiency} = "
        f"{nv.bytes_per_s / 1e9:.0f} GB/s), {nv.latency_us} us",
        f"  network   {_nics(spec)} (x{net.nic_efficiency} = {net.nic_bytes_per_s / 1e9:.1f} GB/s each), "
        f"{net.latency_us} us; {'rail-optimised leaves' if net.rail_optimized else f'{net.nodes_per_leaf} nodes per leaf'}, "
        f"oversubscription {net.oversubscription}:1; PCIe {net.pcie_GBps:.0f} GB/s",
        f"  all-to-all launch {spec.a2a_launch_us} us; expert weights may use {spec.expert_memory_fraction:.0%} of HBM",
        f"  graph     {topo.graph.number_of_nodes()} nodes, {topo.num_links} directed links "
        + "(" + ", ".join(f"{v} {k}" for k, v in sorted(kinds.items())) + ")",
    ]
    if spec.num_gpus > 1:
        far = spec.num_gpus - 1
        path = " -> ".join([topo.link_names[i].split("->")[0] for i in topo.path(0, far)] + [f"gpu{far}"])
        lines.append(f"  path gpu0 -> gpu{far}: {path} ({topo.path_latency[0, far] * 1e6:.1f} us)")
    print("\n".join(lines))
    return 0


def _rounded(value: object, digits: int = 4) -> object:
    """Floats to ``digits`` significant digits, recursively (fitted values carry no more)."""
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    return value


# GPU names as torch.cuda.get_device_name reports them -> the preset that models that GPU
_DEVICE_PRESETS = (("GB200", "gb200-nvl72"), ("B200", "gb200-nvl72"), ("H800", "h800"), ("H200", "hgx-h200"),
                   ("H100", "dgx-h100"), ("A100", "dgx-a100"))


def _preset_of_device(device: str) -> str | None:
    return next((name for key, name in _DEVICE_PRESETS if key in device.upper()), None)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    import numpy as np

    from moesim.calibration import calibrate, load_bench

    data = load_bench(args.bench)
    if not data.a2a and not data.ffn and not data.attention and not data.moe:
        raise InputError("no all-to-all, expert-FFN, attention-core or MoE-layer points in the benchmark files")
    matched = {_preset_of_device(d) for d in data.devices}
    guess = matched.pop() if len(matched) == 1 else None
    devices = ", ".join(sorted(data.devices))
    if args.preset is None:
        args.preset = guess or "hgx-h200"
        print(f"fitting the {args.preset} preset's parameters" + (
            f" (measured on {devices})" if guess else
            f": no single preset matches the devices measured ({devices}); choose with --preset"))
    try:
        preset(args.preset)
    except KeyError as exc:
        raise InputError(str(exc.args[0]), field="--preset") from None
    if guess and guess != args.preset:
        print(f"note: measured on {devices}, which the {guess} preset models; fitting "
              f"{args.preset}'s parameters as asked (those not fitted stay {args.preset}'s)")
    result = calibrate(data, args.preset, name=args.name)
    timings = sorted({p.timing for p in data.attention})
    print(f"calibrated {args.preset} on {len(data.a2a)} all-to-all, {len(data.p2p)} p2p, {len(data.ffn)} FFN, "
          f"{len(data.attention)} attention-core, {len(data.projections)} attention-projection and "
          f"{len(data.moe)} MoE-layer"
          f"{' (' + ' and '.join(timings) + ')' if timings else ''} points from {devices}")
    for key, value in result.fitted.items():
        print(f"  {key:26s} {value:10.4g}")
    print(f"{'points':38s} {'n':>4s} {'median |err|':>13s} {'max |err|':>10s}")
    steps = tuple(sorted({p.kind for p in result.predictions if p.kind.startswith("moe-step:")}))
    groups = {"network": ("a2a-uniform", "a2a-skew", "p2p"), "expert FFN": ("ffn",), "attention core": ("attention",),
              "attention projections": ("projection",), "MoE layer kernels, decode": ("moe-decode",),
              "MoE layer kernels, prefill": ("moe-prefill",), "MoE pipeline steps": steps}
    for label, kinds in groups.items():
        for held in (False, True):
            e = result.errors(held, kinds)
            if e.size:
                print(f"{label + (' held-out' if held else ' fit'):38s} {e.size:4d} {np.median(e) * 100:12.1f}% "
                      f"{e.max() * 100:9.1f}%")
    spec = _rounded(result.spec.model_dump(mode="json"))
    doc = {"preset": args.preset, **{k: spec[k] for k in ("name", "gpu", "nvlink", "a2a_launch_us")}}
    out = Path(args.output)
    held = [f"{label} {np.median(e) * 100:.1f}%" for label, kinds in groups.items()
            if (e := result.errors(True, kinds)).size]
    header = (f"# moesim calibrate {' '.join(args.bench)} --preset {args.preset}\n"
              f"# held-out median |error|: {', '.join(held) or 'no held-out points'}\n")
    atomic_write(out, lambda fh: fh.write(header + yaml.safe_dump(doc, sort_keys=False)))
    print(f"wrote {out}: use it in a scenario as clusters: [{{file: {out}, nodes: N}}]")
    return 0


def _bench_shapes(args: argparse.Namespace) -> dict:
    """The expert (ffn) or attention (attention) shape of ``--scenario``'s model, to measure instead of the
    built-in list; scaled down 16x with ``--cpu`` (a plumbing check), as the built-in shapes are."""
    from moesim.study.config import load_scenario

    if args.what == "a2a":
        raise InputError("applies to moesim bench ffn, attention and moe (the all-to-all sweep has no model shape)",
                         field="--scenario")
    m = load_scenario(args.scenario).model
    name, scale = m.name or "model", 16 if args.cpu else 1
    if args.what == "moe":
        return {name: {"d_model": max(m.d_model // scale, 1), "d_ff": max(m.d_ff // scale, 1),
                       "num_experts": m.num_experts, "top_k": m.top_k}}
    if args.what == "ffn":
        return {name: (max(m.d_model // scale, 1), max(m.d_ff // scale, 1))}
    if m.num_heads is None:
        raise InputError("needed for moesim bench attention: give the model's num_heads (and num_kv_heads)",
                         source=args.scenario, field="model.num_heads")
    return {name: {"d_model": max(m.d_model // scale, 1), "n_heads": m.num_heads, "n_kv_heads": m.kv_heads,
                   "head_dim": 16 if args.cpu else m.head_size}}


def _cmd_bench(args: argparse.Namespace) -> int:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise InputError("moesim bench needs PyTorch: pip install -e '.[bench]'") from None
    shapes = _bench_shapes(args) if args.scenario else None
    if args.what == "a2a":
        from moesim.bench import a2a

        path = a2a.run(args.output, args.nproc or 2, cpu=args.cpu)
    elif args.what == "moe":
        from moesim.bench import moe

        path = moe.run(args.output, cpu=args.cpu, quick=args.quick, nproc=args.nproc or 1, shapes=shapes,
                       dtypes=tuple(args.dtypes.split(",")), pipelines=tuple(args.pipelines.split(",")),
                       log=lambda line: print(line, flush=True))
        print(f"wrote {path}")
        return 0
    elif args.what == "attention":
        from moesim.bench import attention

        path = attention.run(args.output, cpu=args.cpu, shapes=shapes, log=lambda line: print(line, flush=True))
    else:
        from moesim.bench import ffn

        path = ffn.run(args.output, cpu=args.cpu, shapes=shapes)
    print(f"wrote {path}; fit it with: moesim calibrate {path} -o cluster.yaml")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moesim", description="Simulate MoE expert placements on GPU clusters.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="simulate a scenario and write results")
    r.add_argument("scenario")
    r.add_argument("-o", "--output", help="output folder (default: the scenario's 'output', or results/NAME)")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    r.add_argument("--no-plots", action="store_true")
    r.set_defaults(func=_cmd_run)
    v = sub.add_parser("validate", help="check a scenario without running it")
    v.add_argument("scenario")
    v.set_defaults(func=_cmd_validate)
    pl = sub.add_parser("place", help="compute a placement with a registered policy and write it as JSON")
    pl.add_argument("scenario", nargs="?")
    pl.add_argument("--policy")
    pl.add_argument("--cluster", help="cluster name in the scenario (default: the first)")
    pl.add_argument("--set", action="append", metavar="KEY=VALUE", help="policy option")
    pl.add_argument("-o", "--output")
    pl.add_argument("--list", action="store_true", help="list the registered policies")
    pl.set_defaults(func=_cmd_place)
    b = sub.add_parser("bench", help="measure all-to-all, expert-FFN, attention-block or MoE-layer timings on this "
                       "host's GPUs (needs torch)")
    b.add_argument("what", choices=["a2a", "ffn", "attention", "moe"],
                   help="a2a: all-to-all and p2p among --nproc GPUs; ffn: expert FFNs on one GPU; attention: "
                   "QKV/core/O projections of two attention shapes at tp 1/2/4, prefill and decode, on one GPU; "
                   "moe: the whole MoE layer's kernel pipeline step by step (moesim/bench/moe.py)")
    b.add_argument("--nproc", type=int, help="ranks (GPUs of this host): a2a (default 2), moe (default 1)")
    b.add_argument("--cpu", action="store_true", help="dry run on the CPU (gloo, tiny shapes)")
    b.add_argument("--scenario", help="measure this scenario's model shape (expert FFN, attention or MoE layer) "
                   "instead of the built-in list of common MoE shapes")
    b.add_argument("--quick", action="store_true", help="moe: a handful of points")
    b.add_argument("--dtypes", default="bf16,fp8", help="moe: expert dtypes (bf16, fp8)")
    b.add_argument("--pipelines", default="torch_reference,fused", help="moe: pipelines (torch_reference, fused)")
    b.add_argument("-o", "--output", required=True,
                   help="folder for the JSON (a2a_<nproc>.json, expert_ffn.json, attention.json or moe.json)")
    b.set_defaults(func=_cmd_bench)
    cal = sub.add_parser("calibrate", help="fit the hardware model to micro-benchmark JSON and write a cluster YAML")
    cal.add_argument("bench", nargs="+", help="a2a_<world>.json, expert_ffn*.json and/or attention*.json files")
    cal.add_argument("--preset", help="preset whose parameters are fitted (default: the one that models the GPU "
                     "named in the benchmark files, else hgx-h200)")
    cal.add_argument("--name", help="name of the calibrated cluster")
    cal.add_argument("-o", "--output", required=True, help="cluster YAML to write")
    cal.set_defaults(func=_cmd_calibrate)
    from moesim.cli_sweep import add_sweep_parser  # moesim sweep: redundant experts x rebalance intervals

    add_sweep_parser(sub)
    c = sub.add_parser("cluster", help="show cluster presets")
    c.add_argument("action", choices=["show", "list"])
    c.add_argument("name", nargs="?", help="preset name or cluster YAML file")
    c.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. nodes=2")
    c.set_defaults(func=_cmd_cluster)
    from moesim.cli_trace import add_trace_parser

    add_trace_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except InputError as exc:
        print(f"moesim: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into head or less, closed early: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
