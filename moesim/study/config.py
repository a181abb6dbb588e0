"""Scenario files: YAML -> validated, typed objects, with every error naming the file and the field.

A scenario has top-level keys ``name``, ``clusters``, ``model``, ``workload``, ``placements``, ``baseline``,
``engine`` and ``output``; see ``scenarios/*.yaml`` and the README. Unknown keys are rejected, units are in
field names, and cross-field checks (EP vs experts, trace vs model, baseline vs placements) run before
anything is simulated. Relative paths (trace and placement files) resolve against the scenario's folder. The
``model`` is a mapping of ModelSpec fields or a named architecture, ``{preset: NAME, ...overrides}``
(:mod:`moesim.traces.model_presets`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moesim.errors import InputError
from moesim.fileio import safe_name
from moesim.hardware.presets import deep_merge, preset
from moesim.hardware.spec import ClusterSpec
from moesim.loaders import NoBoolNumbers, check_values, read_yaml
from moesim.placement.registry import check_option, policy_names, policy_options, replica_option
from moesim.sim.compute import Attention
from moesim.sim.engine import EngineOptions
from moesim.study.fitted_config import FORM_TAGS, FittedField, resolve_fitted
from moesim.study.rebalance_config import MAX_COUNT, RebalanceConfig, check_rebalance_batches
from moesim.study.speculative import Speculative, with_mtp
from moesim.study.train_config import TrainingConfig
from moesim.traces.model import ModelSpec
from moesim.traces.model_presets import model_with_overrides


class _Strict(NoBoolNumbers):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ClusterEntry(_Strict):
    """A cluster of the study: the hardware, and how expert parallelism is laid over it."""

    name: str
    spec: ClusterSpec
    tp: int = Field(default=1, ge=1, le=4096, description="tensor parallelism: GPUs per EP rank, sharing each "
                    "expert and the attention (Megatron)")

    @property
    def ep(self) -> int:
        return self.spec.num_gpus // self.tp


class SyntheticWorkload(_Strict):
    tokens_per_gpu: int = Field(ge=1, le=MAX_COUNT, description="tokens resident on each GPU per batch")
    batches: int = Field(default=1, ge=1, le=MAX_COUNT)
    profile_batches: int = Field(default=1, ge=1, le=MAX_COUNT, description="independent batches placements are "
                                 "profiled on")
    zipf_alpha: float = Field(default=0.3, ge=0, le=10)
    gpu_mix_sigma: float = Field(default=0.3, ge=0, le=10)
    affinity: float = Field(default=0.5, ge=0, le=1)
    affinity_fanout: int = Field(default=4, ge=1, le=MAX_COUNT)
    groups: int = Field(default=1, ge=1, le=MAX_COUNT, description="expert groups for group-limited routing "
                        "(DeepSeek-V3: 8)")
    topk_groups: int | None = Field(default=None, ge=1, le=MAX_COUNT, description="groups each token may use "
                                    "(DeepSeek-V3: 4)")
    seed: int = Field(default=0, ge=0, description="seed of the workload's random generators (an integer >= 0)")
    fitted: FittedField | None = Field(
        default=None, description="parameters fitted to a real trace (moesim trace fit): a YAML file or a shipped "
        "name; or {params: NAME, expand_experts: N}, a fit of a smaller model of the family carried over to this "
        "one (moesim.study.fitted_config); replaces the synthetic shape fields")
    drift_swaps_per_batch: float = Field(default=0.0, ge=0, le=1e6, description="popularity drift of the evaluation "
                                         "trace: random expert label swaps per layer per batch (moesim.traces."
                                         "synthetic.drift_trace)")


class TraceWorkload(_Strict):
    file: Path | None = None
    files: tuple[Path, ...] | None = Field(
        default=None, min_length=1, description="a sequence of traces replayed one after another (e.g. captured at "
                                                "different times), instead of one file: the run drifts as they do")
    tokens_per_gpu: int | None = Field(default=None, ge=1, le=MAX_COUNT,
                                       description="batch size when the trace has no batch array")
    profile_batches: int | None = Field(default=None, ge=1, le=MAX_COUNT,
                                        description="first N batches to profile on (default: all)")

    @model_validator(mode="after")
    def _one_source(self) -> "TraceWorkload":
        if (self.file is None) == (self.files is None):
            raise ValueError("give exactly one of 'file' or 'files'")
        return self

    @property
    def paths(self) -> tuple[Path, ...]:
        return self.files if self.files is not None else (self.file,)  # type: ignore[return-value]

    @property
    def label(self) -> str:
        """The trace file, or the sequence as ``a.npz + b.npz + ...`` (for messages)."""
        return " + ".join(str(p) for p in self.paths)


class Workload(_Strict):
    phase: Literal["serve", "train"] = Field(default="serve", description="serve (the engine's forward) or train "
                                             "(forward, backward, optimizer: the scenario's training section)")
    synthetic: SyntheticWorkload | None = None
    trace: TraceWorkload | None = None
    seq_len: int | None = Field(default=None, ge=1, le=MAX_COUNT, description="prefill: the batch is prompts of "
                                "this many tokens, each attending causally to the ones before it (charges the "
                                "attention core; needs model.num_heads)")
    prefix_len: int = Field(default=0, ge=0, le=MAX_COUNT, description="prefill: tokens of each prompt already in "
                            "the KV cache (a prefix-cache hit) before its seq_len computed ones; attended to, not "
                            "computed (needs seq_len)")
    kv_len: int | None = Field(default=None, ge=1, le=MAX_COUNT, description="decode: every token is the next "
                               "token of a sequence with this many tokens cached (charges KV-cache reads; needs "
                               "model.num_heads)")
    speculative: Speculative | None = Field(default=None, description="decode: draft tokens from the model's MTP "
                                            "module, verified every step (moesim.study.speculative)")

    @model_validator(mode="after")
    def _one(self) -> "Workload":
        if (self.synthetic is None) == (self.trace is None):
            raise ValueError("give exactly one of 'synthetic' or 'trace'")
        if self.seq_len is not None and self.kv_len is not None:
            raise ValueError("give seq_len (prefill) or kv_len (decode), not both")
        if self.prefix_len and (self.seq_len is None or self.phase == "train"):
            raise ValueError("prefix_len (a cached prefix) needs seq_len, in serving (phase serve)")
        return self

    @property
    def attention(self) -> Attention | None:
        """The attention core's context, or None (projections only)."""
        if self.seq_len is not None:
            return Attention("prefill", self.seq_len, prefix=self.prefix_len)
        if self.kv_len is not None:
            return Attention("decode", self.kv_len, queries=self.speculative.queries if self.speculative else 1)
        return None


