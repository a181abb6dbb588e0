"""The whole MoE layer on one GPU, step by step: what ``moesim bench moe`` measures.

Pipeline ``torch_reference`` is the plain PyTorch expert-parallel MoE layer: router, permute, dispatch
all-to-all, regroup, grouped GEMMs (``torch._grouped_mm``; fp8: ``torch._scaled_grouped_mm``), activation,
unregroup, combine all-to-all and the weighted reduce. It runs through torch.distributed (NCCL; world size 1 on
one GPU, so that the one-GPU layer makes the same ``all_to_all_single`` calls and host synchronisations as the
N-GPU one; ``nproc`` > 1 runs N ranks under torchrun). Pipeline ``fused`` is a vLLM fused_moe-style Triton
implementation (:mod:`moesim.bench.fused_moe`). A point is one shape, expert-parallel degree, pipeline, dtype,
routing and token count. Every step is timed with CUDA events recorded between the steps of one run (median
over the repetitions) and the whole layer as one region without events (median, min, max); L2 is flushed before
each repetition. Each record holds the exact rows per local expert, so a model can be evaluated on the exact
load. :data:`METHOD` (written into the JSON) says exactly what each step does.

Ignored: attention and everything else outside the routed experts (shared experts, norms, the router's bias
or auxiliary losses, gpt-oss's clamped SwiGLU: every expert is a plain SiLU(gate)*up SwiGLU), CUDA graphs, and
on one GPU the network: an expert-parallel slice on one GPU is emulated and its all-to-alls are NCCL copies to
itself (see METHOD). ``cpu=True`` runs tiny shapes in float32 with gloo (fp8 points are recorded as skipped; the
fused pipeline runs in Triton's interpreter if Triton is installed): it checks the plumbing and the numerics,
not the timings.

The JSON (``moe.json``, format ``moesim.bench.moe/1``: device/torch/cuda/sms/world_size/date/method,
warmup/reps/l2_flush, ``ceilings``, ``fp8_scaling`` and ``records``) is rewritten atomically after every point;
a point that could not run is a record with ``skipped`` and no timings.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moesim.bench.timing import event, sync
from moesim.errors import InputError
from moesim.fileio import atomic_write

FORMAT = "moesim.bench.moe/1"
# d_model, d_ff (one routed expert's intermediate size), routed experts and top_k from each model's published
# config.json (Hugging Face):
SHAPES: dict[str, dict[str, int]] = {
    # deepseek-ai/DeepSeek-V3: hidden_size 7168, moe_intermediate_size 2048, n_routed_experts 256,
    # num_experts_per_tok 8
    "deepseek-v3": {"d_model": 7168, "d_ff": 2048, "num_experts": 256, "top_k": 8},
    # moonshotai/Kimi-K2-Instruct: hidden_size 7168, moe_intermediate_size 2048, n_routed_experts 384,
    # num_experts_per_tok 8
    "kimi-k2": {"d_model": 7168, "d_ff": 2048, "num_experts": 384, "top_k": 8},
    # Qwen/Qwen3-235B-A22B: hidden_size 4096, moe_intermediate_size 1536, num_experts 128, num_experts_per_tok 8
    "qwen3-235b-a22b": {"d_model": 4096, "d_ff": 1536, "num_experts": 128, "top_k": 8},
    # Qwen/Qwen3-30B-A3B: hidden_size 2048, moe_intermediate_size 768, num_experts 128, num_experts_per_tok 8
    "qwen3-30b-a3b": {"d_model": 2048, "d_ff": 768, "num_experts": 128, "top_k": 8},
    # openai/gpt-oss-120b: hidden_size 2880, intermediate_size 2880, num_local_experts 128, num_experts_per_tok 4
    "gpt-oss-120b": {"d_model": 2880, "d_ff": 2880, "num_experts": 128, "top_k": 4},
    # deepseek-ai/DeepSeek-V2-Lite: hidden_size 2048, moe_intermediate_size 1408, n_routed_experts 64,
    # num_experts_per_tok 6
    "deepseek-v2-lite": {"d_model": 2048, "d_ff": 1408, "num_experts": 64, "top_k": 6},
    # allenai/OLMoE-1B-7B-0924: hidden_size 2048, intermediate_size 1024, num_experts 64, num_experts_per_tok 8
    "olmoe-1b-7b": {"d_model": 2048, "d_ff": 1024, "num_experts": 64, "top_k": 8},
    # mistralai/Mixtral-8x7B-v0.1: hidden_size 4096, intermediate_size 14336, num_local_experts 8,
    # num_experts_per_tok 2
    "mixtral-8x7b": {"d_model": 4096, "d_ff": 14336, "num_experts": 8, "top_k": 2},
}
CPU_SHAPES: dict[str, dict[str, int]] = {  # --cpu: tiny stand-ins (one with an EP8 slice, one without)
    "tiny-64e": {"d_model": 64, "d_ff": 32, "num_experts": 64, "top_k": 4},
    "tiny-8e": {"d_model": 48, "d_ff": 64, "num_experts": 8, "top_k": 2},
}
QUICK_SHAPES = ("qwen3-30b-a3b", "deepseek-v3")
TOKENS = (32, 128, 512, 2048, 8192, 16384)
ROUTINGS = ("uniform", "zipf1.0", "zipf2.0")
PIPELINES = ("torch_reference", "fused")
DTYPES = ("bf16", "fp8")
EP_SLICE = 8  # the expert-parallel slice recorded on one GPU for models with at least 64 experts
FP8_MAX = 448.0  # largest float8_e4m3fn value
BUDGET_S = 380.0  # default: points not started this many seconds after the start are recorded as skipped

METHOD = (
    "One GPU holds L local experts (SwiGLU, d_model d, d_ff f, E experts, top-k k) and T tokens; pipeline "
    "torch_reference is eager PyTorch through torch.distributed (NCCL, world size 1 on one GPU, "
    "env:// rendezvous on 127.0.0.1) with these steps, each a function whose tensors pass to the next: "
    "router: logits = x[T,d] @ Wg[d,E] (bf16); probs = softmax(logits, dim=-1, dtype=float32); "
    "torch.topk(probs, k); the k weights renormalised to sum 1 (as Qwen3/Mixtral do); topk's expert ids are then "
    "replaced (no kernel) by the seeded routing's ids [T,k], so that the measured routing is the one recorded. "
    "permute: flat ids [T*k] // L -> destination rank; torch.argsort(dest, stable=True) -> order; token = "
    "order // k; send_x = x.index_select(0, token) (the T*k token copies in send order) and send_ids = "
    "ids.index_select(0, order); counts = torch.bincount(dest, minlength=ep) (on CUDA bincount itself reads the "
    "ids' min and max back to the host); the counts are exchanged with all_to_all_single; "
    "torch.cat((counts, recv_counts)).tolist() (the host sync real code needs for the split sizes). "
    "dispatch: all_to_all_single of the rows [*,d] and of the int64 expert ids of each row with those split "
    "sizes into freshly allocated receive buffers. regroup: local = recv_ids - first local expert; "
    "torch.sort(local, stable=True) (the argsort; its sorted values give the offsets); rows = "
    "recv_x.index_select(0, rorder); offs = torch.searchsorted(sorted local, arange(L), right=True, "
    "out_int32=True) (the cumulative rows per expert as int32 on the device, no host sync). gemm_gate_up: "
    "torch._grouped_mm(rows, W13, offs=offs) with W13 stored [L, 2f, d] and passed transposed ([L, d, 2f], "
    "column-major per expert, as torchtitan does). activation: gate, up = chunk(2); F.silu(gate) * up -> "
    "[R, f]. gemm_down: torch._grouped_mm(h, W2 (stored [L, d, f], passed transposed), offs=offs). unregroup: "
    "torch.empty_like(y).index_copy_(0, rorder, y) (rows back to receive order). combine: all_to_all_single "
    "back with the split sizes reversed. reduce: the gate weights in send order (index_select, cast to the "
    "activation dtype) times the returned rows; torch.zeros(T, d).index_add_(0, token, weighted rows). "
    "fp8 (e4m3): weights quantised beforehand with one fp32 scale per (expert, output column); step quant "
    "(before gemm_gate_up) quantises rows with one fp32 scale per row (amax/448 of abs, divide, cast) and step "
    "quant_down does the same to h before gemm_down; both GEMMs are torch._scaled_grouped_mm(a, b, scale_a [R], "
    "scale_b [L, N], offs, out_dtype=bf16, use_fast_accum=True) (rowwise scaling). Intermediate tensors are "
    "dropped as soon as no later step needs them. "
    "Expert-parallel slices: with world size N (torchrun) each rank routes its own T tokens to E/N local experts "
    "and the record is rank 0's. On one GPU an EP slice of ep ranks (local_experts = E/ep) is emulated: the "
    "seeded routing picks experts for the T*ep tokens of the whole EP group; the emulated GPU is the rank whose "
    "L experts receive the most rows (the busiest GPU); its own T tokens go through router and permute as "
    "above (all T*k send rows gathered, the ep split sizes counted, exchanged and read back); dispatch then "
    "all_to_all_singles to itself the R rows (and ids) that the group's picks of its experts would bring (random "
    "rows, prepared untimed, in source-rank order); regroup..unregroup process those R rows; combine "
    "all_to_all_singles the R processed rows to itself; reduce weighs and index_adds T*k stand-in rows (the "
    "rows other GPUs would return, prepared untimed). So on one GPU dispatch and combine are NCCL copies of the "
    "received rows, not network transfers. "
    "Routing (seeded, on the device): k distinct experts per token, drawn without replacement with probability "
    "proportional to a weight w_e by Gumbel-top-k (top-k of log w_e + Gumbel noise): uniform w_e = 1; zipfS "
    "w_e = 1/rank_e^S over a random (seeded per shape and routing) permutation of the experts. rows_per_expert "
    "is the exact count of rows each local expert processed; rows its sum; send_rows = T*k. "
    "Timing: per point, warmup untimed repetitions then reps repetitions, each of two runs: (1) the steps with "
    "a CUDA event recorded before the first and after every step, all in one run, one synchronise at the end "
    "(steps_ms: the median over reps of each step; steps_sum_ms: the sum of those medians); (2) the whole "
    "pipeline as one region with one event pair and no events inside (total_ms median, min_ms, max_ms). L2 is "
    "flushed (bitwise_not_ of a 256 MiB buffer) and the device synchronised (and, with N ranks, a barrier) "
    "before each run. Times include the host's launch and synchronisation gaps (eager mode, no CUDA graphs). "
    "Pipeline fused (vLLM fused_moe style, bf16, EP1 only): router as above; align: moe_align_block_size in torch "
    "(stable sort of the flat ids, each expert's rows padded to a multiple of BLOCK_M, sorted_token_ids with "
    "padding = T*k, one expert id per block, the padded total on the device; no host sync); gemm_gate_up: a "
    "Triton grouped GEMM whose A rows are gathered from x through sorted_token_ids // k (no permuted copy) and "
    "whose output rows are written in pick order [T*k, 2f]; activation: a Triton silu_and_mul; gemm_down: the "
    "same Triton GEMM on h rows, multiplied by each pick's gate weight, written in pick order [T*k, d]; reduce: "
    "view(T, k, d).sum(1). BLOCK_M 16/64/128 by the mean rows per expert (see moesim/bench/fused_moe.py). "
    "Ceilings: 8192^3 bf16 matmul, 8192^3 fp8 torch._scaled_mm (tensor-wise scales, fast accumulation), 2 GiB "
    "device copy (read + write counted), same event timing."
)


@dataclass(frozen=True)
class Point:
    """One measured point (a record)."""

    shape: str
    ep: int
    pipeline: str
    dtype: str
    routing: str
    tokens: int


@dataclass
class Plan:
    """One point's inputs on this GPU: sizes, routing, the tokens, and (emulated EP slice) the rows other GPUs
    send and return."""

    T: int
    d: int
    f: int
    E: int
    k: int
    ep: int
    L: int
    first: int
    emulated: bool
    x: torch.Tensor
    ids: torch.Tensor
    rows_per_expert: list[int]
    arange_L: torch.Tensor
    incoming_x: torch.Tensor | None = None
    incoming_ids: torch.Tensor | None = None
    returned: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return sum(self.rows_per_expert)


@dataclass
class Weights:
    """A shape's router and expert weights on the device (fp8 copies made on first use)."""

    wg: torch.Tensor
    w13: torch.Tensor  # [E, 2f, d]
    w2: torch.Tensor  # [E, d, f]
    fp8: dict[str, torch.Tensor] = field(default_factory=dict)

    def quantised(self) -> dict[str, torch.Tensor]:
        if not self.fp8:
            self.fp8["w13q"], self.fp8["w13s"] = quant_weights(self.w13)
            self.fp8["w2q"], self.fp8["w2s"] = quant_weights(self.w2)
        return self.fp8


