"""One point's inputs: the seeded routing (Gumbel-top-k over uniform or Zipf expert weights), the tokens, and
(an emulated expert-parallel slice) the rows other GPUs send and return; a shape's weights and their rowwise fp8
copies."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch

FP8_MAX = 448.0  # largest float8_e4m3fn value


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

    def emulated_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """An emulated slice's rows from other GPUs: those sent here (``incoming_x``, ``incoming_ids``) and those
        returned (``returned``)."""
        if self.incoming_x is None or self.incoming_ids is None or self.returned is None:
            raise ValueError("not an emulated expert-parallel slice: no rows from other GPUs")
        return self.incoming_x, self.incoming_ids, self.returned


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


def seed_of(*parts: object) -> int:
    """A seed from the parts' text (CRC-32): the same point gets the same routing, tokens and weights."""
    return zlib.crc32("|".join(map(str, parts)).encode())


def make_plan(name: str, sh: dict[str, int], ep: int, routing: str, T: int, *, world: int, rank: int,
              dev: torch.device, dtype: torch.dtype) -> Plan:
    """Route the T*ep tokens of the EP group (seeded) and build this GPU's inputs: rank ``rank`` of ``world``,
    or (world 1, ep > 1) the emulated busiest rank of the slice."""
    d, f, E, k = sh["d_model"], sh["d_ff"], sh["num_experts"], sh["top_k"]
    L = E // ep
    group = pick_experts(T * ep, E, k, routing, seed_of(name, routing, T, ep), seed_of(name, routing), dev)
    flat = group.reshape(-1)
    emulated = world == 1 and ep > 1
    r = int(torch.bincount(flat // L, minlength=ep).argmax()) if emulated else rank
    first = r * L
    incoming = flat[(flat >= first) & (flat < first + L)]
    rows_per_expert = torch.bincount(incoming - first, minlength=L).tolist()
    gen = torch.Generator(device=dev).manual_seed(seed_of(name, "x", T, rank))
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
    gen = torch.Generator(device=dev).manual_seed(seed_of(name, "weights"))

    def rand(*dims: int, fan_in: int) -> torch.Tensor:
        return torch.empty(*dims, device=dev, dtype=dtype).normal_(0.0, fan_in ** -0.5, generator=gen)

    return Weights(rand(d, E, fan_in=d), rand(E, 2 * f, d, fan_in=d), rand(E, d, f, fan_in=f))


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
