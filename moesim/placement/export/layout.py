"""Where a placement's MoE layers sit among the model's decoder layers, for the engines that index by the latter.

A moesim placement has one row per MoE layer (trace layer ``l``). Engines index their maps three ways
(docs/engine_formats.md): vLLM and vllm-ascend by MoE layer (0 .. L_moe - 1), TensorRT-LLM by the decoder-layer
index of each MoE layer (3 .. 60 for DeepSeek-V3), SGLang by every decoder layer, dense ones included.
:class:`LayerLayout` carries what the last two need: the decoder-layer index of each MoE layer and the number of
decoder layers. It comes from a model (:meth:`LayerLayout.from_model`: ``first_dense_layers`` and
``moe_layer_step``, :meth:`moesim.traces.model.ModelSpec.moe_layer_index`) or from those two counts given by hand.
Ignored: MTP (next-token-prediction) layers, which no engine's map covers.
"""

from __future__ import annotations

from dataclasses import dataclass

from moesim.errors import InputError
from moesim.traces.model import ModelSpec


@dataclass(frozen=True)
class LayerLayout:
    """``layer_ids[l]``: decoder-layer index of MoE layer ``l``; ``num_decoder_layers``: dense and MoE."""

    layer_ids: tuple[int, ...]
    num_decoder_layers: int

    def __post_init__(self) -> None:
        ids = self.layer_ids
        if any(b <= a for a, b in zip(ids, ids[1:])) or (ids and ids[0] < 0):
            raise InputError(f"MoE layer indices must rise from 0 or more, got {list(ids)[:8]}", field="layer_ids")
        if ids and ids[-1] >= self.num_decoder_layers:
            raise InputError(f"MoE layer {ids[-1]} lies past the model's {self.num_decoder_layers} decoder layers",
                             field="num_decoder_layers")

    @property
    def num_moe_layers(self) -> int:
        return len(self.layer_ids)

    @property
    def dense_layer_ids(self) -> tuple[int, ...]:
        moe = set(self.layer_ids)
        return tuple(i for i in range(self.num_decoder_layers) if i not in moe)

    @classmethod
    def moe_only(cls, num_moe_layers: int) -> LayerLayout:
        """Every decoder layer is an MoE layer (Mixtral, Qwen3-MoE, OLMoE)."""
        return cls(tuple(range(num_moe_layers)), num_moe_layers)

    @classmethod
    def from_counts(cls, num_moe_layers: int, *, first_dense_layers: int = 0, moe_layer_step: int = 1,
                    num_decoder_layers: int | None = None) -> LayerLayout:
        """``first_dense_layers`` dense layers, then every ``moe_layer_step``-th layer MoE (as
        :class:`~moesim.traces.model.ModelSpec`); ``num_decoder_layers`` may add dense layers after the last MoE
        layer and must not be fewer than the layers these counts give."""
        if first_dense_layers < 0 or moe_layer_step < 1:
            raise InputError(f"need first_dense_layers >= 0 and moe_layer_step >= 1, got {first_dense_layers} and "
                             f"{moe_layer_step}", field="--first-dense-layers")
        ids = tuple(first_dense_layers + l * moe_layer_step + moe_layer_step - 1 for l in range(num_moe_layers))
        total = first_dense_layers + num_moe_layers * moe_layer_step
        if num_decoder_layers is not None:
            if num_decoder_layers < total:
                raise InputError(f"{num_decoder_layers} decoder layers cannot hold {first_dense_layers} dense layers "
                                 f"and {num_moe_layers} MoE layers every {moe_layer_step}",
                                 field="--num-decoder-layers")
            total = num_decoder_layers
        return cls(ids, total)

    @classmethod
    def from_model(cls, model: ModelSpec) -> LayerLayout:
        return cls(tuple(model.moe_layer_index(l) for l in range(model.num_layers)), model.total_layers)

    def check(self, num_moe_layers: int, source: str | None = None) -> None:
        """The placement's MoE layers must be the layout's."""
        if num_moe_layers != self.num_moe_layers:
            raise InputError(f"the placement has {num_moe_layers} MoE layers, the model {self.num_moe_layers}",
                             source=source, field="layers")