class Comm:
    """all_to_all_single and barrier through torch.distributed, or device copies where no process group could
    be made (world size 1 only; the method text then says so)."""

    def __init__(self, world: int, use_dist: bool) -> None:
        self.world, self.use_dist = world, use_dist

    def a2a(self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int] | None = None,
            in_splits: list[int] | None = None) -> None:
        if self.use_dist:
            dist.all_to_all_single(out, inp, out_splits, in_splits)
        else:
            out.copy_(inp)

    def barrier(self) -> None:
        if self.use_dist and self.world > 1:
            dist.barrier()


Step = tuple[str, Callable[[SimpleNamespace], None]]


# ----------------------------------------------------------------------------------------------- routing
def pick_experts(n: int, E: int, k: int, routing: str, seed: int, perm_seed: int, dev: torch.device) -> torch.Tensor:
    """[n, k] int64 expert ids: k distinct experts per token, drawn without replacement proportionally to the
    routing's weights (Gumbel-top-k); zipfS weighs the expert of rank r (a seeded random permutation) 1/r^S."""
    gen = torch.Generator(device=dev).manual_seed(seed)
    u = torch.rand(n, E, generator=gen, device=dev).clamp_(min=1e-30)
    keys = -torch.log(-torch.log(u))
    if routing != "uniform":
        s = float(routing.removeprefix("zipf"))
        perm = torch.randperm(E, generator=torch.Generator(device=dev).manual_seed(perm_seed), device=dev)
        logw = torch.empty(E, device=dev)
        logw[perm] = -s * torch.log(torch.arange(1, E + 1, device=dev, dtype=torch.float32))
        keys += logw
    return keys.topk(k, dim=1).indices


