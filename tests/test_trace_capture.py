"""Capture from Hugging Face MoE models: tiny randomly initialised models built from transformers configs
(no download), checked exactly against the routing the model itself reports. Skipped without transformers."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from moesim.cli import main  # noqa: E402
from moesim.errors import InputError  # noqa: E402
from moesim.traces import load_trace  # noqa: E402
from moesim.traces.capture import capture_model, capture_trace, find_routers, read_prompts  # noqa: E402

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def tiny(kind: str):
    torch.manual_seed(0)
    if kind == "mixtral":
        cfg = transformers.MixtralConfig(**SMALL, num_local_experts=8, num_experts_per_tok=2)
        return transformers.MixtralForCausalLM(cfg), True
    if kind == "olmoe":
        cfg = transformers.OlmoeConfig(**SMALL, num_experts=8, num_experts_per_tok=3, norm_topk_prob=False)
        return transformers.OlmoeForCausalLM(cfg), False
    cfg = transformers.Qwen2MoeConfig(**SMALL, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                      shared_expert_intermediate_size=16, norm_topk_prob=True)
    return transformers.Qwen2MoeForCausalLM(cfg), True


PROMPTS = [[5, 17, 3, 88, 41], [9, 2, 60], [33, 33, 12, 7, 70, 1, 4]]


@pytest.mark.parametrize("kind", ["mixtral", "olmoe", "qwen2_moe"])
def test_capture_matches_the_models_own_router_logits(kind):
    model, renorm = tiny(kind)
    experts, weights, lengths, E = capture_model(model, PROMPTS)
    K = model.config.num_experts_per_tok
    assert experts.shape == (15, 3, K) and lengths == [5, 3, 7] and E == 8
    start = 0
    for ids in PROMPTS:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), output_router_logits=True)
        assert len(out.router_logits) == 3
        for l, logits in enumerate(out.router_logits):
            probs = torch.softmax(logits.float(), dim=-1)
            w, idx = torch.topk(probs, K, dim=-1)
            if renorm:
                w = w / w.sum(dim=-1, keepdim=True)
            got = slice(start, start + len(ids))
            np.testing.assert_array_equal(experts[got, l], idx.numpy())
            np.testing.assert_allclose(weights[got, l], w.numpy(), rtol=1e-6)
        start += len(ids)


def test_capture_trace_from_a_saved_model_with_packing_and_cli(tmp_path, capsys):
    model, _ = tiny("mixtral")
    model.save_pretrained(tmp_path / "m")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"input_ids": p}) for p in PROMPTS) + "\n")
    trace = capture_trace(str(tmp_path / "m"), read_prompts(prompts), num_gpus=2, tokens_per_gpu=8)
    direct, w, _, _ = capture_model(model, PROMPTS)
    assert trace.meta.num_experts == 8 and trace.meta.top_k == 2 and trace.weights is not None
    assert sorted(map(bytes, trace.experts.reshape(15, -1).astype(np.int64))) == sorted(
        map(bytes, direct.reshape(15, -1).astype(np.int64)))
    per = np.zeros((int(trace.batch.max()) + 1, 2), int)
    np.add.at(per, (trace.batch, trace.home), 1)
    assert per.max() <= 8
    out = tmp_path / "t.npz"
    assert main(["trace", "capture", str(tmp_path / "m"), str(prompts), "-o", str(out), "--max-tokens", "4"]) == 0
    assert "11 tokens from 3 prompts x 3 MoE layers x top-2 of 8 experts" in capsys.readouterr().out
    assert load_trace(out).weights.shape == (11, 3, 2)


def test_dense_layers_are_skipped_and_bad_prompts_named(tmp_path):
    if not hasattr(transformers, "DeepseekV2Config"):
        pytest.skip("this transformers has no DeepSeek-V2")
    torch.manual_seed(0)
    cfg = transformers.DeepseekV2Config(**{**SMALL, "num_hidden_layers": 3}, n_routed_experts=8, num_experts_per_tok=2,
                                        n_shared_experts=1, moe_intermediate_size=16, first_k_dense_replace=1,
                                        kv_lora_rank=8, q_lora_rank=None, qk_rope_head_dim=4, v_head_dim=8,
                                        qk_nope_head_dim=4, topk_method="greedy", n_group=1, topk_group=1)
    model = transformers.DeepseekV2ForCausalLM(cfg)
    assert len(find_routers(model)) == 2  # layer 0 is dense
    trace = capture_trace(model, PROMPTS)
    assert (trace.meta.num_layers, trace.meta.num_experts, trace.num_tokens) == (2, 8, 15)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_ids": [1, 2]}\n{"ids": [3]}\n')
    with pytest.raises(InputError, match=r"bad\.jsonl: line 2: needs 'text'"):
        read_prompts(bad)
    with pytest.raises(InputError, match="token id 500 >= vocab_size 97"):
        capture_trace(model, [[1, 500]])
