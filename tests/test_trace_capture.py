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


# ---------------------------------------------------------------- every router family against what its experts ran

def _cfg(name: str, **kw):
    cls = getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"this transformers has no {name}")
    return cls(**{**SMALL, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": None, **kw})


MLA = dict(kv_lora_rank=8, q_lora_rank=None, qk_rope_head_dim=4, v_head_dim=8, qk_nope_head_dim=4)
FAMILIES = {  # model class, config: 8 experts, top-2 (top-3 for OLMoE), tiny everything else
    "mixtral": ("MixtralForCausalLM", lambda: _cfg("MixtralConfig", num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeForCausalLM", lambda: _cfg("Qwen2MoeConfig", num_experts=8, num_experts_per_tok=2,
                                                      moe_intermediate_size=16, shared_expert_intermediate_size=16)),
    "qwen3_moe": ("Qwen3MoeForCausalLM", lambda: _cfg("Qwen3MoeConfig", num_experts=8, num_experts_per_tok=2,
                                                      moe_intermediate_size=16, head_dim=8)),
    "olmoe": ("OlmoeForCausalLM", lambda: _cfg("OlmoeConfig", num_experts=8, num_experts_per_tok=3)),
    # group-limited greedy over softmax scores, scaled weights, a shared expert
    "deepseek_v2": ("DeepseekV2ForCausalLM", lambda: _cfg(
        "DeepseekV2Config", n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=16,
        first_k_dense_replace=0, topk_method="group_limited_greedy", n_group=4, topk_group=2,
        routed_scaling_factor=1.5, **MLA)),
    # sigmoid scores plus a correction bias, groups, first layer dense
    "deepseek_v3": ("DeepseekV3ForCausalLM", lambda: _cfg(
        "DeepseekV3Config", n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=16,
        first_k_dense_replace=1, n_group=4, topk_group=2, rope_scaling=None, **{**MLA, "q_lora_rank": 16})),
    # top-k of the logits, then softmax over the k
    "gpt_oss": ("GptOssForCausalLM", lambda: _cfg(
        "GptOssConfig", num_local_experts=8, num_experts_per_tok=2, head_dim=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    # hybrid linear attention: its cache breaks a plain forward call (the capture runs without one)
    "qwen3_next": ("Qwen3NextForCausalLM", lambda: _cfg("Qwen3NextConfig", num_experts=8, num_experts_per_tok=2,
                                                        moe_intermediate_size=16, shared_expert_intermediate_size=16,
                                                        head_dim=8)),
    # a gate module not named ...Router: found as the 'gate' beside 'experts'
    "hunyuan_moe": ("HunYuanMoEV1ForCausalLM", lambda: _cfg("HunYuanMoEV1Config", num_experts=8, moe_topk=2,
                                                            head_dim=8)),
}


def experts_inputs(model, prompts):
    """Ground truth independent of the router hooks: the (indices, weights) every experts module is called
    with, per prompt and MoE layer (transformers >= 5 calls experts(hidden_states, top_k_index, top_k_weights))."""
    mods = [m for _, m in model.named_modules() if type(m).__name__.endswith("Experts")]
    if not mods:
        pytest.skip("this transformers has no experts modules taking the routing as arguments")
    seen: list = []

    def pre(_mod, args, kwargs):
        a = list(args) + list(kwargs.values())
        seen.append((a[1].reshape(-1, a[1].shape[-1]).numpy().copy(),
                     a[2].float().reshape(-1, a[2].shape[-1]).numpy().copy()))

    handles = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in mods]
    out = []
    try:
        with torch.no_grad():
            for ids in prompts:
                seen.clear()
                model(input_ids=torch.tensor([ids]), use_cache=False)
                out.append(list(seen))
    finally:
        for h in handles:
            h.remove()
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_capture_equals_what_the_experts_ran(family):
    model_cls, make_cfg = FAMILIES[family]
    cfg = make_cfg()
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg)
    with torch.no_grad():  # a non-zero correction bias, so that it must be honoured
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0, 0.1)
    experts, weights, lengths, E = capture_model(model, PROMPTS)
    truth = experts_inputs(model, PROMPTS)
    assert E == 8 and lengths == [5, 3, 7] and experts.shape[1] == len(truth[0]) >= 2
    start = 0
    for ids, layers in zip(PROMPTS, truth):
        got = slice(start, start + len(ids))
        for l, (idx, w) in enumerate(layers):  # the same picks in the same order, the same weights
            np.testing.assert_array_equal(experts[got, l], idx)
            np.testing.assert_allclose(weights[got, l], w, rtol=1e-6, atol=1e-7)
        start += len(ids)


def test_llama4_router_scores_and_logits():
    """Llama 4's router returns (scores over all experts, zero outside the top-k; logits)."""
    cfg = _cfg("Llama4TextConfig", num_local_experts=8, num_experts_per_tok=2, intermediate_size_mlp=48, head_dim=8)
    torch.manual_seed(0)
    model = transformers.Llama4ForCausalLM(cfg)
    experts, weights, _, _ = capture_model(model, PROMPTS)
    routers = [m for _, m, _ in find_routers(model)]
    scores: list = []
    handles = [r.register_forward_hook(lambda _m, _i, out: scores.append(out[0].float().numpy().copy()))
               for r in routers]
    start = 0
    try:
        for ids in PROMPTS:
            scores.clear()
            with torch.no_grad():
                model(input_ids=torch.tensor([ids]), use_cache=False)
            for l, sc in enumerate(scores):
                got = experts[start : start + len(ids), l].astype(np.int64)
                assert [sorted(np.flatnonzero(r)) for r in sc] == [sorted(r) for r in got]
                np.testing.assert_allclose(weights[start : start + len(ids), l], np.take_along_axis(sc, got, 1))
            start += len(ids)
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------- text prompts, local files only

def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_text_prompts_use_the_tokenizer_saved_with_the_model(tmp_path, capsys):
    model, _ = tiny("olmoe")
    model.save_pretrained(tmp_path / "m")
    prompts = tmp_path / "p.txt"
    prompts.write_text("the quick brown fox\n\njumps over the lazy dog\n")
    out = tmp_path / "t.npz"
    # No tokenizer saved: the one transformers falls back to has no vocabulary. Said so, nothing written.
    assert main(["trace", "capture", str(tmp_path / "m"), str(prompts), "-o", str(out)]) == 2
    err = capsys.readouterr().err  # (older transformers find no tokenizer at all)
    assert ("tokenizes to no tokens" in err or "need the model's tokenizer" in err) and not out.exists()
    word_tokenizer().save_pretrained(tmp_path / "m")
    assert main(["trace", "capture", str(tmp_path / "m"), str(prompts), "-o", str(out)]) == 0
    assert "9 tokens from 2 prompts" in capsys.readouterr().out
    direct, _, _, _ = capture_model(model, [[1, 2, 3, 4], [5, 6, 1, 7, 8]])
    np.testing.assert_array_equal(load_trace(out).experts, direct)


def test_a_model_that_is_not_local_fails_at_once(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"input_ids": [1, 2]}\n')
    assert main(["trace", "capture", "no-such-org/no-such-model", str(prompts), "-o", str(tmp_path / "t.npz")]) == 2
    err = capsys.readouterr().err
    assert "no such model folder, and no such model in the Hugging Face cache" in err and "--download" in err
    with pytest.raises(InputError, match="found no MoE router"):
        capture_model(transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL)), PROMPTS)


