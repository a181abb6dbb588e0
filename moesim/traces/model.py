"""The shape of an MoE model: what routing traces refer to and what each layer's compute costs.

Layers. ``num_layers`` counts the MoE layers, the ones routing traces refer to (trace layer ``l`` is the
``l``-th MoE layer). Dense (non-MoE) transformer layers - attention and one dense SwiGLU MLP of width
``dense_d_ff`` - sit ``first_dense_layers`` before the first MoE layer (DeepSeek's ``first_k_dense_replace``)
and ``moe_layer_step - 1`` before each MoE layer (Llama-4's ``interleave_moe_layer_step``: with step 2 every
second layer is MoE). The transformer then has ``first_dense_layers + num_layers x moe_layer_step`` layers,
and MoE layer ``l`` is layer ``first_dense_layers + l x moe_layer_step + moe_layer_step - 1`` of them
(:meth:`ModelSpec.moe_layer_index`; Llama-4's ``moe_layers``, counted from 0). Each MoE layer holds
``num_experts`` routed experts (``top_k`` per token) and ``shared_experts`` shared experts of width
``shared_d_ff`` (default ``d_ff``) that every token runs; all FFNs are SwiGLU (three ``d_model x d_ff``
matrices).

Attention. Without ``num_heads``: projections of ``4 d_model^2`` weights and no attention core. With
``num_heads`` and no MLA field: GQA (``num_kv_heads``, ``head_dim``), projections Q, K, V, O of
``d_model x (2 H hd + 2 KV hd)`` weights. With ``kv_lora_rank`` (DeepSeek-V2/V3, Kimi-K2): multi-head latent
attention, projections q_a ``d x q_lora`` and q_b ``q_lora x H (nope + rope)`` (or one ``d x H (nope + rope)``
without ``q_lora_rank``), kv_a ``d x (kv_lora + rope)``, kv_b ``kv_lora x H (nope + v)``, o ``H v x d``
(:attr:`ModelSpec.projection_params`; the attention core's closed forms are in :mod:`moesim.sim.compute`).
``sliding_window`` applies to every ``sliding_window_every``-th layer counted over all layers from layer 0
(GPT-OSS: a 128-token window on layers 0, 2, 4, ...; its attention sinks are not modelled).

Routing: ``expert_groups`` and ``topk_groups`` are group-limited routing (DeepSeek-V3's ``n_group`` and
``topk_group``): synthetic workloads route that way unless the workload gives its own ``groups``.
``mtp_layers`` (DeepSeek's ``num_nextn_predict_layers``) drafts tokens in speculative decoding
(``workload.speculative``, :mod:`moesim.study.speculative`: one more MoE layer), else it is idle;
``vocab_size`` only counts parameters (:meth:`ModelSpec.param_counts`). Named architectures:
:mod:`moesim.traces.model_presets`.
Deliberately ignored: norms, biases, rotary embeddings, QK norms, attention sinks and Llama-4's chunked
attention (full attention is exact up to its 8192-token chunks).
"""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from moesim.loaders import NoBoolNumbers

# Sanity bounds: far beyond any model, small enough that sizes multiply without overflow (memory and time are
# then the study's own check, moesim.study.sizes).
MAX_LAYERS = 10_000  # a hundred times the MoE layers of any model so far
MAX_EXPERTS = 1_000_000
MAX_DIM = 10_000_000

MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
# Fields added with dense layers, shared experts and MLA: a dump leaves them out while they hold their defaults,
# so a model without them writes the results.json it always did.
ARCHITECTURE_FIELDS = ("first_dense_layers", "moe_layer_step", "dense_d_ff", "shared_experts", "shared_d_ff",
                       *MLA_FIELDS, "sliding_window_every", "expert_groups", "topk_groups", "mtp_layers",
                       "vocab_size")


def _count(default: int, description: str, most: int = MAX_LAYERS) -> Any:
    return Field(default=default, ge=0 if default == 0 else 1, le=most, description=description)


def _dim(description: str) -> Any:
    return Field(default=None, ge=1, le=MAX_DIM, description=description)


