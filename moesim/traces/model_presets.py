"""Model presets: real MoE architectures by name, each figure from the model's published Hugging Face config.json.

A preset is a plain dict of :class:`~moesim.traces.model.ModelSpec` fields; a scenario's ``model: {preset:
NAME, ...}`` lays its other keys over it before validation (:func:`model_with_overrides`), so a preset can
never hold a value a YAML file could not. The comment beside each figure names the config.json field it comes
from. How each was checked: the stored copies of public material this project can search hold few of the
model repositories' own config.json files, so most values were read from verbatim copies of them (duplicates,
quantised re-uploads, tests that embed the published config) and from framework definitions of the same
model; each preset's ``source`` says which, and says where a value could not be checked.

Common to all: ``dtype_bytes`` 2 (bf16 weights and activations, as moesim computes them; several checkpoints
store FP8 or MXFP4 experts - ``engine: {expert_dtype: fp8}`` models FP8 expert GEMMs), and the dispatch and
combine carry ``d_model x 2`` bytes per token copy (DeepEP's FP8 dispatch of DeepSeek-V3 is 7408 bytes:
override ``dispatch_bytes_per_token``). ``num_layers`` counts MoE layers; see :mod:`moesim.traces.model`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelPreset:
    fields: dict[str, Any]
    source: str  # the repository and how the figures were checked
    notes: tuple[str, ...] = field(default_factory=tuple)  # what moesim does not simulate of it


# DeepSeek-V3 (deepseek-ai/DeepSeek-V3, config.json, model_type deepseek_v3). Published parameters
# (README_WEIGHTS.md): 671B total, 36.7B activated (0.9B embedding and 0.9B output head included); the MTP
# module adds 11.5B.
_DEEPSEEK_V3: dict[str, Any] = {
    "name": "deepseek-v3",
    "num_layers": 58,             # num_hidden_layers 61 - first_k_dense_replace 3 (moe_layer_freq 1)
    "first_dense_layers": 3,      # first_k_dense_replace
    "dense_d_ff": 18432,          # intermediate_size (the dense layers' MLP)
    "num_experts": 256,           # n_routed_experts
    "top_k": 8,                   # num_experts_per_tok
    "d_model": 7168,              # hidden_size
    "d_ff": 2048,                 # moe_intermediate_size
    "shared_experts": 1,          # n_shared_experts (each moe_intermediate_size wide)
    "expert_groups": 8,           # n_group
    "topk_groups": 4,             # topk_group
    "num_heads": 128,             # num_attention_heads (num_key_value_heads 128: MLA, no GQA)
    "q_lora_rank": 1536,          # q_lora_rank
    "kv_lora_rank": 512,          # kv_lora_rank
    "qk_nope_head_dim": 128,      # qk_nope_head_dim
    "qk_rope_head_dim": 64,       # qk_rope_head_dim
    "v_head_dim": 128,            # v_head_dim
    "mtp_layers": 1,              # num_nextn_predict_layers
    "vocab_size": 129280,         # vocab_size (tie_word_embeddings false)
    "dtype_bytes": 2,             # the checkpoint stores FP8 (quantization_config fp8 e4m3, 128x128 blocks)
}
_DEEPSEEK_V3_CHECK = ("values read from verbatim copies of the published config.json (amd/DeepSeek-R1-0528-MXFP4, "
                      "mlx-community/DeepSeek-R1-0528-5bit, a DeepSeek-V3 copy in cann-recipes-train) and checked "
                      "against vLLM's DeepseekV3Config defaults; the deepseek-ai repository's own file was not among "
                      "the stored copies")

PRESETS: dict[str, ModelPreset] = {
    "deepseek-v3": ModelPreset(
        _DEEPSEEK_V3, f"huggingface.co/deepseek-ai/DeepSeek-V3 config.json; {_DEEPSEEK_V3_CHECK}",
        ("the MTP layer (num_nextn_predict_layers 1) runs only with workload.speculative",)),
    # DeepSeek-R1 (deepseek-ai/DeepSeek-R1): the same DeepseekV3ForCausalLM config, every field above equal.
    "deepseek-r1": ModelPreset(
        {**_DEEPSEEK_V3, "name": "deepseek-r1"},
        f"huggingface.co/deepseek-ai/DeepSeek-R1 config.json (the DeepSeek-V3 architecture); {_DEEPSEEK_V3_CHECK}",
        ("the MTP layer (num_nextn_predict_layers 1) runs only with workload.speculative",)),
    # Kimi-K2 (moonshotai/Kimi-K2-Instruct, config.json, model_type kimi_k2: the DeepSeek-V3 architecture).
    # Published: 1.04T total, 32B activated.
    "kimi-k2": ModelPreset({
        "name": "kimi-k2",
        "num_layers": 60,             # num_hidden_layers 61 - first_k_dense_replace 1
        "first_dense_layers": 1,      # first_k_dense_replace
        "dense_d_ff": 18432,          # intermediate_size
        "num_experts": 384,           # n_routed_experts
        "top_k": 8,                   # num_experts_per_tok
        "d_model": 7168,              # hidden_size
        "d_ff": 2048,                 # moe_intermediate_size
        "shared_experts": 1,          # n_shared_experts
        "expert_groups": 1,           # n_group 1, topk_group 1: no group limit
        "num_heads": 64,              # num_attention_heads (num_key_value_heads 64)
        "q_lora_rank": 1536,          # q_lora_rank
        "kv_lora_rank": 512,          # kv_lora_rank
        "qk_nope_head_dim": 128,      # qk_nope_head_dim
        "qk_rope_head_dim": 64,       # qk_rope_head_dim
        "v_head_dim": 128,            # v_head_dim
        "mtp_layers": 0,              # num_nextn_predict_layers (as in the Kimi-K2-Thinking config; unchecked for K2)
        "vocab_size": 163840,         # vocab_size (tie_word_embeddings false)
        "dtype_bytes": 2,             # the checkpoint stores FP8 blocks
    }, "huggingface.co/moonshotai/Kimi-K2-Instruct config.json; values read from copies of the kimi_k2 configs of "
       "Kimi-K2-Thinking, Kimi-K2.5 and Kimi-K2.6 (text_config), identical in every field above, and checked against "
       "NVIDIA Megatron-Bridge's KimiK2Provider (61 layers, 384 experts, moe_ffn 2048, shared 2048, 64 heads, top-8, "
       "1 group); Kimi-K2-Instruct's own file was not among the stored copies"),
    # Qwen3-235B-A22B (Qwen/Qwen3-235B-A22B, config.json, model_type qwen3_moe). Published: 235B total, 22B active.
    "qwen3-235b-a22b": ModelPreset({
        "name": "qwen3-235b-a22b",
        "num_layers": 94,             # num_hidden_layers (decoder_sparse_step 1, mlp_only_layers []: all MoE)
        "num_experts": 128,           # num_experts
        "top_k": 8,                   # num_experts_per_tok
        "d_model": 4096,              # hidden_size
        "d_ff": 1536,                 # moe_intermediate_size
        "num_heads": 64,              # num_attention_heads
        "num_kv_heads": 4,            # num_key_value_heads
        "head_dim": 128,              # head_dim
        "vocab_size": 151936,         # vocab_size (tie_word_embeddings false)
    }, "huggingface.co/Qwen/Qwen3-235B-A22B config.json; values checked against the Megatron arguments that "
       "convert it (THUDM/slime scripts/models/qwen3-235B-A22B.sh, MindSpeed-RL qwen3_235b_a22b.yaml: 94 layers, "
       "128 experts, top-8, moe_ffn 1536, hidden 4096, 64 heads, 4 query groups, kv_channels 128, vocab 151936, "
       "untied); the Qwen repository's own file was not among the stored copies"),
    # Qwen3-30B-A3B (Qwen/Qwen3-30B-A3B, config.json, model_type qwen3_moe). Published: 30.5B total, 3.3B active.
    "qwen3-30b-a3b": ModelPreset({
        "name": "qwen3-30b-a3b",
        "num_layers": 48,             # num_hidden_layers (all MoE)
        "num_experts": 128,           # num_experts
        "top_k": 8,                   # num_experts_per_tok
        "d_model": 2048,              # hidden_size
        "d_ff": 768,                  # moe_intermediate_size
        "num_heads": 32,              # num_attention_heads
        "num_kv_heads": 4,            # num_key_value_heads
        "head_dim": 128,              # head_dim
        "vocab_size": 151936,         # vocab_size (tie_word_embeddings false)
    }, "huggingface.co/Qwen/Qwen3-30B-A3B config.json; values checked against MindSpeed-RL qwen3_30b_a3b.yaml and "
       "published Qwen3MoeForCausalLM configs of the same shape (Qwen3-Coder-30B-A3B copies: 48 layers, 128 experts, "
       "top-8, moe_intermediate_size 768, hidden 2048, 32 heads, 4 KV heads, head_dim 128); the Qwen repository's "
       "own file was not among the stored copies"),
    # GPT-OSS-120B (openai/gpt-oss-120b, config.json, model_type gpt_oss). Published: 116.8B total, 5.1B active.
    "gpt-oss-120b": ModelPreset({
        "name": "gpt-oss-120b",
        "num_layers": 36,             # num_hidden_layers (all MoE)
        "num_experts": 128,           # num_local_experts
        "top_k": 4,                   # num_experts_per_tok (experts_per_token)
        "d_model": 2880,              # hidden_size
        "d_ff": 2880,                 # intermediate_size
        "num_heads": 64,              # num_attention_heads
        "num_kv_heads": 8,            # num_key_value_heads
        "head_dim": 64,               # head_dim
        "sliding_window": 128,        # sliding_window
        "sliding_window_every": 2,    # layer_types: sliding_attention, full_attention, ... from layer 0
        "vocab_size": 201088,         # vocab_size (untied: unchecked in the config, the published total needs it)
        "dtype_bytes": 2,             # the checkpoint stores MXFP4 experts
    }, "huggingface.co/openai/gpt-oss-120b config.json; values read from a verbatim duplicate of its "
       "original/config.json (witflag/AlphaMind, 'Duplicate from openai/gpt-oss-120b') and from GptOssForCausalLM "
       "configs with 36 layers and 128 experts (layer_types alternating from sliding_attention)",
        ("attention sinks are not modelled; the 128-token window on every other layer is",)),
    # Llama-4-Maverick (meta-llama/Llama-4-Maverick-17B-128E-Instruct, config.json text_config, model_type
    # llama4_text). Published: ~400B total, 17B active.
    "llama-4-maverick": ModelPreset({
        "name": "llama-4-maverick",
        "num_layers": 24,             # num_hidden_layers 48 / interleave_moe_layer_step 2 (moe_layers 1, 3, ..., 47)
        "moe_layer_step": 2,          # interleave_moe_layer_step
        "dense_d_ff": 16384,          # intermediate_size_mlp (the dense layers' MLP)
        "num_experts": 128,           # num_local_experts
        "top_k": 1,                   # num_experts_per_tok
        "d_model": 5120,              # hidden_size
        "d_ff": 8192,                 # intermediate_size (routed experts and the shared expert)
        "shared_experts": 1,          # not a config field: transformers' Llama4TextMoe always builds one shared_expert
        "num_heads": 40,              # num_attention_heads
        "num_kv_heads": 8,            # num_key_value_heads
        "head_dim": 128,              # head_dim
        "vocab_size": 202048,         # vocab_size (tie_word_embeddings false)
    }, "huggingface.co/meta-llama/Llama-4-Maverick-17B-128E-Instruct config.json (text_config); values read from "
       "TensorRT-LLM's LLAMA_4_MAVERICK_TWO_LAYER_CONFIG (the Maverick text_config with its layers cut to 2) and "
       "GGUF metadata of a Maverick conversion (48 blocks, 128 experts, expert FFN 8192, FFN 16384, step 2); the "
       "MoE layer positions and the shared expert from transformers' Llama4TextConfig and Llama4TextMoe; the "
       "meta-llama repository's own file was not among the stored copies",
        ("chunked attention (8192-token chunks on 3 of every 4 layers) is modelled as full attention: exact up to "
         "8192 tokens of context", "the vision encoder is not modelled")),
    # Mixtral-8x7B (mistralai/Mixtral-8x7B-v0.1, config.json, model_type mixtral). Published: 46.7B total, 12.9B
    # active.
    "mixtral-8x7b": ModelPreset({
        "name": "mixtral-8x7b",
        "num_layers": 32,             # num_hidden_layers (all MoE)
        "num_experts": 8,             # num_local_experts
        "top_k": 2,                   # num_experts_per_tok
        "d_model": 4096,              # hidden_size
        "d_ff": 14336,                # intermediate_size
        "num_heads": 32,              # num_attention_heads
        "num_kv_heads": 8,            # num_key_value_heads (head_dim 4096 / 32 = 128); sliding_window null
        "vocab_size": 32000,          # vocab_size (tie_word_embeddings false)
    }, "huggingface.co/mistralai/Mixtral-8x7B-v0.1 config.json; values read from the stored "
       "mistralai/Mixtral-8x7B-Instruct-v0.1 config.json (commit eba92302, the same architecture) and checked "
       "against duplicates of the base model's file"),
    # DeepSeek-V2-Lite (deepseek-ai/DeepSeek-V2-Lite, config.json, model_type deepseek_v2). Published: 15.7B
    # total, 2.4B active. Its routing traces ship with moesim (moesim/data/deepseek-v2-lite.params.yaml).
    "deepseek-v2-lite": ModelPreset({
        "name": "deepseek-v2-lite",
        "num_layers": 26,             # num_hidden_layers 27 - first_k_dense_replace 1
        "first_dense_layers": 1,      # first_k_dense_replace
        "dense_d_ff": 10944,          # intermediate_size
        "num_experts": 64,            # n_routed_experts
        "top_k": 6,                   # num_experts_per_tok
        "d_model": 2048,              # hidden_size
        "d_ff": 1408,                 # moe_intermediate_size
        "shared_experts": 2,          # n_shared_experts
        "num_heads": 16,              # num_attention_heads; n_group 1, topk_group 1: no group limit
        "kv_lora_rank": 512,          # kv_lora_rank; q_lora_rank null: one d_model x heads x 192 query projection
        "qk_nope_head_dim": 128,      # qk_nope_head_dim
        "qk_rope_head_dim": 64,       # qk_rope_head_dim
        "v_head_dim": 128,            # v_head_dim
        "vocab_size": 102400,         # vocab_size (tie_word_embeddings false)
    }, "huggingface.co/deepseek-ai/DeepSeek-V2-Lite config.json; values read from verbatim copies "
       "(ModelCloud/DeepSeek-V2-Lite-gptq-4bit, TechxGenus/DeepSeek-V2-Lite-Chat-AWQ) and checked against DeepSeek's "
       "own inference/configs/config_16B.json (dim 2048, inter_dim 10944, moe_inter_dim 1408, 27 layers, 1 dense, 16 "
       "heads, 64 routed, 2 shared, 6 activated, q_lora_rank 0, kv_lora_rank 512, 128/64/128, vocab 102400)"),
    # OLMoE-1B-7B (allenai/OLMoE-1B-7B-0924, config.json, model_type olmoe). Published: 6.9B total, 1.3B active.
    # Its routing statistics ship with moesim (moesim/data/olmoe-1b-7b-c4.params.yaml: 3 of the 16 layers).
    "olmoe-1b-7b": ModelPreset({
        "name": "olmoe-1b-7b",
        "num_layers": 16,             # num_hidden_layers (all MoE)
        "num_experts": 64,            # num_experts
        "top_k": 8,                   # num_experts_per_tok
        "d_model": 2048,              # hidden_size
        "d_ff": 1024,                 # intermediate_size
        "num_heads": 16,              # num_attention_heads
        "num_kv_heads": 16,           # num_key_value_heads
        "vocab_size": 50304,          # vocab_size (tie_word_embeddings false)
    }, "huggingface.co/allenai/OLMoE-1B-7B-0924 config.json (the stored file, commit c1b31da0)"),
}


def model_preset_names() -> list[str]:
    return sorted(PRESETS)


def model_preset(name: str) -> ModelPreset:
    """Preset ``name`` (its fields a deep copy); raises KeyError listing the valid names."""
    try:
        found = PRESETS[name]
    except (KeyError, TypeError):
        raise KeyError(f"unknown model preset {name!r}; valid: {', '.join(model_preset_names())}") from None
    return ModelPreset(copy.deepcopy(found.fields), found.source, found.notes)


def model_with_overrides(raw: dict[str, Any]) -> dict[str, Any]:
    """A scenario's ``model`` mapping with its ``preset`` (if any) expanded: the preset's fields, then every other
    key given beside it. Raises KeyError for an unknown preset name."""
    if "preset" not in raw:
        return raw
    rest = {k: v for k, v in raw.items() if k != "preset"}
    name = raw["preset"]
    if not isinstance(name, str):
        raise KeyError(f"a model preset name is text; valid: {', '.join(model_preset_names())}")
    return {**model_preset(name).fields, **rest}
