"""A vLLM fused_moe-style MoE expert computation in Triton (bf16, one GPU holding all experts): the ``fused``
pipeline of :mod:`moesim.measure.moe`.

After the router (shared with the torch reference), four steps and no permuted copy of the tokens:

- ``align`` (moe_align_block_size, in torch, no host sync): the T*k picks sorted by expert (stable), each
  expert's picks padded to a multiple of BLOCK_M; ``sorted_ids`` holds pick ids (padding = T*k), ``block_expert``
  the expert of each BLOCK_M block, ``n_padded`` the padded total (on the device).
- ``gemm_gate_up``: a Triton grouped GEMM over the blocks; block b loads its A rows straight from x through
  ``sorted_ids // k`` (a gather inside the GEMM), multiplies by W13[expert] ([2f, d], K-contiguous) and writes
  each output row at its pick id: [T*k, 2f] in pick order. Blocks past ``n_padded`` return at once.
- ``activation``: a Triton silu_and_mul, [T*k, 2f] -> [T*k, f].
- ``gemm_down``: the same kernel on h (rows indexed by pick id, so k = 1) and W2[expert] ([d, f]), the fp32
  accumulator multiplied by each pick's gate weight before the bf16 store, written in pick order [T*k, d].
- ``reduce``: view(T, k, d).sum(1).

Block sizes by the mean rows per expert m = T*k/E: m <= 16: BLOCK_M 16, BLOCK_N 64, BLOCK_K 128 (decode, the
weights dominate); m <= 128: 64/128/64; else 128/128/64 (8 warps). Not tuned per GPU as vLLM's configs are,
and no fp8 or expert-parallel variant. Runs under ``TRITON_INTERPRET=1`` on CPU tensors (float32 only: the
interpreter's bf16 is not usable), which is how the tests check it against the dense computation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable

import torch
import triton
import triton.language as tl

Step = tuple[str, Callable[[SimpleNamespace], None]]


def _interpreter_numpy_fix() -> None:
    """Triton 3.6's interpreter turns its scalar tensors (1-element arrays) into loop bounds with int(), which
    numpy >= 2.4 refuses; give them an __index__ that takes the element. Interpreter only (TRITON_INTERPRET=1):
    compiled kernels never see this."""
    from triton.runtime import interpreter

    orig = getattr(interpreter, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "moesim_fix", False):
        return

    def patched(tensor: type, scope: Any) -> None:  # scope: the interpreter's own patch scope (untyped)
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    setattr(patched, "moesim_fix", True)  # marks the patch as applied (read back with getattr above)
    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_numpy_fix()


@dataclass(frozen=True)
class Config:
    """Tile sizes of both GEMMs."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


def pick_config(rows: int, num_experts: int) -> Config:
    """Tiles by the mean rows per expert (see the module docstring)."""
    m = rows / num_experts
    if m <= 16:
        return Config(16, 64, 128, 1, 4, 4)
    if m <= 128:
        return Config(64, 128, 64, 8, 4, 4)
    return Config(128, 128, 64, 8, 8, 3)


