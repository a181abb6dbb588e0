"""Measure the non-expert (attention) block of a transformer layer on one GPU, bf16, tensor-parallel slices.

For each attention shape and TP degree the GPU holds nh/tp query heads, nkv/tp KV heads and the matching
column slice of W_qkv and row slice of W_o, and processes all tokens of its TP group (no all-reduce timed).

Prefill (seq_len x total tokens): the QKV projection, the causal SDPA core, the O projection, and the three
as one region (with the reshapes between them). Decode (batch x context, one new token per sequence):
the SDPA core over a KV cache, the QKV and O projections on b tokens, and the block. Every part is timed
with CUDA events, one synchronised repetition at a time, median over ``--reps`` after ``--warmup`` untimed
runs; L2 is flushed (bitwise_not_ of a 256 MiB buffer) before every repetition. Also: device ceilings (8192^3 bf16
matmul, 2 GiB device copy). Writes ``attention_h100.json`` into ``--out``.

The measurement itself is :mod:`moesim.measure.attention` (needs torch and moesim: ``pip install -e '.[bench]'``);
``moesim bench attention -o DIR`` runs the same sweep and writes the same records as ``DIR/attention.json``.
This script keeps the command line and defaults (``--max-seconds`` 230) the stored attention_h100.json was
taken with, when it was a stand-alone torch-only script whose code now lives in moesim:

    python benchmarks/validation/attention_h100/measure.py --out $OUT
    python benchmarks/validation/attention_h100/measure.py --quick --out /tmp/att   # CPU smoke run
"""

from __future__ import annotations

import argparse
import os

import torch

from moesim.measure import attention


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true", help="tiny CPU smoke run (checks plumbing, not numbers)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-flush", action="store_true", help="do not flush L2 before each repetition")
    ap.add_argument("--no-profile", action="store_true", help="do not record SDPA kernel names")
    ap.add_argument("--max-seconds", type=float, default=230.0, help="skip remaining points after this")
    args = ap.parse_args()
    path = attention.run(args.out, cpu=args.quick or not torch.cuda.is_available(), warmup=args.warmup,
                         reps=args.reps, flush=not args.no_flush, profile=not args.no_profile,
                         max_seconds=args.max_seconds, filename="attention_h100.json",
                         log=lambda line: print(line, flush=True))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