def _seed(*parts: object) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


def make_plan(name: str, sh: dict[str, int], ep: int, routing: str, T: int, *, world: int, rank: int,
              dev: torch.device, dtype: torch.dtype) -> Plan:
    """Route the T*ep tokens of the EP group (seeded) and build this GPU's inputs: rank ``rank`` of ``world``,
    or (world 1, ep > 1) the emulated busiest rank of the slice."""
    d, f, E, k = sh["d_model"], sh["d_ff"], sh["num_experts"], sh["top_k"]
    L = E // ep
    group = pick_experts(T * ep, E, k, routing, _seed(name, routing, T, ep), _seed(name, routing), dev)
    flat = group.reshape(-1)
    emulated = world == 1 and ep > 1
    r = int(torch.bincount(flat // L, minlength=ep).argmax()) if emulated else rank
    first = r * L
    incoming = flat[(flat >= first) & (flat < first + L)]
    rows_per_expert = torch.bincount(incoming - first, minlength=L).tolist()
    gen = torch.Generator(device=dev).manual_seed(_seed(name, "x", T, rank))
    x = torch.randn(T, d, generator=gen, device=dev, dtype=dtype)
    plan = Plan(T, d, f, E, k, ep, L, first, emulated, x, group[r * T:(r + 1) * T].contiguous(), rows_per_expert,
                torch.arange(L, device=dev))
    if emulated:
        plan.incoming_ids = incoming.contiguous()
        plan.incoming_x = torch.randn(len(incoming), d, generator=gen, device=dev, dtype=dtype)
        plan.returned = torch.randn(T * k, d, generator=gen, device=dev, dtype=dtype)
    return plan


def make_weights(name: str, sh: dict[str, int], dev: torch.device, dtype: torch.dtype) -> Weights:
    """Random weights (torch.empty + normal_ on the device, std 1/sqrt(fan-in)), seeded per shape."""
    d, f, E = sh["d_model"], sh["d_ff"], sh["num_experts"]
    gen = torch.Generator(device=dev).manual_seed(_seed(name, "weights"))

    def rand(*dims: int, fan_in: int) -> torch.Tensor:
        return torch.empty(*dims, device=dev, dtype=dtype).normal_(0.0, fan_in ** -0.5, generator=gen)

    return Weights(rand(d, E, fan_in=d), rand(E, 2 * f, d, fan_in=d), rand(E, d, f, fan_in=f))


# ----------------------------------------------------------------------------------------------- fp8
def quant_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float8_e4m3fn values and one fp32 dequantisation scale per row (over the last dimension):
    x ~= q * scale[..., None]."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_(min=1e-12) / FP8_MAX
    return (x / scale).to(torch.float8_e4m3fn), scale.squeeze(-1)


def quant_weights(w: torch.Tensor, chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Rowwise fp8 of expert weights [E, N, K] (one scale per expert and output column), a few experts at a time
    so that the temporaries stay small."""
    q = torch.empty(w.shape, device=w.device, dtype=torch.float8_e4m3fn)
    s = torch.empty(w.shape[:2], device=w.device, dtype=torch.float32)
    for i in range(0, w.shape[0], chunk):
        q[i:i + chunk], s[i:i + chunk] = quant_rows(w[i:i + chunk])
    return q, s


# ----------------------------------------------------------------------------------------------- torch_reference
def router_step(p: Plan, w: Weights) -> Step:
    def router(s: SimpleNamespace) -> None:
        probs = torch.softmax(s.x @ w.wg, dim=-1, dtype=torch.float32)
        top = torch.topk(probs, p.k, dim=-1).values
        s.gate = top / top.sum(dim=-1, keepdim=True)
        s.ids = p.ids  # the seeded routing's experts (topk's ids are not used)

    return ("router", router)


def _send_steps(p: Plan, comm: Comm) -> list[Step]:
    """permute and dispatch."""
    def permute(s: SimpleNamespace) -> None:
        flat = s.ids.reshape(-1)
        dest = flat // p.L
        s.order = torch.argsort(dest, stable=True)
        s.token = s.order // p.k
        s.send_x = s.x.index_select(0, s.token)
        s.send_ids = flat.index_select(0, s.order)
        counts = torch.bincount(dest, minlength=p.ep)
        recv = torch.empty_like(counts)
        comm.a2a(recv, counts)
        sizes = torch.cat((counts, recv)).tolist()
        s.send_splits, s.recv_splits = sizes[:p.ep], sizes[p.ep:]

    def dispatch(s: SimpleNamespace) -> None:
        if p.emulated:
            src_x, src_ids, ins, outs = p.incoming_x, p.incoming_ids, [p.rows], [p.rows]
        else:
            src_x, src_ids, ins, outs = s.send_x, s.send_ids, s.send_splits, s.recv_splits
        n = sum(outs)
        s.recv_x = src_x.new_empty((n, p.d))
        comm.a2a(s.recv_x, src_x, outs, ins)
        s.recv_ids = src_ids.new_empty((n,))
        comm.a2a(s.recv_ids, src_ids, outs, ins)
        del s.send_x, s.send_ids

    return [("permute", permute), ("dispatch", dispatch)]


def _regroup_step(p: Plan) -> Step:
    def regroup(s: SimpleNamespace) -> None:
        local = s.recv_ids - p.first
        ordered, s.rorder = torch.sort(local, stable=True)
        s.rows = s.recv_x.index_select(0, s.rorder)
        s.offs = torch.searchsorted(ordered, p.arange_L, right=True, out_int32=True)
        del s.recv_x, s.recv_ids

    return ("regroup", regroup)


def _activation(s: SimpleNamespace) -> None:
    gate, up = s.h13.chunk(2, dim=-1)
    s.h = F.silu(gate) * up
    del s.h13


def _expert_steps_bf16(p: Plan, w: Weights) -> list[Step]:
    w13 = w.w13[p.first:p.first + p.L].transpose(-2, -1)  # [L, d, 2f], column-major per expert
    w2 = w.w2[p.first:p.first + p.L].transpose(-2, -1)  # [L, f, d]

    def gemm_gate_up(s: SimpleNamespace) -> None:
        s.h13 = torch._grouped_mm(s.rows, w13, offs=s.offs)
        del s.rows

    def gemm_down(s: SimpleNamespace) -> None:
        s.y = torch._grouped_mm(s.h, w2, offs=s.offs)
        del s.h

    return [("gemm_gate_up", gemm_gate_up), ("activation", _activation), ("gemm_down", gemm_down)]


def _expert_steps_fp8(p: Plan, w: Weights) -> list[Step]:
    q = w.quantised()
    sl = slice(p.first, p.first + p.L)
    w13, w13s = q["w13q"][sl].transpose(-2, -1), q["w13s"][sl]  # [L, d, 2f] column-major, scales [L, 2f]
    w2, w2s = q["w2q"][sl].transpose(-2, -1), q["w2s"][sl]  # [L, f, d], [L, d]

    def quant(s: SimpleNamespace) -> None:
        s.qrows, s.qscale = quant_rows(s.rows)
        del s.rows

    def gemm_gate_up(s: SimpleNamespace) -> None:
        s.h13 = torch._scaled_grouped_mm(s.qrows, w13, s.qscale, w13s, offs=s.offs, out_dtype=torch.bfloat16,
                                         use_fast_accum=True)
        del s.qrows, s.qscale

    def quant_down(s: SimpleNamespace) -> None:
        s.qh, s.hscale = quant_rows(s.h)
        del s.h

    def gemm_down(s: SimpleNamespace) -> None:
        s.y = torch._scaled_grouped_mm(s.qh, w2, s.hscale, w2s, offs=s.offs, out_dtype=torch.bfloat16,
                                       use_fast_accum=True)
        del s.qh, s.hscale

    return [("quant", quant), ("gemm_gate_up", gemm_gate_up), ("activation", _activation),
            ("quant_down", quant_down), ("gemm_down", gemm_down)]


def _return_steps(p: Plan, comm: Comm) -> list[Step]:
    """unregroup, combine and reduce."""
    def unregroup(s: SimpleNamespace) -> None:
        s.unsorted = torch.empty_like(s.y).index_copy_(0, s.rorder, s.y)
        del s.y

    def combine(s: SimpleNamespace) -> None:
        if p.emulated:
            ins, outs = [p.rows], [p.rows]
        else:
            ins, outs = s.recv_splits, s.send_splits
        s.back = s.unsorted.new_empty((sum(outs), p.d))
        comm.a2a(s.back, s.unsorted, outs, ins)
        del s.unsorted

    def reduce(s: SimpleNamespace) -> None:
        src = p.returned if p.emulated else s.back
        gate = s.gate.reshape(-1).index_select(0, s.order).to(src.dtype)
        s.out = torch.zeros((p.T, p.d), device=src.device, dtype=src.dtype).index_add_(0, s.token,
                                                                                       src * gate.unsqueeze(1))

    return [("unregroup", unregroup), ("combine", combine), ("reduce", reduce)]


def reference_steps(p: Plan, w: Weights, dtype: str, comm: Comm) -> list[Step]:
    """The torch_reference pipeline's steps (see METHOD)."""
    experts = _expert_steps_fp8(p, w) if dtype == "fp8" else _expert_steps_bf16(p, w)
    return [router_step(p, w), *_send_steps(p, comm), _regroup_step(p), *experts, *_return_steps(p, comm)]


def fused_steps(p: Plan, w: Weights) -> list[Step]:
    """The fused pipeline's steps: router, then :func:`moesim.bench.fused_moe.expert_steps`."""
    from moesim.bench import fused_moe

    return [router_step(p, w), *fused_moe.expert_steps(p.x, w.w13, w.w2, p.T, p.k)]


def run_layer(steps: list[Step], x: torch.Tensor) -> SimpleNamespace:
    """One untimed run of ``steps``; the state at the end (``out`` is the layer's output)."""
    s = SimpleNamespace(x=x)
    for _, fn in steps:
        fn(s)
    return s


def dense_moe(x: torch.Tensor, ids: torch.Tensor, gate: torch.Tensor, w13: torch.Tensor,
              w2: torch.Tensor) -> torch.Tensor:
    """The same MoE computed per expert in float32 without any permutation: sum over each token's k experts
    of gate * W2 (SiLU(gate half) * up half of W13 x). The check the tests hold every pipeline to."""
    x, w13, w2 = x.float(), w13.float(), w2.float()
    out = torch.zeros_like(x)
    for e in ids.unique().tolist():
        tok, j = (ids == e).nonzero(as_tuple=True)
        g, u = (x[tok] @ w13[e].T).chunk(2, dim=-1)
        out.index_add_(0, tok, gate[tok, j].float().unsqueeze(1) * ((F.silu(g) * u) @ w2[e].T))
    return out


# ----------------------------------------------------------------------------------------------- timing
@dataclass
class Timer:
    """Times a pipeline's steps: events between the steps of one run, and the whole run as one region."""

    cpu: bool
    warmup: int
    reps: int
    flush_buf: torch.Tensor | None
    comm: Comm

    def _before(self) -> None:
        if self.flush_buf is not None:
            self.flush_buf.bitwise_not_()
        sync(self.cpu)
        self.comm.barrier()

    def _stepped(self, steps: list[Step], x: torch.Tensor, evs: list) -> list[float]:
        s = SimpleNamespace(x=x)
        evs[0].record()
        for (_, fn), ev in zip(steps, evs[1:]):
            fn(s)
            ev.record()
        sync(self.cpu)
        return [a.elapsed_time(b) for a, b in zip(evs, evs[1:])]

    def _whole(self, steps: list[Step], x: torch.Tensor, pair: list) -> float:
        s = SimpleNamespace(x=x)
        pair[0].record()
        for _, fn in steps:
            fn(s)
        pair[1].record()
        sync(self.cpu)
        return pair[0].elapsed_time(pair[1])

    def measure(self, steps: list[Step], x: torch.Tensor) -> dict:
        evs = [event(self.cpu) for _ in range(len(steps) + 1)]
        pair = [event(self.cpu), event(self.cpu)]
        for _ in range(self.warmup):
            self._before()
            self._stepped(steps, x, evs)
            self._before()
            self._whole(steps, x, pair)
        per_step: list[list[float]] = [[] for _ in steps]
        totals = []
        for _ in range(self.reps):
            self._before()
            for acc, ms in zip(per_step, self._stepped(steps, x, evs)):
                acc.append(ms)
            self._before()
            totals.append(self._whole(steps, x, pair))
        medians = {name: statistics.median(v) for (name, _), v in zip(steps, per_step)}
        return {"steps_ms": medians, "steps_sum_ms": sum(medians.values()), "total_ms": statistics.median(totals),
                "min_ms": min(totals), "max_ms": max(totals)}


# ----------------------------------------------------------------------------------------------- sweep
def _eps(sh: dict[str, int], world: int) -> list[int]:
    if world > 1:
        return [world]
    E = sh["num_experts"]
    return [1, EP_SLICE] if E >= 64 and E % EP_SLICE == 0 else [1]


def sweep(shapes: dict[str, dict[str, int]], *, world: int = 1, quick: bool = False, cpu: bool = False,
          dtypes: tuple[str, ...] = DTYPES, pipelines: tuple[str, ...] = PIPELINES) -> list[Point]:
    """The points, most important first (a time budget cuts from the end): torch_reference bf16 at every token
    count and routing (EP1 and, for E >= 64, the EP8 slice); fp8 at T 128/2048/16384 with uniform and zipf1.0
    routing; fused (bf16, EP1) at every token count with uniform routing and at 2048/16384 with zipf1.0.
    ``quick``: T 128 and 2048, uniform routing. ``cpu``: T 8 and 32, uniform and zipf2.0, fused only at T 8."""
    if cpu:
        tok, routes, tok8, routes8, fused_tok = (8, 32), ("uniform", "zipf2.0"), (32,), ("uniform",), ((8, "uniform"),)
    elif quick:
        tok, routes, tok8, routes8 = (128, 2048), ("uniform",), (128, 2048), ("uniform",)
        fused_tok = ((128, "uniform"), (2048, "uniform"))
    else:
        tok, routes, tok8, routes8 = TOKENS, ROUTINGS, (128, 2048, 16384), ("uniform", "zipf1.0")
        fused_tok = tuple((t, "uniform") for t in TOKENS) + ((2048, "zipf1.0"), (16384, "zipf1.0"))
    points = []
    if "bf16" in dtypes and "torch_reference" in pipelines:
        points += [Point(n, ep, "torch_reference", "bf16", r, t) for n, sh in shapes.items() for ep in _eps(sh, world)
                   for r in routes for t in tok]
    if "fp8" in dtypes and "torch_reference" in pipelines:
        points += [Point(n, ep, "torch_reference", "fp8", r, t) for n, sh in shapes.items() for ep in _eps(sh, world)
                   for r in routes8 for t in tok8]
    if "bf16" in dtypes and "fused" in pipelines and world == 1:
        points += [Point(n, 1, "fused", "bf16", r, t) for n in shapes for t, r in fused_tok]
    return points


def estimate_ms(sh: dict[str, int], pt: Point) -> float:
    """A rough H200 time of one run of a point's pipeline (uniform routing), to plan the sweep: launch floor +
    max(GEMM FLOPs at 600 (bf16) / 1000 (fp8) TFLOP/s, touched expert weights at 3.5 TB/s) + row copies at
    3 TB/s."""
    d, f, E, k = sh["d_model"], sh["d_ff"], sh["num_experts"], sh["top_k"]
    L, R = E // pt.ep, pt.tokens * k
    touched = L * (1 - (1 - k / E) ** (pt.tokens * pt.ep))
    fp8 = pt.dtype == "fp8"
    gemm = max(6 * R * d * f / (1.0e15 if fp8 else 0.6e15), touched * 3 * d * f * (1 if fp8 else 2) / 3.5e12)
    copies = (2 * R * d * (12 if pt.pipeline == "torch_reference" else 4) + 10 * R * f) / 3.0e12
    return (0.7 if pt.pipeline == "torch_reference" else 0.4) + (gemm + copies) * 1e3


def estimate_seconds(shapes: dict[str, dict[str, int]], points: list[Point], warmup: int, reps: int) -> float:
    """Estimated wall time of the sweep on an H200: every point's runs (two per repetition, plus 0.3 ms of L2
    flush and synchronisation each), 0.1 s of set-up per point, the weights' initialisation per shape and
    2.5 s per Triton kernel compiled."""
    runs = 2 * (warmup + reps)
    total = sum(runs * (estimate_ms(shapes[p.shape], p) + 0.3) / 1e3 + 0.1 for p in points)
    total += sum(0.2 + 3 * s["num_experts"] * s["d_model"] * s["d_ff"] * 2 / 5e11 for s in shapes.values())
    return total + (7 * 2.5 if any(p.pipeline == "fused" for p in points) else 0.0)


# ----------------------------------------------------------------------------------------------- device facts
def _median_event_ms(fn: Callable[[], object], cpu: bool, n: int = 10) -> float:
    for _ in range(3):
        fn()
    sync(cpu)
    times = []
    for _ in range(n):
        a, b = event(cpu), event(cpu)
        a.record()
        fn()
        b.record()
        sync(cpu)
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def _tflops_8k(dev: torch.device, cpu: bool, fp8: bool) -> float:
    n = 256 if cpu else 8192
    a = torch.randn(n, n, device=dev, dtype=torch.float32 if cpu else torch.bfloat16)
    b = torch.randn_like(a)
    if not fp8:
        return 2 * n**3 / _median_event_ms(lambda: a @ b, cpu) / 1e9
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).T  # column-major second operand
    one = torch.ones((), device=dev)
    return 2 * n**3 / _median_event_ms(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16,
                                                                  use_fast_accum=True), cpu) / 1e9


def ceilings(dev: torch.device, cpu: bool) -> dict:
    """8192^3 bf16 matmul TFLOP/s, the same in fp8 (None where it does not run), 2 GiB device copy GB/s."""
    res = {"bf16_tflops_8k": _tflops_8k(dev, cpu, False), "fp8_tflops_8k": None}
    if not cpu:
        try:
            res["fp8_tflops_8k"] = _tflops_8k(dev, cpu, True)
        except (RuntimeError, TypeError):
            pass
    size = 2**20 if cpu else 2**31
    src = torch.empty(size, device=dev, dtype=torch.uint8)
    dst = torch.empty_like(src)
    res["copy_GBps_rw"] = 2 * size / _median_event_ms(lambda: dst.copy_(src), cpu) / 1e6
    return res


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def probe_blockwise(dev: torch.device) -> str:
    """Whether this torch runs DeepSeek-V3's fp8 recipe (1x128 activation and 128x128 weight block scales):
    dense torch._scaled_mm, and torch.nn.functional.scaled_grouped_mm. A sentence for the method text."""
    M, K, N = 256, 512, 256  # K/128 = 4: no padding of the scale rows either way
    a = torch.randn(M, K, device=dev).to(torch.float8_e4m3fn)
    b = torch.randn(N, K, device=dev).to(torch.float8_e4m3fn)
    sa = torch.ones(K // 128, M, device=dev).T  # [M, K/128], stride (1, M)
    sb = torch.ones(N // 128, K // 128, device=dev).T  # [K/128, N/128], stride (1, K/128)
    try:
        out = torch._scaled_mm(a, b.T, sa, sb, out_dtype=torch.bfloat16)
        ref = a.float() @ b.float().T
        dense = "ran" if torch.allclose(out.float(), ref, rtol=0.02, atol=0.5) else "ran with wrong results"
    except (RuntimeError, TypeError, ValueError) as e:
        dense = f"failed ({_first_line(e)})"
    try:
        rec = F.ScalingType  # type: ignore[attr-defined]
        bg = torch.randn(2, N, K, device=dev).to(torch.float8_e4m3fn)
        sbg = torch.ones(2, N // 128, K // 128, device=dev).transpose(-2, -1)
        F.scaled_grouped_mm(a, bg.transpose(-2, -1), sa, rec.BlockWise1x128, sbg, rec.BlockWise128x128,
                            offs=torch.tensor([M // 2, M], device=dev, dtype=torch.int32))
        grouped = "ran"
    except (RuntimeError, TypeError, ValueError, AttributeError) as e:
        grouped = f"failed ({_first_line(e)})"
    return (f"Blockwise fp8 probe (DeepSeek-V3 recipe, 1x128 activation and 128x128 weight scales): dense "
            f"torch._scaled_mm {dense}; grouped torch.nn.functional.scaled_grouped_mm {grouped}. The fp8 records "
            "were measured with rowwise scales (fp8_scaling), not blockwise.")


def self_check(dev: torch.device, cpu: bool, comm: Comm, cases: list[tuple[str, str]], when: str) -> str:
    """Run each (pipeline, dtype) of ``cases`` once on a small problem and compare its output with
    :func:`dense_moe`; a sentence for the method text."""
    sh = {"d_model": 256, "d_ff": 128, "num_experts": 16, "top_k": 4}
    T, dtype = (16, torch.float32) if cpu else (64, torch.bfloat16)
    p = make_plan("self-check", sh, 1, "zipf1.0", T, world=1, rank=0, dev=dev, dtype=dtype)
    w = make_weights("self-check", sh, dev, dtype)
    gate = torch.softmax(p.x @ w.wg, dim=-1, dtype=torch.float32).topk(p.k, dim=-1).values
    ref = dense_moe(p.x, p.ids, gate / gate.sum(-1, keepdim=True), w.w13, w.w2)
    found = []
    for pipe, dt in cases:
        try:
            steps = reference_steps(p, w, dt, comm) if pipe == "torch_reference" else fused_steps(p, w)
            out = run_layer(steps, p.x).out.float()
            found.append(f"{pipe} {dt} {float((out - ref).abs().max() / ref.abs().max()):.2e}")
        except Exception as e:  # reported in the method text; the sweep records the error per point
            found.append(f"{pipe} {dt} failed ({_first_line(e)})")
    return (f" Self-check {when} (T={T}, d=256, f=128, E=16, k=4, zipf1.0): max |output - dense fp32 per-token "
            "MoE| / max |dense|: " + "; ".join(found) + ".")


# ----------------------------------------------------------------------------------------------- driver
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def open_group(cpu: bool) -> tuple[Comm, bool, str]:
    """The process group the pipelines talk through: torchrun's (WORLD_SIZE > 1), one already made, or a new
    world of one (env:// on 127.0.0.1 and a free port; gloo on the CPU, NCCL on a GPU). Returns it, whether this
    call made it (and should destroy it), and a note for the method text if none could be made (world 1: the
    all-to-alls then become device copies)."""
    if dist.is_initialized():
        return Comm(dist.get_world_size(), True), False, ""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    backend = "gloo" if cpu else "nccl"
    if world > 1:
        dist.init_process_group(backend)
        return Comm(world, True), True, ""
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    try:
        dist.init_process_group(backend, init_method="env://", rank=0, world_size=1)
        _check_a2a(cpu)
        return Comm(1, True), True, ""
    except (RuntimeError, ValueError) as e:
        if dist.is_initialized():
            dist.destroy_process_group()
        return Comm(1, False), False, (f" No working {backend} process group ({_first_line(e)}): the all-to-alls "
                                      "(permute's count exchange, dispatch, combine) were plain device copies.")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _check_a2a(cpu: bool) -> None:
    """An all_to_all_single with split sizes to itself, on the device: it must return its rows."""
    dev = torch.device("cpu") if cpu else torch.device("cuda", torch.cuda.current_device())
    x = torch.arange(6, device=dev, dtype=torch.float32).reshape(3, 2)
    y = torch.empty_like(x)
    dist.all_to_all_single(y, x, [3], [3])
    if not torch.equal(x, y):
        raise RuntimeError("all_to_all_single to itself returned other rows")


@dataclass
class _Run:
    """What every point of one sweep shares."""

    dev: torch.device
    cpu: bool
    rank: int
    dtype: torch.dtype
    timer: Timer
    res: dict
    path: Path
    t0: float
    max_seconds: float | None
    log: Callable[[str], None]
    fp8_ok: bool
    fused_error: str | None
    lines: list[str] = field(default_factory=list)  # the records, each encoded once

    def add(self, rec: dict) -> None:
        self.res["records"].append(rec)
        self.lines.append(json.dumps(rec))

    def dump(self) -> None:
        """Write the JSON (atomically): the header indented, then one record per line."""
        if self.rank == 0:
            head = json.dumps({k: v for k, v in self.res.items() if k != "records"}, indent=1)
            text = head[:-2] + ',\n "records": [\n' + ",\n".join(self.lines) + "\n ]\n}\n"
            atomic_write(self.path, lambda fh: fh.write(text))

    def out_of_time(self) -> bool:
        late = self.max_seconds is not None and time.time() - self.t0 > self.max_seconds
        if self.timer.comm.world > 1:  # every rank skips the same points
            flag = torch.tensor([int(late)], device=self.dev)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            late = bool(flag.item())
        return late


def _base(pt: Point, sh: dict[str, int]) -> dict:
    return {"shape": pt.shape, "d_model": sh["d_model"], "d_ff": sh["d_ff"], "num_experts": sh["num_experts"],
            "top_k": sh["top_k"], "ep": pt.ep, "local_experts": sh["num_experts"] // pt.ep, "pipeline": pt.pipeline,
            "dtype": pt.dtype, "routing": pt.routing, "tokens": pt.tokens}


def _cannot_run(pt: Point, run: _Run) -> str | None:
    if pt.dtype == "fp8" and not run.fp8_ok:
        return "fp8 needs a CUDA GPU of compute capability 9.0+ and torch._scaled_grouped_mm"
    if pt.pipeline == "fused":
        if pt.dtype != "bf16" or pt.ep != 1:
            return "the fused pipeline is measured in bf16 at EP1 only"
        return run.fused_error
    return None


def measure_point(pt: Point, sh: dict[str, int], w: Weights, run: _Run) -> dict:
    """One record: route, build the pipeline, time it (or say why it was skipped)."""
    rec = _base(pt, sh)
    reason = _cannot_run(pt, run)
    if reason:
        return dict(rec, skipped=reason)
    world, rank = run.timer.comm.world, run.rank
    p = make_plan(pt.shape, sh, pt.ep, pt.routing, pt.tokens, world=world, rank=rank, dev=run.dev, dtype=run.dtype)
    rec.update(rows=p.rows, rows_per_expert=p.rows_per_expert, send_rows=pt.tokens * p.k)
    if p.rows == 0 and world == 1:
        return dict(rec, skipped="no rows reach this GPU's experts")
    if pt.pipeline == "fused":
        steps = fused_steps(p, w)
    else:
        steps = reference_steps(p, w, pt.dtype, run.timer.comm)
    return dict(rec, **run.timer.measure(steps, p.x))


def _line(i: int, n: int, rec: dict, run: _Run, left_s: float) -> str:
    head = (f"[{i + 1:3d}/{n} {time.time() - run.t0:5.0f}s, ~{left_s:4.0f}s left] {rec['shape']} ep{rec['ep']} "
            f"{rec['pipeline']} {rec['dtype']} {rec['routing']} T={rec['tokens']}")
    if "skipped" in rec:
        return f"{head}: skipped ({rec['skipped']})"
    steps = " ".join(f"{k} {v:.3f}" for k, v in rec["steps_ms"].items())
    return (f"{head} rows={rec['rows']}: total {rec['total_ms']:.3f} ms (min {rec['min_ms']:.3f}), "
            f"steps sum {rec['steps_sum_ms']:.3f}: {steps}")


def _weights_for(name: str, sh: dict[str, int], run: _Run) -> Weights | str:
    if not run.cpu:
        torch.cuda.empty_cache()
    try:
        return make_weights(name, sh, run.dev, run.dtype)
    except torch.cuda.OutOfMemoryError as e:
        return "out of memory for the weights: " + _first_line(e)


def _point_record(pt: Point, sh: dict[str, int], w: Weights | str | None, run: _Run) -> dict:
    """The record of one point: measured, or skipped with the reason (time budget, OOM, an error)."""
    if run.out_of_time():
        return dict(_base(pt, sh), skipped="time budget of the run exhausted")
    if not isinstance(w, Weights):
        return dict(_base(pt, sh), skipped=str(w))
    try:
        return measure_point(pt, sh, w, run)
    except torch.cuda.OutOfMemoryError as e:
        rec = dict(_base(pt, sh), skipped="out of memory: " + _first_line(e))
    except Exception as e:  # one failing point (a kernel that does not support a shape, ...) is recorded
        if run.timer.comm.world > 1:
            raise  # the other ranks would wait in a collective forever
        rec = dict(_base(pt, sh), skipped=f"error: {type(e).__name__}: {_first_line(e)}")
    if not run.cpu:
        try:
            torch.cuda.empty_cache()
        except RuntimeError:  # a sticky CUDA error: the next points will say so
            pass
    return rec


def _sweep(shapes: dict[str, dict[str, int]], points: list[Point], run: _Run, estimates: list[float]) -> None:
    w: Weights | str | None = None
    current = None
    for i, pt in enumerate(points):
        sh = shapes[pt.shape]
        if pt.shape != current:
            w, current = None, pt.shape  # the last shape's weights are freed before the next are made
            w = _weights_for(pt.shape, sh, run)
        rec = _point_record(pt, sh, w, run)
        if pt.dtype == "fp8" and "total_ms" in rec:
            run.res["fp8_scaling"] = "rowwise"
        run.add(rec)
        run.dump()
        done = sum(estimates[: i + 1])
        left = sum(estimates[i + 1:]) * (time.time() - run.t0) / max(done, 1e-9)
        run.log(_line(i, len(points), rec, run, left))


def _fused_error(cpu: bool) -> str | None:
    """Why the fused pipeline cannot run here, or None. On the CPU it runs in Triton's interpreter."""
    if cpu and "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    if cpu and os.environ.get("TRITON_INTERPRET") != "1":
        return "on the CPU the fused pipeline runs only in Triton's interpreter (TRITON_INTERPRET=1)"
    try:
        from moesim.bench import fused_moe  # noqa: F401
    except ImportError as e:
        return f"Triton is not installed ({_first_line(e)})"
    return None


def _header(cpu: bool, world: int, warmup: int, reps: int, flush: bool) -> dict:
    props = None if cpu else torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"format": FORMAT, "device": "cpu (plumbing dry run)" if cpu else props.name,
            "torch": torch.__version__, "cuda": torch.version.cuda or "none",
            "sms": 0 if cpu else props.multi_processor_count, "world_size": world,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "method": METHOD, "warmup": warmup, "reps": reps, "l2_flush": flush,
            "ceilings": {"bf16_tflops_8k": 0.0, "fp8_tflops_8k": None, "copy_GBps_rw": 0.0},
            "fp8_scaling": None, "records": []}


def _defaults(cpu: bool, quick: bool, shapes: dict[str, dict[str, int]] | None, warmup: int | None,
              reps: int | None) -> tuple[dict[str, dict[str, int]], int, int]:
    if shapes is None:
        shapes = CPU_SHAPES if cpu else {n: SHAPES[n] for n in QUICK_SHAPES} if quick else SHAPES
    if warmup is None:
        warmup = 1 if cpu else 3
    if reps is None:
        reps = 2 if cpu else 12
    return shapes, warmup, reps


def _check_names(dtypes: tuple[str, ...], pipelines: tuple[str, ...]) -> None:
    for given, valid, flag in ((dtypes, DTYPES, "--dtypes"), (pipelines, PIPELINES, "--pipelines")):
        bad = [v for v in given if v not in valid]
        if bad or not given:
            raise InputError(f"unknown {bad or 'empty list'}; valid: {', '.join(valid)}", field=flag)


def launch(out: str | Path, nproc: int, filename: str, flags: list[str]) -> Path:
    """Run the sweep on ``nproc`` GPUs (ranks) of this host under torchrun: ``python -m torch.distributed.run
    --nproc_per_node N -m moesim.bench.moe ...`` with this checkout on PYTHONPATH; rank 0 writes the JSON."""
    root = str(Path(__file__).resolve().parents[2])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "moesim.bench.moe",
           "--out", str(out), "--filename", filename, *flags]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    subprocess.run(cmd, env=env, check=True)
    return Path(out) / filename


def _flags(cpu: bool, quick: bool, dtypes: tuple[str, ...], pipelines: tuple[str, ...],
           shapes: dict[str, dict[str, int]] | None, warmup: int | None, reps: int | None, flush: bool,
           max_seconds: float | None) -> list[str]:
    flags = ["--dtypes", ",".join(dtypes), "--pipelines", ",".join(pipelines)]
    flags += ["--cpu"] * cpu + ["--quick"] * quick + ["--no-flush"] * (not flush)
    flags += ["--shapes", json.dumps(shapes)] if shapes else []
    flags += ["--warmup", str(warmup)] if warmup is not None else []
    flags += ["--reps", str(reps)] if reps is not None else []
    return flags + ["--max-seconds", str(max_seconds if max_seconds is not None else -1)]


def run(out: str | Path, *, cpu: bool = False, quick: bool = False, nproc: int = 1,
        dtypes: tuple[str, ...] = DTYPES, pipelines: tuple[str, ...] = PIPELINES,
        shapes: dict[str, dict[str, int]] | None = None, warmup: int | None = None, reps: int | None = None,
        flush: bool = True, max_seconds: float | None = BUDGET_S, filename: str = "moe.json",
        log: Callable[[str], None] | None = print) -> Path:
    """Measure the sweep (:func:`sweep`) and write ``out/filename`` (rewritten after every point); return its path.

    ``nproc`` > 1 (and not already under torchrun): launch ``nproc`` ranks with torchrun (:func:`launch`).
    ``cpu``: tiny shapes in float32 with gloo, 1 + 2 repetitions. ``max_seconds``: points not started by then are
    recorded as skipped. ``log`` gets one line per point.
    """
    _check_names(dtypes, pipelines)
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        return launch(out, nproc, filename, _flags(cpu, quick, dtypes, pipelines, shapes, warmup, reps, flush,
                                                   max_seconds))
    if not cpu and not torch.cuda.is_available():
        raise InputError("no CUDA GPU visible to torch; --cpu runs tiny shapes on the CPU", field="--cpu")
    t0 = time.time()
    shapes, warmup, reps = _defaults(cpu, quick, shapes, warmup, reps)
    if not cpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    comm, owned, note = open_group(cpu)
    try:
        path = Path(out) / filename
        _run(path, shapes, sweep(shapes, world=comm.world, quick=quick, cpu=cpu, dtypes=dtypes, pipelines=pipelines),
             comm, note, cpu=cpu, warmup=warmup, reps=reps, flush=flush, max_seconds=max_seconds, t0=t0,
             log=log or (lambda line: None))
    finally:
        if owned:
            dist.destroy_process_group()
    return path


def _checks_before(run: _Run, points: list[Point]) -> str:
    """The method text's notes that can be made before the sweep: the torch_reference self-check (the kernels
    the sweep itself runs first)."""
    kinds = {(p.pipeline, p.dtype) for p in points}
    cases = [("torch_reference", dt) for dt in DTYPES if ("torch_reference", dt) in kinds
             and (dt == "bf16" or run.fp8_ok)]
    if run.timer.comm.world > 1 or not cases:
        return ""
    return self_check(run.dev, run.cpu, run.timer.comm, cases, "at the start of this run")


def _checks_after(run: _Run, points: list[Point]) -> str:
    """The notes made after the sweep, so that a kernel fault in them cannot spoil a measurement: the fused
    pipeline's self-check and the blockwise fp8 probe."""
    extra = ""
    if run.timer.comm.world == 1 and run.fused_error is None and any(p.pipeline == "fused" for p in points):
        extra += self_check(run.dev, run.cpu, run.timer.comm, [("fused", "bf16")], "after the sweep")
    if run.fp8_ok and run.rank == 0 and any(p.dtype == "fp8" for p in points):
        extra += " " + probe_blockwise(run.dev)
    return extra


def _run(path: Path, shapes: dict[str, dict[str, int]], points: list[Point], comm: Comm, note: str, *, cpu: bool,
         warmup: int, reps: int, flush: bool, max_seconds: float | None, t0: float,
         log: Callable[[str], None]) -> None:
    dev = torch.device("cpu") if cpu else torch.device("cuda", torch.cuda.current_device())
    rank = dist.get_rank() if comm.use_dist else 0
    say = log if rank == 0 else (lambda line: None)
    flush_buf = torch.empty(2**20 if cpu else 256 * 2**20, dtype=torch.uint8, device=dev) if flush else None
    fp8_ok = (not cpu and torch.cuda.get_device_capability(dev) >= (9, 0) and hasattr(torch, "_scaled_grouped_mm"))
    fused_error = _fused_error(cpu) if any(p.pipeline == "fused" for p in points) else None
    run = _Run(dev, cpu, rank, torch.float32 if cpu else torch.bfloat16, Timer(cpu, warmup, reps, flush_buf, comm),
               _header(cpu, comm.world, warmup, reps, flush), path, t0, max_seconds, say, fp8_ok, fused_error)
    est = [2 * (warmup + reps) * (estimate_ms(shapes[p.shape], p) + 0.3) / 1e3 + 0.1 for p in points]
    say(f"moesim bench moe: {len(points)} points on {run.res['device']} x{comm.world}; estimated "
        f"{estimate_seconds(shapes, points, warmup, reps):.0f} s on an H200"
        + (f" (points not started after {max_seconds:.0f} s are skipped)" if max_seconds is not None else ""))
    torch.backends.cuda.matmul.allow_tf32 = False
    run.res["ceilings"] = c = ceilings(dev, cpu)
    extra = note + (" This is a --cpu dry run: float32 instead of bf16, wall-clock timers, tiny shapes." if cpu
                    else "") + _checks_before(run, points)
    run.res["method"] = METHOD + extra
    say(f"ceilings: bf16 {c['bf16_tflops_8k']:.0f} TFLOP/s, fp8 {c['fp8_tflops_8k'] or 0:.0f} TFLOP/s, copy "
        f"{c['copy_GBps_rw']:.0f} GB/s;{extra}")
    run.dump()
    _sweep(shapes, points, run, est)
    after = _checks_after(run, points)
    run.res["method"] += after
    run.dump()
    n_ok = sum("total_ms" in r for r in run.res["records"])
    say(f"{n_ok} of {len(points)} points measured in {time.time() - t0:.0f} s;{after} Wrote {path}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m moesim.bench.moe`` (what :func:`launch` runs on every rank)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--filename", default="moe.json")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--pipelines", default=",".join(PIPELINES))
    ap.add_argument("--shapes", help="JSON {name: {d_model, d_ff, num_experts, top_k}}")
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--reps", type=int)
    ap.add_argument("--no-flush", action="store_true")
    ap.add_argument("--max-seconds", type=float, default=BUDGET_S, help="negative: no limit")
    a = ap.parse_args(argv)
    run(a.out, cpu=a.cpu, quick=a.quick, nproc=a.nproc, dtypes=tuple(a.dtypes.split(",")),
        pipelines=tuple(a.pipelines.split(",")), shapes=json.loads(a.shapes) if a.shapes else None,
        warmup=a.warmup, reps=a.reps, flush=not a.no_flush, max_seconds=a.max_seconds if a.max_seconds >= 0 else None,
        filename=a.filename, log=lambda line: print(line, flush=True))


if __name__ == "__main__":
    main()