def align_block_size(flat_ids: torch.Tensor, num_experts: int, block_m: int, ar_e: torch.Tensor,
                     ar_n: torch.Tensor, ar_blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """moe_align_block_size in torch: (sorted_ids int32 [max_padded], block_expert int32 [max_padded/block_m],
    n_padded int32 [1]); ``ar_e``/``ar_n``/``ar_blocks`` are arange(E), arange(T*k), arange(blocks)*block_m,
    made once outside the timed region. max_padded = T*k + E*(block_m-1) rounded up to block_m, a bound known
    without a host sync, as in vLLM."""
    n = flat_ids.numel()
    sorted_e, order = torch.sort(flat_ids, stable=True)
    ends = torch.searchsorted(sorted_e, ar_e, right=True)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    padded = (counts + block_m - 1) // block_m * block_m
    pad_ends = torch.cumsum(padded, 0)
    pos = (pad_ends - padded - ends + counts).index_select(0, sorted_e) + ar_n  # padded start + rank in expert
    sorted_ids = torch.full((ar_blocks.numel() * block_m,), n, device=flat_ids.device, dtype=torch.int32)
    sorted_ids.index_put_((pos,), order.to(torch.int32))
    block_expert = torch.searchsorted(pad_ends, ar_blocks, right=True).clamp_(max=num_experts - 1).to(torch.int32)
    return sorted_ids, block_expert, pad_ends[-1:].to(torch.int32)


@triton.jit
def _moe_gemm(a_ptr, b_ptr, c_ptr, gate_ptr, sorted_ptr, expert_ptr, n_padded_ptr,
              N, K, num_valid, num_blocks_m, top_k, stride_am, stride_be, stride_bn, stride_cm,
              MUL_GATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              GROUP_M: tl.constexpr):
    """C[pick] = A[pick // top_k] @ B[expert].T (x gate[pick]) for the picks of one BLOCK_M block."""
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    group_size = tl.minimum(num_blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_n = (pid % width) // group_size
    if pid_m * BLOCK_M >= tl.load(n_padded_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pick = tl.load(sorted_ptr + offs_m)
    valid = pick < num_valid
    expert = tl.load(expert_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (pick // top_k).to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + expert * stride_be + offs_n.to(tl.int64)[None, :] * stride_bn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - kk * BLOCK_K
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        acc += tl.dot(a, b)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if MUL_GATE:
        acc = acc * tl.load(gate_ptr + pick, mask=valid, other=0.0)[:, None]
    c_ptrs = c_ptr + pick.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < N))


@triton.jit
def _silu_and_mul(in_ptr, out_ptr, F, BLOCK: tl.constexpr):
    """out[r] = silu(in[r, :F]) * in[r, F:] for one row r and BLOCK columns."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < F
    g = tl.load(in_ptr + row * 2 * F + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(in_ptr + row * 2 * F + F + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * F + cols, (g * tl.sigmoid(g) * u).to(out_ptr.dtype.element_ty), mask=ok)


def moe_gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, gate: torch.Tensor | None, sorted_ids: torch.Tensor,
             block_expert: torch.Tensor, n_padded: torch.Tensor, top_k: int, cfg: Config) -> torch.Tensor:
    """out[pick] = a[pick // top_k] @ w[expert(pick)].T (times gate[pick] if given); w is [E, N, K]."""
    N, K = w.shape[1], w.shape[2]
    blocks = block_expert.numel()
    grid = (blocks * triton.cdiv(N, cfg.block_n),)
    _moe_gemm[grid](a, w, out, gate if gate is not None else out, sorted_ids, block_expert, n_padded,
                    N, K, out.shape[0], blocks, top_k, a.stride(0), w.stride(0), w.stride(1), out.stride(0),
                    MUL_GATE=gate is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                    GROUP_M=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def silu_and_mul(h13: torch.Tensor, block: int = 1024) -> torch.Tensor:
    f = h13.shape[1] // 2
    out = torch.empty((h13.shape[0], f), device=h13.device, dtype=h13.dtype)
    _silu_and_mul[(h13.shape[0], triton.cdiv(f, block))](h13, out, f, BLOCK=block)
    return out


def expert_steps(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, T: int, k: int,
                 cfg: Config | None = None) -> list[Step]:
    """The steps after the router (which leaves ``ids`` [T, k] and ``gate`` [T, k] fp32 in the state): align,
    gemm_gate_up, activation, gemm_down, reduce. w13 [E, 2f, d], w2 [E, d, f], both contiguous."""
    E, d = w13.shape[0], w13.shape[2]
    cfg = cfg or pick_config(T * k, E)
    max_padded = triton.cdiv(T * k + E * (cfg.block_m - 1), cfg.block_m) * cfg.block_m
    dev = x.device
    ar_e, ar_n = torch.arange(E, device=dev), torch.arange(T * k, device=dev)
    ar_blocks = torch.arange(0, max_padded, cfg.block_m, device=dev)

    def align(s: SimpleNamespace) -> None:
        s.sorted_ids, s.block_expert, s.n_padded = align_block_size(s.ids.reshape(-1), E, cfg.block_m, ar_e, ar_n,
                                                                    ar_blocks)

    def gemm_gate_up(s: SimpleNamespace) -> None:
        out = torch.empty((T * k, w13.shape[1]), device=dev, dtype=x.dtype)
        s.h13 = moe_gemm(s.x, w13, out, None, s.sorted_ids, s.block_expert, s.n_padded, k, cfg)

    def activation(s: SimpleNamespace) -> None:
        s.h = silu_and_mul(s.h13)
        del s.h13

    def gemm_down(s: SimpleNamespace) -> None:
        out = torch.empty((T * k, d), device=dev, dtype=x.dtype)
        s.y = moe_gemm(s.h, w2, out, s.gate.reshape(-1), s.sorted_ids, s.block_expert, s.n_padded, 1, cfg)
        del s.h

    def reduce(s: SimpleNamespace) -> None:
        s.out = s.y.view(T, k, d).sum(dim=1)

    return [("align", align), ("gemm_gate_up", gemm_gate_up), ("activation", activation), ("gemm_down", gemm_down),
            ("reduce", reduce)]
