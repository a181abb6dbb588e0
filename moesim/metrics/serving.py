"""Serving figures of a simulated run: its forward passes in the tokens per second that serving is planned with.

A run simulates batches, each one forward pass of the model on every GPU's tokens: the dense layers, then every
MoE layer with its attention and shared experts, as the engine runs them (``e2e`` of :mod:`.summary`). The
workload says which serving phase a forward is:

- **prefill** (``workload.seq_len``): the tokens are prompts of ``seq_len`` tokens; every token is an *input*
  token processed; a forward takes ``prefill_forward_ms``; throughput is input tokens/s per GPU and per node; with
  a cached prefix (``workload.prefix_len``: prefix-cache hits, attended to but not computed) also the prompt
  tokens/s per node counting the cached ones, as deployments that report cache hits count them;
- **decode** (``workload.kv_len``): every token is the next token of one request whose KV cache holds
  ``kv_len`` tokens, so tokens per GPU are requests per GPU; a step gives one *output* token per request, so
  the time per output token (TPOT) is the step time and each request streams ``1000 / TPOT`` tokens/s. With
  speculative decoding (``workload.speculative``, :mod:`moesim.study.speculative`) a request's ``1 + d`` tokens
  (its next and ``d`` drafts) share a step: requests are tokens / (1 + d), and a step gives each request
  ``1 + a + ... + a^d`` output tokens on average (``a`` the acceptance), so TPOT is the step time over that;
- **batch** (neither): tokens per GPU per forward and tokens/s, with no phase meaning.

Throughput is a closed form of the simulated times: tokens of every forward / their summed time, per GPU (over
the cluster's GPUs) and per node (x GPUs per node). Deliberately ignored: what the engine does not simulate
(embedding, LM head and sampling; the host's gap between steps), and everything outside one forward: request
arrival, queueing, continuous batching, chunked prefill, the transfer of KV caches between pools. Throughput is
therefore that of back-to-back forwards of full batches.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from moesim.sim.compute import Attention
from moesim.sim.engine import SimRecords

PHASES = ("prefill", "decode", "batch")


@dataclass(frozen=True)
class ServingMetrics:
    """One run's serving figures (see the module docstring); fields that do not apply to the phase are None."""

    phase: str  # prefill | decode | batch
    gpus: int
    gpus_per_node: int
    tokens_per_gpu: float  # per forward, mean over forwards (decode: requests per GPU)
    forward_ms: float  # mean over forwards
    forward_ms_p99: float
    tokens_per_s_per_gpu: float  # tokens of every forward / their summed time / GPUs
    tokens_per_s_per_node: float
    # prefill
    prompt_len: int | None = None  # computed tokens per prompt
    prefix_len: int | None = None  # cached tokens before them (prefix-cache hits), when any
    input_tokens_per_s_per_node_with_prefix: float | None = None  # computed and cached prompt tokens, when any
    prompts_per_gpu: float | None = None
    input_tokens_per_s_per_gpu: float | None = None
    input_tokens_per_s_per_node: float | None = None
    # decode
    kv_len: int | None = None
    requests_per_gpu: float | None = None
    output_tokens_per_s_per_gpu: float | None = None
    output_tokens_per_s_per_node: float | None = None
    tpot_ms: float | None = None  # time per output token: the mean step time over the output tokens per step
    output_tokens_per_s_per_request: float | None = None
    draft_tokens: int | None = None  # speculative decoding only
    output_tokens_per_step: float | None = None  # per request, speculative decoding only

    @property
    def nodes(self) -> float:
        return self.gpus / self.gpus_per_node

    def to_json(self) -> dict[str, Any]:
        """The figures that apply to the phase, as a flat mapping."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def serving_metrics(rec: SimRecords, batch_tokens: np.ndarray, attention: Attention | None, *,
                    output_per_step: float = 1.0) -> ServingMetrics:
    """Serving figures of a run: ``rec`` its records, ``batch_tokens`` the tokens of each of its forwards (over
    every GPU), ``attention`` the workload's phase (None: no phase; its ``queries`` are tokens per request in a
    decode step), ``output_per_step`` a decode step's output tokens per request. Throughput = tokens / time,
    summed over the forwards."""
    tokens = np.asarray(batch_tokens, dtype=float)
    forward_s = np.asarray(rec.batch_end - rec.batch_start, dtype=float)
    if tokens.shape != forward_s.shape or tokens.size == 0:
        raise ValueError(f"need the tokens of each of the {forward_s.size} forwards, got {tokens.shape}")
    G, per_node = rec.num_gpus, rec.gpus_per_node
    total_s = float(forward_s.sum())
    per_gpu = float(tokens.sum() / total_s / G) if total_s > 0 else 0.0
    tokens_per_gpu = float(tokens.mean() / G)
    forward_ms = float(forward_s.mean() * 1e3)
    common: dict[str, Any] = dict(
        gpus=G, gpus_per_node=per_node, tokens_per_gpu=tokens_per_gpu, forward_ms=forward_ms,
        forward_ms_p99=float(np.percentile(forward_s, 99) * 1e3), tokens_per_s_per_gpu=per_gpu,
        tokens_per_s_per_node=per_gpu * per_node)
    if attention is None:
        return ServingMetrics(phase="batch", **common)
    if attention.phase == "prefill":
        cached: dict[str, Any] = {}
        if attention.prefix:
            cached = dict(prefix_len=attention.prefix,
                          input_tokens_per_s_per_node_with_prefix=per_gpu * per_node * (1 + attention.prefix_share))
        return ServingMetrics(phase="prefill", prompt_len=attention.length, **cached,
                              prompts_per_gpu=tokens_per_gpu / attention.length, input_tokens_per_s_per_gpu=per_gpu,
                              input_tokens_per_s_per_node=per_gpu * per_node, **common)
    out = per_gpu / attention.queries * output_per_step
    speculative: dict[str, Any] = {}
    if attention.queries > 1:
        speculative = dict(draft_tokens=attention.queries - 1, output_tokens_per_step=output_per_step)
    return ServingMetrics(phase="decode", kv_len=attention.length, requests_per_gpu=tokens_per_gpu / attention.queries,
                          output_tokens_per_s_per_gpu=out, output_tokens_per_s_per_node=out * per_node,
                          tpot_ms=forward_ms / output_per_step,
                          output_tokens_per_s_per_request=1e3 * output_per_step / forward_ms if forward_ms else 0.0,
                          **speculative, **common)


def headline(s: ServingMetrics) -> str:
    """One line: the phase's batch and its throughput and latency, as serving is planned with."""
    if s.phase == "prefill":
        prefix, counted = "", ""
        if s.prefix_len:
            prefix = f" after a {s.prefix_len}-token cached prefix"
            counted = f" ({s.input_tokens_per_s_per_node_with_prefix:,.0f} counting the cached tokens)"
        return (f"prefill, {s.prompt_len}-token prompts{prefix}, {s.tokens_per_gpu:,.0f} tokens/GPU per forward: "
                f"{s.input_tokens_per_s_per_gpu:,.0f} input tok/s per GPU, {s.input_tokens_per_s_per_node:,.0f} per "
                f"node{counted}; {s.forward_ms:.2f} ms per forward")
    if s.phase == "decode":
        mtp = "" if s.draft_tokens is None else (f" + {s.draft_tokens} draft token(s) each (the MTP module: one "
                                                  f"more MoE layer), {s.output_tokens_per_step:.2f} output tokens per "
                                                  "step")
        return (f"decode, {s.requests_per_gpu:,.0f} requests/GPU{mtp}, KV {s.kv_len}: "
                f"{s.output_tokens_per_s_per_gpu:,.0f} "
                f"output tok/s per GPU, {s.output_tokens_per_s_per_node:,.0f} per node; TPOT {s.tpot_ms:.2f} ms "
                f"({s.output_tokens_per_s_per_request:.1f} tok/s per request)")
    return (f"{s.tokens_per_gpu:,.0f} tokens/GPU per forward: {s.tokens_per_s_per_gpu:,.0f} tok/s per GPU, "
            f"{s.tokens_per_s_per_node:,.0f} per node; {s.forward_ms:.2f} ms per forward (no seq_len or kv_len: "
            "no serving phase)")