class PlacementEntry(_Strict):
    name: str
    policy: str | None = None
    file: Path | None = None
    options: dict[str, Any] = Field(default_factory=dict)


class EngineConfig(_Strict):
    moe_kernels: Literal["torch_reference", "fused", "deepgemm", "ffn"] | None = Field(
        default=None, description="the MoE layer's kernel pipeline (moesim.sim.kernels): torch_reference "
        "(plain PyTorch EP: router, permute, all_to_all_single, regroup, grouped GEMMs, unpermute, index_add), fused "
        "(vLLM's fused_moe Triton kernels), deepgemm (DeepEP + DeepGEMM FP8 grouped GEMMs: SGLang wide EP, "
        "DeepSeek), ffn (the expert FFNs alone); default: deepgemm with the DeepEP or NVLink one-sided all-to-alls, "
        "else torch_reference")
    expert_dtype: Literal["bf16", "fp8"] = Field(default="bf16", description="the expert GEMMs' dtype")
    launch: Literal["eager", "cuda_graph"] = Field(
        default="eager", description="how the MoE pipeline's kernels are launched: eager (PyTorch from Python; small "
        "layers are bound by the host) or cuda_graph (replayed from CUDA graphs, as serving engines run decode; needs "
        "moe_kernels fused or deepgemm)")
    dispatch: Literal["per_gpu", "per_expert"] | None = Field(
        default=None, description="one token copy per destination GPU (DeepEP) or per expert (naive); default: "
        "per_expert with moe_kernels torch_reference (its send buffer has a row per pick), else per_gpu")
    expert_kernel: Literal["grouped", "per_expert"] = "grouped"
    rate_tolerance: float = Field(default=0.01, ge=0, le=0.2)
    a2a: Literal["nccl", "deepep_normal", "deepep_low_latency", "nvlink_one_sided", "direct", "hierarchical",
                 "low_latency"] = Field(
        default="direct", description="the all-to-all kernel family (docs/a2a.md; fixed costs in the cluster's "
        "a2a_kernels): nccl (alias direct: NCCL all_to_all, copies straight to each GPU), deepep_normal (alias "
        "hierarchical: DeepEP normal, notify step, one network copy per node and NVLink forwarding), "
        "deepep_low_latency (alias low_latency: DeepEP low-latency, one message per token and expert), "
        "nvlink_one_sided (TensorRT-LLM one-sided NVLink, one NVLink domain only)")
    replica_rule: Literal["token_index", "local", "balanced_split"] = Field(
        default="token_index", description="which replica serves a token: token_index (vLLM), local (SGLang "
                                           "static: same GPU, then node, then spread), balanced_split (LPLB)")
    dataflow: Literal["standard", "coherent"] = Field(
        default="standard", description="standard (dispatch from home, combine home, every layer) or coherent "
                                        "(ExFlow: tokens go from layer l's expert GPUs straight to layer l+1's)")
    overlap: Literal["none", "two_batch"] = Field(
        default="none", description="none, or two_batch: each batch in two micro-batches whose all-to-alls overlap "
        "the other's compute, shared experts beside their own dispatch (DeepSeek, SGLang TBO, vLLM DBO; "
        "moesim.sim.overlap)")
    comm_sms: int | None = Field(default=None, ge=0, le=100_000, description="SMs an all-to-all kernel occupies "
                                 "while in flight, slowing the compute it overlaps (default: the kernel family's sms "
                                 "in the cluster's a2a_kernels)")
    dense_dtype: Literal["bf16", "fp8"] = Field(
        default="bf16", description="dtype of the GEMMs outside the routed experts: attention projections, shared "
        "experts, dense layers' MLPs (DeepSeek serves every linear layer in FP8)")
    attention_kernel: str = Field(default="fa2", max_length=64, description="the prefill attention core's kernel "
                                  "family: fa2 (FlashAttention-2) or one the GPU has fitted (gpu.attention_kernels, "
                                  "e.g. cudnn: Hopper-native fused attention); decode keeps its own (docs/formats.md)")
    clock: Literal["auto", "sustained", "boost"] = Field(default="auto", description="tensor-core clock: sustained "
        "(power-capped, gpu.sustained_clock), boost (as kernels were timed); auto: sustained unless decoding or eager")
    progress: bool = True

    @model_validator(mode="after")
    def _a2a(self) -> "EngineConfig":
        if self.a2a in ("low_latency", "deepep_low_latency") and "dispatch" in self.model_fields_set \
                and self.dispatch == "per_gpu":
            raise ValueError(f"a2a {self.a2a} sends one message per (token, expert); drop dispatch: per_gpu")
        self.options()  # the engine's own checks (EngineOptions), defined once there
        return self

    def options(self) -> EngineOptions:
        """The engine options these settings ask for."""
        kernels = self.moe_kernels or ("torch_reference" if self.a2a in ("direct", "nccl") else "deepgemm")
        dispatch = self.dispatch or ("per_expert" if kernels == "torch_reference" else "per_gpu")
        return EngineOptions(dedup=dispatch == "per_gpu", grouped=self.expert_kernel == "grouped",
                             rate_tolerance=self.rate_tolerance, a2a=self.a2a, replica_rule=self.replica_rule,
                             dataflow=self.dataflow, moe_kernels=kernels, expert_dtype=self.expert_dtype,
                             launch=self.launch, overlap=self.overlap, comm_sms=self.comm_sms,
                             dense_dtype=self.dense_dtype)


