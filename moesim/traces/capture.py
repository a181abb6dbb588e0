"""Capture routing traces from a Hugging Face transformers MoE model (optional extra: ``pip install -e
'.[capture]'``).

What is recorded: for every prompt, one forward pass (prefill, batch size 1, no padding, no KV cache), and at
every MoE layer the router's top-k expert ids and gate weights for every token, exactly as the model's own
router computed them. Routers are found by class: transformers >= 5 gives every MoE model a router module
(``MixtralTopKRouter``, ``OlmoeTopKRouter``, ``Qwen2MoeTopKRouter``, ``DeepseekV3TopkRouter``,
``GptOssTopKRouter``, ...); a forward hook on each, in module order, gives the layers in order (dense layers
have no router and are skipped). Without such a class, the ``gate`` (or ``router``) child of every block
that has ``experts`` is hooked (HunYuan's gate module; older releases' plain gate Linear). What the hook
reads depends on what the router returns: ``(logits, top-k weights, top-k indices)`` (or any one integer
top-k tensor with its weights), ``(scores, logits)`` over all experts with the scores zero outside the top-k
(Llama 4), or bare logits, to which softmax, top-k and the model's ``norm_topk_prob`` renormalisation are
applied as those older sparse-MoE blocks do. Prompts are packed onto GPUs and batches like imported logs
(:func:`moesim.traces.readers.pack_requests`). Model and tokenizer come from local files only unless
downloading is allowed.

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
from moesim.traces.readers import ASSIGN_POLICIES, pack_tokens

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


def _in_hf_cache(repo_id: str) -> bool:
    """Whether the Hugging Face cache holds a ``config.json`` of ``repo_id`` (a hub id such as org/name)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return True  # cannot tell: let transformers try
    try:
        hit = try_to_load_from_cache(repo_id, "config.json")
    except (ValueError, OSError):  # not a valid hub id
        return False
    return isinstance(hit, str)


def find_routers(model: Any) -> list[tuple[str, Any, str]]:
    """(name, module, kind) of every router in module order. kind ``router``: a module whose class is named
    like one (``...TopKRouter``, ``...Router``) with a weight; else, kind ``gate``: the ``gate`` or ``router``
    child of every block that also has ``experts`` (older transformers' gate Linear, HunYuan's gate module).
    What a router returns is read at run time (see :func:`capture_model`)."""
    out: list[tuple[str, Any, str]] = []
    for name, module in model.named_modules():
        cls = type(module).__name__
        if cls.endswith(_ROUTER_SUFFIXES) and hasattr(module, "weight"):
            out.append((name, module, "router"))
    if out:
        return out
    for name, module in model.named_modules():  # a block with experts and a gate (or router) child
        if not hasattr(module, "experts"):
            continue
        for attr in ("gate", "router"):
            gate = getattr(module, attr, None)
            if gate is not None and callable(gate) and hasattr(gate, "register_forward_hook"):
                out.append((f"{name}.{attr}" if name else attr, gate, "gate"))
                break
    return out


