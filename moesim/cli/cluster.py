"""``moesim cluster list | show``: the shipped presets, and one cluster's hardware and topology in words.

``show`` takes a preset name or a cluster YAML file (optionally naming a ``preset`` to start from), with
``--set KEY=VALUE`` overrides on dotted paths (``--set network.nic_Gbps=200``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from moesim.cli.common import key_values
from moesim.errors import InputError
from moesim.hardware.presets import deep_merge, preset, preset_names
from moesim.hardware.spec import A2A_FAMILIES, ClusterSpec
from moesim.hardware.topology import build_topology
from moesim.loaders import dump_yaml, read_yaml


def _cluster_spec(name: str, overrides: list[str]) -> ClusterSpec:
    raw = _read_cluster_file(name) if Path(name).suffix in (".yaml", ".yml") else _preset(name)
    for key, value in key_values(overrides):
        node: dict = raw
        *parents, leaf = key.split(".")
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise InputError(f"{'.'.join(parents[: i + 1])} is {node!r}, not a mapping with keys",
                                 field=f"--set {key}")
        node[leaf] = value
    from pydantic import ValidationError

    from moesim.study.config import _pydantic_error  # one formatter for every config error

    try:
        return ClusterSpec.model_validate(raw)
    except ValidationError as exc:
        raise _pydantic_error(exc, name, "") from None


def _preset(name: str) -> dict[str, Any]:
    try:
        return preset(name)
    except KeyError as exc:
        raise InputError(str(exc.args[0])) from None


def _read_cluster_file(name: str) -> dict[str, Any]:
    """A cluster YAML file as a mapping, merged over the preset it names (if any)."""
    raw = read_yaml(name)
    if not isinstance(raw, dict):
        raise InputError("a cluster file must be a YAML mapping", source=name)
    base: dict = {}
    if "preset" in raw:
        try:
            base = preset(str(raw.pop("preset")))
        except KeyError as exc:
            raise InputError(str(exc.args[0]), source=name, field="preset") from None
    return deep_merge(base, raw)


def _a2a_kernels(spec: ClusterSpec) -> list[str]:
    """One line per all-to-all kernel family (engine.a2a): its fixed costs, bandwidth shares and SMs."""
    out = []
    for name in A2A_FAMILIES:
        k = spec.a2a_kernels.family(name)
        launch = k.launch_us if k.launch_us is not None else spec.a2a_launch_us
        shares = "".join(f", {what} x{v}" for what, v in (("NVLink", k.nvlink_efficiency), ("RDMA", k.rdma_efficiency))
                         if v is not None)
        out.append(f"  a2a       {name}: launch {launch:g} us, notify {k.notify_us:g} us, per peer {k.per_peer_us:g} us"
                   f"{shares}, {k.sms} SMs")
    return out


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
    try:  # errors without a file of their own (a preset, --set, the topology's size) name the cluster given
        spec = _cluster_spec(args.name, args.set or [])
        if args.yaml:  # every field, to start a cluster file from (docs/formats.md)
            print(f"# moesim cluster show {args.name} --yaml: every field of the cluster; edit and use it as "
                  f"clusters: [{{file: my_cluster.yaml}}]")
            print(dump_yaml(spec.model_dump(mode="json"), sort_keys=False), end="")
        else:
            print("\n".join(_describe(spec)))
    except InputError as exc:
        raise exc.at(source=args.name) from None
    return 0


def _describe(spec: ClusterSpec) -> list[str]:
    """The lines of ``moesim cluster show``: hardware, links, the topology graph and its longest path."""
    topo = build_topology(spec)
    g, nv, net = spec.gpu, spec.nvlink, spec.network
    kinds: dict[str, int] = {}
    for k in topo.link_kind:
        kinds[k] = kinds.get(k, 0) + 1
    fabric = "rail-optimised leaves" if net.rail_optimized else f"{net.nodes_per_leaf} nodes per leaf"
    lines = [
        f"{spec.name}: {spec.nodes} node(s) x {spec.gpus_per_node} GPUs = {spec.num_gpus} GPUs",
        f"  GPU       {g.name}: {g.bf16_tflops:.0f} TFLOP/s bf16 dense (x{g.compute_efficiency} achieved), "
        f"{g.hbm_GBps:.0f} GB/s HBM (x{g.hbm_efficiency}), {g.memory_GB:.0f} GB, "
        f"{g.ffn_overhead_us:.0f} us per FFN launch; sustained load (power cap): tensor cores at "
        f"x{g.sustained_clock} of that",
        f"  NVLink    {nv.name}: {nv.GBps:.0f} GB/s per GPU per direction (x{nv.efficiency} = "
        f"{nv.bytes_per_s / 1e9:.0f} GB/s), {nv.latency_us} us",
        f"  network   {_nics(spec)} (x{net.nic_efficiency} = {net.nic_bytes_per_s / 1e9:.1f} GB/s each), "
        f"{net.latency_us} us; {fabric}, oversubscription {net.oversubscription}:1; PCIe {net.pcie_GBps:.0f} GB/s",
        f"  all-to-all launch {spec.a2a_launch_us} us (NCCL); "
        f"expert weights may use {spec.expert_memory_fraction:.0%} of HBM",
        *_a2a_kernels(spec),
        f"  graph     {topo.graph.number_of_nodes()} nodes, {topo.num_links} directed links "
        + "(" + ", ".join(f"{v} {k}" for k, v in sorted(kinds.items())) + ")",
    ]
    lines.append(_attention_line(g))
    for name, p in g.moe_pipelines.items():  # the MoE kernel pipelines (moesim/sim/kernels.py)
        lines.append(f"  MoE       {name}: grouped GEMM tiles {p.tile_m}x{p.tile_n} over {g.sms} SMs at "
                     f"x{p.gemm_efficiency} of peak (fp8 x{p.fp8_gemm_efficiency}), weights at "
                     f"x{p.gemm_hbm_efficiency} of HBM; fixed us: "
                     + ", ".join(f"{k} {c.fixed_us:.0f}" for k, c in p.steps.items()))
    if spec.num_gpus > 1:
        far = spec.num_gpus - 1
        path = " -> ".join([topo.link_names[i].split("->")[0] for i in topo.path(0, far)] + [f"gpu{far}"])
        lines.append(f"  path gpu0 -> gpu{far}: {path} ({topo.path_latency[0, far] * 1e6:.1f} us)")
    return lines


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``moesim cluster`` on the top-level subparsers."""
    c = sub.add_parser("cluster", help="show cluster presets")
    c.add_argument("action", choices=["show", "list"])
    c.add_argument("name", nargs="?", help="preset name or cluster YAML file")
    c.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. nodes=2")
    c.add_argument("--yaml", action="store_true", help="show: print every field as a cluster YAML to start from")
    c.set_defaults(func=_cmd_cluster)


def _attention_line(g: Any) -> str:
    """The attention core's kernels: FlashAttention-2 (forward, backward), the other prefill families, MLA decode."""
    eff = g.attention_efficiency or g.compute_efficiency
    back = f", backward x{g.attention_backward.efficiency}" if g.attention_backward else ""
    fams = "; ".join(f"{k} x{f.efficiency}" + (f" (backward x{f.backward.efficiency})" if f.backward else "")
                     for k, f in g.attention_kernels.items())
    return (f"  attention fa2: x{eff} of peak{back}, KV cache at x{g.attention_hbm_efficiency or g.hbm_efficiency} "
            f"of HBM" + (f"; prefill families: {fams}" if fams else "") + f"; MLA decode x{g.mla_decode_efficiency}")