class Scenario(_Strict):
    name: str
    source: str  # the file it came from
    clusters: tuple[ClusterEntry, ...]
    model: ModelSpec
    workload: Workload
    placements: tuple[PlacementEntry, ...]
    baseline: str
    engine: EngineConfig
    output: Path
    rebalance: RebalanceConfig | None = None
    training: TrainingConfig | None = None

    @property
    def attention(self) -> Attention | None:
        """The attention core's context and kernel family, or None (projections only)."""
        a = self.workload.attention
        return None if a is None else replace(a, kernel=self.engine.attention_kernel)

    @property
    def output_per_step(self) -> float:
        """Output tokens per request per forward in decode (more than one with speculative decoding)."""
        spec = self.workload.speculative
        return 1.0 if spec is None else spec.output_tokens_per_step

    @property
    def sustained(self) -> bool:
        """GPUs at their sustained tensor-core clock? (``engine.clock``; auto: fused kernels, not decoding)"""
        if self.engine.clock != "auto":
            return self.engine.clock == "sustained"
        a = self.workload.attention
        return (a is None or a.phase != "decode") and self.engine.options().moe_kernels in ("fused", "deepgemm")


_M = TypeVar("_M", bound=BaseModel)
TOP_KEYS = {"name", "clusters", "model", "workload", "placements", "baseline", "engine", "output", "rebalance",
            "training", "sweep"}


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or str(part).startswith("function-") or part in FORM_TAGS:
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def _pydantic_error(exc: ValidationError, source: str, prefix: str) -> InputError:
    err = exc.errors()[0]
    field = _loc(tuple(err["loc"]))
    field = f"{prefix}{'' if field.startswith('[') else '.'}{field}" if prefix and field else (prefix or field)
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif "input" in err and not isinstance(err["input"], (dict, list)):
        msg = f"{msg} (got {err['input']!r})"
    return InputError(msg, source=source, field=field)