class _Toy(torch.nn.Module):
    """A minimal 'MoE model': one block with ``experts`` and a ``gate``, no class named like a router."""

    def __init__(self):
        super().__init__()
        self.config = transformers.PretrainedConfig(num_experts_per_tok=2, num_experts=8, vocab_size=97)
        self.embed = torch.nn.Embedding(97, 16)
        block = torch.nn.Module()
        block.experts = torch.nn.ModuleList()
        block.gate = torch.nn.Linear(16, 8, bias=False)
        self.block = block

    def forward(self, input_ids, use_cache=None):
        out = self.block.gate(self.embed(input_ids))
        if torch.is_tensor(out):
            self.seen = torch.topk(torch.softmax(out.reshape(-1, 8), -1), 2, dim=-1)
        return out


def test_router_outputs_without_a_router_class_are_read_or_refused():
    # A gate Linear (older transformers): softmax, top-k, renormalised.
    toy = _Toy()
    experts, weights, _, E = capture_model(toy, [[1, 2, 3]])
    np.testing.assert_array_equal(experts[:, 0], toy.seen.indices.numpy())
    np.testing.assert_allclose(weights[:, 0], (toy.seen.values / toy.seen.values.sum(-1, keepdim=True)).numpy(),
                               rtol=1e-6)
    # A gate module returning (indices, weights, aux_loss=None), as remote-code DeepSeek-V2 does.
    gate = torch.nn.Linear(16, 8, bias=False)

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = gate

        def forward(self, x):
            w, i = torch.topk(torch.softmax(self.inner(x).reshape(-1, 8), -1), 2, dim=-1)
            return i, w, None

    toy.block.gate = Wrapped()
    experts, weights, _, _ = capture_model(toy, [[4, 5]])
    w, i = torch.topk(torch.softmax(gate(toy.embed(torch.tensor([[4, 5]]))).reshape(-1, 8), -1), 2, dim=-1)
    np.testing.assert_array_equal(experts[:, 0], i.numpy())
    np.testing.assert_allclose(weights[:, 0], w.detach().numpy(), rtol=1e-6)

    class Odd(torch.nn.Module):
        def forward(self, x):
            return {"what": x}

    toy.block.gate = Odd()
    with pytest.raises(InputError, match=r"router block\.gate returns dict of no tensors: not \(logits, weights, "
                                         r"indices\)"):
        capture_model(toy, [[4, 5]])
