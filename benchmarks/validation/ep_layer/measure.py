"""Measure a real expert-parallel MoE layer on the GPUs of one host (run under torchrun).

For every placement file given, replays the routing trace layer by layer the way EP serving runs it:
dispatch all-to-all (one copy of a token per destination GPU, uneven splits), the GPU's experts one after
another (bf16 SwiGLU FFN, weights of the trace's model shape), combine all-to-all back home. Each phase is
timed with CUDA events on every rank after a barrier; the median over repetitions is written as JSON.
Needs only torch and numpy, so it runs on a bare GPU machine; moesim's prediction is made elsewhere
(``compare.py``) from the same trace and placements.

With ``--attention prefill`` or ``--attention decode`` every layer starts with its attention block, data
parallel (each GPU attends for the tokens it holds; no tensor parallelism): x @ W_qkv, the FlashAttention core
(GQA, ``--heads``/``--kv-heads``, head size d_model / heads), y @ W_o, whose output is what the dispatch sends.
Prefill: the GPU's tokens are prompts of ``--seq-len`` tokens, causal. Decode: each token is the next token of
its own sequence over a KV cache of ``--kv-len`` tokens (one cache shared by the layers, to save memory: it is
far larger than L2, so every layer still reads it from HBM). ``--tokens-per-gpu N`` keeps the first N tokens
of each GPU (a decode batch from the same trace). Norms, the router and residuals are not run. On one GPU
(``--nproc_per_node=1``) every token and every expert is local: the layer is attention, the experts one after
another and two all-to-alls that are local copies; the placement file then only names the run.

    torchrun --standalone --nproc_per_node=2 measure.py --trace trace.npz --placement a.json b.json
    torchrun ... measure.py ... --attention decode --kv-len 2048 --tokens-per-gpu 256 --name decode.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import numpy as np
import torch
import torch.distributed as dist


def ffn(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    g, u = (x @ w1).chunk(2, dim=-1)
    return (torch.nn.functional.silu(g) * u) @ w2


def plan_layer(experts: np.ndarray, home: np.ndarray, gpu_of: np.ndarray, rank: int, world: int):
    """Send order, split sizes and per-expert receive indices for one layer (all from the global trace)."""
    dst = gpu_of[np.where(experts >= 0, experts, 0)]  # [T, K]
    dst = np.where(experts >= 0, dst, -1)
    send_rows, send_splits = [], []
    mine = np.flatnonzero(home == rank)
    for d in range(world):
        rows = mine[(dst[mine] == d).any(axis=1)]
        send_rows.append(rows)
        send_splits.append(rows.size)
    recv_splits, recv_tokens = [], []
    for s in range(world):
        theirs = np.flatnonzero(home == s)
        rows = theirs[(dst[theirs] == rank).any(axis=1)]
        recv_splits.append(rows.size)
        recv_tokens.append(rows)
    recv_tokens = np.concatenate(recv_tokens)
    local = {}
    for e in np.flatnonzero(gpu_of == rank):
        local[int(e)] = np.flatnonzero((experts[recv_tokens] == e).any(axis=1))
    return np.concatenate(send_rows), send_splits, recv_splits, local


def keep_first(experts: np.ndarray, home: np.ndarray, per_gpu: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The first ``per_gpu`` tokens of each home GPU (all of them if None), in trace order."""
    if not per_gpu:
        return experts, home
    keep = np.zeros(home.size, dtype=bool)
    for g in np.unique(home):
        keep[np.flatnonzero(home == g)[:per_gpu]] = True
    return experts[keep], home[keep]