def _cluster_file(file: Any, base_dir: Path, source: str, where: str) -> dict[str, Any]:
    """A cluster YAML file named in a scenario, as a mapping (its errors name it, and where it was named)."""
    path = Path(str(file))
    path = path if path.is_absolute() else base_dir / path
    try:
        loaded = read_yaml(path)
        if not isinstance(loaded, dict):
            raise InputError("a cluster file must be a YAML mapping", source=str(path))
    except InputError as exc:
        raise exc.via(source, f"{where}.file") from None
    return loaded


def _cluster(raw: Any, i: int, source: str, base_dir: Path) -> ClusterEntry:
    where = f"clusters[{i}]"
    if isinstance(raw, str):
        raw = {"preset": raw}
    if not isinstance(raw, dict):
        raise InputError("must be a preset name or a mapping", source=source, field=where)
    raw = dict(raw)
    tp = raw.pop("tp", 1)
    name = raw.pop("name", None)
    if "file" in raw:
        raw = deep_merge(_cluster_file(raw.pop("file"), base_dir, source, where), raw)
    if "preset" in raw:
        try:
            base = preset(str(raw.pop("preset")))
        except KeyError as exc:
            raise InputError(str(exc.args[0]), source=source, field=f"{where}.preset") from None
    else:
        base = {}
    merged = deep_merge(base, raw)
    if name is None:
        nodes = merged.get("nodes", 1)
        name = f"{merged.get('name', 'cluster')}-{nodes}x{merged.get('gpus_per_node', '?')}"
    merged["name"] = str(name)
    try:
        spec = ClusterSpec.model_validate(merged)
    except ValidationError as exc:
        raise _pydantic_error(exc, source, where) from None
    if not isinstance(tp, int) or isinstance(tp, bool) or not 1 <= tp <= 4096:
        raise InputError(f"must be a positive integer up to 4096 (got {tp!r})", source=source, field=f"{where}.tp")
    if spec.gpus_per_node % tp:
        raise InputError(f"tp={tp} must divide gpus_per_node={spec.gpus_per_node}", source=source, field=f"{where}.tp")
    return ClusterEntry(name=str(name), spec=spec, tp=tp)


def _placement(raw: Any, i: int, source: str, base_dir: Path) -> PlacementEntry:
    where = f"placements[{i}]"
    if isinstance(raw, str):
        raw = {"policy": raw}
    if not isinstance(raw, dict):
        raise InputError("must be a policy name or a mapping with 'policy' or 'file'", source=source, field=where)
    raw = dict(raw)
    name = raw.pop("name", None)
    if "file" in raw:
        file = raw.pop("file")
        if raw:
            raise InputError("unknown key next to 'file'", source=source, field=f"{where}.{sorted(raw)[0]}")
        path = Path(str(file))
        path = path if path.is_absolute() else base_dir / path
        if not path.is_file():
            raise InputError(f"placement file not found: {path}", source=source, field=f"{where}.file")
        return PlacementEntry(name=str(name or path.stem), file=path)
    if "policy" not in raw:
        raise InputError("needs 'policy' (one of " + ", ".join(policy_names()) + ") or 'file'",
                         source=source, field=where)
    policy = str(raw.pop("policy"))
    if policy not in policy_names():
        raise InputError(f"unknown policy {policy!r}; valid: {', '.join(policy_names())}", source=source,
                         field=f"{where}.policy")
    check_policy_options(policy, raw, source, f"{where}.")
    return PlacementEntry(name=str(name or policy), policy=policy, options=raw)


