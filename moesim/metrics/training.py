"""Memory per GPU of a training step, counted by hand from the model's shapes, and checked against the GPU.

Per GPU of the simulated pipeline stage (its MoE layers, and the dense layers before them):

- **parameters** (``param_bytes`` each, bf16): the non-expert weights - attention projections, shared experts,
  routers, dense layers - split over ``tp``; the routed experts the GPU holds (``3 d_model d_ff / tp`` each);
- **gradients** (``grad_bytes`` each) of the same;
- **optimizer states** (``optimizer_bytes`` each: fp32 master weight and Adam's two moments) of the same,
  the non-expert ones divided over the data-parallel group when ``shard_optimizer`` (ZeRO-1, Megatron's
  distributed optimizer);
- under FSSDP the routed experts' parameters, gradients and optimizer states are the GPU's *shards*
  (``expert_shard_params``), and the *materialised* experts come on top: the peak number materialised at once
  times their bf16 weights, plus one layer's worth of their gradients before the reduce-scatter;
- **activations** kept for the backward, per micro-batch in flight and per layer, in ``dtype_bytes``: the
  attention's input, Q, K, V and output; the router's input; the expert rows received, their gate-up output,
  activation and down output; the shared experts' input, gate-up output and activation; per dense layer the
  same attention and MLP tensors. In flight: ``min(m, pp)`` micro-batches under 1F1B, ``min(m, pp + 1)``
  under DualPipe (its paper's count), 1 with one stage. ``recompute`` keeps only each layer's input.

Ignored: the embedding and LM head, norms and their inputs, FlashAttention's softmax statistics, the CUDA
context and allocator fragmentation, communication buffers and temporary workspaces.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from moesim.sim.training import TrainOptions
from moesim.traces.model import ModelSpec

GB = 1e9


def attention_width(model: ModelSpec) -> float:
    """Elements per token of Q, K, V and the attention output."""
    if model.is_mla:
        assert model.num_heads and model.qk_nope_head_dim and model.qk_rope_head_dim and model.v_head_dim
        qk = model.qk_nope_head_dim + model.qk_rope_head_dim
        return float(model.num_heads * (2 * qk + 2 * model.v_head_dim))
    q = (model.num_heads or 1) * model.head_size
    return float(2 * q + 2 * model.kv_heads * model.head_size)


def non_expert_params(model: ModelSpec, layers: range) -> float:
    """Weights other than the routed experts in MoE layers ``layers`` and the dense layers before them."""
    d = model.d_model
    total = 0.0
    for l in layers:
        total += model.projection_params + 3.0 * d * model.shared_ff + d * model.num_experts
        total += len(model.dense_layers_before(l)) * (model.projection_params + 3.0 * d * (model.dense_d_ff or 0))
    return total


def activation_bytes(model: ModelSpec, layers: range, home: float, rows: float, tp: int) -> float:
    """Bytes one micro-batch keeps for the backward on one GPU (module docstring): ``home`` tokens at home,
    ``rows`` expert rows received per layer."""
    d, b, f = model.d_model, model.dtype_bytes, model.d_ff / tp
    attn = home * (d + attention_width(model))
    per_layer = attn + home * d + rows * (2.0 * d + 3.0 * f) + home * (d + 3.0 * model.shared_ff)
    dense = home * (d + attention_width(model) + 3.0 * (model.dense_d_ff or 0))
    return b * sum(per_layer + len(model.dense_layers_before(l)) * dense for l in layers)


def in_flight(options: TrainOptions) -> int:
    """Micro-batches whose activations a GPU of the first stage holds at once."""
    if options.pp == 1:
        return 1
    return min(options.micro_batches, options.pp + 1 if options.overlap == "dualpipe" else options.pp)


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU by kind, and the GPU's capacity."""

    params: float
    grads: float
    optimizer: float
    activations: float
    materialised: float
    capacity: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.materialised

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    def as_gb(self) -> dict[str, float]:
        out = {k: v / GB for k, v in asdict(self).items()}
        return {**out, "total": self.total / GB, "fits": float(self.fits)}


def memory_per_gpu(model: ModelSpec, layers: range, options: TrainOptions, *, tp: int, dp: int,
                   expert_params: float, capacity_GB: float, home_tokens: float, max_rows: float,
                   materialised_params: float = 0.0, materialised_layer_params: float = 0.0,
                   shard_optimizer: bool = True) -> Memory:
    """The module docstring's count for one GPU: ``expert_params`` routed-expert parameters it owns (held
    experts under EP, shards under FSSDP), ``materialised_params`` the peak materialised at once (FSSDP) and
    ``materialised_layer_params`` one layer's worth (their gradients wait for the reduce-scatter)."""
    dense = non_expert_params(model, layers) / tp
    owned = dense + expert_params
    opt_dense = dense / dp if shard_optimizer else dense
    acts = activation_bytes(model, layers, home_tokens, max_rows, tp)
    if options.recompute:
        acts = model.dtype_bytes * home_tokens * model.d_model * len(layers)
    return Memory(params=owned * options.param_bytes, grads=owned * options.grad_bytes,
                  optimizer=(opt_dense + expert_params) * options.optimizer_bytes,
                  activations=acts * in_flight(options),
                  materialised=materialised_params * options.param_bytes
                  + materialised_layer_params * options.grad_bytes,
                  capacity=capacity_GB * GB)


def local_params(model: ModelSpec, layers: range, *, tp: int, dp: int, expert_params: float,
                 shard_optimizer: bool = True) -> float:
    """Parameters the GPU's optimizer updates: its non-expert share (over ``dp`` when sharded) and its experts."""
    dense = non_expert_params(model, layers) / tp
    return (dense / dp if shard_optimizer else dense) + expert_params


def imbalance(rows: np.ndarray) -> float:
    """(max - mean) / mean of expert rows per GPU (TensorRT-LLM's imbalance); 0 without rows."""
    mean = float(np.mean(rows))
    return float(np.max(rows)) / mean - 1.0 if mean > 0 else 0.0