class AttentionBlock:
    """One GPU's data-parallel attention for its ``n`` tokens: QKV projection, SDPA core, O projection."""

    def __init__(self, kind: str, n: int, d: int, heads: int, kv_heads: int, length: int, dev, gen) -> None:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        self.kind, self.n, self.h, self.hk, self.hd = kind, n, heads, kv_heads, d // heads
        self.length = length
        bf = torch.bfloat16
        self.wqkv = torch.randn(d, (heads + 2 * kv_heads) * self.hd, device=dev, dtype=bf, generator=gen) * d ** -0.5
        self.wo = torch.randn(heads * self.hd, d, device=dev, dtype=bf, generator=gen) * d ** -0.5
        if kind == "decode":
            shape = (n, kv_heads, length, self.hd)
            self.kc = torch.randn(*shape, device=dev, dtype=bf, generator=gen)
            self.vc = torch.randn(*shape, device=dev, dtype=bf, generator=gen)
        elif n % length:
            raise SystemExit(f"{n} tokens per GPU are not whole prompts of --seq-len {length}")
        self.kernel = lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h, hk, hd, n = self.h, self.hk, self.hd, self.n
        qkv = x @ self.wqkv
        with self.kernel():
            if self.kind == "prefill":
                b, s = n // self.length, self.length
                q, k, v = qkv.view(b, s, h + 2 * hk, hd).split([h, hk, hk], dim=2)
                o = torch.nn.functional.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True)
                o = o.transpose(1, 2).reshape(n, h * hd)
            else:
                q = qkv[:, : h * hd].view(n, h, 1, hd)
                o = torch.nn.functional.scaled_dot_product_attention(q, self.kc, self.vc, enable_gqa=True)
                o = o.reshape(n, h * hd)
        return o @ self.wo


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", required=True)
    ap.add_argument("--placement", nargs="+", required=True)
    ap.add_argument("--d-model", type=int, default=4096)
    ap.add_argument("--d-ff", type=int, default=14336)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--attention", choices=["none", "prefill", "decode"], default="none")
    ap.add_argument("--seq-len", type=int, default=4096, help="prefill prompt length")
    ap.add_argument("--kv-len", type=int, default=2048, help="decode KV-cache length")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--tokens-per-gpu", type=int, help="keep the first N tokens of each GPU")
    ap.add_argument("--name", default="measured.json", help="output file name (in $OUT)")
    args = ap.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    z = np.load(args.trace)
    experts, home = keep_first(z["experts"].astype(np.int64), z["home"].astype(np.int64), args.tokens_per_gpu)
    if world == 1:  # one GPU: every token lives on it and every expert runs on it (the all-to-alls are copies)
        home = np.zeros_like(home)
    T, L, K = experts.shape
    d, f = args.d_model, args.d_ff
    gen = torch.Generator(device=dev).manual_seed(rank)
    x_home = torch.randn(int((home == rank).sum()), d, device=dev, dtype=torch.bfloat16, generator=gen)
    index_of = {int(t): i for i, t in enumerate(np.flatnonzero(home == rank))}
    n_home = x_home.shape[0]
    length = args.seq_len if args.attention == "prefill" else args.kv_len
    attn = AttentionBlock(args.attention, n_home, d, args.heads, args.kv_heads, length, dev, gen) \
        if args.attention != "none" else None
    out = {"world": world, "device": torch.cuda.get_device_name(rank), "torch": torch.__version__,
           "nccl": ".".join(map(str, torch.cuda.nccl.version())), "d_model": d, "d_ff": f,
           "attention": args.attention, "tokens_per_gpu": n_home, "placements": {}}
    if attn is not None:
        out.update(heads=args.heads, kv_heads=args.kv_heads,
                   **({"seq_len": args.seq_len} if args.attention == "prefill" else {"kv_len": args.kv_len}))
    for path in args.placement:
        pl = json.load(open(path))
        gpu_of_layers = [np.array([reps[0] for reps in layer["expert_gpus"]]) * (world > 1) for layer in pl["layers"]]
        slots = max(int((g == rank).sum()) for g in gpu_of_layers)
        weights = [[(torch.randn(d, 2 * f, device=dev, dtype=torch.bfloat16, generator=gen) * 0.02,
                     torch.randn(f, d, device=dev, dtype=torch.bfloat16, generator=gen) * 0.02)
                    for _ in range(slots)] for _ in range(L)]
        plans = []
        for l in range(L):
            send_rows, ss, rs, local = plan_layer(experts[:, l], home, gpu_of_layers[l], rank, world)
            idx = torch.tensor([index_of[int(t)] for t in send_rows], device=dev, dtype=torch.long)
            local_idx = {e: torch.tensor(v, device=dev, dtype=torch.long) for e, v in local.items()}
            plans.append((idx, ss, rs, local_idx))
        phases = ("attention", "dispatch", "compute", "combine", "layer")
        times = {ph: [[] for _ in range(L)] for ph in phases}
        for it in range(args.warmup + args.iters):
            for l, (idx, ss, rs, local_idx) in enumerate(plans):
                recv = torch.empty(sum(rs), d, device=dev, dtype=torch.bfloat16)
                ev = [torch.cuda.Event(enable_timing=True) for _ in range(5)]
                dist.barrier()
                torch.cuda.synchronize()
                ev[4].record()
                hidden = attn(x_home) if attn is not None else x_home
                send = hidden.index_select(0, idx)
                ev[0].record()
                dist.all_to_all_single(recv, send, rs, ss)
                ev[1].record()
                y = torch.zeros_like(recv)
                for slot, (e, rows) in enumerate(local_idx.items()):
                    if rows.numel():
                        w1, w2 = weights[l][slot]
                        y.index_add_(0, rows, ffn(recv.index_select(0, rows), w1, w2))
                ev[2].record()
                back = torch.empty_like(send)
                dist.all_to_all_single(back, y, ss, rs)
                ev[3].record()
                torch.cuda.synchronize()
                if it >= args.warmup:
                    for ph, a, b in (("attention", 4, 0), ("dispatch", 0, 1), ("compute", 1, 2), ("combine", 2, 3),
                                     ("layer", 4, 3)):
                        times[ph][l].append(ev[a].elapsed_time(ev[b]))
        med = {ph: [statistics.median(v) for v in per_layer] for ph, per_layer in times.items()}
        gathered = [None] * world
        dist.all_gather_object(gathered, med)
        out["placements"][os.path.basename(path)] = {"ms_median_per_rank": gathered}
        del weights
        torch.cuda.empty_cache()
    if rank == 0:
        dest = os.path.join(os.environ.get("OUT", "."), args.name)
        with open(dest, "w") as fh:
            json.dump(out, fh, indent=1)
        for name, res in out["placements"].items():
            layer = np.array([r["layer"] for r in res["ms_median_per_rank"]]).max(axis=0)
            print(f"{name}: layer ms (slowest rank) {np.round(layer, 3).tolist()}  sum {layer.sum():.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