def check_policy_options(policy: str, options: dict[str, Any], source: str | None, prefix: str) -> None:
    """Every option is one ``policy`` takes, of the type it declares; a seed is an integer >= 0. An error
    names the option as ``prefix + key`` (``placements[0].seed``, ``--set seed``)."""
    accepted = policy_options(policy)
    for key, value in options.items():
        if key not in accepted:
            valid = ", ".join(accepted) or "none"
            raise InputError(f"policy {policy!r} has no option {key!r}; valid options: {valid}", source=source,
                             field=f"{prefix}{key}")
        try:
            check_option(policy, key, value)
        except TypeError as exc:
            raise InputError(str(exc), source=source, field=f"{prefix}{key}") from None
        if key == "seed" and isinstance(value, int) and value < 0:
            raise InputError(f"must be an integer >= 0 (a random generator's seed), got {value}", source=source,
                             field=f"{prefix}{key}")
        if key == replica_option(policy) and isinstance(value, int) and value < 0:
            raise InputError(f"must be an integer >= 0 (extra expert copies per layer), got {value}", source=source,
                             field=f"{prefix}{key}")


def _rebalance(raw: Any, placements: tuple[PlacementEntry, ...], workload: Workload,
               source: str) -> RebalanceConfig | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise InputError("must be a mapping {policy, every_batches, window_batches, ...}", source=source,
                         field="rebalance")
    try:
        cfg = RebalanceConfig.model_validate(raw)
    except ValidationError as exc:
        raise _pydantic_error(exc, source, "rebalance") from None
    if "overlap_slowdown" in cfg.model_fields_set and cfg.migration != "overlap":
        raise InputError("applies only with migration: overlap (a stall has no slowdown); drop it or set "
                         "migration: overlap", source=source, field="rebalance.overlap_slowdown")
    entry = next((p for p in placements if p.name == cfg.policy), None)
    if entry is None or entry.policy is None:
        names = ", ".join(p.name for p in placements if p.policy is not None)
        raise InputError(f"{cfg.policy!r} is not a placement made by a policy; valid: {names}", source=source,
                         field="rebalance.policy")
    if workload.trace is not None and workload.trace.profile_batches is None:
        raise InputError("a rebalancing study needs the plan made once to come from the first batches only (else "
                         "it has seen the whole trace, the future included); set e.g. profile_batches: "
                         f"{cfg.window_batches}", source=source, field="workload.trace.profile_batches")
    if workload.synthetic is not None:
        check_rebalance_batches(cfg.every_batches, cfg.window_batches, workload.synthetic.batches, source)
    return cfg


def _check_top_level(data: Any, source: str) -> None:
    """A mapping of the known top-level keys, with the required ones."""
    if not isinstance(data, dict):
        raise InputError("a scenario must be a YAML mapping", source=source)
    for key in data:
        if key == "pools":  # a disaggregated deployment: moesim.study.disagg reads it (moesim run does)
            raise InputError("a disaggregated scenario: load it with moesim.study.disagg.load_any", source=source,
                             field="pools")
        if key not in TOP_KEYS:
            raise InputError(f"unknown key; valid: {', '.join(sorted(TOP_KEYS))}", source=source, field=str(key))
    for key in ("clusters", "model", "workload") + (() if "training" in data else ("placements",)):
        if key not in data:
            raise InputError("missing", source=source, field=key)


def _non_empty_list(raw: Any, source: str, field: str) -> list[Any]:
    if not isinstance(raw, list) or not raw:
        raise InputError("must be a non-empty list", source=source, field=field)
    return raw


def _parse_clusters(raw: Any, source: str, base_dir: Path) -> tuple[ClusterEntry, ...]:
    clusters = tuple(_cluster(c, i, source, base_dir) for i, c in enumerate(_non_empty_list(raw, source, "clusters")))
    names = [c.name for c in clusters]
    if len(set(names)) != len(names):
        raise InputError(f"cluster names must be unique, got {names}", source=source, field="clusters")
    return clusters


