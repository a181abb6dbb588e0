"""``moesim bench a2a | ffn | attention | attention-kernels | moe | train``: measure this host's GPUs into the JSON
``moesim calibrate`` fits.

Needs PyTorch (``pip install -e '.[bench]'``); without it the command fails as bad input, naming the extra.
The measuring itself lives in :mod:`moesim.measure`; this module only picks the shapes and the runner.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moesim.cli.common import at_least_one
from moesim.errors import InputError


def _bench_shapes(args: argparse.Namespace) -> dict:
    """The expert (ffn) or attention (attention) shape of ``--scenario``'s model, to measure instead of the
    built-in list; scaled down 16x with ``--cpu`` (a plumbing check), as the built-in shapes are."""
    from moesim.study.config import load_scenario

    if args.what in ("a2a", "attention-kernels"):
        raise InputError("applies to moesim bench ffn, attention, moe and train (the all-to-all sweep has no model "
                         "shape; attention-kernels measures fixed GQA and MLA shapes)", field="--scenario")
    m = load_scenario(args.scenario).model
    name, scale = m.name or "model", 16 if args.cpu else 1
    if args.what == "train":
        return {name: (max(m.d_model // scale, 1), max(m.d_ff // scale, 1), m.num_experts, m.top_k)}
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


def _check_bench_output(args: argparse.Namespace) -> None:
    """The folder -o and the file this bench writes into it, checked before measuring: the folder collects the
    JSON of several benches; an existing file of the same name is replaced only if a bench wrote it."""
    from moesim.fileio import check_output_file, contains

    folder = Path(args.output)
    if folder.exists() and not folder.is_dir():
        raise InputError("exists and is not a folder; -o takes the folder for the benchmark JSON",
                         source=args.output)
    name = {"a2a": f"a2a_{args.nproc or 2}.json", "ffn": "expert_ffn.json", "attention": "attention.json",
            "moe": "moe.json", "train": "train.json", "attention-kernels": "attention_kernels.json"}[args.what]
    check_output_file(folder / name, owned=contains(b'"device":'), what="a file moesim bench wrote")


def _cmd_bench(args: argparse.Namespace) -> int:
    try:
        import torch
    except ImportError:
        raise InputError("moesim bench needs PyTorch: pip install -e '.[bench]'") from None
    _check_bench_output(args)
    if not args.cpu and not torch.cuda.is_available():
        raise InputError("no CUDA GPU visible to torch; --cpu runs tiny shapes on the CPU", field="--cpu")
    # ranks: this host's GPUs, or (--cpu) a few processes
    at_least_one(args.nproc, "--nproc", most=64 if args.cpu else max(torch.cuda.device_count(), 1))
    shapes = _bench_shapes(args) if args.scenario else None
    if args.what == "a2a":
        from moesim.measure import a2a

        path = a2a.run(args.output, args.nproc or 2, cpu=args.cpu)
    elif args.what == "moe":
        from moesim.measure import moe

        path = moe.run(args.output, cpu=args.cpu, quick=args.quick, nproc=args.nproc or 1, shapes=shapes,
                       dtypes=tuple(args.dtypes.split(",")), pipelines=tuple(args.pipelines.split(",")),
                       log=lambda line: print(line, flush=True))
    elif args.what == "train":
        from moesim.measure import train

        path = train.run(args.output, nproc=args.nproc or 1, cpu=args.cpu, quick=args.quick, shapes=shapes,
                         log=lambda line: print(line, flush=True))
    elif args.what == "attention-kernels":
        from moesim.measure import attention_kernels

        path = attention_kernels.run(args.output, cpu=args.cpu, log=lambda line: print(line, flush=True))
    elif args.what == "attention":
        from moesim.measure import attention

        path = attention.run(args.output, cpu=args.cpu, shapes=shapes, log=lambda line: print(line, flush=True))
    else:
        from moesim.measure import ffn

        path = ffn.run(args.output, cpu=args.cpu, shapes=shapes)
    print(f"wrote {path}; fit it with: moesim calibrate {path} -o cluster.yaml")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``moesim bench`` on the top-level subparsers."""
    b = sub.add_parser("bench", help="measure all-to-all, expert-FFN, attention-block or MoE-layer timings on this "
                       "host's GPUs (needs torch)")
    b.add_argument("what", choices=["a2a", "ffn", "attention", "attention-kernels", "moe", "train"],
                   help="a2a: all-to-all and p2p among --nproc GPUs; ffn: expert FFNs on one GPU; attention: "
                   "QKV/core/O projections of two attention shapes at tp 1/2/4, prefill and decode, on one GPU; "
                   "attention-kernels: prefill attention cores forward and backward, FlashAttention-2 and cuDNN's "
                   "fused attention, GQA and MLA shapes; "
                   "moe: the whole MoE layer's kernel pipeline step by step (moesim/measure/moe/); train: forward and "
                   "backward expert grouped GEMMs on one GPU, all-gather and reduce-scatter among --nproc GPUs")
    b.add_argument("--nproc", type=int, help="ranks (GPUs of this host): a2a (default 2), moe and train (default 1)")
    b.add_argument("--cpu", action="store_true", help="dry run on the CPU (gloo, tiny shapes)")
    b.add_argument("--scenario", help="measure this scenario's model shape (expert FFN, attention or MoE layer) "
                   "instead of the built-in list of common MoE shapes")
    b.add_argument("--quick", action="store_true", help="moe, train: a handful of points")
    b.add_argument("--dtypes", default="bf16,fp8", help="moe: expert dtypes (bf16, fp8)")
    b.add_argument("--pipelines", default="torch_reference,fused", help="moe: pipelines (torch_reference, fused)")
    b.add_argument("-o", "--output", required=True,
                   help="folder for the JSON (a2a_<nproc>.json, expert_ffn.json, attention.json, "
                   "attention_kernels.json, moe.json or train.json)")
    b.set_defaults(func=_cmd_bench)
