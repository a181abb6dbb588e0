"""Speculative decoding with the model's multi-token-prediction module as the draft (``workload.speculative``):
DeepSeek-V3/R1's MTP layer as SGLang (EAGLE with the NextN module) and vLLM (``deepseek_mtp``) run it.

A decode step verifies, for every request, its next token and ``draft_tokens`` tokens drafted at the previous step:
one forward of the main model over ``1 + draft_tokens`` tokens per request, each attending to the request's KV cache
and to the step's tokens before it (the kernel reads the cache once per request:
:class:`moesim.sim.compute.Attention`, ``queries``). The MTP module - one more transformer block of the model's
shape, MLA and an MoE layer with its own experts, the model's ``mtp_layers`` - then runs over the same tokens to
extend the draft (SGLang's draft-extend pass), so it is simulated as one more MoE layer after the model's last,
with its own routing and placement. Each draft token is accepted with probability ``acceptance`` given that the
ones before it were, so a step emits ``1 + a + ... + a^d`` output tokens per request on average.

Tokens per GPU in the workload are the forward's: requests x (1 + draft_tokens) (``synthetic.tokens_per_gpu`` must
be a multiple). Deliberately ignored: the MTP module's input projection (its hidden state and embedding
concatenated, 2d x d) and output head, as the engine ignores the main model's LM head and sampling; draft steps
beyond the first (with ``draft_tokens`` > 1 the module drafts one token at a time: those extra passes over one token
per request are not simulated); acceptance that varies by position or request; tree drafts (topk > 1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import ConfigDict, Field

from moesim.errors import InputError
from moesim.loaders import NoBoolNumbers
from moesim.traces.model import ModelSpec

if TYPE_CHECKING:
    from moesim.study.config import Workload


class Speculative(NoBoolNumbers):
    """``workload.speculative``: draft tokens verified per request per step, and each one's acceptance."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    draft_tokens: int = Field(ge=1, le=16, description="tokens the MTP module drafts per request per step")
    acceptance: float = Field(ge=0, le=1, description="probability that a draft token is accepted, given that "
                              "the ones before it were")

    @property
    def queries(self) -> int:
        """Tokens per request in a step's forward."""
        return 1 + self.draft_tokens

    @property
    def output_tokens_per_step(self) -> float:
        """Output tokens per request per step, on average: the verified token and the accepted run of drafts."""
        return float(sum(self.acceptance**i for i in range(self.draft_tokens + 1)))


def with_mtp(model: ModelSpec, workload: "Workload", source: str) -> ModelSpec:
    """The model as a speculative-decoding workload runs it: its MTP module as one more MoE layer (module
    docstring); the model unchanged without ``workload.speculative``. Errors name the field."""
    spec = workload.speculative
    if spec is None:
        return model
    field = "workload.speculative"
    if workload.kv_len is None:
        raise InputError("speculative decoding is a decode workload: give workload.kv_len", source=source,
                         field=field)
    if model.mtp_layers < 1 or model.moe_layer_step != 1:
        why = "no multi-token-prediction layer to draft with (mtp_layers 0)" if model.mtp_layers < 1 else \
            "MoE layers between dense ones (moe_layer_step > 1), unlike DeepSeek's MTP models"
        raise InputError(f"model {model.name!r} has {why}", source=source, field=field)
    syn = workload.synthetic
    if syn is not None and syn.tokens_per_gpu % spec.queries:
        raise InputError(f"tokens per GPU are requests x (1 + draft_tokens) = requests x {spec.queries}; "
                         f"{syn.tokens_per_gpu} is not a multiple of {spec.queries}", source=source,
                         field="workload.synthetic.tokens_per_gpu")
    return model.model_copy(update={"num_layers": model.num_layers + 1})
