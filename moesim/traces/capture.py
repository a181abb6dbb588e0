"""Capture routing traces from a Hugging Face transformers MoE model (optional extra: ``pip install -e
'.[capture]'``).

What is recorded: for every prompt, one forward pass (prefill, batch size 1, no padding), and at every MoE
layer the router's top-k expert ids and gate weights for every token, exactly as the model's own router
computed them. Routers are found by class: transformers >= 5 gives every MoE model a router module
(``MixtralTopKRouter``, ``OlmoeTopKRouter``, ``Qwen2MoeTopKRouter``, ``DeepseekV3TopkRouter``,
``GptOssTopKRouter``, ...) returning ``(router_logits, top-k weights, top-k indices)``; a forward hook on
each, in module order, gives the layers in order (dense layers have no router and are skipped). Older
releases expose a plain ``gate`` linear layer inside a sparse-MoE block; there the hook takes its logits and
applies softmax, top-k and the model's ``norm_topk_prob`` renormalisation (Mixtral-style), which is what
those releases compute. Prompts are packed onto GPUs and batches like imported logs
(:func:`moesim.traces.importers.pack_requests`).

Ignored: decode steps (each prompt is one prefill), shared experts (they do not route), and sampling; the
tokeniser is only needed for text prompts (JSONL ``input_ids`` need none).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from moesim.errors import InputError
from moesim.traces.format import Trace, TraceMeta
from moesim.traces.importers import ASSIGN_POLICIES, pack_requests

_ROUTER_SUFFIXES = ("TopKRouter", "TopkRouter", "Router")


def _require() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError:
        raise InputError("moesim trace capture needs torch and transformers: pip install -e '.[capture]'") from None
    return torch, transformers


def read_prompts(path: str | os.PathLike[str]) -> list[str | list[int]]:
    """Prompts from a text file (one per non-empty line) or JSONL (``{"text": ...}`` or ``{"input_ids": [...]}``
    per line). Errors name the file and line."""
    src = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError("file not found", source=src) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read ({exc})", source=src) from None
    prompts: list[str | list[int]] = []
    jsonl = src.endswith((".jsonl", ".json"))
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if not jsonl:
            prompts.append(line)
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise InputError(f"not JSON ({exc})", source=src, field=f"line {lineno}") from None
        if isinstance(obj, dict) and isinstance(obj.get("input_ids"), list) and obj["input_ids"] and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in obj["input_ids"]):
            prompts.append([int(v) for v in obj["input_ids"]])
        elif isinstance(obj, dict) and isinstance(obj.get("text"), str) and obj["text"]:
            prompts.append(obj["text"])
        else:
            raise InputError("needs 'text' (a non-empty string) or 'input_ids' (non-negative integers)", source=src,
                             field=f"line {lineno}")
    if not prompts:
        raise InputError("no prompts", source=src)
    return prompts


def find_routers(model: Any) -> list[tuple[str, Any, str]]:
    """(name, module, kind) of every router in module order; kind is ``router`` (returns logits, weights,
    indices) or ``gate`` (a linear layer returning logits, in a block with ``top_k``/``num_experts_per_tok``)."""
    out: list[tuple[str, Any, str]] = []
    for name, module in model.named_modules():
        cls = type(module).__name__
        if cls.endswith(_ROUTER_SUFFIXES) and hasattr(module, "weight"):
            out.append((name, module, "router"))
    if out:
        return out
    for name, module in model.named_modules():  # older transformers: a gate Linear inside a sparse-MoE block
        gate = getattr(module, "gate", None)
        if gate is not None and type(gate).__name__ == "Linear" and hasattr(module, "experts"):
            out.append((f"{name}.gate", gate, "gate"))
    return out


def _config_int(config: Any, *names: str) -> int | None:
    for n in names:
        v = getattr(config, n, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def capture_model(model: Any, prompts: Sequence[Sequence[int]], *, device: str = "cpu"
                  ) -> tuple[np.ndarray, np.ndarray, list[int], int]:
    """Run ``model`` on each prompt (token ids) and return (experts [T, L, K], weights [T, L, K], prompt
    lengths, num_experts), tokens in prompt order."""
    torch, _ = _require()
    config = model.config
    routers = find_routers(model)
    if not routers:
        raise InputError(f"{type(model).__name__} has no router modules: not a mixture-of-experts model "
                         "transformers knows")
    E = _config_int(config, "num_local_experts", "num_experts", "n_routed_experts")
    K = _config_int(config, "num_experts_per_tok", "top_k", "moe_topk")
    norm = bool(getattr(config, "norm_topk_prob", True))
    records: list[list[tuple[Any, Any]]] = [[] for _ in routers]
    handles = []

    def hook_for(i: int, kind: str) -> Any:
        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            if kind == "router":
                _, weights, indices = output
            else:  # a gate Linear: softmax, top-k, renormalised as the sparse-MoE block does
                probs = torch.softmax(output.float().reshape(-1, output.shape[-1]), dim=-1)
                weights, indices = torch.topk(probs, K, dim=-1)
                if norm:
                    weights = weights / weights.sum(dim=-1, keepdim=True)
            records[i].append((indices.detach().reshape(-1, indices.shape[-1]).cpu(),
                               weights.detach().float().reshape(-1, weights.shape[-1]).cpu()))
        return hook

    for i, (_, module, kind) in enumerate(routers):
        handles.append(module.register_forward_hook(hook_for(i, kind)))
    if not prompts:
        raise InputError("no prompts")
    lengths = []
    experts_parts: list[list[Any]] = [[] for _ in routers]
    weight_parts: list[list[Any]] = [[] for _ in routers]
    try:
        model.eval()
        with torch.no_grad():
            for ids in prompts:
                for r in records:
                    r.clear()
                model(input_ids=torch.tensor([list(ids)], dtype=torch.long, device=device))
                n = len(ids)
                for (name, _, _), r in zip(routers, records):
                    if len(r) != 1 or r[0][0].shape[0] != n:
                        raise InputError(f"router {name} ran {len(r)} times on {sum(x[0].shape[0] for x in r)} "
                                         f"tokens for a prompt of {n}; cannot attribute its picks")
                for i, r in enumerate(records):
                    experts_parts[i].append(r[0][0].numpy())
                    weight_parts[i].append(r[0][1].numpy())
                lengths.append(n)
    finally:
        for h in handles:
            h.remove()
    experts = np.stack([np.concatenate(p) for p in experts_parts], axis=1)
    weights = np.stack([np.concatenate(p) for p in weight_parts], axis=1).astype(np.float32)
    num_experts = E or int(experts.max()) + 1
    return experts, weights, lengths, num_experts


def capture_trace(model: Any, prompts: Sequence[str | Sequence[int]], *, tokenizer: Any = None,
                  max_tokens: int = 2048, device: str = "cpu", dtype: str = "float32", num_gpus: int | None = None,
                  tokens_per_gpu: int | None = None, assign: str = "least_loaded",
                  trust_remote_code: bool = False) -> Trace:
    """Capture a :class:`Trace` (with gate weights) from ``model``: a loaded transformers model, or a local
    folder / hub id loaded with ``AutoModelForCausalLM`` (weights must be available locally).

    Text prompts need ``tokenizer`` (or one loadable from the model's folder); token-id prompts need none.
    Each prompt is cut to ``max_tokens``. With ``num_gpus``, prompts are packed into batches and home GPUs
    (see :func:`moesim.traces.importers.pack_requests`)."""
    torch, transformers = _require()
    if assign not in ASSIGN_POLICIES:
        raise InputError(f"unknown assignment {assign!r}; valid: {', '.join(ASSIGN_POLICIES)}", field="assign")
    if max_tokens < 1:
        raise InputError(f"must be >= 1, got {max_tokens}", field="max_tokens")
    name = ""
    if isinstance(model, (str, os.PathLike)):
        name = str(model)
        dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                name, **{dtype_key: getattr(torch, dtype)}, trust_remote_code=trust_remote_code).to(device)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot load the model ({' '.join(str(exc).split())[:300]})", source=name) from None
    else:
        name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    ids: list[list[int]] = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                try:
                    tokenizer = transformers.AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
                except (OSError, ValueError) as exc:
                    raise InputError(f"text prompts need a tokenizer ({' '.join(str(exc).split())[:200]}); give "
                                     "JSONL input_ids instead", source=name) from None
            ids.append(list(tokenizer(p)["input_ids"])[:max_tokens])
        else:
            ids.append(list(p)[:max_tokens])
    vocab = getattr(model.config, "vocab_size", None)
    for i, seq in enumerate(ids):
        if not seq:
            raise InputError(f"prompt {i} has no tokens")
        if vocab is not None and max(seq) >= vocab:
            raise InputError(f"prompt {i}: token id {max(seq)} >= vocab_size {vocab}")
    experts, weights, lengths, E = capture_model(model, ids, device=device)
    T, L, K = experts.shape
    extra: dict[str, Any] = {"requests": len(lengths), "capture": {"routers": L, "prompts": len(lengths)}}
    home = batch = None
    if num_gpus:
        length_arr = np.array(lengths)
        budget = tokens_per_gpu or int(length_arr.max())
        unit_req, unit_batch, unit_home = pack_requests(length_arr, num_gpus=num_gpus, tokens_per_gpu=budget,
                                                        assign=assign)
        starts = np.searchsorted(unit_req, unit_req)
        unit_len = np.minimum(length_arr[unit_req] - (np.arange(unit_req.size) - starts) * budget, budget)
        tok_batch, tok_home = np.repeat(unit_batch, unit_len), np.repeat(unit_home, unit_len)
        perm = np.lexsort((np.arange(T), tok_home, tok_batch))
        experts, weights = experts[perm], weights[perm]
        home, batch = tok_home[perm].astype(np.int32), tok_batch[perm].astype(np.int32)
        extra["packing"] = {"num_gpus": num_gpus, "tokens_per_gpu": budget, "assign": assign}
    dtype_ids = np.int16 if E < 2**15 else np.int32
    meta = TraceMeta(num_experts=E, num_layers=L, top_k=K, model=name, source="moesim.capture", extra=extra)
    return Trace(experts=experts.astype(dtype_ids), meta=meta, weights=weights, home=home, batch=batch
                 ).validate(name)