def _validated(model: type[_M], raw: Any, source: str, field: str) -> _M:
    """``raw`` validated as ``model``; a validation error names ``field`` and the key inside it."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise _pydantic_error(exc, source, field) from None


def _parse_model(raw: Any, source: str) -> ModelSpec:
    """The model: a mapping of :class:`ModelSpec` fields, or ``preset: NAME`` (moesim.traces.model_presets) with
    any field given beside it overriding the preset's; a bare name is a preset without overrides."""
    field = "model.preset"
    if isinstance(raw, str):
        raw, field = {"preset": raw}, "model"
    if isinstance(raw, dict):
        try:
            raw = model_with_overrides(raw)
        except KeyError as exc:
            raise InputError(str(exc.args[0]), source=source, field=field) from None
    return _validated(ModelSpec, raw, source, "model")


def _model_routing(syn: SyntheticWorkload, model: ModelSpec) -> SyntheticWorkload:
    """The synthetic workload routing as the model does (its ``expert_groups``, ``topk_groups``) unless the
    workload gives ``groups`` or ``topk_groups`` itself: then the workload's values alone."""
    if syn.fitted is not None or {"groups", "topk_groups"} & syn.model_fields_set or model.expert_groups == 1:
        return syn
    return syn.model_copy(update={"groups": model.expert_groups, "topk_groups": model.topk_groups})


