"""Make the small engine dump that ``notebooks/from_dump_to_placement.ipynb`` plans from.

    python benchmarks/make_tiny_dump.py   # rewrites notebooks/data/tiny-deepseek-trtllm/

A tiny, randomly initialised DeepSeek-V3-architecture model built locally from a transformers config (no
download; seed 0): 4 decoder layers, the first dense (``first_k_dense_replace`` 1), then 3 MoE layers of 16 routed
experts, top-4 within 2 of 4 groups, one shared expert. Its routing is captured with moesim's own capture
(:func:`moesim.traces.capture.capture_model`: the router's top-k, exactly as the model computes it) on 96 prompts
of random token ids (32-96 tokens each), then written as TensorRT-LLM's expert statistics write them
(``EXPERT_STATISTIC_PATH``; ``tensorrt_llm/_torch/expert_statistic.py``): ``meta_info.json``
``{"num_experts", "num_experts_per_token"}``, and per EP rank ``rank{r}.safetensors`` with one int32 bincount [E]
per ``"{iter}_{layer}"`` key and ``rank{r}_raw.safetensors`` with that rank's ``token_selected_experts`` [tokens,
k] per key. ``layer`` is the decoder-layer index of each MoE layer (1, 2, 3), as TensorRT-LLM counts them. An
iteration is 8 prompts; each prompt's tokens stay on one of the 2 EP ranks (alternating). The routing of a random
model is not a trained model's: this dump exercises the path from dump to placement, nothing more.
Needs torch, transformers and safetensors (``pip install -e '.[capture]' safetensors``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "notebooks" / "data" / "tiny-deepseek-trtllm"
RANKS, PROMPTS_PER_ITER, PROMPTS = 2, 8, 96


def tiny_deepseek():
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.DeepseekV3Config(
        vocab_size=211, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=4,
        first_k_dense_replace=1, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
        n_shared_experts=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=128)
    return transformers.DeepseekV3ForCausalLM(cfg).eval()


def main() -> None:
    from safetensors.numpy import save_file

    from moesim.traces.capture import capture_model

    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 211, size=int(rng.integers(32, 97))).tolist() for _ in range(PROMPTS)]
    model = tiny_deepseek()
    experts, _, lengths, E = capture_model(model, prompts)
    K = int(model.config.num_experts_per_tok)
    layer_ids = range(model.config.first_k_dense_replace, model.config.num_hidden_layers)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    counts: list[dict[str, np.ndarray]] = [{} for _ in range(RANKS)]
    raw: list[dict[str, np.ndarray]] = [{} for _ in range(RANKS)]
    for it in range(PROMPTS // PROMPTS_PER_ITER):
        for r in range(RANKS):
            mine = [p for p in range(it * PROMPTS_PER_ITER, (it + 1) * PROMPTS_PER_ITER) if p % RANKS == r]
            rows = np.concatenate([np.arange(starts[p], starts[p + 1]) for p in mine])
            for l, layer in enumerate(layer_ids):
                picks = experts[rows, l].astype(np.int32)
                raw[r][f"{it}_{layer}"] = np.ascontiguousarray(picks)
                counts[r][f"{it}_{layer}"] = np.bincount(picks.ravel(), minlength=E).astype(np.int32)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "meta_info.json").write_text(json.dumps({"num_experts": E, "num_experts_per_token": K}) + "\n")
    for r in range(RANKS):
        save_file(counts[r], str(OUT / f"rank{r}.safetensors"))
        save_file(raw[r], str(OUT / f"rank{r}_raw.safetensors"))
    print(f"wrote {OUT}: {len(prompts)} prompts, {int(starts[-1])} tokens, {PROMPTS // PROMPTS_PER_ITER} iterations, "
          f"MoE layers {list(layer_ids)}, {E} experts, top-{K}, {RANKS} ranks")


if __name__ == "__main__":
    main()