class ModelSpec(NoBoolNumbers):
    """An MoE model's shape (see the module docstring). ``num_layers`` counts MoE layers only."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = "moe"
    num_layers: int = Field(ge=1, le=MAX_LAYERS, description="MoE layers")
    num_experts: int = Field(ge=1, le=MAX_EXPERTS, description="routed experts per layer")
    top_k: int = Field(ge=1, le=MAX_EXPERTS)
    d_model: int = Field(ge=1, le=MAX_DIM, description="hidden size")
    d_ff: int = Field(ge=1, le=MAX_DIM, description="expert FFN intermediate size (SwiGLU: three d_model x d_ff "
                                                     "matrices)")
    dtype_bytes: float = Field(default=2, ge=0.125, le=16, description="bytes per weight and activation element")
    dispatch_bytes_per_token: float | None = Field(
        default=None, gt=0, le=1e12, description="bytes per dispatched token copy (default d_model x dtype_bytes)")
    combine_bytes_per_token: float | None = Field(
        default=None, gt=0, le=1e12, description="bytes per combined token copy (default d_model x dtype_bytes)")
    dense_flops_per_token: float | None = Field(
        default=None, ge=0, le=1e18, description="non-expert FLOPs per token per layer (default: the attention "
                                                 "projections, 2 FLOPs per weight; 8 d_model^2 without num_heads)")
    dense_weight_bytes: float | None = Field(
        default=None, ge=0, le=1e18, description="non-expert weight bytes per layer (default: the attention "
                                                 "projections; 4 d_model^2 x dtype_bytes without num_heads)")
    num_heads: int | None = Field(default=None, ge=1, le=MAX_DIM, description="attention query heads (enables the "
                                  "attention core; projections then follow the GQA or MLA shape)")
    num_kv_heads: int | None = Field(default=None, ge=1, le=MAX_DIM, description="key/value heads (default num_heads)")
    head_dim: int | None = Field(default=None, ge=1, le=MAX_DIM,
                                 description="per-head size (default d_model / num_heads)")
    sliding_window: int | None = Field(default=None, ge=1, le=2**31 - 1,
                                       description="attention window in tokens (GPT-OSS: 128)")
    sliding_window_every: int = _count(1, "the window applies to every n-th layer from layer 0 (GPT-OSS: 2)")
    first_dense_layers: int = _count(0, "dense transformer layers before the first MoE layer (DeepSeek-V3: 3)")
    moe_layer_step: int = _count(1, "every n-th layer is MoE, n - 1 dense layers before each (Llama-4: 2)")
    dense_d_ff: int | None = _dim("the dense layers' SwiGLU MLP intermediate size (needed with dense layers)")
    shared_experts: int = _count(0, "shared experts every token runs in every MoE layer", MAX_EXPERTS)
    shared_d_ff: int | None = _dim("intermediate size of each shared expert (default d_ff)")
    q_lora_rank: int | None = _dim("MLA: query low-rank size (none: one d_model x heads x qk projection)")
    kv_lora_rank: int | None = _dim("MLA: compressed KV size (enables multi-head latent attention)")
    qk_nope_head_dim: int | None = _dim("MLA: per-head query/key size without rotary embedding")
    qk_rope_head_dim: int | None = _dim("MLA: per-head rotary query/key size (shared key)")
    v_head_dim: int | None = _dim("MLA: per-head value size")
    expert_groups: int = _count(1, "expert groups of group-limited routing (DeepSeek-V3 n_group: 8)", MAX_EXPERTS)
    topk_groups: int | None = Field(default=None, ge=1, le=MAX_EXPERTS,
                                    description="groups each token may use (DeepSeek-V3 topk_group: 4)")
    mtp_layers: int = _count(0, "multi-token-prediction layers (drafts in workload.speculative)")
    vocab_size: int | None = _dim("vocabulary size (parameter counts only)")

    @model_validator(mode="after")
    def _check(self) -> "ModelSpec":
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) exceeds num_experts ({self.num_experts})")
        self._check_attention()
        self._check_layers()
        self._check_groups()
        return self

    def _check_attention(self) -> None:
        given = [k for k in ("num_kv_heads", "head_dim", "sliding_window", *MLA_FIELDS) if getattr(self, k) is not None]
        if self.num_heads is None and given:
            raise ValueError(f"{given[0]} needs num_heads")
        if self.sliding_window_every > 1 and self.sliding_window is None:
            raise ValueError(f"sliding_window_every ({self.sliding_window_every}) needs sliding_window")
        mla = [k for k in MLA_FIELDS if getattr(self, k) is not None]
        if mla:
            missing = [k for k in MLA_FIELDS[1:] if getattr(self, k) is None]
            if missing:
                raise ValueError(f"multi-head latent attention ({mla[0]}) needs {', '.join(missing)}")
            if self.num_kv_heads is not None or self.head_dim is not None:
                raise ValueError("num_kv_heads and head_dim are GQA fields; an MLA model (kv_lora_rank) has neither")
            return
        if self.num_heads is not None:
            if self.num_heads % self.kv_heads:
                raise ValueError(f"num_kv_heads ({self.kv_heads}) must divide num_heads ({self.num_heads})")
            if self.head_dim is None and self.d_model % self.num_heads:
                raise ValueError(f"num_heads ({self.num_heads}) must divide d_model ({self.d_model}), or give head_dim")

    def _check_layers(self) -> None:
        if self.dense_layers and self.dense_d_ff is None:
            raise ValueError(f"the model has {self.dense_layers} dense layers (first_dense_layers, moe_layer_step): "
                             "give their MLP size dense_d_ff")
        if self.total_layers > MAX_LAYERS:
            raise ValueError(f"first_dense_layers + num_layers x moe_layer_step = {self.total_layers} layers, more "
                             f"than {MAX_LAYERS}")

    def _check_groups(self) -> None:
        if self.num_experts % self.expert_groups:
            raise ValueError(f"expert_groups ({self.expert_groups}) must divide num_experts ({self.num_experts})")
        if self.topk_groups is not None and (self.topk_groups > self.expert_groups or
                                             self.topk_groups * (self.num_experts // self.expert_groups) < self.top_k):
            raise ValueError(f"topk_groups ({self.topk_groups}) must be at most expert_groups ({self.expert_groups}) "
                             f"and leave at least top_k ({self.top_k}) experts to choose from")

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        for key in ARCHITECTURE_FIELDS:
            if key in out and getattr(self, key) == type(self).model_fields[key].default:
                del out[key]
        return out

    # ---- layers

    @property
    def total_layers(self) -> int:
        """Transformer layers, dense and MoE."""
        return self.first_dense_layers + self.num_layers * self.moe_layer_step

    @property
    def dense_layers(self) -> int:
        return self.total_layers - self.num_layers

    def moe_layer_index(self, l: int) -> int:
        """Where MoE layer ``l`` (a trace layer) sits among all the transformer's layers, from 0."""
        return self.first_dense_layers + l * self.moe_layer_step + self.moe_layer_step - 1

    def dense_layers_before(self, l: int) -> range:
        """The transformer layers (indices over all layers) that are dense and run just before MoE layer ``l``."""
        start = 0 if l == 0 else self.moe_layer_index(l - 1) + 1
        return range(start, self.moe_layer_index(l))

    def window_at(self, layer: int) -> int | None:
        """The attention window of transformer layer ``layer`` (None: full attention)."""
        return self.sliding_window if layer % self.sliding_window_every == 0 else None

    # ---- attention

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def attention_kind(self) -> str:
        """``mla``, ``gqa`` (fewer KV heads than query heads), ``mha``, or ``projections`` (no head shape)."""
        if self.num_heads is None:
            return "projections"
        if self.is_mla:
            return "mla"
        return "gqa" if self.kv_heads < self.num_heads else "mha"

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads or 1

    @property
    def head_size(self) -> int:
        return self.head_dim or (self.d_model // self.num_heads if self.num_heads else self.d_model)

    @property
    def projection_params(self) -> float:
        """Attention projection weights per layer: Q, K, V and O (GQA), the five MLA matrices (module docstring),
        ``4 d_model^2`` without a head shape."""
        if self.num_heads is None:
            return 4.0 * self.d_model**2
        if self.is_mla:
            return float(self._mla_params())
        q = self.num_heads * self.head_size
        return self.d_model * (2 * q + 2 * self.kv_heads * self.head_size)

    def _mla_params(self) -> int:
        assert self.num_heads and self.kv_lora_rank and self.qk_nope_head_dim and self.qk_rope_head_dim
        assert self.v_head_dim
        d, H, r, rope = self.d_model, self.num_heads, self.kv_lora_rank, self.qk_rope_head_dim
        qk, v = self.qk_nope_head_dim + rope, self.v_head_dim
        q = d * H * qk if self.q_lora_rank is None else d * self.q_lora_rank + self.q_lora_rank * H * qk
        return q + d * (r + rope) + r * H * (self.qk_nope_head_dim + v) + H * v * d

    # ---- FFNs and memory

    @property
    def expert_weight_bytes(self) -> float:
        return 3 * self.d_model * self.d_ff * self.dtype_bytes

    @property
    def shared_ff(self) -> int:
        """Intermediate size of the shared experts together (run as one SwiGLU MLP); 0 without them."""
        return self.shared_experts * (self.shared_d_ff or self.d_ff)

    @property
    def dispatch_bytes(self) -> float:
        return self.dispatch_bytes_per_token or self.d_model * self.dtype_bytes

    @property
    def combine_bytes(self) -> float:
        return self.combine_bytes_per_token or self.d_model * self.dtype_bytes

    @property
    def dense_flops(self) -> float:
        return 2.0 * self.projection_params if self.dense_flops_per_token is None else self.dense_flops_per_token

    @property
    def dense_bytes(self) -> float:
        return self.projection_params * self.dtype_bytes if self.dense_weight_bytes is None else self.dense_weight_bytes

    def param_counts(self) -> dict[str, float]:
        """Weights by part and in all (``total``), and those one token uses (``active``: its top-k experts). Counted:
        the attention projections of every layer, routed and shared experts, routers, dense MLPs, and the input
        embedding plus the untied output head when ``vocab_size`` is given. Not counted: norms, biases, the MTP
        layers."""
        d, L = self.d_model, self.num_layers
        swiglu = 3.0 * d
        parts = {
            "attention": self.total_layers * self.projection_params,
            "routed_experts": L * self.num_experts * swiglu * self.d_ff,
            "shared_experts": L * swiglu * self.shared_ff,
            "routers": float(L * d * self.num_experts),
            "dense_mlp": self.dense_layers * swiglu * (self.dense_d_ff or 0),
            "embeddings": 2.0 * d * (self.vocab_size or 0),
        }
        total = sum(parts.values())
        active = total - parts["routed_experts"] + L * self.top_k * swiglu * self.d_ff
        return {**parts, "total": total, "active": active}