def _check_synthetic(syn: SyntheticWorkload, model: ModelSpec, source: str) -> None:
    """The synthetic generator can draw ``top_k`` distinct experts of this model with these settings."""
    if syn.affinity >= 1 and syn.affinity_fanout < model.top_k:
        raise InputError(f"affinity 1 with affinity_fanout {syn.affinity_fanout} < top_k {model.top_k} cannot give "
                         "top_k distinct experts; lower affinity or raise affinity_fanout", source=source,
                         field="workload.synthetic.affinity_fanout")
    if model.num_experts % syn.groups:
        raise InputError(f"must divide num_experts ({model.num_experts})", source=source,
                         field="workload.synthetic.groups")
    if syn.topk_groups is not None and (
            syn.topk_groups > syn.groups or syn.topk_groups * (model.num_experts // syn.groups) < model.top_k):
        raise InputError(f"must be at most groups ({syn.groups}) and leave at least top_k ({model.top_k}) experts "
                         "to choose from", source=source, field="workload.synthetic.topk_groups")
    most = model.num_experts**2
    if syn.drift_swaps_per_batch > most:
        raise InputError(f"must be at most num_experts^2 = {most} swaps per layer per batch (beyond that the labels "
                         f"are shuffled completely every batch), got {syn.drift_swaps_per_batch:g}", source=source,
                         field="workload.synthetic.drift_swaps_per_batch")


def _resolve_traces(tw: TraceWorkload, source: str, base_dir: Path) -> TraceWorkload:
    """The trace file(s) resolved against the scenario's folder; each must exist."""
    key = "file" if tw.file is not None else "files"
    paths = tuple(p if p.is_absolute() else base_dir / p for p in tw.paths)
    for i, path in enumerate(paths):
        if not path.is_file():
            field = f"workload.trace.{key}" + (f"[{i}]" if key == "files" else "")
            raise InputError(f"trace file not found: {path}", source=source, field=field)
    return tw.model_copy(update={key: paths[0] if key == "file" else paths})


def _parse_workload(raw: Any, model: ModelSpec, source: str, base_dir: Path) -> Workload:
    """The workload, checked against the model; a fitted generator's file and trace files resolved."""
    workload = _validated(Workload, raw, source, "workload")
    for key in ("seq_len", "kv_len"):
        if getattr(workload, key) is not None and model.num_heads is None:
            raise InputError("needs the model's attention shape (model.num_heads, num_kv_heads, head_dim)",
                             source=source, field=f"workload.{key}")
    syn = workload.synthetic
    if syn is not None:
        syn = _model_routing(syn, model)
        workload = workload.model_copy(update={"synthetic": syn})
        _check_synthetic(syn, model, source)
        if syn.fitted is not None:
            fitted = resolve_fitted(syn.fitted, model, source, base_dir, set(syn.model_fields_set))
            workload = workload.model_copy(update={"synthetic": syn.model_copy(update={"fitted": fitted})})
    if workload.trace is not None:
        workload = workload.model_copy(update={"trace": _resolve_traces(workload.trace, source, base_dir)})
    return workload


def _parse_placements(raw: Any, source: str, base_dir: Path) -> tuple[PlacementEntry, ...]:
    entries = _non_empty_list(raw, source, "placements")
    placements = tuple(_placement(p, i, source, base_dir) for i, p in enumerate(entries))
    names = [p.name for p in placements]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"placement names must be unique; {dupes[0]!r} repeats (give each a 'name')",
                         source=source, field="placements")
    return placements


def _baseline(data: dict[str, Any], placements: tuple[PlacementEntry, ...], source: str) -> str:
    names = [p.name for p in placements]
    baseline = str(data.get("baseline", names[0]))
    if baseline not in names:
        raise InputError(f"{baseline!r} is not one of the placements: {', '.join(names)}", source=source,
                         field="baseline")
    return baseline


def _training(data: dict[str, Any], workload: Workload, source: str) -> TrainingConfig | None:
    """The training section: present exactly when ``workload.phase`` is train (moesim.study.train_config)."""
    if (workload.phase == "train") != ("training" in data):
        raise InputError("workload.phase train needs a training section, and a training section needs it",
                         source=source, field="training" if "training" in data else "workload.phase")
    return None if workload.phase == "serve" else _validated(TrainingConfig, data["training"], source, "training")


def parse_scenario(data: Any, source: str, base_dir: Path | None = None) -> Scenario:
    """Validate a scenario given as plain data (what YAML loads to): its top-level keys, then each section
    in turn (clusters, model, workload, placements, baseline, engine, rebalance), cross-field checks with
    the section they concern."""
    base_dir = base_dir or Path(".")
    check_values(data, source, plain=False)  # numbers finite, integers of 64 bits, valid text (data may not be YAML)
    _check_top_level(data, source)
    clusters = _parse_clusters(data["clusters"], source, base_dir)
    model = _parse_model(data["model"], source)
    workload = _parse_workload(data["workload"], model, source, base_dir)
    model = with_mtp(model, workload, source)  # speculative decoding: the MTP module as one more MoE layer
    training = _training(data, workload, source)
    placements = _parse_placements(data["placements"] if training is None else training.scenario_placements(),
                                   source, base_dir)
    baseline = _baseline(data if training is None else {"baseline": training.baseline_name}, placements, source)
    engine = _validated(EngineConfig, data.get("engine") or {}, source, "engine")
    _check_a2a_domain(engine, clusters, source)
    name = str(data.get("name") or Path(source).stem)
    output = Path(str(data.get("output") or Path("results") / safe_name(name)))  # the name: one safe component
    rebalance = _rebalance(data.get("rebalance"), placements, workload, source)
    from moesim.study.grid import check_sweep  # moesim sweep expands the section; the others run without it
    check_sweep(data.get("sweep"), source)
    return Scenario(name=name, source=source, clusters=clusters, model=model, workload=workload, rebalance=rebalance,
                    placements=placements, baseline=baseline, engine=engine, output=output, training=training)


def _check_a2a_domain(engine: EngineConfig, clusters: Sequence[ClusterEntry], source: str) -> None:
    """One-sided NVLink all-to-alls run within one NVLink domain: refuse a cluster of several nodes. Every cluster's
    GPU has the attention kernel family asked for."""
    for c in (c for c in clusters if engine.attention_kernel not in ("fa2", *c.spec.gpu.attention_kernels)):
        raise InputError(f"cluster {c.name!r}'s GPU ({c.spec.gpu.name}) has no fit for {engine.attention_kernel!r} "
                         f"(it has: {', '.join(['fa2', *c.spec.gpu.attention_kernels])})", source=source,
                         field="engine.attention_kernel")
    for c in (c for c in clusters if engine.a2a == "nvlink_one_sided" and c.spec.nodes > 1):
        raise InputError(f"nvlink_one_sided runs within one NVLink domain; cluster {c.name!r} spans {c.spec.nodes} "
                         f"nodes of {c.spec.gpus_per_node} GPUs (use deepep_normal, deepep_low_latency or nccl)",
                         source=source, field="engine.a2a")


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario YAML file (:func:`moesim.loaders.read_yaml`: UTF-8, no duplicate keys,
    aliases and nesting bounded)."""
    return parse_scenario(read_yaml(path, str(path)), str(path), Path(path).parent)