@dataclass(frozen=True)
class RequestMix:
    """What a deployment's requests need, on average: prompt (input) tokens, of which ``cache_hit_rate`` (0 to
    below 1) are served from a prefix cache without computing, and output tokens (both > 0). The node ratio
    depends only on their ratio; requests/s needs per-request means."""

    input_tokens: float
    output_tokens: float
    cache_hit_rate: float = 0.0

    def __post_init__(self) -> None:
        if not (self.input_tokens > 0 and self.output_tokens > 0 and 0 <= self.cache_hit_rate < 1):
            raise ValueError(f"need input_tokens > 0, output_tokens > 0 and 0 <= cache_hit_rate < 1, got {self}")

    @property
    def computed_input_tokens(self) -> float:
        return self.input_tokens * (1 - self.cache_hit_rate)


def disaggregated_figures(prefill: ServingMetrics, decode: ServingMetrics,
                          mix: RequestMix | None = None) -> dict[str, Any]:
    """Figures of a prefill pool and a decode pool serving together (prefill/decode disaggregation): each pool's
    throughput per node and latency and, given the request ``mix``, the prefill:decode node ratio it needs
    (node-seconds of prefill per request over those of decode), the requests/s the pools as sized sustain and which
    pool limits them, and the output tokens/s per node of the whole deployment sized at that ratio. The KV-cache
    transfer between the pools, queueing and arrival are not modelled: TTFT is one prefill forward at least."""
    if prefill.phase != "prefill" or decode.phase != "decode":
        raise ValueError(f"need a prefill and a decode run, got {prefill.phase} and {decode.phase}")
    assert prefill.input_tokens_per_s_per_node is not None and decode.output_tokens_per_s_per_node is not None
    in_node, out_node = prefill.input_tokens_per_s_per_node, decode.output_tokens_per_s_per_node
    out: dict[str, Any] = {
        "prefill_nodes": prefill.nodes, "decode_nodes": decode.nodes,
        "input_tokens_per_s_per_prefill_node": in_node, "output_tokens_per_s_per_decode_node": out_node,
        "prefill_forward_ms": prefill.forward_ms, "tpot_ms": decode.tpot_ms,
        "output_tokens_per_s_per_request": decode.output_tokens_per_s_per_request,
        "nodes_ratio": prefill.nodes / decode.nodes,  # prefill:decode nodes, as the scenario sizes them
    }
    if mix is None:
        return out
    prefill_node_s = mix.computed_input_tokens / in_node  # node-seconds per request in each pool
    decode_node_s = mix.output_tokens / out_node
    rates = {"prefill": prefill.nodes / prefill_node_s, "decode": decode.nodes / decode_node_s}
    limit = min(rates, key=lambda k: rates[k])
    out.update({
        "input_tokens_per_request": mix.input_tokens, "output_tokens_per_request": mix.output_tokens,
        "cache_hit_rate": mix.cache_hit_rate,
        "input_tokens_per_s_per_prefill_node_with_cache_hits": in_node / (1 - mix.cache_hit_rate),
        "needed_nodes_ratio": prefill_node_s / decode_node_s,
        "requests_per_s": rates[limit], "limited_by": limit,
        "requests_per_s_prefill_pool": rates["prefill"], "requests_per_s_decode_pool": rates["decode"],
        "output_tokens_per_s_per_node_balanced": mix.output_tokens / (prefill_node_s + decode_node_s),
    })
    return out