def _config_int(config: Any, *names: str) -> int | None:
    for n in names:
        v = getattr(config, n, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _need_k(name: str, K: int | None) -> int:
    if K is None:
        raise InputError(f"router {name} returns scores only and the model config names no top-k "
                         "(num_experts_per_tok, top_k, moe_topk)")
    return K


def _scores_logits_picks(torch: Any, name: str, floats: list[Any], k: int) -> tuple[Any, Any]:
    """(scores, logits) over all experts, Llama-4 style: the picks are the top-k logits, their weights the
    scores there (zero elsewhere); which tensor is which is told by the zeros."""
    a, b = (t.reshape(-1, t.shape[-1]) for t in floats)
    if int((a != 0).sum(dim=-1).max()) <= k:
        scores, logits = a, b
    elif int((b != 0).sum(dim=-1).max()) <= k:
        scores, logits = b, a
    else:
        raise InputError(f"router {name} returns two [tokens, experts] tensors, neither zero outside "
                         "the top-k: cannot tell which experts it picked")
    indices = torch.topk(logits, k, dim=-1).indices
    return indices, scores.gather(-1, indices)


def _logits_picks(torch: Any, out: Any, k: int, norm: bool) -> tuple[Any, Any]:
    """A gate Linear's logits: softmax, top-k, renormalised as the sparse-MoE block does."""
    probs = torch.softmax(out.float().reshape(-1, out.shape[-1]), dim=-1)
    weights, indices = torch.topk(probs, k, dim=-1)
    if norm:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return indices, weights


def _router_picks(torch: Any, name: str, output: Any, K: int | None, norm: bool) -> tuple[Any, Any]:
    """(indices, weights) from what a router returned."""
    tensors = [o for o in output if torch.is_tensor(o)] if isinstance(output, (tuple, list)) else [output]
    ints = [t for t in tensors if torch.is_tensor(t) and not t.is_floating_point()]
    floats = [t for t in tensors if torch.is_tensor(t) and t.is_floating_point()]
    if len(ints) == 1:  # top-k indices, with the top-k weights of the same shape: (logits, weights, indices)
        same = [f for f in floats if f.shape == ints[0].shape]
        if len(same) == 1:
            return ints[0], same[0]
    elif not ints and len(floats) == 2 and floats[0].shape == floats[1].shape \
            and floats[0].shape[-1] > _need_k(name, K):
        return _scores_logits_picks(torch, name, floats, _need_k(name, K))
    elif not ints and len(floats) == 1:
        return _logits_picks(torch, floats[0], _need_k(name, K), norm)
    shapes = ", ".join(f"{t.dtype} {tuple(t.shape)}" for t in tensors if torch.is_tensor(t))
    raise InputError(f"router {name} returns {type(output).__name__} of {shapes or 'no tensors'}: not "
                     "(logits, weights, indices), (scores, logits) nor logits, so moesim cannot read its picks")


def _recorder(torch: Any, record: list[tuple[Any, Any]], name: str, K: int | None, norm: bool) -> Any:
    """A forward hook appending the router's (indices [tokens, k], weights [tokens, k]) to ``record``."""
    def hook(_module: Any, _inputs: Any, output: Any) -> None:
        indices, weights = _router_picks(torch, name, output, K, norm)
        record.append((indices.detach().reshape(-1, indices.shape[-1]).cpu(),
                       weights.detach().float().reshape(-1, weights.shape[-1]).cpu()))
    return hook


def _run_prompts(torch: Any, model: Any, prompts: Sequence[Sequence[int]], routers: list[tuple[str, Any, str]],
                 records: list[list[tuple[Any, Any]]], device: str
                 ) -> tuple[list[list[Any]], list[list[Any]], list[int]]:
    """One forward pass per prompt; per router, the picks and weights of every prompt, and the lengths."""
    lengths = []
    experts_parts: list[list[Any]] = [[] for _ in routers]
    weight_parts: list[list[Any]] = [[] for _ in routers]
    model.eval()
    with torch.no_grad():
        for ids in prompts:
            for r in records:
                r.clear()
            model(input_ids=torch.tensor([list(ids)], dtype=torch.long, device=device), use_cache=False)
            n = len(ids)
            for (name, _, _), r in zip(routers, records):
                if len(r) != 1 or r[0][0].shape[0] != n:
                    raise InputError(f"router {name} ran {len(r)} times on {sum(x[0].shape[0] for x in r)} "
                                     f"tokens for a prompt of {n}; cannot attribute its picks")
            for i, r in enumerate(records):
                experts_parts[i].append(r[0][0].numpy())
                weight_parts[i].append(r[0][1].numpy())
            lengths.append(n)
    return experts_parts, weight_parts, lengths


def capture_model(model: Any, prompts: Sequence[Sequence[int]], *, device: str = "cpu"
                  ) -> tuple[np.ndarray, np.ndarray, list[int], int]:
    """Run ``model`` on each prompt (token ids) and return (experts [T, L, K], weights [T, L, K], prompt
    lengths, num_experts), tokens in prompt order."""
    torch, _ = _require()
    config = model.config
    routers = find_routers(model)
    if not routers:
        raise InputError(f"{type(model).__name__}: found no MoE router (no module whose class is named ...Router "
                         "with a weight, no 'gate' or 'router' beside 'experts'): not a mixture-of-experts model, or "
                         "one whose routing moesim cannot read")
    E = _config_int(config, "num_local_experts", "num_experts", "n_routed_experts")
    K = _config_int(config, "num_experts_per_tok", "top_k", "moe_topk")
    norm = bool(getattr(config, "norm_topk_prob", True))
    records: list[list[tuple[Any, Any]]] = [[] for _ in routers]
    handles = [module.register_forward_hook(_recorder(torch, records[i], name, K, norm))
               for i, (name, module, _) in enumerate(routers)]
    if not prompts:
        raise InputError("no prompts")
    try:
        experts_parts, weight_parts, lengths = _run_prompts(torch, model, prompts, routers, records, device)
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
                  trust_remote_code: bool = False, download: bool = False) -> Trace:
    """Capture a :class:`Trace` (with gate weights) from ``model``: a loaded transformers model, or a local
    folder / hub id loaded with ``AutoModelForCausalLM``. Weights (and the tokenizer) must be available locally
    (a folder, or the Hugging Face cache) unless ``download`` lets transformers fetch them.

    Text prompts need ``tokenizer`` (or one saved with the model, loaded before the weights); token-id prompts
    need none. Each prompt is cut to ``max_tokens``. With ``num_gpus``, prompts are packed into batches and
    home GPUs (see :func:`moesim.traces.readers.pack_requests`)."""
    torch, transformers = _require()
    if assign not in ASSIGN_POLICIES:
        raise InputError(f"unknown assignment {assign!r}; valid: {', '.join(ASSIGN_POLICIES)}", field="assign")
    if max_tokens < 1:
        raise InputError(f"must be >= 1, got {max_tokens}", field="max_tokens")
    hub = {"trust_remote_code": trust_remote_code, "local_files_only": not download}
    where = "" if download else " (moesim trace capture reads local files only: a model folder, or the Hugging Face " \
                                "cache; --download lets transformers fetch them)"
    path_given = isinstance(model, (str, os.PathLike))
    name = str(model) if path_given else (getattr(model.config, "_name_or_path", "") or type(model).__name__)
    if path_given and not download and not Path(name).is_dir() and not _in_hf_cache(name):
        raise InputError("no such model folder, and no such model in the Hugging Face cache (moesim trace capture "
                         "reads local files only; --download lets transformers fetch it)", source=name)
    if tokenizer is None and any(isinstance(p, str) for p in prompts):
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(name, **hub)
        except (OSError, ValueError) as exc:
            raise InputError(f"text prompts need the model's tokenizer, which cannot be loaded "
                             f"({' '.join(str(exc).split())[:200]}){where}; or give JSONL input_ids",
                             source=name) from None
    if path_given:
        dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                name, **{dtype_key: getattr(torch, dtype)}, **hub).to(device)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot load the model ({' '.join(str(exc).split())[:300]}){where}",
                             source=name) from None
    ids: list[list[int]] = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            seq = list(tokenizer(p)["input_ids"])
            if not seq and p.strip():
                raise InputError(f"prompt {i} ({p[:40]!r}) tokenizes to no tokens: the tokenizer loaded for {name} "
                                 f"({type(tokenizer).__name__}) has no vocabulary? Save the model's tokenizer with it "
                                 "(tokenizer.json) or give JSONL input_ids")
            ids.append(seq[:max_tokens])
        else:
            ids.append(list(p)[:max_tokens])
    vocab = getattr(model.config, "vocab_size", None)
    for i, seq in enumerate(ids):
        if not seq:
            raise InputError(f"prompt {i} has no tokens")
        if vocab is not None and max(seq) >= vocab:
            raise InputError(f"prompt {i}: token id {max(seq)} >= vocab_size {vocab}")
    experts, weights, lengths, E = capture_model(model, ids, device=device)
    _, L, K = experts.shape
    extra: dict[str, Any] = {"requests": len(lengths), "capture": {"routers": L, "prompts": len(lengths)}}
    home = batch = None
    if num_gpus:
        packing = pack_tokens(np.array(lengths), num_gpus=num_gpus, tokens_per_gpu=tokens_per_gpu, assign=assign)
        experts, weights = experts[packing.perm], weights[packing.perm]
        home, batch = packing.home, packing.batch
        extra["packing"] = packing.to_json()
    dtype_ids = np.int16 if E < 2**15 else np.int32
    meta = TraceMeta(num_experts=E, num_layers=L, top_k=K, model=name, source="moesim.capture", extra=extra)
    return Trace(experts=experts.astype(dtype_ids), meta=meta, weights=weights, home=home, batch=batch
                 ).validate(name)
