"""The pipelines' steps, each a function of one state whose tensors pass to the next step: ``torch_reference``
(router, permute, dispatch, regroup, grouped GEMMs, activation, unregroup, combine, reduce; bf16 or rowwise
fp8) and ``fused`` (the router, then :mod:`moesim.measure.fused_moe`); the dense float32 MoE every pipeline is
checked against."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moesim.measure.moe.inputs import Plan, Weights, quant_rows


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

    incoming = p.emulated_rows() if p.emulated else None

    def dispatch(s: SimpleNamespace) -> None:
        if incoming is not None:
            src_x, src_ids, ins, outs = incoming[0], incoming[1], [p.rows], [p.rows]
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

    returned = p.emulated_rows()[2] if p.emulated else None

    def reduce(s: SimpleNamespace) -> None:
        src = returned if returned is not None else s.back
        gate = s.gate.reshape(-1).index_select(0, s.order).to(src.dtype)
        s.out = torch.zeros((p.T, p.d), device=src.device, dtype=src.dtype).index_add_(0, s.token,
                                                                                       src * gate.unsqueeze(1))

    return [("unregroup", unregroup), ("combine", combine), ("reduce", reduce)]


def reference_steps(p: Plan, w: Weights, dtype: str, comm: Comm) -> list[Step]:
    """The torch_reference pipeline's steps (see METHOD)."""
    experts = _expert_steps_fp8(p, w) if dtype == "fp8" else _expert_steps_bf16(p, w)
    return [router_step(p, w), *_send_steps(p, comm), _regroup_step(p), *experts, *_return_steps(p, comm)]


def fused_steps(p: Plan, w: Weights) -> list[Step]:
    """The fused pipeline's steps: router, then :func:`moesim.measure.fused_moe.expert_steps`."""
    from moesim.measure import fused_moe

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
